#!/usr/bin/env bash
# The unit tests (make unit, make test), side by side in six pytest runs:
# pytest alone (no plugin: the design says pytest only) runs one test at a
# time, and on two cores most of the owner agent's tests wait (a pause within
# 2 s, an idle time) while the bundle scripts' bash runs and the
# rest of the suite keep the cores busy. Each run's output goes to
# logs/unit-GROUP.log; its summary line is printed, and a failed run's whole
# log.
#
#   scripts/unit-tests.sh [PYTEST ARGS...]    e.g. -x, -k name
#
# UNIT_PARALLEL=0 runs them as one pytest run, as before. Exit status: 0
# when every run passed, else the first failed run's (pytest's: 1 a test
# failed, 5 none collected).
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LOGS=logs
# pytest alone, whatever else is installed (the design says pytest only): a
# plugin found by autoload is imported by each run (pytest-benchmark here:
# half a second of CPU a run)
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=${PYTEST_DISABLE_PLUGIN_AUTOLOAD:-1}
t_start=$SECONDS

say() { printf '=== [%4ss] %s\n' "$((SECONDS - t_start))" "$*"; }

# groups: the arguments of each pytest run, one a line, in
# $LOGS/unit-GROUP.args (GROUP_NAMES). The agent's tests mostly wait (an
# agent pausing within 2 s, idle for its idle time): three runs, their test
# functions dealt one each in turn, so that the waits overlap. The bundle
# scripts' tests keep a core busy (bash and its stubs): two runs, the safety
# tests and the rest of them (about the same CPU each). Then every other
# test file (pytest's own order within each run).
groups() {
	local f i rest=() functions=()
	for f in tests/test_*.py; do
		case $f in
		tests/test_agent.py | tests/test_bundle_*.py) ;;
		*) rest+=("$f") ;;
		esac
	done
	# the test functions as pytest finds them (module level: test_agent.py
	# has no test classes), read without starting Python
	mapfile -t functions < <(sed -n 's/^def \(test_[A-Za-z0-9_]*\)(.*/tests\/test_agent.py::\1/p' tests/test_agent.py)
	GROUP_NAMES=(agent1 agent2 agent3 bundle1 bundle2 rest)
	for i in 1 2 3; do : >"$LOGS/unit-agent$i.args"; done
	for i in "${!functions[@]}"; do
		printf '%s\n' "${functions[$i]}" >>"$LOGS/unit-agent$((i % 3 + 1)).args"
	done
	printf '%s\n' tests/test_bundle_safety.py >"$LOGS/unit-bundle1.args"
	for f in tests/test_bundle_*.py; do
		[[ $f == tests/test_bundle_safety.py ]] || printf '%s\n' "$f"
	done >"$LOGS/unit-bundle2.args"
	printf '%s\n' "${rest[@]}" >"$LOGS/unit-rest.args"
}

# temp_folder -> TEMP: where the runs' temporary folders go (pytest's
# basetemp, one a run): /dev/shm where it is a tmpfs with 1 GiB free that
# programs may run from (the tests' stubs run there). The tests make, rename
# and sync thousands of small files (bundles, stubs, state), and a tmpfs
# costs the cores less than a disk (the bundle scripts' tests: 12 % less CPU)
# and never waits on it. UNIT_TMP=FOLDER chooses; UNIT_TMP= (empty): pytest's
# own. Removed at the end (the logs stay).
TEMP=''
temp_folder() {
	local base=${UNIT_TMP-} mnt type opts avail
	if [[ ! -v UNIT_TMP ]]; then
		while read -r _ mnt type opts _; do
			[[ $mnt == /dev/shm && $type == tmpfs && ,$opts, != *,noexec,* ]] || continue
			{ read -r _ && read -r _ _ _ avail _; } < <(df -Pk /dev/shm) || continue
			((avail >= 1048576)) && base=/dev/shm
		done </proc/mounts
	fi
	[[ -n $base ]] || return 0
	TEMP=$(mktemp -d "$base/gridx-unit.XXXXXX")
	trap 'rm -rf -- "$TEMP"' EXIT
}

main() {
	local i pids=() rc=0 status log args temp=()
	if [ "${UNIT_PARALLEL:-1}" = 0 ]; then
		exec "$PYTHON" -m pytest -q -rs -m "not e2e" "$@" tests
	fi
	mkdir -p "$LOGS"
	groups
	temp_folder
	for i in "${!GROUP_NAMES[@]}"; do
		log=$LOGS/unit-${GROUP_NAMES[$i]}.log
		mapfile -t args <"$LOGS/unit-${GROUP_NAMES[$i]}.args"
		[[ -z $TEMP ]] || temp=("--basetemp=$TEMP/${GROUP_NAMES[$i]}")
		"$PYTHON" -m pytest -q -rs -m "not e2e" -p no:cacheprovider "${temp[@]}" "$@" "${args[@]}" >"$log" 2>&1 &
		pids+=("$!")
	done
	say "unit tests: ${#pids[@]} pytest runs side by side (${GROUP_NAMES[*]}: $LOGS/unit-GROUP.log)"
	for i in "${!GROUP_NAMES[@]}"; do
		log=$LOGS/unit-${GROUP_NAMES[$i]}.log
		status=0
		wait "${pids[$i]}" || status=$?
		if [ "$status" -eq 0 ]; then
			say "unit tests, ${GROUP_NAMES[$i]}: $(tail -n 1 "$log")"
		else
			say "unit tests, ${GROUP_NAMES[$i]} FAILED (exit $status); its log:" >&2
			cat "$log" >&2
			[ "$rc" -ne 0 ] || rc=$status
		fi
	done
	say "unit tests: $([ "$rc" -eq 0 ] && echo passed || echo FAILED) in $((SECONDS - t_start)) s"
	return "$rc"
}

main "$@"
