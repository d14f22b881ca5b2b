# shellcheck shell=bash
# Sent by tests/bench.py as STATE_FILL (bash -c).
# $1 pending jobs with the labels gridx gives a job; a constraint no node
# meets keeps them pending (no container runs).
now=$(date +%s)
seq 1 "$1" | xargs -P 4 -I{} docker service create --detach --quiet --no-resolve-image \
	--name gxbench-p{} --mode replicated-job --restart-condition none \
	--constraint node.labels.gridx-bench==never \
	--label gridx.job=gxbench-p{} --label gridx.kind=run --label gridx.created="$now" \
	--label gridx.command=true --label gridx.bench=1 \
	--generic-resource gridx_cpu=1 --generic-resource gridx_mem=1024 \
	--limit-cpu 1 --limit-memory 1G python:3.11 true >/dev/null
