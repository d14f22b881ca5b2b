# shellcheck shell=bash
# Sent by tests/bench.py as BARE_LEAVE (bash -c).
docker swarm leave --force >/dev/null 2>&1
wg-quick down gridx0 >/dev/null 2>&1
rm -f /etc/wireguard/gridx0.conf
if [ -e /etc/docker/daemon.json ]; then
	rm -f /etc/docker/daemon.json
	service docker restart >/dev/null 2>&1
	until docker info >/dev/null 2>&1; do sleep 0.1; done
fi
true
