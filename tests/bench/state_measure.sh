# shellcheck shell=bash
# Sent by tests/bench.py as STATE_MEASURE (bash -c).
reps=$1
calls() { # calls LABEL GRIDX_ARGS...: the docker calls and Engine API requests `gridx -v` echoes ([#] lines)
	gridx -v "${@:2}" >/dev/null 2>/tmp/gridx-bench/calls || echo "C-FAIL $*"
	echo "C $1 $(grep -c '^\[#\] ' /tmp/gridx-bench/calls)"
}
# The lab's gridx (lab/gridx) imports gridx.py with its bytecode cached, as
# an installed gridx does: one run first, so that no timed run compiles it.
mkdir -p /tmp/gridx-bench
gridx --version >/dev/null
calls jobs jobs list
calls cluster cluster
echo "N $(gridx jobs list --json | grep -c '"kind"')"
for _ in $(seq 1 "$reps"); do
	t list gridx jobs list
	t cluster gridx cluster
	t bare docker service ls --filter label=gridx.job
done
