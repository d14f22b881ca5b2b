#!/usr/bin/env bash
#
# jobnet.sh - what jobs on this Grid-X worker may reach: the internet, and
# nothing private (the rules are lib.sh's "jobs' network" section).
#
#   sudo ./jobnet.sh apply          put the rules in place again: the allow-list
#                                   join.sh recorded, the name servers and
#                                   networks of now (wg-quick runs this when
#                                   the VPN comes up; run it after moving to
#                                   another network)
#   sudo ./jobnet.sh allow 'LIST'   make LIST the allow-list, then apply
#   sudo ./jobnet.sh allow          the allow-list of the settings.env beside
#                                   this script (a bundle the hub sent again)
#   sudo ./jobnet.sh show           the allow-list, name servers and rules
#
# LIST: what the hub's admin opens for every job, entries separated by
# spaces: ADDRESS[/PREFIX][:tcp|udp[/PORT[-PORT]]], IPv6 in brackets
# ([fd00::5]:tcp/443); '' opens nothing. The same grammar as settings.env's
# GRIDX_JOB_ALLOW (lib.sh job_allow_parse). A LIST that does not parse is
# exit 2 and changes nothing.
#
# join.sh keeps a copy of this script and lib.sh in /var/lib/gridx/jobnet/,
# which wg-quick's PreUp runs; the hub runs it there to change the list:
#   gridx hub ssh NAME -- /var/lib/gridx/jobnet/jobnet.sh allow 'LIST'
#
# Reads: ${GRIDX_STATE_DIR:-/var/lib/gridx}/state.env (written by join.sh),
# settings.env beside this script when present, the host's resolv.conf and
# routes, and the path overrides listed in lib.sh.
#
# Exit codes: 0 done, 1 the rules could not be put in place, 2 bad usage or
# a bad allow-list (nothing changed), 3 not root, not joined, or joined by a
# join.sh that kept no jobs' network.

set -euo pipefail
export LC_ALL=C
umask 077

GRIDX_PROG=jobnet.sh
GRIDX_BUNDLE_DIR=${BASH_SOURCE[0]%/*}
[[ $GRIDX_BUNDLE_DIR != "${BASH_SOURCE[0]}" ]] || GRIDX_BUNDLE_DIR=.
GRIDX_BUNDLE_DIR=$(cd "$GRIDX_BUNDLE_DIR" && pwd -P)
# shellcheck source=lib.sh
. "$GRIDX_BUNDLE_DIR/lib.sh"

ACTION='' NEW_ALLOW='' FROM_SETTINGS=0

usage() {
	cat <<EOF
Usage: sudo ./jobnet.sh apply | allow ['LIST'] | show

What jobs on this worker may reach: the internet, and nothing private (not
your networks, not this machine, not the VPN), except DNS to your name
servers and the allow-list the hub's admin opens for every job.

  apply          put the rules in place again (after moving to another network)
  allow 'LIST'   make LIST the allow-list, then apply ('' opens nothing)
  allow          the allow-list of the settings.env beside this script
  show           the allow-list, name servers and rules in force

LIST: ADDRESS[/PREFIX][:tcp|udp[/PORT[-PORT]]] entries separated by spaces,
IPv6 in brackets, e.g. '203.0.113.7 10.0.0.1:tcp/5000 [fd00::5]:tcp/443'.

Exit status: 0 done, 1 failed, 2 bad usage or allow-list (nothing changed),
3 not root or not joined.
EOF
}

parse_args() {
	(($#)) || fatal 2 "say what to do: apply, allow or show" "see $GRIDX_PROG --help"
	case $1 in
	-h | --help)
		usage
		exit 0
		;;
	apply | show)
		(($# == 1)) || fatal 2 "$1 takes no argument" "see $GRIDX_PROG --help"
		;;
	allow)
		if (($# == 2)); then
			NEW_ALLOW=$2
		elif (($# == 1)); then
			FROM_SETTINGS=1
		else
			fatal 2 "allow takes one argument: the whole list, quoted" "e.g. $GRIDX_PROG allow '10.0.0.1:tcp/5000 203.0.113.7'"
		fi
		;;
	*) fatal 2 "unknown action '$1'" "see $GRIDX_PROG --help" ;;
	esac
	ACTION=$1
}

# The new list is data: judged before root, Docker or the state are asked for.
check_new_allow() {
	[[ $ACTION == allow ]] || return 0
	if ((FROM_SETTINGS)); then
		[[ -f $GRIDX_BUNDLE_DIR/settings.env ]] || fatal 2 "allow without a list reads settings.env beside $GRIDX_PROG, and there is none" "give the list: $GRIDX_PROG allow 'LIST'"
		NEW_ALLOW=${S[GRIDX_JOB_ALLOW]:-}
	fi
	job_allow_parse "$NEW_ALLOW" || fatal 2 "allow-list: $REPLY" "see $GRIDX_PROG --help for the grammar"
}

load_joined_state() {
	state_exists || fatal 3 "this machine has not joined Grid-X (no $STATE_FILE)" "join first: sudo ./join.sh"
	load_state
	[[ -v ST[JOB_NET_DIR] ]] ||
		fatal 3 "this machine joined with a join.sh that kept no jobs' network (no JOB_NET_DIR in $STATE_FILE)" \
			"leave and join again with a bundle from the hub: sudo ./leave.sh, then sudo ./join.sh"
}

show() {
	local tool fam servers
	job_allow_parse "${ST[JOB_ALLOW]:-}"
	job_resolvers
	printf 'allow-list   %s\n' "${ST[JOB_ALLOW]:-(none)}"
	servers="${JOB_DNS4[*]} ${JOB_DNS6[*]}"
	servers=${servers# }
	servers=${servers% }
	printf 'name servers %s\n' "${servers:-(none: Docker gives containers public ones)}"
	for fam in 4 6; do
		job_tool "$fam" || continue
		tool=$REPLY
		"$tool" -w 10 -S "$JOB_CHAIN" 2>/dev/null || printf '%s: no %s chain\n' "$tool" "$JOB_CHAIN"
		"$tool" -w 10 -S "$JOB_HOST_CHAIN" 2>/dev/null || printf '%s: no %s chain\n' "$tool" "$JOB_HOST_CHAIN"
	done
}

main() {
	parse_args "$@"
	init_paths
	if [[ -f $GRIDX_BUNDLE_DIR/settings.env ]]; then load_settings; fi
	check_new_allow
	ensure_root "changes the firewall" "$@"
	need_cmd iptables iptables-restore
	load_joined_state
	case $ACTION in
	show) show ;;
	allow)
		state_set JOB_ALLOW "$NEW_ALLOW"
		job_net_apply || fatal 1 "the jobs' network rules could not be put in place (see above)" "fix what iptables says, then run: $GRIDX_PROG apply"
		ok "jobs may reach: the internet, DNS to the name servers, and ${NEW_ALLOW:-nothing else}"
		;;
	apply)
		job_net_apply || fatal 1 "the jobs' network rules could not be put in place (see above)" "fix what iptables says, then run: $GRIDX_PROG apply"
		;;
	esac
}

main "$@"
