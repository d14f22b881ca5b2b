# shellcheck shell=bash
# Sent by tests/bench.py as STATE_MEASURE (bash -c).
reps=$1
calls() {
	rm -f /tmp/gridx-bench/calls
	GRIDX_BENCH_CALLS=/tmp/gridx-bench/calls PATH=/tmp/gridx-bench/bin:$PATH "$@" >/dev/null 2>&1 || echo "C-FAIL $*"
	echo "C $2 $(wc -l </tmp/gridx-bench/calls)"
}
calls gridx jobs list
calls gridx cluster
echo "N $(gridx jobs list --json | grep -c '"kind"')"
for _ in $(seq 1 "$reps"); do
	t list gridx jobs list
	t cluster gridx cluster
	t bare docker service ls --filter label=gridx.job
done
