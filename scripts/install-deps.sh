#!/usr/bin/env bash
# Install what Grid-X's tests and lab need, only when it is missing.
#   scripts/install-deps.sh test   pytest, ruff (pip) and shellcheck (apt)
#   scripts/install-deps.sh lab    Docker engine + compose, WireGuard tools,
#                                  debootstrap, jq; starts dockerd if not running
#   scripts/install-deps.sh debootstrap   debootstrap alone (make demo runs it
#                                  first, then debootstraps while the rest installs)
# Debian/Ubuntu hosts (apt-get); elsewhere it says what to install.
set -euo pipefail
export LC_ALL=C DEBIAN_FRONTEND=noninteractive

info() { printf 'info: %s\n' "$*" >&2; }
fatal() { printf 'error: %s\n' "$*" >&2; exit 3; }

APT_UPDATED=0
apt_install() {
	command -v apt-get >/dev/null 2>&1 || fatal "missing packages: $*; install them with your package manager"
	[ "$(id -u)" -eq 0 ] || fatal "missing packages: $*; run as root or: sudo apt-get install $*"
	if [ "$APT_UPDATED" -eq 0 ]; then
		info "apt-get update"
		apt-get update -qq >/dev/null
		APT_UPDATED=1
	fi
	info "apt-get install $*"
	apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# need_pkg COMMAND PACKAGE: queue PACKAGE when COMMAND is missing.
MISSING=()
need_pkg() {
	command -v "$1" >/dev/null 2>&1 || MISSING+=("$2")
}

install_missing() {
	if [ "${#MISSING[@]}" -gt 0 ]; then
		apt_install "${MISSING[@]}"
		MISSING=()
	fi
}

python_module_missing() {
	! python3 -c "import $1" >/dev/null 2>&1
}

install_test_deps() {
	need_pkg shellcheck shellcheck
	need_pkg bash bash
	install_missing
	local wanted=()
	python_module_missing pytest && wanted+=("pytest")
	python3 -m ruff --version >/dev/null 2>&1 || wanted+=("ruff")
	if [ "${#wanted[@]}" -gt 0 ]; then
		info "pip install ${wanted[*]}"
		python3 -m pip install -q "${wanted[@]}" 2>/dev/null \
			|| python3 -m pip install -q --break-system-packages "${wanted[@]}"
	fi
}

docker_answers() {
	timeout 10 docker info >/dev/null 2>&1
}

# A pid file left by a killed dockerd (or by the containerd it ran) stops the
# next start ("pid file found", "containerd is still running") while that PID
# is a zombie or another process. remove_stale_pidfile FILE PROGRAM
remove_stale_pidfile() {
	local file=$1 program=$2 pid
	[ -f "$file" ] || return 0
	pid=$(cat "$file" 2>/dev/null || :)
	if [[ $pid =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$program" ] \
		&& [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ] \
		&& [ "$(readlink "/proc/$pid/ns/pid")" = "$(readlink /proc/self/ns/pid)" ]; then
		return 0 # a live one on this machine: it may still be starting
	fi
	info "removing $file (left by a $program that is no longer running)"
	rm -f "$file"
}

# wait_dockerd LOG: until `docker info` answers (60 s); fails early when the
# dockerd writing LOG gave up.
wait_dockerd() {
	local _
	for _ in $(seq 1 60); do
		docker_answers && return 0
		if [ -n "$1" ] && grep -q '^failed to start' "$1" 2>/dev/null; then
			tail -n 3 "$1" >&2
			return 1
		fi
		sleep 1
	done
	return 1
}

start_dockerd() {
	docker_answers && return 0
	command -v dockerd >/dev/null 2>&1 || return 1
	if [ -d /run/systemd/system ]; then
		systemctl start docker || true
		wait_dockerd "" || fatal "dockerd did not start: see journalctl -u docker"
		return 0
	fi
	local try log
	for try in 1 2; do
		# a second try: the PIDs of a daemon killed just before may be reaped now
		remove_stale_pidfile /var/run/docker.pid dockerd
		remove_stale_pidfile /var/run/docker/containerd/containerd.pid containerd
		if [ -x /etc/init.d/docker ] && service docker start >/dev/null 2>&1; then
			log=""
		else
			log=/var/log/dockerd.log
			info "starting dockerd (log: $log)"
			setsid dockerd >"$log" 2>&1 </dev/null &
		fi
		wait_dockerd "$log" && return 0
		[ "$try" -eq 2 ] || info "dockerd did not start: trying once more"
	done
	fatal "dockerd did not start: see ${log:-/var/log/docker.log}"
}

install_lab_deps() {
	need_pkg dockerd docker.io
	need_pkg docker docker.io
	if ! docker compose version >/dev/null 2>&1; then
		need_pkg docker-compose docker-compose
	fi
	need_pkg wg wireguard-tools
	need_pkg wireguard-go wireguard-go
	need_pkg debootstrap debootstrap
	need_pkg ip iproute2
	need_pkg iptables iptables
	need_pkg ssh openssh-client
	need_pkg curl curl
	# e2e tests copy the host's jq into a worker-like node (join.sh merges daemon.json with it)
	need_pkg jq jq
	install_missing
	start_dockerd
}

install_debootstrap() {
	need_pkg debootstrap debootstrap
	install_missing
}

case "${1:-}" in
	test) install_test_deps ;;
	lab) install_lab_deps ;;
	debootstrap) install_debootstrap ;;
	*) printf 'usage: %s test|lab|debootstrap\n' "$0" >&2; exit 2 ;;
esac
