# shellcheck shell=bash
# Sent by tests/bench.py as WORKDIR_SCRIPT (bash -c).
reps=$1 size=$2 registry=$3 prefix=$4 bare_repo=$5 writer=$6
base=/tmp/gxbench-wd
submitted() { # submitted SIDE START: "P SIDE US", the time until the job was created (the rest is the worker's)
	local e=${EPOCHREALTIME/./}
	echo "P $1 $((e - $2))" >>"$base/phases"
}
steps() { # steps REP START: gridx -v's lines (each command it runs) as "S REP MS LINE", for where the time went
	local line e
	while IFS= read -r line; do
		e=${EPOCHREALTIME/./}
		echo "S $1 $(((e - $2) / 1000)) ${line:0:160}" >>"$base/steps"
		echo "$line" >>/tmp/gridx-bench.err
	done
}
gridx_side() { # the folder as gridx sends it: gridx's own Dockerfile, built and pushed by the hub's Docker
	local s=${EPOCHREALTIME/./}
	gridx -v jobs run --workdir "$base/g$1" --name "$prefix-g$1" python:3.11 'sleep 30' 2> >(steps "$1" "$s") &&
		submitted gridx "$s" && running "$prefix-g$1"
}
bare_side() { # the same Dockerfile and context, by hand: pushed to the writer, run from the VPN address
	local pushed=$writer/$bare_repo:b$1 image=$registry/$bare_repo:b$1 s=${EPOCHREALTIME/./}
	docker build --quiet --tag "$pushed" "$base/b$1" &&
		docker push "$pushed" >/dev/null &&
		docker service create --detach --quiet --no-resolve-image --name "$prefix-b$1" --mode replicated-job \
			--restart-condition none --constraint node.role==worker --label gridx.bench=1 \
			"$image" sleep 30 &&
		submitted bare "$s" && running "$prefix-b$1"
}
fill() { # fill DIR: a folder holding $size fresh random bytes
	mkdir -p "$1" && head -c "$size" /dev/urandom >"$1/data.bin"
}
rm -rf "$base"
for i in $(seq 1 "$reps"); do
	fill "$base/g$i" && fill "$base/b$i/work" || exit 1
	printf 'FROM python:3.11\nCOPY work/ /work/\nWORKDIR /work\n' >"$base/b$i/Dockerfile"
	sync # the folders' writeback is not timed
	if [ $((i % 2)) -eq 1 ]; then
		t gridx gridx_side "$i"
		t bare bare_side "$i"
	else
		t bare bare_side "$i"
		t gridx gridx_side "$i"
	fi
	gridx jobs delete "$prefix-g$i" >/dev/null 2>>/tmp/gridx-bench.err
	docker service rm "$prefix-b$i" >/dev/null 2>>/tmp/gridx-bench.err
	rm -rf "$base/g$i" "$base/b$i"
done
cat "$base/phases" "$base/steps"
sed 's/^/W /' /tmp/gridx-bench.err
