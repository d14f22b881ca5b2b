# shellcheck shell=bash
# Sent by tests/bench.py as FORWARD_PREPARE (bash -c), in the hub: the job's
# file of $2 bytes of fresh random data in its Jupyter container (/root, the
# folder Jupyter serves), and the same bytes in /tmp of its worker for the
# bare side; prints "N NODE ADDRESS" and "H SHA256".
job=$1 size=$2 key=$3 known=$4
ssh_opts=(-i "$key" -o IdentitiesOnly=yes -o "UserKnownHostsFile=$known" -o StrictHostKeyChecking=accept-new
	-o BatchMode=yes) # as gridx's ssh_argv
task=$(docker service ps -q --filter desired-state=running "$job" | head -n 1)
node=$(docker inspect --format '{{.NodeID}}' "$task")
addr=$(docker node inspect --format '{{.Status.Addr}}' "$node")
name=$(docker node inspect --format '{{.Description.Hostname}}' "$node")
container=$(docker inspect --format '{{.Status.ContainerStatus.ContainerID}}' "$task")
echo "N $name $addr"
# shellcheck disable=SC2029 # expanded here, on purpose
ssh "${ssh_opts[@]}" "root@$addr" "docker exec $container sh -c 'head -c $size /dev/urandom >/root/gxbench.bin' &&
	docker cp $container:/root/gxbench.bin /tmp/gxbench-fwd.bin && sha256sum </tmp/gxbench-fwd.bin" |
	sed 's/^\([0-9a-f]*\).*/H \1/'
