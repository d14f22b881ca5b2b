# shellcheck shell=bash
# Sent by tests/bench.py as FORWARD_SCP (bash -c), in the hub: bare scp of the
# same bytes from the job's worker with the hub's key, timed.
key=$1 known=$2 addr=$3
ssh_opts=(-i "$key" -o IdentitiesOnly=yes -o "UserKnownHostsFile=$known" -o StrictHostKeyChecking=accept-new
	-o BatchMode=yes) # as gridx's ssh_argv
t bare scp -q "${ssh_opts[@]}" -- "root@$addr:/tmp/gxbench-fwd.bin" /tmp/gxbench-bare.bin
echo "H $(sha256sum </tmp/gxbench-bare.bin | cut -d' ' -f1)"
rm -f /tmp/gxbench-bare.bin
