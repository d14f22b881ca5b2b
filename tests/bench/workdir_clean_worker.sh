# shellcheck shell=bash
# Sent by tests/bench.py as WORKDIR_CLEAN_WORKER (bash -c).
registry=$1 prefix=$2 bare_repo=$3
pattern="^$registry/($bare_repo:b[0-9]+|gridx/work:$prefix-g[0-9]+)(@|\$)"
docker ps -a --format '{{.ID}} {{.Image}}' | awk -v p="$pattern" '$2 ~ p {print $1}' | xargs -r docker rm -f >/dev/null
docker images --format '{{.Repository}}:{{.Tag}}' | grep -E "$pattern" | xargs -r docker image rm >/dev/null
docker images --format '{{.Repository}}:{{.Tag}}' | grep -E "$pattern" | sed 's/^/L worker image: /'
true
