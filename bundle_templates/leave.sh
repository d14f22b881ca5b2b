#!/usr/bin/env bash
#
# leave.sh - stop sharing this machine with Grid-X and put it back as it was.
#
#   sudo ./leave.sh          (--yes is accepted: it asks nothing anyway)
#
# Undoes exactly what join.sh recorded that it changed, newest first:
#   the owner-activity agent (stopped, every paused Grid-X container
#   unpaused, its gridx-agent unit and its folder removed); the
#   wg-quick@gridx0 boot unit; the hub's line in root's authorized_keys
#   (the file goes back byte for byte when nobody edited it since, else only
#   that line goes; the file and ~/.ssh are removed only if join created them
#   and they are empty); the swarm membership (docker swarm leave --force);
#   /etc/docker/daemon.json and the NVIDIA toolkit's config.toml, restored byte
#   for byte (or removed if they were absent), Docker restarted only if that
#   changed them (so user-namespace remapping ends, and the volunteer's own
#   images and containers are back); the gridx0 link (wg-quick down), its
#   DOCKER-USER rule and the GRIDX-WORKER INPUT chain; its WireGuard config;
#   the jobs' network (the GRIDX-JOBS and GRIDX-JOBS-HOST chains and their
#   jumps, for iptables and ip6tables, and the copy of jobnet.sh and lib.sh
#   the VPN's PreUp ran); then the state folder.
# It acts only on the paths join.sh records (checked against the ones it
# uses), and refuses a state folder or file that anyone but root can write.
# Each step is skipped when already undone and forgotten once done, so a
# second run, or a run after a failed one, does only what is left.
#
# Reads: ${GRIDX_STATE_DIR:-/var/lib/gridx}/state.env (written by join.sh;
#   /root/.gridx/state.env where an older join.sh joined), settings.env
#   beside this script when present, and the path overrides listed in
#   lib.sh. Without state.env: "not joined, nothing to do", exit 0.
#
# Exit codes: 0 left (or nothing to do), 1 something could not be undone
# (the record of it stays; run leave.sh again), 2 bad usage, 3 not root, or
# a state that someone other than root could have written.

set -euo pipefail
export LC_ALL=C
umask 077

GRIDX_PROG=leave.sh
GRIDX_BUNDLE_DIR=${BASH_SOURCE[0]%/*}
[[ $GRIDX_BUNDLE_DIR != "${BASH_SOURCE[0]}" ]] || GRIDX_BUNDLE_DIR=.
GRIDX_BUNDLE_DIR=$(cd "$GRIDX_BUNDLE_DIR" && pwd -P)
# shellcheck source=lib.sh
. "$GRIDX_BUNDLE_DIR/lib.sh"

usage() {
	cat <<EOF
Usage: sudo ./leave.sh [--yes]

Leave the Grid-X swarm and VPN and undo everything join.sh changed
(Docker's daemon.json byte for byte, authorized_keys, the WireGuard link and
config, the boot unit). Safe to run twice.

Exit status: 0 done or nothing to do, 1 something could not be undone (run
it again once fixed), 2 bad usage, 3 not root.
EOF
}

parse_args() {
	while (($#)); do
		case $1 in
		-y | --yes) ;; # accepted for symmetry with join.sh: leave asks nothing
		-h | --help)
			usage
			exit 0
			;;
		*) fatal 2 "unknown option '$1'" "see $GRIDX_PROG --help" ;;
		esac
		shift
	done
}

leave() {
	if ! state_exists; then
		info "not joined, nothing to do"
		return 0
	fi
	load_state
	if [[ ${ST[COMPLETE]:-0} != 1 ]]; then
		info "a join stopped midway: undoing what it did"
	fi
	info "leaving Grid-X: ${ST[NAME]:-this machine} (${ST[VPN_IP]:-?})"
	local remapped=${ST[CONTAINMENT]:-0}
	undo_all || fatal 1 "some changes could not be undone (see above); their record stays in $STATE_FILE" "fix what is said above, then run $GRIDX_PROG again"
	printf '%sDone.%s This machine left Grid-X; everything join.sh changed is back as it was.\n' "$O_GREEN$O_BOLD" "$O_OFF"
	if [[ $remapped == 1 ]]; then
		printf 'Your own Docker images and containers are visible again. What jobs left (their images)\n'
		printf 'stays in the remapped folder Docker made, /var/lib/docker/100000.100000 with the default\n'
		printf 'mapping: used again if you join again, or free the space with rm -rf on it.\n'
	fi
}

main() {
	parse_args "$@"
	ensure_root "undoes network and Docker changes" "$@"
	init_paths
	find_legacy_state
	if [[ -f $GRIDX_BUNDLE_DIR/settings.env ]]; then load_settings; fi
	leave
}

main "$@"
