# shellcheck shell=bash
# Sent by tests/bench.py as POLL_TASK (bash -c).
task_state() { # task_state NAME WANTED
	local st
	while :; do
		st=$(docker service ps --format '{{.CurrentState}}' "$1") || return 1
		case $st in
			"$2"*) return 0 ;;
			Complete* | Failed* | Rejected* | Shutdown*) echo "$1: $st (waiting for $2)" >&2; return 1 ;;
		esac
		sleep 0.1
	done
}
running() { task_state "$1" Running; }
ended() { task_state "$1" Complete; }
: >/tmp/gridx-bench.err
