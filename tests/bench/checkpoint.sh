# shellcheck shell=bash
# Sent by tests/bench.py as CHECKPOINT_SCRIPT (bash -c, with HUB_PRELUDE).
# REPS times: a job writes SIZE bytes into its --checkpoint folder and
# sleeps; then, interleaved, the hub takes the checkpoint (gridx's
# take_checkpoint) / bare scp of the same bytes from that worker ("take"),
# and restores it (checkpoint_image, then the worker's docker pull of the
# image) / bare scp of the bytes from the hub to that worker ("restore").
reps=$1 size=$2 key=$3 known=$4 prefix=$5 py=$6
ssh_opts=(-i "$key" -o IdentitiesOnly=yes -o "UserKnownHostsFile=$known" -o StrictHostKeyChecking=accept-new
	-o BatchMode=yes) # as gridx's ssh_argv
base=/tmp/gxbench-ckpt
rm -rf "$base"
mkdir -p "$base"
# pull IMAGE on the worker: what a run again from the checkpoint starts with
pull() { ssh "${ssh_opts[@]}" "root@$addr" docker pull -q "$1"; }
restore() {
	local image
	image=$(python3 -c "$py" restore "$name") && [ -n "$image" ] && pull "$image"
}
for i in $(seq 1 "$reps"); do
	name=$prefix$i
	touch "$base/.rep" # older than this rep's checkpoint (the job writes it after)
	gridx jobs run --name "$name" --checkpoint /tmp/ck python:3.11 \
		"mkdir -p /tmp/ck && head -c $size /dev/urandom >/tmp/ck/c.bin && touch /tmp/ready && sleep 900" \
		>/dev/null 2>>/tmp/gridx-bench.err || { sed 's/^/W /' /tmp/gridx-bench.err; exit 1; }
	for _ in $(seq 1 300); do
		task=$(docker service ps -q "$name" | head -n 1) # a replicated job's one task (desired: complete)
		container=$(docker inspect --format '{{.Status.ContainerStatus.ContainerID}}' "$task" 2>/dev/null)
		[ -z "$container" ] || break
		sleep 0.2
	done
	node=$(docker inspect --format '{{.NodeID}}' "$task")
	addr=$(docker node inspect --format '{{.Status.Addr}}' "$node")
	# shellcheck disable=SC2029 # $container expands here, on purpose
	for _ in $(seq 1 300); do
		ssh "${ssh_opts[@]}" "root@$addr" "docker exec $container test -e /tmp/ready" 2>/dev/null && break
		sleep 0.2
	done
	# the bare side's file: the same bytes, out of the same container, on the same worker (not timed)
	# shellcheck disable=SC2029
	ssh "${ssh_opts[@]}" "root@$addr" "docker cp $container:/tmp/ck/c.bin /tmp/gxbench-c.bin" \
		2>>/tmp/gridx-bench.err || { sed 's/^/W /' /tmp/gridx-bench.err; exit 1; }
	echo "N $(docker node inspect --format '{{.Description.Hostname}}' "$node") $addr"
	if [ $((i % 2)) -eq 1 ]; then
		t take python3 -c "$py" take "$name"
		t take_bare scp -q "${ssh_opts[@]}" -- "root@$addr:/tmp/gxbench-c.bin" "$base/c.bin"
		t restore restore
		t restore_bare scp -q "${ssh_opts[@]}" -- "$base/c.bin" "root@$addr:/tmp/gxbench-c2.bin"
	else
		t take_bare scp -q "${ssh_opts[@]}" -- "root@$addr:/tmp/gxbench-c.bin" "$base/c.bin"
		t take python3 -c "$py" take "$name"
		t restore_bare scp -q "${ssh_opts[@]}" -- "$base/c.bin" "root@$addr:/tmp/gxbench-c2.bin"
		t restore restore
	fi
	# the checkpoint the hub keeps holds the job's bytes, or the figures mean nothing
	kept=$(find /var/lib/gridx/checkpoints -path "*/current/c.bin" -newer "$base/.rep" -size "${size}c" | head -n 1)
	[ -n "$kept" ] && cmp -s "$kept" "$base/c.bin" || echo "E rep $i: the checkpoint kept differs from the job's bytes"
	gridx jobs delete "$name" >/dev/null 2>>/tmp/gridx-bench.err
	ssh "${ssh_opts[@]}" "root@$addr" "rm -f /tmp/gxbench-c.bin /tmp/gxbench-c2.bin;
		docker images --format '{{.ID}} {{.Repository}}' | awk '/gridx\/checkpoint/ {print \$1}' | xargs -r docker rmi -f"
	rm -f "$base/c.bin"
done
sed 's/^/W /' /tmp/gridx-bench.err
