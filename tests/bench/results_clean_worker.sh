# shellcheck shell=bash
# Sent by tests/bench.py as RESULTS_CLEAN_WORKER (bash -c).
docker ps -aq --filter "name=^$1[0-9]+\\." | xargs -r docker rm -f >/dev/null
docker ps -a --format '{{.Names}}' | grep "^${1}[0-9]" | sed 's/^/L container: /'
true
