# shellcheck shell=bash
# Sent by tests/bench.py as FORWARD_GET (bash -c), in the user container: one
# GET of the job's file through the forward listening on 127.0.0.1:$1 (bash's
# /dev/tcp: the member's machine has no curl), timed; then "H SHA256" of
# what came after the HTTP headers.
port=$1 token=$2 size=$3
get() {
	exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
	printf 'GET /files/gxbench.bin?token=%s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$token" >&3
	cat <&3 >/tmp/gxbench-got
	exec 3<&-
}
t forward get
echo "H $(tail -c "$size" /tmp/gxbench-got | sha256sum | cut -d' ' -f1) $(stat -c %s /tmp/gxbench-got)"
rm -f /tmp/gxbench-got
