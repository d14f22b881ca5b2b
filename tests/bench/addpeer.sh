# shellcheck shell=bash
# Sent by tests/bench.py as ADDPEER_SCRIPT (bash -c).
n=$1 ping_during=$2 target=$3
ping -n -i 0.05 "$target" >/tmp/gridx-bench-ping.log 2>&1 &
pid=$!
sleep 0.5
for i in $(seq 1 "$n"); do
	t add gridx hub add-peer "gxbench-$i"
	if [ "$i" -eq "$ping_during" ]; then
		sleep 0.3
		kill -INT "$pid"
		wait "$pid"
		sed 's/^/P /' /tmp/gridx-bench-ping.log
	fi
done
rm -f /tmp/gridx-bench-ping.log
