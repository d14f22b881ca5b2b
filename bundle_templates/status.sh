#!/usr/bin/env bash
#
# status.sh - is this Grid-X worker healthy? Safe for cron: it never asks
# anything, and has no colour when not on a terminal.
#
#   sudo ./status.sh          # a few lines for people
#   sudo ./status.sh --json   # one JSON document (no jq or python needed)
#
# Healthy means: the VPN link is up, the last handshake with the hub is less
# than 180 s old (WireGuard renews it every 2 minutes while traffic flows,
# and PersistentKeepalive 25 keeps traffic flowing), and Docker's swarm
# state is "active". Otherwise each reason is printed on stderr.
#
# --json fields: joined (bool), complete (bool, false after a join that
# stopped midway), name, interface, vpn_ip, hub_vpn_ip, hub_endpoint,
# manager, link_up (bool), handshake_age_s (int, null when none yet),
# swarm_state (inactive/pending/active/error/locked/unknown), node_addr,
# shared {cpus, memory_mib, gpu_ids [..]}, contained (bool: Docker runs with
# user-namespace remapping), jobs_network (bool: the rules keeping jobs off
# private networks are in place), healthy (bool), problems [..], agent (null
# where no owner-activity agent is installed, else {installed, running,
# policy (idle/always), hours (null or HH:MM-HH:MM), idle_s, preempt_s,
# grace_s, state (sharing/paused/outside-hours/preempting), reason
# (-/input/terminal/logind/cpu/gpu/hours), since, preempt_at (epoch s, 0: none),
# mem_mib, last_active, hub_ok_at, tasks [..], jobs [..]}).
#
# The agent (agent.sh): what it does now (sharing; paused: owner active since
# ...; outside hours), which jobs it holds paused and their memory, when they
# will be preempted. Unhealthy when it is installed and not running, or has
# not written its status for three heartbeats.
#
# Reads: ${GRIDX_STATE_DIR:-/var/lib/gridx}/state.env (written by join.sh;
#   /root/.gridx/state.env where an older join.sh joined), settings.env
#   beside this script when present, and the path overrides listed in
#   lib.sh.
#
# Exit codes: 0 healthy, 1 not healthy or not joined, 2 bad usage, 3 not root,
# or a state that someone other than root could have written.

set -euo pipefail
export LC_ALL=C

GRIDX_PROG=status.sh
GRIDX_BUNDLE_DIR=${BASH_SOURCE[0]%/*}
[[ $GRIDX_BUNDLE_DIR != "${BASH_SOURCE[0]}" ]] || GRIDX_BUNDLE_DIR=.
GRIDX_BUNDLE_DIR=$(cd "$GRIDX_BUNDLE_DIR" && pwd -P)
# shellcheck source=lib.sh
. "$GRIDX_BUNDLE_DIR/lib.sh"

# Same as gridx.py's HANDSHAKE_SILENT_S (hub status calls a peer silent past it).
HANDSHAKE_MAX_AGE=180
OPT_JSON=0
LINK_UP=false HANDSHAKE_AGE=null SWARM=unknown NODE_ADDR='' PROBLEMS=() CONTAINED=false REGISTRY_CA=false
JOBS_NETWORK=false
AGENT_JSON=null

usage() {
	cat <<EOF
Usage: sudo ./status.sh [--json]

Show whether this Grid-X worker is healthy: VPN link, handshake with the
hub, swarm membership, and what it shares.

Exit status: 0 healthy (link up, handshake less than $HANDSHAKE_MAX_AGE s old, swarm
active), 1 not healthy or not joined (reasons on stderr), 2 bad usage,
3 not root.
EOF
}

parse_args() {
	while (($#)); do
		case $1 in
		--json) OPT_JSON=1 ;;
		-h | --help)
			usage
			exit 0
			;;
		*) fatal 2 "unknown option '$1'" "see $GRIDX_PROG --help" ;;
		esac
		shift
	done
}

check_link() {
	local iface=${ST[INTERFACE]:-gridx0}
	if link_is_up "$iface"; then
		LINK_UP=true
	else
		PROBLEMS+=("link $iface is down (bring it up: wg-quick up $iface)")
	fi
}

check_handshake() {
	local now
	latest_handshake "${ST[INTERFACE]:-gridx0}" || true
	if ((REPLY == 0)); then
		[[ $LINK_UP == true ]] && PROBLEMS+=("no handshake with the hub yet (is the hub at ${ST[HUB_ENDPOINT]:-?} reachable over UDP?)")
		return 0
	fi
	printf -v now '%(%s)T' -1
	HANDSHAKE_AGE=$((now - REPLY))
	((HANDSHAKE_AGE >= 0)) || HANDSHAKE_AGE=0
	if ((HANDSHAKE_AGE >= HANDSHAKE_MAX_AGE)); then
		PROBLEMS+=("last handshake with the hub ${HANDSHAKE_AGE} s ago (more than $HANDSHAKE_MAX_AGE s)")
	fi
}

check_swarm() {
	swarm_state
	SWARM=$REPLY
	if [[ $SWARM == active ]]; then
		NODE_ADDR=$(docker info --format '{{.Swarm.NodeAddr}}' 2>/dev/null || true)
	else
		PROBLEMS+=("swarm state is $SWARM, not active")
	fi
}

# What join.sh set up to keep jobs in: still in force?
check_containment() {
	local opts
	opts=$(docker info --format '{{range .SecurityOptions}}{{.}} {{end}}' 2>/dev/null) || opts=''
	[[ $opts == *name=userns* ]] && CONTAINED=true
	if [[ ${ST[CONTAINMENT]:-0} == 1 && $CONTAINED != true ]]; then
		PROBLEMS+=("Docker runs without user-namespace remapping: jobs are not contained (run leave.sh, then join.sh again)")
	fi
	if [[ -v ST[WORKER_CHAIN] && $LINK_UP == true ]] && ! worker_chain_present; then
		PROBLEMS+=("iptables' INPUT chain has no jump to $WORKER_CHAIN: the swarm's ports answer beyond the VPN (wg-quick down $IFACE_NAME && wg-quick up $IFACE_NAME)")
	fi
}

# The rules that keep jobs off private networks (lib.sh job_net_*): still in
# place? (a firewall manager may flush them; a reboot without the VPN does)
check_job_network() {
	[[ -v ST[JOB_NET_DIR] ]] || return 0
	if job_net_present; then
		JOBS_NETWORK=true
	else
		PROBLEMS+=("the jobs' network rules are missing: jobs could reach this machine's networks (put them back: sudo ${ST[JOB_NET_DIR]}/jobnet.sh apply)")
	fi
}

# The hub registry's CA that join.sh installed: still where Docker reads it?
check_registry_ca() {
	[[ -v ST[REGISTRY] ]] || return 0
	registry_ca_path "${ST[REGISTRY]}"
	if [[ -f $REPLY ]]; then
		REGISTRY_CA=true
	else
		PROBLEMS+=("the hub registry's CA $REPLY is missing: images from ${ST[REGISTRY]} cannot be pulled (run leave.sh, then join.sh again)")
	fi
}

# The owner-activity agent, where join.sh installed one: running, and
# writing its status (every heartbeat, HEARTBEAT_S).
check_agent() {
	local now age
	[[ -v ST[AGENT_DIR] ]] || return 0
	if ! (load_agent_settings) >/dev/null 2>&1; then
		PROBLEMS+=("the owner-activity agent's settings $AGENT_ENV are missing or damaged (run leave.sh, then join.sh again)")
		return 0
	fi
	load_agent_settings
	read_agent_status
	if ! agent_running; then
		PROBLEMS+=("the owner-activity agent is not running: Grid-X's jobs would not pause for you (start it: sudo $AGENT_DIR/agent.sh start)")
	elif [[ ${ASTAT[UPDATED]:-} =~ ^[0-9]+$ ]]; then
		printf -v now '%(%s)T' -1
		age=$((now - ASTAT[UPDATED]))
		if ((age > 3 * AG[HEARTBEAT_S])); then
			PROBLEMS+=("the owner-activity agent has not written its status for $age s (look at $AGENT_LOG, or journalctl -u $AGENT_UNIT_NAME)")
		fi
	fi
	agent_json
	AGENT_JSON=$REPLY
}

print_json() {
	local healthy=$1 joined=$2 key p problems='' complete=false
	[[ ${ST[COMPLETE]:-0} == 1 ]] && complete=true
	printf '{"joined": %s, "complete": %s' "$joined" "$complete"
	for key in NAME INTERFACE VPN_IP HUB_VPN_IP HUB_ENDPOINT MANAGER; do
		json_str "${ST[$key]:-}"
		printf ', "%s": %s' "${key,,}" "$REPLY"
	done
	json_str "$NODE_ADDR"
	printf ', "link_up": %s, "handshake_age_s": %s, "swarm_state": "%s", "node_addr": %s' \
		"$LINK_UP" "$HANDSHAKE_AGE" "$SWARM" "$REPLY"
	json_str_list "${ST[SHARED_GPU_IDS]:-}"
	printf ', "shared": {"cpus": %s, "memory_mib": %s, "gpu_ids": %s}' \
		"${ST[SHARED_CPUS]:-0}" "${ST[SHARED_MEMORY_MIB]:-0}" "$REPLY"
	for p in "${PROBLEMS[@]}"; do
		json_str "$p"
		problems+=${problems:+, }$REPLY
	done
	json_str "${ST[REGISTRY]:-}"
	printf ', "registry": %s, "registry_ca": %s' "$REPLY" "$REGISTRY_CA"
	printf ', "contained": %s, "jobs_network": %s, "healthy": %s, "problems": [%s], "agent": %s}\n' \
		"$CONTAINED" "$JOBS_NETWORK" "$healthy" "$problems" "$AGENT_JSON"
}

print_human() {
	local age=never gpus=${ST[SHARED_GPU_IDS]:-}
	[[ $HANDSHAKE_AGE != null ]] && age="$HANDSHAKE_AGE s ago"
	printf 'Grid-X worker %s (%s)\n' "${ST[NAME]:-?}" "${ST[VPN_IP]:-?}"
	printf '  link %-10s %s\n' "${ST[INTERFACE]:-gridx0}" "$([[ $LINK_UP == true ]] && printf up || printf down)"
	printf '  handshake       %s (hub %s at %s)\n' "$age" "${ST[HUB_VPN_IP]:-?}" "${ST[HUB_ENDPOINT]:-?}"
	printf '  swarm           %s (manager %s)\n' "$SWARM" "${ST[MANAGER]:-?}"
	printf '  shared          %s CPUs, %s MiB, GPUs: %s\n' "${ST[SHARED_CPUS]:-?}" "${ST[SHARED_MEMORY_MIB]:-?}" "${gpus:-none}"
	printf '  contained       %s\n' "$([[ $CONTAINED == true ]] && printf 'yes (user-namespace remapping)' || printf no)"
	if [[ $JOBS_NETWORK == true ]]; then
		printf "  jobs' network   the internet only; allow-list: %s\n" "${ST[JOB_ALLOW]:-none}"
	else
		printf "  jobs' network   not kept off private networks\n"
	fi
	if [[ -v ST[REGISTRY] ]]; then
		printf '  registry        %s (CA %s)\n' "${ST[REGISTRY]}" "$([[ $REGISTRY_CA == true ]] && printf installed || printf missing)"
	fi
	if [[ $AGENT_JSON != null ]]; then agent_human; fi
}

main() {
	parse_args "$@"
	ensure_root "reads the VPN's state" "$@"
	init_paths
	find_legacy_state
	if [[ -f $GRIDX_BUNDLE_DIR/settings.env ]]; then load_settings; fi
	need_cmd ip wg docker
	if ! state_exists; then
		PROBLEMS=("not joined (no $STATE_FILE)")
		if ((OPT_JSON)); then print_json false false; fi
		warn "${PROBLEMS[0]}"
		exit 1
	fi
	load_state
	[[ ${ST[COMPLETE]:-0} == 1 ]] || PROBLEMS+=("a join stopped midway: run leave.sh, then join.sh again")
	check_link
	check_handshake
	check_swarm
	IFACE_NAME=${ST[INTERFACE]:-gridx0}
	check_containment
	check_job_network
	check_registry_ca
	check_agent
	local healthy=true p
	((${#PROBLEMS[@]} == 0)) || healthy=false
	if ((OPT_JSON)); then print_json "$healthy" true; else print_human; fi
	if [[ $healthy == true ]]; then
		((OPT_JSON)) || printf 'healthy\n'
		exit 0
	fi
	for p in "${PROBLEMS[@]}"; do printf 'unhealthy: %s\n' "$p" >&2; done
	exit 1
}

main "$@"
