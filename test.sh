#!/usr/bin/env bash
# Grid-X local lab: 1 hub + 3 workers as containers, each with its own Docker
# engine, sshd and WireGuard (userspace wireguard-go where the kernel has no
# module), on the private bridge network gridx-lab (172.29.240.0/24).
#
# Usage: ./test.sh COMMAND [ARGS]   (./test.sh help for the list)
#
# Environment:
#   GRIDX_LAB_SUITE       Debian suite the nodes run: bookworm (Debian 12,
#                         Docker 20.10; the default), trixie (Debian 13,
#                         Docker 26.1) or forky (Debian testing, Docker
#                         28.5). Images are tagged per suite
#                         (gridx-lab-node:SUITE, gridx-lab-hub:SUITE), so both
#                         can exist side by side; a lab keeps its suite until
#                         it is cleaned.
#   GRIDX_LAB_BASE_IMAGE  base image for the nodes (default: debian:SUITE-slim
#                         when present or pullable, else gridx-lab-base:SUITE
#                         built here with debootstrap)
#   GRIDX_LAB_CACHE       where the debootstrap trees are kept, one per suite
#                         (/var/cache/gridx-lab/rootfs-SUITE)
#   GRIDX_LAB_MIRROR      Debian mirror for debootstrap (default: the one in
#                         /etc/apt/sources.list.d, else http://deb.debian.org/debian)
#   GRIDX_LAB_TIMEOUT     seconds to wait for every node's dockerd (120)
#   GRIDX_LAB_CPUS        CPUs each worker shares (4, or nproc when fewer)
#   GRIDX_LAB_JOB_TIMEOUT seconds test-job / test-gpu wait for a job (300)
#   GRIDX_LAB_NAME        name of this lab (gridx-lab): its containers are
#                         NAME-hub, NAME-worker1.., its network NAME; several
#                         labs can run side by side (images are shared by
#                         the labs of one suite)
#   GRIDX_LAB_NET         first three octets of its /24 (172.29.240): hub .10,
#                         workers .11 .12 .13; must not overlap 10.0.0.0/24
#   NO_COLOR              plain output
#
# Exit status: 0 ok, 1 a step failed, 2 bad usage, 3 a prerequisite is missing.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT=${GRIDX_LAB_NAME:-gridx-lab}
LAB_NET=${GRIDX_LAB_NET:-172.29.240}
export GRIDX_LAB_NAME=$PROJECT GRIDX_LAB_NET=$LAB_NET # for docker-compose.yml
PREFIX=$PROJECT-
HUB=${PREFIX}hub
WORKERS=(worker1 worker2 worker3)
HUB_IP=$LAB_NET.10
LAB_LABEL=io.gridx.lab          # on every image the lab builds
NAME_LABEL=io.gridx.lab.name    # on every container of this lab: its name
SUITE_LABEL=io.gridx.lab.suite  # on every container of this lab: its suite
SUITES=(bookworm trixie forky)
# Debian testing: newer than this machine's debootstrap may know (see
# debootstrap_script), and its Release file can be served past Valid-Until
# (allow_expired_release).
TESTING_SUITES=(forky)
SUITE=${GRIDX_LAB_SUITE:-bookworm}
export GRIDX_LAB_SUITE=$SUITE # for docker-compose.yml
NODE_IMAGE=gridx-lab-node:$SUITE
HUB_IMAGE=gridx-lab-hub:$SUITE
# The job images are the same for every suite: python:3.11 must hold Python
# 3.11, which is bookworm's python3 (trixie's is 3.13).
JOB_SUITE=bookworm
# What every node holds from the start (python:3.11: most tests' jobs); the
# Jupyter image (two thirds of the bytes, one test) is built and pushed to the
# hub's registry only when asked for (./test.sh push-image), and the worker
# that runs it pulls it then.
JOB_IMAGES=(python:3.11)
JUPYTER_IMAGE=gridx-lab-jupyter:latest
BUNDLE_DIR=/etc/gridx/bundles
CACHE=${GRIDX_LAB_CACHE:-/var/cache/gridx-lab}
TIMEOUT=${GRIDX_LAB_TIMEOUT:-120}
# worker -> extra join.sh flags (worker3 shares two made-up GPUs)
declare -A JOIN_EXTRA=([worker3]="--gpus 2 --gpu-ids GPU-fake-0000,GPU-fake-0001")
# join.sh refuses to share more CPUs than the machine has: 4, or fewer here.
LAB_CPUS=${GRIDX_LAB_CPUS:-$(n=$(nproc 2>/dev/null || echo 1); echo $((n < 4 ? n : 4)))}
JOIN_FLAGS=(--yes --cpus "$LAB_CPUS" --memory 4G)
COMPOSE=()

# ---------------------------------------------------------------- output ----

if [ -t 2 ] && [ -z "${NO_COLOR:-}" ]; then
	BOLD=$'\e[1m' RED=$'\e[31m' YELLOW=$'\e[33m' RESET=$'\e[0m'
else
	BOLD='' RED='' YELLOW='' RESET=''
fi
info() { printf '%s[lab]%s %s\n' "$BOLD" "$RESET" "$*" >&2; }
warn() { printf '%s[lab] warning:%s %s\n' "$YELLOW" "$RESET" "$*" >&2; }
die() { # die CODE MESSAGE [HINT]
	printf '%s[lab] error:%s %s\n' "$RED" "$RESET" "$2" >&2
	[ -z "${3:-}" ] || printf '[lab] hint: %s\n' "$3" >&2
	exit "$1"
}
echo_run() { printf '[#] %s\n' "$*" >&2; "$@"; }

# stage NAME FUNCTION [ARGS...]: run a step and print how long it took.
stage() {
	local name=$1 t0=$EPOCHREALTIME
	shift
	info "== $name"
	"$@"
	info "== $name: done in $(elapsed "$t0")s"
}
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

usage() {
	cat <<EOF
Usage: ./test.sh COMMAND [ARGS]

Grid-X local lab: a hub and 3 workers as containers (each its own dockerd,
sshd and WireGuard) on the private network $LAB_NET.0/24 (lab $PROJECT,
Debian $SUITE).

Commands:
  start               build the images (base image too when it cannot be
                      pulled), start the containers, wait for every dockerd,
                      load python:3.11 into every node (a worker's into the
                      store its engine uses once joined)
  setup               hub init, add-peer + join.sh for worker1..3 (worker3
                      shares 2 made-up GPUs), start gridx hub watch in the
                      hub; idempotent (start put python:3.11 into every node)
  job-images          build (or pull) every job image the tests use, the
                      Jupyter one too, and start nothing
  rootfs              debootstrap now the trees start will build base images
                      from (Docker need not run yet; make demo does this
                      while Docker is being installed)
  push-image IMAGE    IMAGE into the hub and its registry (prints the name
                      workers pull it by); $JUPYTER_IMAGE is built
                      first when missing
  status              gridx hub status and gridx cluster (nodes, VPN addresses)
  ssh WORKER [CMD..]  gridx hub ssh WORKER [-- CMD] from the hub
  add-external NAME   add a peer NAME and copy its bundle to ./gridx-NAME-bundle
  test-job            run python:3.11 "python -c 'print(2**100)'" and wait
  test-gpu            a --gpus 1 job (shows the GPU it got) and a --gpus 3 job
                      that must be refused
  cluster             gridx cluster on the hub
  suite               the Debian suite the lab's containers run (bookworm, trixie, forky)
  logs NODE [OPTS]    docker logs of hub, worker1.. (or a full container name)
  exec NODE CMD..     run CMD in a node container (docker exec)
  clean [--keep-images]
                      remove every container, volume, network and image of the lab
                      (the images stay while another lab on this machine uses
                      them, or with --keep-images)
  help                this text

Typical: ./test.sh start && ./test.sh setup && ./test.sh test-job
Debian 13 (Docker 26.1) instead of 12 (Docker 20.10): GRIDX_LAB_SUITE=trixie;
Debian testing (Docker 28.5): GRIDX_LAB_SUITE=forky
EOF
}

# ----------------------------------------------------------- prerequisites --

need_cmd() {
	command -v "$1" >/dev/null 2>&1 \
		|| die 3 "'$1' is not installed" "${2:-apt-get install -y $1}"
}

need_docker() {
	need_cmd docker docker.io
	docker info >/dev/null 2>&1 \
		|| die 3 "Docker is not running (docker info failed)" \
			"start it: setsid dockerd >/var/log/dockerd.log 2>&1 &"
}

# ----------------------------------------------------------- stale ports --
# When Docker's daemon is killed without stopping the containers (a CI runner
# ending a session's processes, `kill -9 dockerd`), the restarted daemon marks
# the lab's containers exited and their processes die, but the kernel can keep
# a dead node's network namespace for minutes (no process holds it, and no
# mount), and with it the node's address on the lab bridge. A new node given
# that address shares it with the dead one: pings answer, while WireGuard
# packets go to the dead namespace and no join gets a handshake. Cutting
# those bridge ports (the veth of a namespace no running container owns)
# takes the dead addresses off the bridge.

# stale_ports: the lab bridge's ports that lead to no running container.
# Prints nothing when it cannot tell (a failed docker or nsenter call).
stale_ports() {
	local bridge ids pids pid links peers=" " idx name _
	bridge=br-$(docker network inspect -f '{{.Id}}' "$PROJECT" 2>/dev/null | cut -c1-12)
	[ "$bridge" != br- ] && [ -e "/sys/class/net/$bridge" ] || return 0
	ids=$(docker ps -q --filter "network=$PROJECT") || return 0
	if [ -n "$ids" ]; then
		# shellcheck disable=SC2086 # a list of container IDs
		pids=$(docker inspect -f '{{.State.Pid}}' $ids) || return 0
		for pid in $pids; do
			# a container's links name their bridge-side peer: eth0@if763
			links=$(nsenter -t "$pid" -n ip -o link) || return 0
			peers+="$(sed -n 's/^[0-9]*: [^@]*@if\([0-9]*\):.*/\1/p' <<<"$links" | tr '\n' ' ') "
		done
	fi
	while read -r idx name _; do
		[[ $peers == *" ${idx%:} "* ]] || printf '%s\n' "${name%%@*}"
	done < <(ip -o link show master "$bridge")
}

cut_stale_ports() {
	[ "$(id -u)" -eq 0 ] || return 0 # nsenter and ip link delete need root
	local port ports
	ports=$(stale_ports)
	[ -n "$ports" ] || return 0
	warn "the lab bridge still carries $(wc -l <<<"$ports") dead node(s) of a killed Docker daemon," \
		"with the addresses the lab's nodes use: removing their links (${ports//$'\n'/ }))"
	for port in $ports; do
		ip link delete "$port" 2>/dev/null || [ ! -e "/sys/class/net/$port" ] \
			|| die 1 "cannot remove $port from the lab bridge" "ip link delete $port"
	done
}

pick_compose() {
	[ "${#COMPOSE[@]}" -eq 0 ] || return 0
	if docker compose version >/dev/null 2>&1; then
		COMPOSE=(docker compose)
	elif command -v docker-compose >/dev/null 2>&1; then
		COMPOSE=(docker-compose)
	else
		die 3 "neither 'docker compose' nor 'docker-compose' is installed" \
			"apt-get install -y docker-compose"
	fi
}

compose() {
	pick_compose
	"${COMPOSE[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"
}

# node NAME -> container name (hub, worker1 or a full gridx-lab-* name)
node() {
	case $1 in
		"$PREFIX"*) printf '%s\n' "$1" ;;
		*) printf '%s%s\n' "$PREFIX" "$1" ;;
	esac
}

in_node() { # in_node NAME CMD...
	local c
	c=$(node "$1")
	shift
	docker exec "$c" "$@"
}

gridx_hub() { docker exec "$HUB" gridx "$@"; }

# gridx_job ARGS: `gridx jobs run ARGS --wait` in the hub, stopped after
# GRIDX_LAB_JOB_TIMEOUT seconds (exit 124) so a job that never ends cannot
# hang the caller.
gridx_job() {
	local rc=0 limit=${GRIDX_LAB_JOB_TIMEOUT:-300}
	docker exec "$HUB" timeout "$limit" gridx jobs run --wait "$@" || rc=$?
	[ "$rc" -ne 124 ] || warn "the job did not finish within ${limit}s (GRIDX_LAB_JOB_TIMEOUT)"
	return "$rc"
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# -------------------------------------------------------------- base image --

# The Debian mirror: GRIDX_LAB_MIRROR, else the first non-security Debian URI
# in /etc/apt/sources.list(.d), else deb.debian.org.
debian_mirror() {
	if [ -n "${GRIDX_LAB_MIRROR:-}" ]; then
		printf '%s\n' "$GRIDX_LAB_MIRROR"
		return
	fi
	local uri
	uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
		/etc/apt/sources.list.d/*.list 2>/dev/null \
		| awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }
		       /^deb / { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' \
		| grep -E '/debian/?$' | head -n 1 || :)
	printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

# debootstrap_script SUITE: the debootstrap script that builds SUITE. A
# debootstrap older than the suite has none for it: Debian testing (forky,
# while Debian 13 is stable) is built as unstable is, from sid's script, as
# bookworm's debootstrap does for its own testing (its trixie and testing are
# links to sid). Fails for a suite it cannot build.
debootstrap_script() {
	local dir=/usr/share/debootstrap/scripts
	if [ -e "$dir/$1" ]; then
		printf '%s\n' "$dir/$1"
	elif [[ " ${TESTING_SUITES[*]} " == *" $1 "* ]] && [ -e "$dir/sid" ]; then
		printf '%s\n' "$dir/sid"
	else
		return 1
	fi
}

# allow_expired_release SUITE ROOTFS: apt in a testing suite's tree accepts
# a Release file past its Valid-Until. Testing's Release files carry one
# (stable's do not), and a mirror that is a snapshot, such as this machine's,
# goes on serving the one it has ("is expired (invalid since 31d)"): every
# apt-get update in the images' builds would fail. The signatures are still
# checked. Written at each import, so a tree debootstrapped earlier gets it.
allow_expired_release() {
	[[ " ${TESTING_SUITES[*]} " == *" $1 "* ]] || return 0
	printf '%s\n' '// gridx lab (test.sh): the mirror may serve an expired Release of Debian testing' \
		'Acquire::Check-Valid-Until "false";' >"$2/etc/apt/apt.conf.d/99gridx-lab-valid-until"
}

# build_base_image SUITE: gridx-lab-base:SUITE from a debootstrap tree of
# SUITE, kept in $CACHE/rootfs-SUITE for the next build.
build_base_image() {
	local suite=$1 rootfs=$CACHE/rootfs-$1
	make_rootfs "$suite"
	allow_expired_release "$suite" "$rootfs"
	info "docker import $rootfs as gridx-lab-base:$suite"
	tar -C "$rootfs" --exclude=./.gridx-complete -c . \
		| docker import --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
			--change "LABEL $LAB_LABEL=1" - "gridx-lab-base:$suite" >/dev/null
}

# make_rootfs SUITE: the debootstrap tree of SUITE in $CACHE/rootfs-SUITE,
# unless a complete one is there.
make_rootfs() {
	local suite=$1 mirror rootfs=$CACHE/rootfs-$1 log=$CACHE/debootstrap-$1.log script
	[ ! -e "$rootfs/.gridx-complete" ] || return 0
	[ "$(id -u)" -eq 0 ] || die 3 "building the base image with debootstrap needs root" \
		"sudo ./test.sh start"
	need_cmd debootstrap
	script=$(debootstrap_script "$suite") \
		|| die 3 "this debootstrap does not know Debian $suite" "apt-get install -y debootstrap (a newer one)"
	mirror=$(debian_mirror)
	info "debootstrap $suite from $mirror into $rootfs (about a minute)"
	rm -rf "$rootfs"
	mkdir -p "$CACHE"
	echo_run debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" "$script" >"$log" 2>&1 \
		|| { tail -n 20 "$log" >&2; die 1 "debootstrap $suite failed (log: $log)"; }
	rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
		"$rootfs"/var/cache/apt/*.bin
	touch "$rootfs/.gridx-complete"
}

# ./test.sh rootfs: the debootstrap trees start will need (the lab's suite
# and the job images' one), made now. Docker need not run yet: make demo runs
# this while the machine's Docker is still being installed. Where Docker
# answers and a base image is here already, nothing is needed.
cmd_rootfs() {
	[ $# -eq 0 ] || die 2 "usage: ./test.sh rootfs (no arguments)"
	local suite t0=$EPOCHREALTIME
	for suite in $(printf '%s\n' "$SUITE" "$JOB_SUITE" | sort -u); do
		if docker info >/dev/null 2>&1 \
			&& { image_exists "debian:$suite-slim" || image_exists "gridx-lab-base:$suite" \
				|| { [ "$suite" != "$SUITE" ] && image_exists python:3.11; }; }; then
			info "the images $suite's tree would make are here: no debootstrap"
			continue
		fi
		make_rootfs "$suite"
	done
	info "debootstrap trees ready in $(elapsed "$t0")s"
}

# base_image SUITE: prints the base image to build SUITE's images from:
# debian:SUITE-slim when here or pullable, else gridx-lab-base:SUITE (built
# with debootstrap when missing). GRIDX_LAB_BASE_IMAGE overrides the nodes'.
base_image() {
	local suite=$1 pull=debian:$1-slim local=gridx-lab-base:$1
	if [ -n "${GRIDX_LAB_BASE_IMAGE:-}" ] && [ "$suite" = "$SUITE" ]; then
		image_exists "$GRIDX_LAB_BASE_IMAGE" || docker pull "$GRIDX_LAB_BASE_IMAGE" >&2 \
			|| die 1 "GRIDX_LAB_BASE_IMAGE=$GRIDX_LAB_BASE_IMAGE is neither here nor pullable"
		printf '%s\n' "$GRIDX_LAB_BASE_IMAGE"
	elif image_exists "$pull"; then
		printf '%s\n' "$pull"
	elif image_exists "$local"; then
		printf '%s\n' "$local"
	elif timeout 120 docker pull "$pull" >&2; then
		printf '%s\n' "$pull"
	else
		warn "cannot pull $pull: building $local locally with debootstrap"
		build_base_image "$suite"
		printf '%s\n' "$local"
	fi
}

ensure_base_image() {
	BASE_IMAGE=$(base_image "$SUITE")
	info "base image ($SUITE): $BASE_IMAGE"
}

# ------------------------------------------------------------------ images --

build_target() { # build_target TARGET TAG [BASE]  (BASE: $BASE_IMAGE)
	# The build context is lab/ only (small, no .git); Dockerfile sits at the top.
	local log base=${3:-$BASE_IMAGE}
	log=$(mktemp)
	printf '[#] docker build --target %s -t %s (BASE_IMAGE=%s)\n' "$1" "$2" "$base" >&2
	if ! docker build -f "$ROOT/Dockerfile" --target "$1" \
		--build-arg "BASE_IMAGE=$base" -t "$2" "$ROOT/lab" >"$log" 2>&1; then
		tail -n 30 "$log" >&2
		rm -f "$log"
		die 1 "docker build --target $1 failed"
	fi
	rm -f "$log"
}

build_images() {
	export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}
	docker buildx version >/dev/null 2>&1 && DOCKER_BUILDKIT=1
	build_target node "$NODE_IMAGE"
	build_target hub "$HUB_IMAGE"
	info "$NODE_IMAGE: $(docker run --rm --entrypoint dockerd "$NODE_IMAGE" --version)"
}

# job_base_image: the base the job images are built from ($JOB_SUITE's).
job_base_image() {
	if [ "$SUITE" = "$JOB_SUITE" ] && [ -n "${BASE_IMAGE:-}" ]; then
		printf '%s\n' "$BASE_IMAGE"
	else
		base_image "$JOB_SUITE"
	fi
}

# ensure_image IMAGE TARGET: IMAGE here: present, pulled where a registry
# answers, else built (Dockerfile target TARGET) from the $JOB_SUITE base and
# labelled as the lab's own. Shared by every suite's lab.
ensure_image() {
	if image_exists "$1"; then
		info "job image $1 present"
	elif timeout 120 docker pull "$1" >&2; then
		info "job image $1 pulled"
	else
		local base
		base=$(job_base_image)
		info "cannot pull $1: building it from $base"
		build_target "$2" "$1" "$base"
	fi
}

ensure_job_images() { ensure_image python:3.11 job-python; }

# ./test.sh job-images: every job image the tests use, the Jupyter one too,
# built (or pulled) now; nothing started. make test runs it once before the
# suites' labs start side by side, so that they do not build it at once.
cmd_job_images() {
	[ $# -eq 0 ] || die 2 "usage: ./test.sh job-images (no arguments)"
	need_docker
	export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}
	docker buildx version >/dev/null 2>&1 && DOCKER_BUILDKIT=1
	ensure_image python:3.11 job-python
	ensure_image "$JUPYTER_IMAGE" job-jupyter
}

# build_all_images: the job image builds (when missing) while the node and
# hub images do: each waits on the mirror and on apt part of the time.
build_all_images() {
	local job
	ensure_job_images &
	job=$!
	build_images
	wait "$job" || die 1 "the job image python:3.11 could not be made"
}

# ------------------------------------------------------------------ start ---

wait_nodes_ready() {
	local deadline=$((SECONDS + TIMEOUT)) n pending
	while :; do
		pending=()
		for n in hub "${WORKERS[@]}"; do
			in_node "$n" test -e /run/gridx-lab.ready 2>/dev/null || pending+=("$n")
		done
		[ "${#pending[@]}" -gt 0 ] || return 0
		if [ "$SECONDS" -ge "$deadline" ]; then
			for n in "${pending[@]}"; do
				warn "$n: dockerd not ready; its log:"
				docker logs --tail 20 "$(node "$n")" >&2 || :
				in_node "$n" tail -n 20 /var/log/docker.log >&2 || :
			done
			die 1 "nodes not ready after ${TIMEOUT}s: ${pending[*]}" "./test.sh logs ${pending[0]}"
		fi
		sleep 0.5
	done
}

# lab_suite: prints the suite the lab's containers were made for; fails when
# the lab has no hub container. Containers made before suites existed are
# bookworm's.
lab_suite() {
	local running
	running=$(docker inspect -f '{{index .Config.Labels "'"$SUITE_LABEL"'"}}' "$HUB" 2>/dev/null) || return 1
	running=${running#<no value>}
	printf '%s\n' "${running:-bookworm}"
}

# A lab keeps the suite it was started with: its engines' data (volumes) are
# that Docker's.
check_lab_suite() {
	local running
	running=$(lab_suite) || return 0
	[ "$running" = "$SUITE" ] \
		|| die 2 "the lab $PROJECT runs Debian $running, not $SUITE (GRIDX_LAB_SUITE)" \
			"remove it first: GRIDX_LAB_NAME=$PROJECT ./test.sh clean --keep-images; or pick another GRIDX_LAB_NAME and GRIDX_LAB_NET"
}

cmd_start() {
	[ $# -eq 0 ] || die 2 "usage: ./test.sh start (no arguments)"
	need_docker
	pick_compose
	check_lab_suite
	local t0=$EPOCHREALTIME
	info "lab $PROJECT on $LAB_NET.0/24, Debian $SUITE"
	stage "base image" ensure_base_image
	export GRIDX_LAB_BASE_IMAGE=$BASE_IMAGE
	stage "build node + hub images, and the job image beside them" build_all_images
	stage "compose up -d" compose up -d --no-build
	stage "dead nodes of a killed Docker daemon" cut_stale_ports
	stage "wait for dockerd in every node" wait_nodes_ready
	stage "job images into every node" preload_job_images
	info "lab up in $(elapsed "$t0")s; next: ./test.sh setup"
}

# ------------------------------------------------------------------ setup ---

need_lab() {
	need_docker
	local state
	state=$(docker inspect -f '{{.State.Running}}' "$HUB" 2>/dev/null || :)
	[ "$state" = true ] || die 3 "the lab is not running" "./test.sh start"
}

# Run again on an initialised hub it changes nothing, except what is not
# running: the lab has no systemd, so after a restart init starts both sides
# of the image registry again (a real hub's gridx-registry.service and
# gridx-registry-writer.service do that).
hub_init() {
	if docker exec "$HUB" test -e /etc/gridx/hub_config.json; then
		info "hub already initialised"
		gridx_hub hub init --ip "$HUB_IP" >/dev/null
		return 0
	fi
	echo_run gridx_hub hub init --ip "$HUB_IP"
}

# bundle_path NAME: the bundle folder add-peer wrote on the hub. Adds the peer
# first when it does not exist yet.
bundle_path() {
	local name=$1 out path=$BUNDLE_DIR/gridx-$1-bundle
	if ! docker exec "$HUB" test -d "$path"; then
		out=$(gridx_hub hub add-peer "$name" 2>&1) || { printf '%s\n' "$out" >&2; die 1 "add-peer $name failed"; }
		printf '%s\n' "$out" >&2
		if ! docker exec "$HUB" test -d "$path"; then
			# add-peer printed somewhere else: take the first path it names.
			path=$(printf '%s\n' "$out" | grep -oE "/[^ '\"]*gridx-$name-bundle" | head -n 1 || :)
			if [ -z "$path" ] || ! docker exec "$HUB" test -d "$path"; then
				die 1 "cannot find the bundle of $name on the hub"
			fi
		fi
	fi
	printf '%s\n' "$path"
}

# copy_bundle WORKER PATH: hub -> host -> worker:/root, modes kept (tar stream).
copy_bundle() {
	local worker=$1 path=$2
	docker exec "$(node "$worker")" rm -rf "/root/$(basename "$path")"
	docker cp "$HUB:$path" - | docker cp - "$(node "$worker"):/root/"
}

# A worker is done when join.sh recorded its join and its engine is in the swarm.
# swarm_state NODE: its engine's swarm state (active, pending, error...), or nothing.
swarm_state() { in_node "$1" docker info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null || :; }

# wait_swarm_active NODE WHAT: until NODE's engine is active in the swarm.
wait_swarm_active() {
	local deadline=$((SECONDS + TIMEOUT))
	until [ "$(swarm_state "$1")" = active ]; do
		[ "$SECONDS" -lt "$deadline" ] || die 1 "$2" "./test.sh logs $1"
		sleep 0.5
	done
}

# joined_before NODE: join.sh's record is on NODE: /var/lib/gridx/state.env
# (join.sh's state folder, as in bundle_templates/lib.sh), or
# /root/.gridx/state.env where an older join.sh joined the lab.
joined_before() {
	in_node "$1" sh -c 'test -e /var/lib/gridx/state.env || test -e /root/.gridx/state.env'
}

worker_joined() {
	[ "$(swarm_state "$1")" = active ] || return 1
	joined_before "$1" \
		|| die 1 "$1 is in a swarm that join.sh did not set up" \
			"start afresh: ./test.sh clean && ./test.sh start && ./test.sh setup"
}

# join_worker WORKER [PATH]: join.sh in WORKER, with the bundle at PATH on
# the hub (copied in first); a failed join is shown and tried once more.
join_worker() {
	local w=$1 path=${2:-}
	[ -n "$path" ] || path=$(bundle_path "$w")
	copy_bundle "$w" "$path"
	local extra=()
	read -r -a extra <<<"${JOIN_EXTRA[$w]:-}"
	local join=("/root/$(basename "$path")/join.sh" "${JOIN_FLAGS[@]}" "${extra[@]}")
	echo_run in_node "$w" "${join[@]}" && return 0
	# join.sh rolled back what it changed: show why, then try once more
	# (a retry is what a volunteer would do; the diagnostics say what to fix).
	join_diagnostics "$w"
	warn "join of $w failed: running join.sh once more"
	echo_run in_node "$w" "${join[@]}" || die 1 "join of $w failed twice" "./test.sh logs $w"
}

# join_workers: every worker not in the swarm yet joins. The hub makes their
# bundles one after another (add-peer changes its WireGuard and state); the
# workers then run join.sh at the same time, as volunteers' machines would:
# each join waits mostly on its own engine's restart and the swarm.
join_workers() {
	local w pids=() names=() path i failed=0 t0=$EPOCHREALTIME
	for w in "${WORKERS[@]}"; do
		if worker_joined "$w"; then
			info "$w already in the swarm"
		elif joined_before "$w"; then
			info "$w joined before this restart: waiting for it to be back in the swarm"
			wait_swarm_active "$w" "$w joined before but is not back in the swarm"
		else
			path=$(bundle_path "$w")
			join_worker "$w" "$path" &
			pids+=("$!") names+=("$w")
		fi
	done
	for i in "${!pids[@]}"; do
		wait "${pids[$i]}" || { warn "join of ${names[$i]} failed"; failed=1; }
	done
	[ "$failed" -eq 0 ] || die 1 "a worker could not join" "./test.sh logs WORKER"
	[ "${#pids[@]}" -eq 0 ] || info "joined ${names[*]} in $(elapsed "$t0")s"
}

# What to look at when a worker cannot join: both ends' WireGuard, the hub's
# UDP sockets and firewall, the route and a ping over the lab's bridge.
join_diagnostics() {
	warn "diagnostics for $1: the hub's WireGuard, UDP sockets and INPUT firewall"
	docker exec "$HUB" sh -c 'wg show; ss -uanp; iptables -S INPUT; iptables -S GRIDX-INPUT' >&2 || :
	warn "diagnostics for $1: its route and ping to the hub's bridge address"
	in_node "$1" sh -c "ip route get $HUB_IP; ping -c 2 -W 2 $HUB_IP" >&2 || :
	if [ "$(id -u)" -eq 0 ]; then
		warn "diagnostics for $1: lab bridge ports that lead to no running container: $(stale_ports | tr '\n' ' ')"
	fi
}

# Job images are where jobs need them before setup begins: `start` loads
# them into the hub's engine, and into each worker's remapped store before
# the worker joins (lab/seed-images.sh: join.sh turns on userns-remap, whose
# engine keeps its images apart), from one uncompressed `docker save` stream
# per node, all nodes at once. Nothing is compressed or sent over the VPN,
# and setup waits for none of it. The hub's registry is still what real hubs
# use: the tests that check it push images there and have workers pull them
# over the VPN (./test.sh push-image; the Jupyter image comes to its worker
# that way, when its test runs). A task of python:3.11 asks Docker Hub first,
# as on a volunteer's machine, and is refused at once (lab/entrypoint.sh);
# its engine then runs the image it has.
JOB_IDS=() # the machine's image ID of each of JOB_IMAGES (job_image_ids)

job_image_ids() {
	[ "${#JOB_IDS[@]}" -eq 0 ] || return 0
	local ids
	ids=$(docker image inspect -f '{{.Id}}' "${JOB_IMAGES[@]}") \
		|| die 1 "the job images are missing here" "./test.sh start"
	mapfile -t JOB_IDS <<<"$ids"
}

# node_images NODE: "REPOSITORY:TAG ID" for every image NODE's engine has
# (one docker exec instead of one per image and name).
node_images() {
	in_node "$1" docker images --no-trunc --format '{{.Repository}}:{{.Tag}} {{.ID}}' 2>/dev/null || :
}

# has_image LIST IMAGE ID: node_images LIST shows IMAGE as ID.
has_image() { grep -qxF "$2 $3" <<<"$1"; }

# missing_images NODE: the JOB_IMAGES its engine lacks now, one a line.
missing_images() {
	local have i
	have=$(node_images "$1")
	for i in "${!JOB_IMAGES[@]}"; do
		has_image "$have" "${JOB_IMAGES[$i]}" "${JOB_IDS[$i]}" || printf '%s\n' "${JOB_IMAGES[$i]}"
	done
}

# remapped NODE: its engine runs with userns-remap (the worker has joined).
remapped() {
	[[ $(in_node "$1" docker info --format '{{range .SecurityOptions}}{{.}} {{end}}' 2>/dev/null) == *name=userns* ]]
}

# load_images NODE IMAGE...: into NODE's engine as it runs now.
load_images() {
	local n=$1 t0=$EPOCHREALTIME
	shift
	docker save "$@" | docker exec -i "$(node "$n")" docker load -q >/dev/null \
		|| { warn "docker load of $* into $n failed"; return 1; }
	info "$n: loaded $* in $(elapsed "$t0")s"
}

# seed_worker WORKER: the job images into the store WORKER's engine will use
# once joined (lab/seed-images.sh), unless they are there already.
seed_worker() {
	local w=$1 i pairs=() t0=$EPOCHREALTIME out
	for i in "${!JOB_IMAGES[@]}"; do pairs+=("${JOB_IMAGES[$i]}=${JOB_IDS[$i]}"); done
	out=$(docker save "${JOB_IMAGES[@]}" \
		| docker exec -i "$(node "$w")" bash -c "$(cat "$ROOT/lab/seed-images.sh")" seed-images "${pairs[@]}" 2>&1) \
		|| { printf '%s\n' "$out" >&2; warn "$w: the job images could not be put into its remapped store"; return 1; }
	[[ $out == *"already there"* ]] || info "$w: ${JOB_IMAGES[*]} in its remapped store in $(elapsed "$t0")s"
}

# preload_node NODE: what NODE needs before setup: the hub (never remapped)
# and a joined worker get the images into their engine, a worker that has
# not joined into its remapped store.
preload_node() {
	local n=$1 missing
	mapfile -t missing < <(missing_images "$n")
	if [ "$n" = hub ] || remapped "$n"; then
		[ "${#missing[@]}" -eq 0 ] || load_images "$n" "${missing[@]}"
	else
		seed_worker "$n"
	fi
}

# preload_job_images: every node at once. A worker left without them is not
# fatal here: setup loads them after its join (slower).
preload_job_images() {
	job_image_ids
	local n pids=() names=() i
	for n in hub "${WORKERS[@]}"; do
		preload_node "$n" &
		pids+=("$!") names+=("$n")
	done
	for i in "${!pids[@]}"; do
		wait "${pids[$i]}" || warn "${names[$i]}: the job images are not there yet (setup loads them)"
	done
}

# nodes_have_images: after the joins, every node's engine holds every job
# image; one that lacks some (a seed that failed, a lab started by an older
# test.sh) gets them now, all such nodes at once.
nodes_have_images() {
	job_image_ids
	local n missing pids=() failed=0 i
	for n in hub "${WORKERS[@]}"; do
		mapfile -t missing < <(missing_images "$n")
		[ "${#missing[@]}" -gt 0 ] || continue
		info "$n lacks ${missing[*]}: loading it now (start puts the images there before setup)"
		load_images "$n" "${missing[@]}" &
		pids+=("$!")
	done
	for i in "${!pids[@]}"; do wait "${pids[$i]}" || failed=1; done
	[ "$failed" -eq 0 ] || die 1 "a node could not load the job images" "./test.sh logs NODE"
}

# ./test.sh push-image IMAGE: IMAGE (the Jupyter image is built here when missing) into
# the hub's engine when it lacks it, then `gridx image push` to the hub's
# registry; prints the name workers pull it by (10.0.0.1:5000/IMAGE).
cmd_push_image() {
	[ $# -eq 1 ] || die 2 "usage: ./test.sh push-image IMAGE"
	need_lab
	local image=$1 id
	if [ "$image" = "$JUPYTER_IMAGE" ]; then
		ensure_image "$image" job-jupyter
	fi
	id=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null) \
		|| die 2 "there is no image $image here" "build it, or name one of: python:3.11 $JUPYTER_IMAGE"
	has_image "$(node_images hub)" "$image" "$id" || load_images hub "$image" || die 1 "cannot load $image into the hub"
	gridx_hub image push "$image"
}

# The hub's job keeper (`gridx hub watch`: jobs of a worker Down for 15 s run
# again elsewhere), in the background: the lab has no systemd to run
# gridx-watch.service. Started once; its log is /var/log/gridx-watch.log.
start_watch() {
	if docker exec "$HUB" pgrep -f 'gridx hub watch' >/dev/null 2>&1; then
		info "gridx hub watch already running"
		return 0
	fi
	echo_run docker exec -d "$HUB" sh -c \
		'exec gridx hub watch --interval 5 --down-after 15 >>/var/log/gridx-watch.log 2>&1'
}

# The lab has no systemd: after its containers restart (docker stop/start, a
# host reboot) bring back what wg-quick@gridx0 and the boot order would: each
# node's VPN, then the hub's Docker, whose swarm manager could not listen on
# 10.0.0.1 before gridx0 existed.
revive_nodes() {
	local n revived=0
	for n in hub "${WORKERS[@]}"; do
		in_node "$n" test -e /etc/wireguard/gridx0.conf 2>/dev/null || continue
		in_node "$n" ip link show gridx0 >/dev/null 2>&1 && continue
		echo_run in_node "$n" wg-quick up gridx0 >/dev/null 2>&1 || warn "$n: wg-quick up gridx0 failed"
		revived=1
	done
	[ "$revived" -eq 1 ] || return 0
	if [ "$(swarm_state hub)" = error ]; then
		echo_run in_node hub service docker restart >/dev/null
		wait_swarm_active hub "the hub's swarm did not come back"
	fi
}

cmd_setup() {
	need_lab
	local t0=$EPOCHREALTIME
	wait_nodes_ready
	stage "dead nodes of a killed Docker daemon" cut_stale_ports
	stage "revive VPN after a restart" revive_nodes
	stage "hub init" hub_init
	stage "join ${WORKERS[*]}" join_workers
	stage "job images on every node" nodes_have_images
	stage "hub watch" start_watch
	info "lab set up in $(elapsed "$t0")s; next: ./test.sh status, ./test.sh test-job"
}

# --------------------------------------------------------------- commands ---

cmd_status() {
	need_lab
	local rc=0
	gridx_hub hub status || rc=$?
	# every node with its VPN address, role and state
	gridx_hub cluster || rc=1
	return "$rc"
}

cmd_ssh() {
	[ $# -ge 1 ] || die 2 "usage: ./test.sh ssh WORKER [CMD...]"
	need_lab
	local worker=$1 tty=()
	shift
	[ -t 0 ] && [ -t 1 ] && tty=(-it)
	if [ $# -gt 0 ]; then
		docker exec "${tty[@]}" "$HUB" gridx hub ssh "$worker" -- "$@"
	else
		docker exec "${tty[@]}" "$HUB" gridx hub ssh "$worker"
	fi
}

cmd_add_external() {
	[ $# -eq 1 ] || die 2 "usage: ./test.sh add-external NAME"
	need_lab
	local name=$1 path dest
	path=$(bundle_path "$name")
	dest=$PWD/$(basename "$path")
	rm -rf "$dest" "$dest.tar.gz"
	docker cp "$HUB:$path" "$PWD/"
	docker cp "$HUB:$path.tar.gz" "$PWD/" 2>/dev/null || warn "no $path.tar.gz on the hub"
	info "bundle for $name: $dest"
	cat >&2 <<EOF
[lab] Copy it to the machine that joins (it must reach $HUB_IP:51820/udp,
[lab] i.e. sit on the $PROJECT network), then there:
[lab]     cd $(basename "$path") && sudo ./join.sh
[lab] and to leave again: sudo ./leave.sh
EOF
}

cmd_test_job() {
	need_lab
	echo_run gridx_job python:3.11 "python -c 'print(2**100)'"
}

cmd_test_gpu() {
	need_lab
	if command -v nvidia-smi >/dev/null 2>&1; then
		info "this machine's GPUs (the lab's workers share made-up ones):"
		nvidia-smi -L || :
	fi
	local job prog out rc=0
	job=gpu-test-$(date +%s)
	# Swarm hands the GPU over as DOCKER_RESOURCE_NVIDIA-GPU, a name sh drops:
	# the job runs python directly (several words after --, no sh).
	prog='import os, shutil, subprocess
print("GPU given:", os.environ.get("DOCKER_RESOURCE_NVIDIA-GPU", "none"))
if shutil.which("nvidia-smi"):
    subprocess.run(["nvidia-smi", "-L"])'
	info "a job asking for 1 GPU (worker3 shares GPU-fake-0000 and GPU-fake-0001)"
	rc=0
	echo_run gridx_job --gpus 1 --name "$job" python:3.11 -- python -c "$prog" || rc=$?
	echo_run gridx_hub jobs status "$job" || :
	gridx_hub jobs delete "$job" >/dev/null 2>&1 || :
	[ "$rc" -eq 0 ] || die 1 "the --gpus 1 job failed (exit status $rc)"
	rc=0
	info "a job asking for 3 GPUs must be refused (no worker shares 3)"
	out=$(gridx_hub jobs run --gpus 3 python:3.11 nvidia-smi 2>&1) || rc=$?
	printf '%s\n' "$out"
	[ "$rc" -ne 0 ] || die 1 "a --gpus 3 job was accepted; it should have been refused"
	info "refused as expected (exit status $rc)"
}

cmd_suite() {
	[ $# -eq 0 ] || die 2 "usage: ./test.sh suite"
	need_docker
	lab_suite || die 1 "there is no lab $PROJECT" "./test.sh start"
}

cmd_cluster() {
	need_lab
	gridx_hub cluster "$@"
}

cmd_logs() {
	[ $# -ge 1 ] || die 2 "usage: ./test.sh logs CONTAINER"
	need_docker
	local name=$1 c
	c=$(node "$name")
	shift
	docker logs "$@" "$c"
	info "the inner dockerd's log: ./test.sh exec $name tail /var/log/docker.log"
}

cmd_exec() {
	[ $# -ge 2 ] || die 2 "usage: ./test.sh exec NODE CMD..."
	need_lab
	local c tty=()
	c=$(node "$1")
	shift
	[ -t 0 ] && [ -t 1 ] && tty=(-it)
	docker exec "${tty[@]}" "$c" "$@"
}

# Every image built or imported here carries $LAB_LABEL (base, node, hub, the
# local python:3.11), older builds included. Images still used by another
# lab's containers stay.
remove_lab_images() {
	local tags
	tags=$(docker images --filter "label=$LAB_LABEL" --format '{{.Repository}}:{{.Tag}}' | grep -v '<none>' || :)
	[ -z "$tags" ] || printf '%s\n' "$tags" | xargs -r docker rmi >/dev/null 2>&1 || :
	docker images -q --filter "label=$LAB_LABEL" | sort -u | xargs -r docker rmi -f >/dev/null 2>&1 || :
	if docker images -q --filter "label=$LAB_LABEL" | grep -q .; then
		warn "some lab images are still in use (another lab running?):"
		docker images --filter "label=$LAB_LABEL" >&2
	fi
}

cmd_clean() {
	local keep_images=0
	case ${1:-} in
		"") ;;
		--keep-images) keep_images=1 ;;
		*) die 2 "usage: ./test.sh clean [--keep-images]" ;;
	esac
	need_docker
	pick_compose
	local t0=$EPOCHREALTIME
	compose down -v --remove-orphans --timeout 5 || :
	# Anything of the lab that compose did not remove (renamed services...).
	{
		docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"
		docker ps -aq --filter "label=$NAME_LABEL=$PROJECT" # extra nodes (tests)
	} | sort -u | xargs -r docker rm -f -v >/dev/null
	local n
	for n in hub "${WORKERS[@]}"; do
		docker volume rm "$PREFIX$n-docker" >/dev/null 2>&1 || :
	done
	docker network rm "$PROJECT" >/dev/null 2>&1 || :
	# The images are shared by every lab on this machine: they go with the last one.
	local others
	others=$(docker ps -a --filter "label=$NAME_LABEL" --format '{{.Label "'"$NAME_LABEL"'"}}' \
		| grep -vxF "$PROJECT" | sort -u | tr '\n' ' ' || :)
	if [ "$keep_images" -eq 1 ]; then
		info "keeping the lab images (--keep-images)"
	elif [ -n "$others" ]; then
		info "keeping the lab images: other labs still use them (${others% })"
	else
		remove_lab_images
	fi
	local b
	for b in "$ROOT"/gridx-*-bundle "$ROOT"/gridx-*-bundle.tar.gz; do
		[ -e "$b" ] || continue
		info "removing $b (a bundle for the lab's VPN)"
		rm -rf "$b"
	done
	info "lab removed in $(elapsed "$t0")s (the debootstrap tree stays in $CACHE)"
}

# ------------------------------------------------------------------- main ---

main() {
	[ $# -ge 1 ] || { usage >&2; exit 2; }
	[[ " ${SUITES[*]} " == *" $SUITE "* ]] \
		|| die 2 "GRIDX_LAB_SUITE=$SUITE is not a suite the lab knows" "use one of: ${SUITES[*]}"
	local cmd=$1
	shift
	case $cmd in
		start) cmd_start "$@" ;;
		setup) cmd_setup "$@" ;;
		status) cmd_status "$@" ;;
		ssh) cmd_ssh "$@" ;;
		add-external) cmd_add_external "$@" ;;
		test-job) cmd_test_job "$@" ;;
		test-gpu) cmd_test_gpu "$@" ;;
		push-image) cmd_push_image "$@" ;;
		rootfs) cmd_rootfs "$@" ;;
		job-images) cmd_job_images "$@" ;;
		cluster) cmd_cluster "$@" ;;
		suite) cmd_suite "$@" ;;
		logs) cmd_logs "$@" ;;
		exec) cmd_exec "$@" ;;
		clean) cmd_clean "$@" ;;
		help | -h | --help) usage ;;
		*) usage >&2; die 2 "unknown command: $cmd" ;;
	esac
}

main "$@"
