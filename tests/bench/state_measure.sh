# shellcheck shell=bash
# Sent by tests/bench.py as STATE_MEASURE (bash -c).
reps=$1
calls() { # calls LABEL GRIDX_ARGS...: the docker calls and Engine API requests `gridx -v` echoes ([#] lines)
	gridx -v "${@:2}" >/dev/null 2>/tmp/gridx-bench/calls || echo "C-FAIL $*"
	echo "C $1 $(grep -c '^\[#\] ' /tmp/gridx-bench/calls)"
}
# The same gridx.py imported with its bytecode cached (as the installed
# command runs it), beside the lab's launcher, which compiles it each time.
mkdir -p /tmp/gridx-bench/code
cp /opt/gridx/gridx.py /tmp/gridx-bench/code/
imported() { python3 -c 'import sys; sys.path.insert(0, "/tmp/gridx-bench/code"); import gridx; sys.exit(gridx.main(sys.argv[1:]))' "$@"; }
imported --version >/dev/null
calls jobs jobs list
calls cluster cluster
echo "N $(gridx jobs list --json | grep -c '"kind"')"
for _ in $(seq 1 "$reps"); do
	t list gridx jobs list
	t cluster gridx cluster
	t bare docker service ls --filter label=gridx.job
	t list_cached imported jobs list
	t cluster_cached imported cluster
done
