# shellcheck shell=bash
# Sent by tests/bench.py as BARE_JOIN (bash -c).
set -e
b=/root/gridx-benchjoin-bundle
# shellcheck source=/dev/null # the bundle hub add-peer wrote in the join node
. "$b/settings.env"
install -m 0600 "$b/gridx0.conf" /etc/wireguard/gridx0.conf
wg-quick up gridx0 2>/dev/null
if [ "${1:-}" = restart ]; then
	# what join.sh must add to the bare steps: the shared resources in
	# daemon.json, and a Docker restart so that the swarm sees them
	mkdir -p /etc/docker
	printf '{"node-generic-resources": ["gridx_cpu=1", "gridx_mem=1024"]}\n' >/etc/docker/daemon.json
	service docker restart >/dev/null
	until docker info >/dev/null 2>&1; do sleep 0.1; done
fi
docker swarm join --token "$(cat "$b/swarm-token")" --advertise-addr "$GRIDX_VPN_IP" \
	--listen-addr "$GRIDX_VPN_IP:2377" --data-path-addr "$GRIDX_VPN_IP" "$GRIDX_MANAGER" >/dev/null
