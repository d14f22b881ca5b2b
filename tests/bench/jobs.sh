# shellcheck shell=bash
# Sent by tests/bench.py as JOBS_SCRIPT (bash -c).
reps=$1
bare() { # bare NAME: the raw swarm job, polled as gridx polls (every 0.1 s)
	local st
	docker service create --detach --quiet --no-resolve-image --name "$1" --mode replicated-job \
		--restart-condition none --constraint node.role==worker --label gridx.bench=1 \
		python:3.11 true || return 1
	while :; do
		st=$(docker service ps --format '{{.CurrentState}}' "$1") || return 1
		case $st in
			Complete*) return 0 ;;
			Failed* | Rejected*) echo "bare $1: $st" >&2; return 1 ;;
		esac
		sleep 0.1
	done
}
for i in $(seq 1 "$reps"); do
	t gridx gridx jobs run --wait --name "gxbench-run$i" python:3.11 true
	t bare bare "gxbench-bare$i"
done
# why gridx runs failed, if they did
for i in $(seq 1 "$reps"); do
	docker service ps --no-trunc --format '{{.CurrentState}}|{{.Error}}' "gxbench-run$i" |
		grep -v '^Complete' | cut -d'|' -f2 | sed 's/^/E /'
done
