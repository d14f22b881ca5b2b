#!/usr/bin/env bash
# The unit tests (make unit, make test), side by side in four pytest runs:
# pytest alone (no plugin: the design says pytest only) runs one test at a
# time, and on two cores most of the owner agent's tests wait (a supervisor
# stopping, a pause within 2 s) while the bundle scripts' bash runs and the
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
t_start=$SECONDS

say() { printf '=== [%4ss] %s\n' "$((SECONDS - t_start))" "$*"; }

# groups: the arguments of each pytest run, one a line, in
# $LOGS/unit-GROUP.args (GROUP_NAMES): the agent's tests (mostly waiting) in
# two, by test function, one each in turn, the bundle scripts' (bash, busy), and every
# other test file (pytest's own order within each).
groups() {
	local f rest=() functions=()
	for f in tests/test_*.py; do
		case $f in
		tests/test_agent.py | tests/test_bundle_*.py) ;;
		*) rest+=("$f") ;;
		esac
	done
	mapfile -t functions < <("$PYTHON" -m pytest --collect-only -q -p no:cacheprovider tests/test_agent.py |
		sed -n 's/^\(tests\/test_agent\.py::[A-Za-z0-9_]*\).*/\1/p' | uniq)
	GROUP_NAMES=(agent1 agent2 bundle rest)
	: >"$LOGS/unit-agent1.args"
	: >"$LOGS/unit-agent2.args"
	for f in "${!functions[@]}"; do
		printf '%s\n' "${functions[$f]}" >>"$LOGS/unit-agent$((f % 2 + 1)).args"
	done
	printf '%s\n' tests/test_bundle_*.py >"$LOGS/unit-bundle.args"
	printf '%s\n' "${rest[@]}" >"$LOGS/unit-rest.args"
}

main() {
	local i pids=() rc=0 status log args
	if [ "${UNIT_PARALLEL:-1}" = 0 ]; then
		exec "$PYTHON" -m pytest -q -rs -m "not e2e" "$@" tests
	fi
	mkdir -p "$LOGS"
	groups
	for i in "${!GROUP_NAMES[@]}"; do
		log=$LOGS/unit-${GROUP_NAMES[$i]}.log
		mapfile -t args <"$LOGS/unit-${GROUP_NAMES[$i]}.args"
		"$PYTHON" -m pytest -q -rs -m "not e2e" -p no:cacheprovider "$@" "${args[@]}" >"$log" 2>&1 &
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
