# shellcheck shell=bash
# Sent by tests/bench.py as STATE_SETUP (bash -c).
mkdir -p /tmp/gridx-bench/bin
cat >/tmp/gridx-bench/bin/docker <<'EOF'
#!/bin/sh
echo "$*" >>"${GRIDX_BENCH_CALLS:-/dev/null}"
exec /usr/bin/docker "$@"
EOF
chmod +x /tmp/gridx-bench/bin/docker
docker service ls -q --filter label=gridx.job | wc -l
