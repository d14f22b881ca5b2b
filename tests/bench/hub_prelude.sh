# shellcheck shell=bash
# Sent by tests/bench.py as HUB_PRELUDE (bash -c).
set -u
t() {
	local label=$1 s e rc
	shift
	s=${EPOCHREALTIME/./}
	"$@" >/dev/null 2>>/tmp/gridx-bench.err
	rc=$?
	e=${EPOCHREALTIME/./}
	echo "T $label $((e - s)) $rc"
}
