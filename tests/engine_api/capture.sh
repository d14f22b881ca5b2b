#!/bin/sh
# Records what the Engine API answers to the requests gridx makes, and what
# the docker CLI shows of the same tasks, from a real engine: the JSON that
# tests/test_engine_api.py reads for each Docker version.
#
# Run on a swarm manager whose workers share resources (a lab's hub):
#   docker exec -i HUB sh -s OUT < tests/engine_api/capture.sh
#   docker cp HUB:OUT/. tests/engine_api/VERSION/
# It submits four jobs with gridx (one that ends well, one that exits 3, one
# holding a GPU when a node shares one, and one whose last replica waits for
# room while the others run), records, and deletes them.
#
# Writes into OUT (default /tmp/engine-api): ping.headers (GET /_ping),
# version.json, services.json, tasks.json and nodes.json (gridx's requests),
# service-ps.jsonl (`docker service ps --no-trunc --format '{{json .}}'`) and
# inspect.json (`docker inspect` of those tasks).
set -eu

OUT=${1:-/tmp/engine-api}
SOCKET=/var/run/docker.sock
JOBS="cap-ok cap-fail cap-gpu cap-many"

api() { # api PATH [FILTERS]: the engine's answer, at the version it speaks
	if [ $# -gt 1 ]; then
		curl -sfG --unix-socket "$SOCKET" --data-urlencode "filters=$2" "http://docker/v$VERSION$1"
	else
		curl -sf --unix-socket "$SOCKET" "http://docker/v$VERSION$1"
	fi
}

remove_jobs() {
	# shellcheck disable=SC2086 # the job names are words
	gridx jobs delete $JOBS >/dev/null 2>&1 || :
}

largest_share() { # the CPUs the biggest worker shares, and how many share that many
	gridx cluster --json | python3 -c '
import json, sys
shares = [n["shared"]["cpus"] for n in json.load(sys.stdin)["nodes"] if n["shared"]["cpus"]]
print(max(shares), shares.count(max(shares)))'
}

submit_jobs() {
	gridx jobs run --wait --name cap-ok python:3.11 'echo hi' >/dev/null 2>&1
	gridx jobs run --wait --name cap-fail python:3.11 'exit 3' >/dev/null 2>&1 || :
	gridx jobs run --wait --name cap-gpu --gpus 1 python:3.11 true >/dev/null 2>&1 || :
	# shellcheck disable=SC2046 # two numbers
	set -- $(largest_share)
	gridx jobs run --name cap-many --cpus "$1" --replicas $(($2 + 1)) python:3.11 'sleep 300' >/dev/null 2>&1
	for _ in $(seq 1 150); do
		running=$(docker service ps --format '{{.CurrentState}}' cap-many | grep -c '^Running' || :)
		[ "$running" -eq "$2" ] && return 0
		sleep 0.2
	done
	echo "cap-many did not start" >&2
	return 1
}

record() {
	mkdir -p "$OUT"
	curl -sf -D "$OUT/ping.headers" -o /dev/null --unix-socket "$SOCKET" http://docker/_ping
	VERSION=$(tr -d '\r' <"$OUT/ping.headers" | sed -n 's/^[Aa]pi-[Vv]ersion: *//p')
	api /version >"$OUT/version.json"
	api /services '{"label":["gridx.job"]}' >"$OUT/services.json"
	api /tasks '{"service":["cap-ok","cap-fail","cap-gpu","cap-many"]}' >"$OUT/tasks.json"
	api /nodes >"$OUT/nodes.json"
	# shellcheck disable=SC2086 # the job names are words
	docker service ps --no-trunc --format '{{json .}}' $JOBS >"$OUT/service-ps.jsonl"
	# shellcheck disable=SC2086,SC2046
	docker inspect $(docker service ps -q --no-trunc $JOBS) >"$OUT/inspect.json"
}

remove_jobs
submit_jobs
record
remove_jobs
echo "recorded Docker API $VERSION in $OUT"
