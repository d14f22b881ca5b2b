#!/usr/bin/env bash
# Grid-X lab node entry point (hub and workers).
#
# Turns a non-privileged container (cap_add ALL minus SYS_RESOURCE, seccomp and
# AppArmor unconfined, /dev/net/tun, device rule "a *:* rwm") into a small
# machine that can run its own Docker engine and WireGuard:
#   1. makes /sys and the cgroup hierarchies writable, and uncovers what
#      Docker masks in /proc and /sys (for sysctls and userns-remap);
#   2. on cgroup v2 hosts, the usual docker-in-docker cgroup step;
#   3. a fresh container forgets swarm state left in its /var/lib/docker volume
#      by an earlier container (images are kept);
#   4. points Docker Hub's names at 127.0.0.1 in /etc/hosts, so that a pull
#      from there fails at once (the lab cannot reach it);
#   5. starts sshd (host keys made here, unique per container);
#   6. starts dockerd through Debian's init script (`service docker start`,
#      so join.sh can `service docker restart` it);
#   7. waits until `docker info` answers, then sleeps until SIGTERM.
# Readiness: /run/gridx-lab.ready exists once dockerd answers.
# Environment: GRIDX_LAB_DOCKER_WAIT (seconds to wait for dockerd, 60).
set -euo pipefail
export LC_ALL=C

READY=/run/gridx-lab.ready
INSTANCE=/etc/gridx-lab.instance

info() { printf 'gridx-lab: %s\n' "$*"; }
warn() { printf 'gridx-lab: warning: %s\n' "$*" >&2; }

make_kernel_files_writable() {
	# A plain `remount,rw` is refused inside a container; a bind remount works.
	mount -o remount,bind,rw /sys 2>/dev/null || warn "could not remount /sys rw"
	local dir
	for dir in /sys/fs/cgroup /sys/fs/cgroup/*; do
		if [ ! -d "$dir" ] || ! mountpoint -q "$dir"; then
			continue
		fi
		mount -o remount,bind,rw "$dir" 2>/dev/null || warn "could not remount $dir rw"
	done
	unmask_system_paths
}

# Docker covers parts of /proc and /sys in every container: read-only binds
# (/proc/sys, /proc/bus...) and masks (/dev/null over /proc/kcore, empty
# tmpfs over /proc/acpi, /sys/firmware...). Uncovered here, as `docker run
# --security-opt systempaths=unconfined` would (docker-compose cannot pass
# that option: the Docker CLI turns it into empty MaskedPaths/ReadonlyPaths
# and the daemon refuses it by name), because:
# - dockerd and wg-quick set sysctls under /proc/sys;
# - an engine with userns-remap (join.sh turns it on) mounts a fresh proc and
#   sysfs for each container inside a user namespace, which the kernel allows
#   only while the node's own /proc and /sys are wholly visible (nothing
#   mounted over a file or a non-empty folder): else every container fails
#   with "mount proc ... operation not permitted".
# The node has every capability but one already; this hides nothing more.
unmask_system_paths() {
	local target
	# Every mount below /proc, and Docker's masks below /sys (its default
	# list); /sys/fs/cgroup's mounts sit on empty folders and stay.
	awk '$5 ~ /^\/proc\// || $5 == "/sys/firmware" || $5 == "/sys/devices/virtual/powercap" { print $5 }' \
		/proc/self/mountinfo | sort -r | while read -r target; do
		umount "$target" 2>/dev/null || warn "could not unmount $target"
	done
}

setup_cgroup_v2() {
	# cgroup v2 host: move every process out of the root cgroup into a child so
	# that controllers can be enabled for the cgroups dockerd creates.
	[ -f /sys/fs/cgroup/cgroup.controllers ] || return 0
	info "cgroup v2: enabling controllers for nested containers"
	mkdir -p /sys/fs/cgroup/init
	local pid
	while read -r pid; do
		echo "$pid" > /sys/fs/cgroup/init/cgroup.procs 2>/dev/null || :
	done < /sys/fs/cgroup/cgroup.procs
	local controllers
	controllers=$(sed -e 's/ / +/g' -e 's/^/+/' /sys/fs/cgroup/cgroup.controllers)
	echo "$controllers" > /sys/fs/cgroup/cgroup.subtree_control \
		|| warn "could not enable cgroup controllers: $controllers"
}

forget_stale_swarm() {
	# The engine's data lives on a named volume that outlives the container;
	# the container's own files (/etc/gridx, /etc/wireguard, ~/.gridx) do not.
	# A new container therefore starts outside any swarm, keeping the images.
	if [ ! -e "$INSTANCE" ]; then
		if [ -d /var/lib/docker/swarm ]; then
			info "new container: removing swarm state left in /var/lib/docker"
			rm -rf /var/lib/docker/swarm
		fi
		date +%s > "$INSTANCE"
	fi
}

# Docker Hub's names, as dockerd looks them up for a pull of python:3.11:
# docker.io first (before any connection), then the registry, its token
# service and its blob store.
DOCKER_HUB_NAMES="docker.io registry-1.docker.io index.docker.io auth.docker.io production.cloudflare.docker.com"
HOSTS_MARK="# gridx-lab: Docker Hub is out of reach"

# The lab's engines pull a swarm task's image before they run it, as a
# volunteer's do, and the lab's network leads nowhere: each lookup of a
# Docker Hub name waited for the DNS timeout, 10-20 s a task, before the
# engine fell back to the image it has ("pulling image failed"). Pointed at
# 127.0.0.1, where nothing listens on 443, the pull is refused within about
# 30 ms and the task goes on with the local image. The hub's registry is
# named by its address (10.0.0.1:5000): its pulls are untouched. Done here,
# not in docker-compose.yml, so that nodes made with `docker run` (the
# tests' fresh node) get it too; the mark keeps a restarted container that
# kept its /etc/hosts from getting the lines twice.
block_docker_hub() {
	grep -qxF "$HOSTS_MARK" /etc/hosts && return 0
	printf '%s\n127.0.0.1 %s\n' "$HOSTS_MARK" "$DOCKER_HUB_NAMES" >>/etc/hosts
}

start_sshd() {
	ssh-keygen -A >/dev/null
	mkdir -p /run/sshd /root/.ssh
	chmod 0700 /root/.ssh
	rm -f /run/sshd.pid
	/usr/sbin/sshd
}

start_dockerd() {
	local wait=${GRIDX_LAB_DOCKER_WAIT:-60} i
	# A restarted container keeps its /run: drop what the last dockerd left.
	rm -rf "$READY" /run/docker.pid /run/docker-ssd.pid /run/docker.sock \
		/run/docker /run/containerd /run/wireguard
	service docker start >/dev/null
	for ((i = 0; i < wait * 5; i++)); do
		if docker info >/dev/null 2>&1; then
			touch "$READY"
			info "dockerd ready ($(docker info --format '{{.Driver}}'))"
			return 0
		fi
		sleep 0.2
	done
	warn "dockerd did not answer within ${wait}s; last lines of /var/log/docker.log:"
	tail -n 20 /var/log/docker.log >&2 || :
	return 1
}

stop_all() {
	info "stopping"
	rm -f "$READY"
	service docker stop >/dev/null 2>&1 || :
	exit 0
}

main() {
	make_kernel_files_writable
	setup_cgroup_v2
	forget_stale_swarm
	block_docker_hub
	start_sshd
	trap stop_all TERM INT
	start_dockerd || :
	info "$(hostname) up"
	sleep infinity &
	wait $! || :
	stop_all
}

main "$@"
