#!/usr/bin/env bash
# Grid-X lab: put job images into a worker node's remapped image store
# before the worker joins (test.sh start runs it in each worker, reading
# `docker save` of the images on stdin).
#
# join.sh turns on Docker's user-namespace remapping, and a remapped engine
# keeps its images apart, in DATA_ROOT/100000.100000: what the node's engine
# holds before the join is not there afterwards. Loading the job images after
# the join put 10-20 s of work (extracting about 170 MB per worker, on the
# machine's two cores) into every lab setup. Instead, while the lab starts,
# this script runs the node's engine remapped for a moment (the setting
# join.sh writes, "userns-remap": "default"), loads the images there, then
# puts back every file that doing so changed (daemon.json; the dockremap user
# and its subordinate IDs, which dockerd adds) and starts the engine as it
# was. join.sh later finds the machine as it was and makes the same remapped
# store, where the images already are. Nothing of join.sh is skipped or
# changed; only the images are there sooner.
#
# Usage: seed-images.sh IMAGE=ID... < docker-save.tar
#   Does nothing (exit 0) when the node's remapped store already holds every
#   IMAGE as ID (recorded in MARK by an earlier run). Exit 1 on failure, with
#   the files and the engine put back as they were.
set -euo pipefail
export LC_ALL=C

MARK_NAME=.gridx-lab-images # in the remapped data root: "IMAGE=ID" lines
BACKUP=/run/gridx-lab-seed
# The setting, and what dockerd changes when it remaps for the first time
# (useradd and usermod keep the old copy of each account file as FILE-).
ACCOUNT_FILES=(/etc/passwd /etc/group /etc/shadow /etc/gshadow /etc/subuid /etc/subgid)
FILES=(/etc/docker/daemon.json "${ACCOUNT_FILES[@]}" "${ACCOUNT_FILES[@]/%/-}")

info() { printf 'seed-images: %s\n' "$*" >&2; }

wait_docker() {
	local i
	for ((i = 0; i < 300; i++)); do
		docker info >/dev/null 2>&1 && return 0
		sleep 0.2
	done
	info "dockerd did not answer within 60 s"
	return 1
}

restart_docker() {
	service docker restart >/dev/null
	wait_docker
}

# seeded IMAGE=ID...: every one is recorded in a remapped store's mark.
seeded() {
	local want mark
	for mark in /var/lib/docker/[0-9]*.[0-9]*/"$MARK_NAME"; do
		[ -e "$mark" ] || continue
		for want in "$@"; do
			grep -qxF "$want" "$mark" || return 1
		done
		return 0
	done
	return 1
}

save_files() {
	local f
	rm -rf "$BACKUP"
	mkdir -p "$BACKUP"
	for f in "${FILES[@]}"; do
		if [ -e "$f" ]; then cp -a "$f" "$BACKUP/${f//\//_}"; fi
	done
}

restore_files() {
	local f copy
	for f in "${FILES[@]}"; do
		copy=$BACKUP/${f//\//_}
		if [ -e "$copy" ]; then cp -a "$copy" "$f"; else rm -f "$f"; fi
	done
}

# On any failure after the engine was switched: files back, engine restarted.
put_back() {
	trap - EXIT
	info "putting the engine back as it was"
	restore_files
	restart_docker || :
}

main() {
	[ $# -gt 0 ] || { info "usage: seed-images.sh IMAGE=ID... < docker-save.tar"; exit 2; }
	if seeded "$@"; then
		info "already there"
		cat >/dev/null # the caller's stream
		return 0
	fi
	local root remapped
	[ "$(docker info --format '{{.Swarm.LocalNodeState}}')" = inactive ] \
		|| { info "this node is in a swarm: not touching its engine"; exit 1; }
	save_files
	trap put_back EXIT
	mkdir -p /etc/docker
	printf '{\n    "userns-remap": "default"\n}\n' >/etc/docker/daemon.json
	restart_docker
	root=$(docker info --format '{{.DockerRootDir}}')
	remapped=$(docker info --format '{{range .SecurityOptions}}{{.}} {{end}}')
	[[ $remapped == *name=userns* ]] || { info "the engine did not remap"; exit 1; }
	docker load -q >/dev/null
	local want id
	for want in "$@"; do
		id=$(docker image inspect -f '{{.Id}}' "${want%=*}" 2>/dev/null || :)
		[ "$id" = "${want#*=}" ] || { info "${want%=*} is not ${want#*=} after the load"; exit 1; }
	done
	printf '%s\n' "$@" >"$root/$MARK_NAME"
	put_back
	rm -rf "$BACKUP"
}

main "$@"
