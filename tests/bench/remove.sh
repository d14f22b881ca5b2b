# shellcheck shell=bash
# Sent by tests/bench.py as REMOVE_SCRIPT (bash -c).
gridx hub list-peers --json | grep -o '"name": "gxbench-[0-9]*"' | cut -d'"' -f4 |
	xargs -r -P 4 -I{} gridx hub remove-peer {} >/dev/null 2>&1
gridx hub list-peers --json | grep -c '"name": "gxbench-' || true
