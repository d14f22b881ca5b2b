#!/usr/bin/env bash
# The end-to-end tests on a lab of each Debian suite (make test's e2e-suites).
#
#   scripts/e2e-suites.sh SUITE...      e.g. forky trixie bookworm
#
# Side by side (E2E_PARALLEL=1, the default): the labs start one after the
# other (their image builds would only fight for the cores), then the three
# pytest runs go at once, each to its own log (logs/e2e-SUITE.log). A suite's
# run is mostly waiting (a worker seen Down, a job's retries, a restart), so
# two cores carry three labs: measured on forky, a whole run's lab containers
# and pytest used about 3.6 min of CPU in 17 min (other labs ran beside it).
# One after the other (E2E_PARALLEL=0): one lab, the way it was, each
# suite's replacing the last.
#
# Labs: the last suite's is GRIDX_LAB_NAME on GRIDX_LAB_NET (gridx-lab,
# 172.29.240: the lab left running afterwards, as before); side by side, each
# other suite gets NAME-SUITE on the next /24s (third octet + 1, + 2...),
# removed once its tests pass (kept when they fail, to look at).
#
# E2E_BESIDE=COMMAND (make test: the unit tests) runs COMMAND while the labs
# start (its output to logs/e2e-beside.log, printed whole when it fails);
# the end-to-end tests begin once it passed, and do not when it failed.
#
# Prints when each stage began and how long it took, as .ci/run does; exit 1
# when a suite's tests failed (its log's end is printed), 2 on bad usage.
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
NAME=${GRIDX_LAB_NAME:-gridx-lab}
NET=${GRIDX_LAB_NET:-172.29.240}
PARALLEL=${E2E_PARALLEL:-1}
LOGS=logs
t_start=$SECONDS

say() { printf '=== [%4ss] %s\n' "$((SECONDS - t_start))" "$*"; }

usage() {
	printf 'usage: %s SUITE... (bookworm trixie forky)\n' "$0" >&2
	exit 2
}

# lab_of INDEX COUNT -> REPLY=(name net): the last suite's lab is NAME/NET.
lab_of() {
	local i=$1 n=$2 octet
	if [ "$PARALLEL" != 1 ] || [ "$i" -eq $((n - 1)) ]; then
		REPLY=("$NAME" "$NET")
		return 0
	fi
	octet=$((${NET##*.} + i + 1))
	[ "$octet" -le 255 ] || { echo "error: GRIDX_LAB_NET=$NET leaves no room for $n labs" >&2; exit 2; }
	REPLY=("$NAME-${SUITES[$i]}" "${NET%.*}.$octet")
}

# in_lab NAME NET SUITE CMD...: CMD with that lab's environment.
in_lab() {
	local name=$1 net=$2 suite=$3
	shift 3
	GRIDX_LAB_NAME=$name GRIDX_LAB_NET=$net GRIDX_LAB_SUITE=$suite "$@"
}

# start_lab NAME NET SUITE: a lab of another suite under that name goes
# first (its images kept), then ./test.sh start.
start_lab() {
	local name=$1 net=$2 suite=$3 running
	running=$(in_lab "$name" "$net" "$suite" ./test.sh suite 2>/dev/null || :)
	if [ -n "$running" ] && [ "$running" != "$suite" ]; then
		say "removing the $running lab $name before the $suite one (images kept)"
		in_lab "$name" "$net" "$suite" ./test.sh clean --keep-images
	fi
	in_lab "$name" "$net" "$suite" ./test.sh start
}

run_tests() { # NAME NET SUITE: pytest's exit status
	in_lab "$1" "$2" "$3" env GRIDX_E2E_REQUIRED=1 "$PYTHON" -m pytest -q -rs --durations=15 -m e2e tests/e2e
}

sequential() {
	local i t0 lab
	beside_start
	beside_wait # one lab at a time: nothing to overlap
	for i in "${!SUITES[@]}"; do
		lab_of "$i" "${#SUITES[@]}"
		lab=("${REPLY[@]}")
		say "end-to-end tests on Debian ${SUITES[$i]} (lab ${lab[0]})"
		t0=$SECONDS
		start_lab "${lab[@]}" "${SUITES[$i]}"
		run_tests "${lab[@]}" "${SUITES[$i]}" \
			|| { say "end-to-end tests on Debian ${SUITES[$i]} FAILED after $((SECONDS - t0)) s" >&2; exit 1; }
		say "end-to-end tests on Debian ${SUITES[$i]} passed in $((SECONDS - t0)) s"
	done
}

# beside_start: E2E_BESIDE in the background, if set (BESIDE_PID).
beside_start() {
	BESIDE_PID=''
	[ -n "${E2E_BESIDE:-}" ] || return 0
	mkdir -p "$LOGS"
	say "beside the labs' start: $E2E_BESIDE (log: $LOGS/e2e-beside.log)"
	BESIDE_T0=$SECONDS
	bash -c "$E2E_BESIDE" >"$LOGS/e2e-beside.log" 2>&1 &
	BESIDE_PID=$!
}

# beside_wait: E2E_BESIDE's end; exit 1 (its log printed) when it failed.
beside_wait() {
	[ -n "$BESIDE_PID" ] || return 0
	if wait "$BESIDE_PID"; then
		say "$E2E_BESIDE passed in $((SECONDS - BESIDE_T0)) s: $(tail -n 1 "$LOGS/e2e-beside.log")"
	else
		say "$E2E_BESIDE FAILED after $((SECONDS - BESIDE_T0)) s; its log:" >&2
		cat "$LOGS/e2e-beside.log" >&2
		exit 1
	fi
}

side_by_side() {
	local i t0 pids=() labs=() begun=() failed=0 log
	mkdir -p "$LOGS"
	beside_start
	say "job images (python:3.11, gridx-lab-jupyter), once for every lab"
	t0=$SECONDS
	./test.sh job-images
	say "job images: $((SECONDS - t0)) s"
	for i in "${!SUITES[@]}"; do
		lab_of "$i" "${#SUITES[@]}"
		labs+=("${REPLY[*]}")
		say "start the Debian ${SUITES[$i]} lab (${REPLY[0]} on ${REPLY[1]}.0/24)"
		t0=$SECONDS
		# shellcheck disable=SC2086 # name and net: two words
		start_lab ${labs[$i]} "${SUITES[$i]}"
		say "the Debian ${SUITES[$i]} lab started in $((SECONDS - t0)) s"
	done
	beside_wait
	for i in "${!SUITES[@]}"; do
		log=$LOGS/e2e-${SUITES[$i]}.log
		say "end-to-end tests on Debian ${SUITES[$i]}, side by side (log: $log)"
		# shellcheck disable=SC2086 # name and net: two words
		run_tests ${labs[$i]} "${SUITES[$i]}" >"$log" 2>&1 &
		pids+=("$!") begun+=("$SECONDS")
	done
	for i in "${!SUITES[@]}"; do
		log=$LOGS/e2e-${SUITES[$i]}.log
		if wait "${pids[$i]}"; then
			say "end-to-end tests on Debian ${SUITES[$i]} passed in $((SECONDS - begun[i])) s: $(tail -n 1 "$log")"
			if [ "$i" -lt $((${#SUITES[@]} - 1)) ]; then
				# shellcheck disable=SC2086 # name and net: two words
				in_lab ${labs[$i]} "${SUITES[$i]}" ./test.sh clean --keep-images >/dev/null 2>&1 || :
			fi
		else
			failed=1
			say "end-to-end tests on Debian ${SUITES[$i]} FAILED after $((SECONDS - begun[i])) s; the end of $log:" >&2
			tail -n 60 "$log" >&2
		fi
	done
	[ "$failed" -eq 0 ] || exit 1
}

main() {
	[ $# -gt 0 ] || usage
	SUITES=("$@")
	case $PARALLEL in
		1) side_by_side ;;
		0) sequential ;;
		*) printf 'error: E2E_PARALLEL=%s: 1 (side by side) or 0 (one after the other)\n' "$PARALLEL" >&2; exit 2 ;;
	esac
	say "end-to-end tests on ${SUITES[*]} passed"
}

main "$@"
