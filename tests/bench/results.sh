# shellcheck shell=bash
# Sent by tests/bench.py as RESULTS_SCRIPT (bash -c).
reps=$1 size=$2 key=$3 known=$4 prefix=$5
base=/tmp/gxbench-res
ssh_opts=(-i "$key" -o IdentitiesOnly=yes -o "UserKnownHostsFile=$known" -o StrictHostKeyChecking=accept-new
	-o BatchMode=yes) # as gridx's ssh_argv
rm -rf "$base"
for i in $(seq 1 "$reps"); do
	name=$prefix$i
	if ! gridx jobs run --output /tmp/out --name "$name" python:3.11 \
		"mkdir -p /tmp/out && head -c $size /dev/urandom >/tmp/out/r.bin" >/dev/null 2>>/tmp/gridx-bench.err ||
		! ended "$name"; then
		sed 's/^/W /' /tmp/gridx-bench.err
		exit 1
	fi
	task=$(docker service ps -q "$name")
	node=$(docker service ps --format '{{.Node}}' "$name")
	addr=$(docker node inspect --format '{{.Status.Addr}}' "$node")
	container=$(docker inspect --format '{{.Status.ContainerStatus.ContainerID}}' "$task")
	# the bare side's file: the same bytes, out of the same container, on the same worker (not timed)
	# shellcheck disable=SC2029 # $container expands here, on purpose
	ssh "${ssh_opts[@]}" "root@$addr" "docker cp $container:/tmp/out/r.bin /tmp/gxbench-r.bin" \
		2>>/tmp/gridx-bench.err || { sed 's/^/W /' /tmp/gridx-bench.err; exit 1; }
	mkdir -p "$base/b$i"
	echo "N $node $addr"
	if [ $((i % 2)) -eq 1 ]; then
		t gridx gridx jobs results "$name" "$base/g$i"
		t bare scp -q "${ssh_opts[@]}" -- "root@$addr:/tmp/gxbench-r.bin" "$base/b$i/r.bin"
	else
		t bare scp -q "${ssh_opts[@]}" -- "root@$addr:/tmp/gxbench-r.bin" "$base/b$i/r.bin"
		t gridx gridx jobs results "$name" "$base/g$i"
	fi
	# both copies hold the job's bytes, or the figures mean nothing
	cmp -s "$base/g$i/r.bin" "$base/b$i/r.bin" && [ "$(stat -c %s "$base/g$i/r.bin")" = "$size" ] ||
		echo "E rep $i: the two copies differ or are not $size bytes"
	gridx jobs delete "$name" >/dev/null 2>>/tmp/gridx-bench.err
	ssh "${ssh_opts[@]}" "root@$addr" rm -f /tmp/gxbench-r.bin
	rm -rf "$base/g$i" "$base/b$i"
done
sed 's/^/W /' /tmp/gridx-bench.err
