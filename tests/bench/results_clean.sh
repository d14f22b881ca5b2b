# shellcheck shell=bash
# Sent by tests/bench.py as RESULTS_CLEAN (bash -c).
prefix=$1
mapfile -t jobs < <(docker service ls --format '{{.Name}}' | grep "^${prefix}[0-9]")
[ ${#jobs[@]} -eq 0 ] || gridx jobs delete "${jobs[@]}" >/dev/null 2>&1
rm -rf /tmp/gxbench-res /tmp/gridx-bench.err /var/lib/gridx/results/"$prefix"[0-9]*
docker service ls --format '{{.Name}}' | grep "^${prefix}[0-9]" | sed 's/^/L service: /'
true
