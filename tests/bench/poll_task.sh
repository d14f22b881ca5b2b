# shellcheck shell=bash
# Sent by tests/bench.py as POLL_TASK (bash -c).
task_state() { # task_state NAME WANTED: a task of the job reached WANTED
	# Every task is read, not the first line: a job given a new image (a
	# --workdir job's) keeps its first task, Shutdown, beside the new one.
	# All of them ended for 3 s (not one being made) is a failure.
	local st line live ended_since=
	while :; do
		st=$(docker service ps --format '{{.CurrentState}}' "$1") || return 1
		live=0
		while IFS= read -r line; do
			case $line in
				"$2"*) return 0 ;;
				Complete* | Failed* | Rejected* | Shutdown*) ;;
				*) live=1 ;;
			esac
		done <<<"$st"
		if [ "$live" = 1 ]; then
			ended_since=
		elif [ -z "$ended_since" ]; then
			ended_since=$SECONDS
		elif [ $((SECONDS - ended_since)) -ge 3 ]; then
			echo "$1: $st (waiting for $2)" >&2
			return 1
		fi
		sleep 0.1
	done
}
running() { task_state "$1" Running; }
ended() { task_state "$1" Complete; }
: >/tmp/gridx-bench.err
