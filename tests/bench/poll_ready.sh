# shellcheck shell=bash
# Sent by tests/bench.py as POLL_READY (bash -c).
# prints READY when a node that is not in the list given ($*) shows Ready
known=" $* "
while :; do
	while read -r id st; do
		case $known in *" $id "*) continue ;; esac
		if [ "$st" = Ready ]; then echo "READY $id"; exit 0; fi
	done < <(docker node ls --format '{{.ID}} {{.Status}}')
	sleep 0.1
done
