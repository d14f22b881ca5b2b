# shellcheck shell=bash
# Sent by tests/bench.py as WORKDIR_CLEAN_HUB (bash -c).
registry=$1 prefix=$2 bare_repo=$3 writer=$4
mapfile -t jobs < <(docker service ls --format '{{.Name}}' | grep "^$prefix-g")
[ ${#jobs[@]} -eq 0 ] || gridx jobs delete "${jobs[@]}" >/dev/null 2>&1
docker service ls --format '{{.Name}}' | grep "^$prefix-" | xargs -r docker service rm >/dev/null 2>&1
docker images --format '{{.Repository}}:{{.Tag}}' |
	grep -E "^($registry|$writer)/($bare_repo:b[0-9]+|gridx/work:$prefix-g[0-9]+)\$" | xargs -r docker image rm >/dev/null
gridx image ls --json | grep -oE "\"name\": \"$registry/($bare_repo:b[0-9]+|gridx/work:$prefix-g[0-9]+)\"" |
	cut -d'"' -f4 | while read -r image; do gridx image rm "$image" >/dev/null || echo "L registry: $image"; done
rm -rf /tmp/gxbench-wd /tmp/gridx-bench.err
docker service ls --format '{{.Name}}' | grep "^$prefix-" | sed 's/^/L service: /'
docker images --format '{{.Repository}}:{{.Tag}}' | grep -E "$bare_repo|gridx/work:$prefix" | sed 's/^/L hub image: /'
true
