# shellcheck shell=bash
# Sent by tests/bench.py as STATE_SETUP (bash -c).
mkdir -p /tmp/gridx-bench
docker service ls -q --filter label=gridx.job | wc -l
