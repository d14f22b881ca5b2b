#!/usr/bin/env bash
#
# join.sh - share this machine with a Grid-X hub.
#
# Joins the hub's WireGuard VPN and its Docker swarm, and tells the swarm how
# many CPUs, how much memory and which GPUs this machine shares. Run it from
# the bundle folder the hub admin gave you:
#
#   sudo ./join.sh                                  # asks its questions
#   sudo ./join.sh --cpus 4 --memory 8G --gpus 0 --yes   # asks nothing
#
# Options (every question has one):
#   --cpus N               CPUs to share (1 .. what the machine has)
#   --memory SIZE          memory to share: 512M, 8G, 1T (at most what it has)
#   --gpus N               GPUs to share (0 .. what nvidia-smi lists)
#   --gpu-ids ID,ID        which GPUs, by UUID (GPU-...) or nvidia-smi index
#   --private-key FILE     this machine's WireGuard private key, for a bundle
#                          made with `gridx hub add-peer NAME --pubkey KEY`
#   --install-deps         install missing packages (apt-get, pacman or dnf)
#   --handshake-timeout S  seconds to wait for the hub's handshake (30)
#   --no-hub-ssh           do not let the hub SSH in as root (the engine
#                          label gridx.hub-ssh=no tells the hub so)
#   --no-containment       leave Docker's user-namespace remapping and
#                          no-new-privileges off (see the warning it prints)
#   --share idle|always    when Grid-X may use this machine: idle = only while
#                          its owner is away (the default where a keyboard,
#                          mouse or desktop session is; always on a server)
#   --hours HH:MM-HH:MM    and only within these hours (local time), or any
#   -y, --yes              answer yes to "continue?" (values still need flags
#                          when there is no terminal)
#   -h, --help             this text
#
# Reads, from its own folder (GRIDX_BUNDLE_DIR):
#   settings.env     GRIDX_NAME GRIDX_INTERFACE GRIDX_VPN_IP GRIDX_HUB_VPN_IP
#                    GRIDX_HUB_ENDPOINT GRIDX_SUBNET GRIDX_MANAGER
#                    GRIDX_NEEDS_PRIVATE_KEY GRIDX_VERSION GRIDX_REGISTRY
#                    GRIDX_JOB_ALLOW (values, not code)
#   GRIDX_INTERFACE.conf  the WireGuard config (gridx0.conf)
#   swarm-token      the swarm's worker join token
#   hub_ssh.pub      the hub's SSH public key (optional: without it the hub
#                    cannot SSH here)
#   registry-ca.crt  the CA of the hub's image registry at GRIDX_REGISTRY
#                    (one PEM certificate; bundles from older hubs have none)
# and the path overrides listed in lib.sh (GRIDX_WG_DIR, GRIDX_STATE_DIR...).
#
# What it changes, in this order, each step recorded in the state folder
# just before it is made (so that a failure, or leave.sh, undoes exactly it):
#   1. /var/lib/gridx/ (0700: state.env, worker_config.json, backups)
#   1b. the jobs' network (lib.sh): the GRIDX-JOBS chain (from DOCKER-USER)
#      and GRIDX-JOBS-HOST (from INPUT), for iptables and ip6tables, so a
#      job reaches the internet and nothing private, except DNS to this
#      machine's name servers and GRIDX_JOB_ALLOW; a copy of jobnet.sh and
#      lib.sh in /var/lib/gridx/jobnet/ puts them back before each VPN up
#      (the config's PreUp)
#   2. /etc/wireguard/gridx0.conf (0600), never any other WireGuard config:
#      the bundle's, checked line by line (only the keys Grid-X writes), plus
#      PostUp/PostDown that add and remove the DOCKER-USER rule keeping ports
#      published by jobs on the VPN, and the GRIDX-WORKER INPUT chain keeping
#      the swarm's ports (2377, 7946, 4789) on the VPN
#   3. the gridx0 link (wg-quick up), then waits for the hub's handshake
#   4. /etc/docker/daemon.json, merged: user-namespace remapping and
#      no-new-privileges (containment, before the swarm join, which the
#      manager cannot undo), the userland proxy off (no docker-proxy on
#      IPv6), generic resources gridx_cpu, gridx_mem, NVIDIA-GPU, the label
#      gridx.hub-ssh=no with --no-hub-ssh, the nvidia runtime when GPUs are
#      shared; and the toolkit's config.toml (swarm-resource); Docker restarts
#      only if that changed them
#   5. /etc/docker/certs.d/GRIDX_REGISTRY/ca.crt: the hub registry's CA, so
#      Docker pulls the hub's images over TLS (Docker reads it at each pull:
#      no restart, no insecure-registries); an earlier file there is saved
#   6. the swarm membership (advertise, listen and data-path on the VPN IP)
#   7. one line in root's authorized_keys: the hub's key, from its VPN IP only
#      (not with --no-hub-ssh)
#   8. wg-quick@gridx0 enabled at boot, where systemd runs
#   9. the owner-activity agent (agent.sh): a copy in /var/lib/gridx/agent/
#      with its settings, run as gridx-agent.service where systemd runs, else
#      under its own supervisor loop (bundles without agent.sh: skipped)
# If a step fails, the trap undoes the steps done, newest first.
#
# Exit codes: 0 joined, 1 failed (and rolled back), 2 bad usage or input,
# 3 a precondition is missing (not root, a tool, Docker not running, already
# joined), 130 interrupted (rolled back).

set -euo pipefail
export LC_ALL=C
umask 077

GRIDX_PROG=join.sh
GRIDX_BUNDLE_DIR=${BASH_SOURCE[0]%/*}
[[ $GRIDX_BUNDLE_DIR != "${BASH_SOURCE[0]}" ]] || GRIDX_BUNDLE_DIR=.
GRIDX_BUNDLE_DIR=$(cd "$GRIDX_BUNDLE_DIR" && pwd -P)
# shellcheck source=lib.sh
. "$GRIDX_BUNDLE_DIR/lib.sh"

# Answers (flags, or prompts) and what the machine has.
OPT_CPUS='' OPT_MEMORY='' OPT_GPUS='' OPT_GPU_IDS='' OPT_PRIVATE_KEY=''
OPT_YES=0 OPT_INSTALL_DEPS=0 OPT_HANDSHAKE_TIMEOUT=30 OPT_HUB_SSH=1 OPT_CONTAINMENT=1
OPT_SHARE='' OPT_HOURS='' SHARE='' HOURS='' AGENT_BUNDLED=0 POLICY_HINT=''
MACHINE_CPUS=0 MACHINE_MEM_MIB=0 GPUS_LISTED=0 MACHINE_GPUS=()
SHARED_CPUS=0 SHARED_MEM_MIB=0 SHARED_GPUS=()
VPN_IP='' HUB_VPN_IP='' HUB_ENDPOINT='' MANAGER='' NAME='' SUBNET='' PREFIX=''
ENGINE_VERSION='' REMAP_KEPT='' TOOLKIT_VERSION=''
WG_CONF='' WG_CONF_SAME=0 KEY_LINE='' RUNTIME_PATH=''
DAEMON_CHANGE=0 NVIDIA_CHANGE=0 WORK='' ROLLBACK_ARMED=0
REGISTRY='' REGISTRY_CA=''

usage() {
	cat <<EOF
Usage: sudo ./join.sh [--cpus N] [--memory SIZE] [--gpus N] [--gpu-ids ID,ID]
                      [--private-key FILE] [--install-deps]
                      [--handshake-timeout SECONDS] [--no-hub-ssh]
                      [--no-containment] [--share idle|always]
                      [--hours HH:MM-HH:MM] [-y|--yes]

Share this machine with the Grid-X hub this bundle came from: join its VPN
and its Docker swarm, sharing the CPUs, memory and GPUs you choose.

  --cpus N               CPUs to share (1 .. what the machine has)
  --memory SIZE          memory to share, e.g. 512M, 8G (at most what it has)
  --gpus N               GPUs to share (0 .. what nvidia-smi lists)
  --gpu-ids ID,ID        which GPUs: UUIDs (GPU-...) or nvidia-smi indexes
  --private-key FILE     this machine's WireGuard private key (bundles made
                         with add-peer --pubkey)
  --install-deps         install missing packages with apt-get/pacman/dnf
  --handshake-timeout S  seconds to wait for the hub to answer (default 30)
  --no-hub-ssh           do not let the hub SSH in as root
  --no-containment       no user-namespace remapping or no-new-privileges in
                         Docker: the hub could then read and write every file
                         here as root (it warns; only for a machine that is
                         the hub's own anyway)
  --share idle|always    idle: Grid-X's jobs run only while you are away from
                         this machine (they pause within 2 s when you use
                         it); always: whenever the hub has jobs for it.
                         Default: idle where a keyboard, mouse or desktop
                         session is, always on a server (--yes takes it)
  --hours HH:MM-HH:MM    only within these hours, local time (22:00-08:00
                         crosses midnight); "any" (the default): any time.
                         Change either later: sudo ./agent.sh policy --help
  -y, --yes              do not ask "continue?"
  -h, --help             show this text

Without a terminal, every value must come as a flag (and --yes).
Undo everything with ./leave.sh; check health with ./status.sh.

Exit status: 0 joined, 1 failed (rolled back), 2 bad usage or input,
3 a precondition is missing, 130 interrupted.
EOF
}

# ------------------------------------------------------------ arguments ----

parse_args() {
	local opt value
	while (($#)); do
		opt=$1
		value=''
		if [[ $opt == --*=* ]]; then
			value=${opt#*=}
			opt=${opt%%=*}
			shift
			set -- "$opt" "$value" "$@"
		fi
		case $opt in
		--cpus | --memory | --gpus | --gpu-ids | --private-key | --handshake-timeout | --share | --hours)
			if (($# < 2)) || [[ $2 == --* ]]; then fatal 2 "$opt needs a value" "see $GRIDX_PROG --help"; fi
			value=$2
			shift 2
			;;
		-y | --yes | --install-deps | --no-hub-ssh | --no-containment)
			shift
			;;
		-h | --help)
			usage
			exit 0
			;;
		*) fatal 2 "unknown option '$opt'" "see $GRIDX_PROG --help" ;;
		esac
		case $opt in
		--cpus) OPT_CPUS=$value ;;
		--memory) OPT_MEMORY=$value ;;
		--gpus) OPT_GPUS=$value ;;
		--gpu-ids) OPT_GPU_IDS=${value:-,} ;;
		--private-key) OPT_PRIVATE_KEY=$value ;;
		--handshake-timeout) OPT_HANDSHAKE_TIMEOUT=$value ;;
		-y | --yes) OPT_YES=1 ;;
		--install-deps) OPT_INSTALL_DEPS=1 ;;
		--no-hub-ssh) OPT_HUB_SSH=0 ;;
		--no-containment) OPT_CONTAINMENT=0 ;;
		--share) OPT_SHARE=$value ;;
		--hours) OPT_HOURS=$value ;;
		esac
	done
	# What can be judged without the machine is judged now, before anything.
	if [[ -n $OPT_CPUS ]] && ! is_count "$OPT_CPUS"; then fatal 2 "--cpus '$OPT_CPUS' is not a whole number" "e.g. --cpus 4"; fi
	if [[ -n $OPT_CPUS ]] && ((10#$OPT_CPUS == 0)); then fatal 2 "--cpus 0: share at least 1 CPU" "to share nothing, do not join"; fi
	if [[ -n $OPT_MEMORY ]] && ! memory_mib "$OPT_MEMORY"; then fatal 2 "--memory '$OPT_MEMORY': $REPLY" "e.g. --memory 8G or --memory 512M"; fi
	if [[ -n $OPT_GPUS ]] && ! is_count "$OPT_GPUS"; then fatal 2 "--gpus '$OPT_GPUS' is not a whole number" "e.g. --gpus 1, or --gpus 0"; fi
	check_policy_flags
	if ! is_count "$OPT_HANDSHAKE_TIMEOUT" || ((10#$OPT_HANDSHAKE_TIMEOUT == 0)); then
		fatal 2 "--handshake-timeout '$OPT_HANDSHAKE_TIMEOUT' is not a number of seconds above 0" "e.g. --handshake-timeout 60"
	fi
	return 0
}

is_count() { [[ $1 =~ ^[0-9]{1,6}$ ]]; }

# memory_mib SIZE -> REPLY: MiB; or fails with REPLY = what is wrong.
memory_mib() {
	local re='^([0-9]{1,9})[[:space:]]*([MmGgTt])([iI]?[bB]?)$' n
	if [[ $1 =~ ^[0-9]+$ ]]; then
		REPLY="a size needs a unit: ${1}M or ${1}G"
		return 1
	fi
	if [[ ! $1 =~ $re ]]; then
		REPLY="not a size (use a whole number and M, G or T)"
		return 1
	fi
	n=$((10#${BASH_REMATCH[1]}))
	case ${BASH_REMATCH[2]} in
	[Gg]) n=$((n * 1024)) ;;
	[Tt]) n=$((n * 1024 * 1024)) ;;
	esac
	if ((n == 0)); then
		REPLY="share more than 0"
		return 1
	fi
	REPLY=$n
}

# ---------------------------------------------------------------- prompts ----

have_terminal() { [[ -t 0 ]]; }

# ask PROMPT DEFAULT [SHOWN] -> REPLY (the default on an empty answer; SHOWN
# is how the default is shown, the default itself when not given)
ask() {
	local answer
	if ! read -r -p "$1 [${3:-$2}]: " answer; then
		printf '\n' >&2
		fatal 2 "no answer to: $1"
	fi
	REPLY=${answer:-$2}
}

# ask_yes PROMPT DEFAULT(y/n): succeeds on yes.
ask_yes() {
	local shown=y/N
	[[ $2 == y ]] && shown=Y/n
	ask "$1?" "$2" "$shown"
	[[ $REPLY =~ ^[Yy]([Ee][Ss])?$ ]]
}

# no_terminal WHAT FLAG: a missing answer without a terminal to ask.
no_terminal() {
	fatal 2 "no terminal to ask $1: pass $2" "e.g. sudo ./join.sh --cpus 4 --memory 8G --gpus 0 --yes"
}

# ------------------------------------------------------------------ bundle ----

# The bundle's files and values (settings.env was checked by load_settings).
check_bundle() {
	local conf=$GRIDX_BUNDLE_DIR/$IFACE.conf token key
	[[ -f $conf ]] || fatal 3 "$conf is missing: this folder is not a complete Grid-X bundle" "ask the hub admin for the bundle again"
	[[ -s $GRIDX_BUNDLE_DIR/swarm-token ]] || fatal 3 "$GRIDX_BUNDLE_DIR/swarm-token is missing or empty" "ask the hub admin for the bundle again"
	for key in GRIDX_VPN_IP GRIDX_SUBNET GRIDX_HUB_ENDPOINT; do
		[[ -n ${S[$key]:-} ]] || fatal 2 "settings.env has no $key" "ask the hub admin for the bundle again"
	done
	VPN_IP=${S[GRIDX_VPN_IP]}
	SUBNET=${S[GRIDX_SUBNET]}
	PREFIX=${SUBNET##*/}
	HUB_ENDPOINT=${S[GRIDX_HUB_ENDPOINT]}
	MANAGER=${S[GRIDX_MANAGER]:-}
	HUB_VPN_IP=${S[GRIDX_HUB_VPN_IP]:-${MANAGER%:*}}
	is_ipv4 "$HUB_VPN_IP" || fatal 2 "settings.env has neither GRIDX_HUB_VPN_IP nor GRIDX_MANAGER" "ask the hub admin for the bundle again"
	MANAGER=${MANAGER:-$HUB_VPN_IP:2377}
	cidr_inside "$VPN_IP" "$SUBNET" || fatal 2 "settings.env: GRIDX_VPN_IP $VPN_IP is not in GRIDX_SUBNET $SUBNET" "ask the hub admin for the bundle again"
	cidr_inside "$HUB_VPN_IP" "$SUBNET" || fatal 2 "settings.env: the hub's VPN address $HUB_VPN_IP is not in GRIDX_SUBNET $SUBNET" "ask the hub admin for the bundle again"
	NAME=${S[GRIDX_NAME]:-$(uname -n)}
	NAME=${NAME%%.*}
	is_dns_label "${NAME,,}" || fatal 2 "this machine's name '$NAME' is not a DNS label, and settings.env has no GRIDX_NAME" "ask the hub admin for a bundle made with gridx hub add-peer NAME"
	NAME=${NAME,,}
	read -r token <"$GRIDX_BUNDLE_DIR/swarm-token" || true
	[[ $token =~ ^SWMTKN-[0-9]+-[a-z0-9]+-[a-z0-9]+$ ]] || fatal 2 "$GRIDX_BUNDLE_DIR/swarm-token does not hold a swarm join token (SWMTKN-1-...)" "ask the hub admin for the bundle again (gridx hub refresh-bundle $NAME)"
	SWARM_TOKEN=$token
	WG_CONF=$WG_DIR/$IFACE.conf
	check_wg_config "$conf"
	check_registry_ca
}

# The registry's CA is data too: one PEM certificate (base64 lines between
# the markers), nothing else, or exit 2. REGISTRY is empty for a bundle of a
# hub without a registry.
check_registry_ca() {
	local file=$GRIDX_BUNDLE_DIR/registry-ca.crt line n=0 state=before
	REGISTRY=${S[GRIDX_REGISTRY]:-}
	[[ -n $REGISTRY ]] || return 0
	# Docker trusts the CA for exactly this address: the hub's, never another
	[[ ${REGISTRY%:*} == "$HUB_VPN_IP" ]] || fatal 2 "settings.env names the registry $REGISTRY, which is not at the hub's VPN address $HUB_VPN_IP" "ask the hub admin for the bundle again (gridx hub refresh-bundle $NAME)"
	[[ -f $file && ! -L $file ]] || fatal 2 "settings.env names the registry $REGISTRY but $file is missing" "ask the hub admin for the bundle again (gridx hub refresh-bundle $NAME)"
	(($(stat -c %s -- "$file") <= 16384)) || fatal 2 "$file is larger than a certificate (16 KiB)" "ask the hub admin for the bundle again"
	while IFS= read -r line || [[ -n $line ]]; do
		n=$((n + 1))
		case $state:$line in
		before:'-----BEGIN CERTIFICATE-----') state=inside ;;
		inside:'-----END CERTIFICATE-----') state=after ;;
		inside:*) [[ $line =~ ^[A-Za-z0-9+/]{1,76}={0,2}$ ]] || state=bad ;;
		after:) ;;
		*) state=bad ;;
		esac
		[[ $state != bad ]] || fatal 2 "$file line $n: not a PEM certificate (one -----BEGIN CERTIFICATE----- block and nothing else)" "ask the hub admin for the bundle again"
	done <"$file"
	[[ $state == after ]] || fatal 2 "$file is not a PEM certificate (one -----BEGIN CERTIFICATE----- block and nothing else)" "ask the hub admin for the bundle again"
	REGISTRY_CA=$file
}

# ------------------------------------------------------------ the wg config ----
# The bundle's WireGuard config is data: wg-quick runs PreUp/PostUp/PreDown/
# PostDown as shell commands and DNS/Table/SaveConfig change the machine, so
# only the keys Grid-X writes (gridx.py render_worker_wg_conf) are accepted,
# with values checked; join.sh adds its own hooks. wg-quick reads keys without
# regard to case and drops everything after a '#': so does this.

# wg_bad N WHAT: exit 2 naming the line.
wg_bad() {
	fatal 2 "$IFACE.conf line $1: $2" "this file is not as the hub wrote it: ask the hub admin for the bundle again"
}

is_wg_key() { [[ $1 =~ ^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw480]=$ ]]; }

check_wg_config() { # FILE
	local line n=0 section='' name key value seen=' ' item items
	local re_kv='^[[:space:]]*([A-Za-z]+)[[:space:]]*=[[:space:]]*(.*[^[:space:]])[[:space:]]*$'
	while IFS= read -r line || [[ -n $line ]]; do
		n=$((n + 1))
		line=${line%%#*}
		line=${line%$'\r'}
		[[ $line =~ ^[[:space:]]*$ ]] && continue
		if [[ $line =~ ^[[:space:]]*\[([A-Za-z]+)\][[:space:]]*$ ]]; then
			case ${BASH_REMATCH[1],,} in
			interface) [[ -z $section ]] || wg_bad "$n" "a second [Interface] section" ;;
			peer) [[ $section == interface ]] || wg_bad "$n" "[Peer] must follow the one [Interface] section (Grid-X writes one peer: the hub)" ;;
			*) wg_bad "$n" "unknown section [${BASH_REMATCH[1]}]" ;;
			esac
			section=${BASH_REMATCH[1],,}
			continue
		fi
		[[ $line =~ $re_kv ]] || wg_bad "$n" "not a 'Key = value' line"
		name=${BASH_REMATCH[1]} key=${BASH_REMATCH[1],,} value=${BASH_REMATCH[2]}
		[[ -n $section ]] || wg_bad "$n" "'$name' comes before [Interface]"
		[[ $seen != *" $section.$key "* ]] || wg_bad "$n" "'$name' is given twice"
		seen+="$section.$key "
		case $section.$key in
		interface.privatekey)
			is_wg_key "$value" || [[ $value == GRIDX_PRIVATE_KEY_PLACEHOLDER ]] || wg_bad "$n" "PrivateKey is not a WireGuard key"
			;;
		interface.address)
			[[ $value == "$VPN_IP/$PREFIX" ]] || wg_bad "$n" "Address must be this bundle's VPN address $VPN_IP/$PREFIX (GRIDX_VPN_IP in GRIDX_SUBNET), not '$value'"
			;;
		interface.mtu)
			{ [[ $value =~ ^[0-9]{3,5}$ ]] && ((10#$value >= 576 && 10#$value <= 9000)); } || wg_bad "$n" "MTU '$value' is not a number from 576 to 9000"
			;;
		interface.listenport) is_port "$value" || wg_bad "$n" "ListenPort '$value' is not a port" ;;
		peer.publickey) is_wg_key "$value" || wg_bad "$n" "PublicKey is not a WireGuard key" ;;
		peer.endpoint)
			is_endpoint "$value" || wg_bad "$n" "Endpoint '$value' is not host:port"
			[[ $value == "$HUB_ENDPOINT" ]] || wg_bad "$n" "Endpoint '$value' is not the hub's ($HUB_ENDPOINT in settings.env)"
			;;
		peer.allowedips)
			IFS=, read -r -a items <<<"$value"
			((${#items[@]})) || wg_bad "$n" "AllowedIPs is empty"
			for item in "${items[@]}"; do
				item=${item//[[:space:]]/}
				[[ $item == */* ]] || item+=/32
				{ is_cidr "$item" && cidr_inside "$item" "$SUBNET"; } || wg_bad "$n" "AllowedIPs '$item' is not inside the VPN subnet $SUBNET"
			done
			;;
		peer.persistentkeepalive)
			if [[ $value != off ]] && { [[ ! $value =~ ^[0-9]{1,5}$ ]] || ((10#$value > 65535)); }; then
				wg_bad "$n" "PersistentKeepalive '$value' is not a number of seconds"
			fi
			;;
		*) wg_bad "$n" "'$name' is not a key Grid-X writes (only PrivateKey, Address, MTU, ListenPort; PublicKey, Endpoint, AllowedIPs, PersistentKeepalive)" ;;
		esac
	done <"$1"
	[[ $seen == *" interface.privatekey "* ]] || wg_bad "$n" "no PrivateKey in [Interface]"
	[[ $seen == *" interface.address "* ]] || wg_bad "$n" "no Address in [Interface]"
	[[ $seen == *" peer.publickey "* && $seen == *" peer.endpoint "* && $seen == *" peer.allowedips "* ]] ||
		wg_bad "$n" "the [Peer] (the hub) needs PublicKey, Endpoint and AllowedIPs"
}

# ----------------------------------------------------------- prerequisites ----

# Every missing tool at once, with the install command for each system.
check_prerequisites() {
	local missing=() apt=() pacman=() dnf=()
	if ! have_cmd wg || ! have_cmd wg-quick; then
		missing+=("wg/wg-quick") apt+=(wireguard-tools) pacman+=(wireguard-tools) dnf+=(wireguard-tools)
	fi
	if ! have_cmd docker; then
		# Debian 13 and Ubuntu 24.04 ship the command in docker-cli, which
		# docker.io only recommends: an install without recommends has
		# dockerd and no docker.
		if have_cmd dockerd; then
			missing+=("docker (the command; dockerd is installed)") apt+=(docker-cli) pacman+=(docker) dnf+=(moby-engine)
		elif apt_knows docker-cli; then
			missing+=(docker) apt+=(docker.io docker-cli) pacman+=(docker) dnf+=(moby-engine)
		else
			missing+=(docker) apt+=(docker.io) pacman+=(docker) dnf+=(moby-engine)
		fi
	fi
	if ! have_cmd ip; then
		missing+=(ip) apt+=(iproute2) pacman+=(iproute2) dnf+=(iproute)
	fi
	if ! have_cmd iptables; then
		missing+=(iptables) apt+=(iptables) pacman+=(iptables) dnf+=(iptables)
	fi
	if ! have_cmd sshd && [[ ! -x /usr/sbin/sshd ]]; then
		warn "sshd is not installed: the hub cannot reach this machine with 'gridx hub ssh' (install openssh-server, or openssh on Arch)"
	fi
	if [[ ! -d /sys/module/wireguard ]] && ! have_cmd wireguard-go; then
		warn "no WireGuard kernel module loaded and no wireguard-go: if 'wg-quick up' fails, install wireguard-go"
	fi
	if ((${#missing[@]})); then
		warn "missing: ${missing[*]}"
		info "  Debian/Ubuntu: sudo apt-get install -y ${apt[*]}"
		info "  Arch:          sudo pacman -S --needed ${pacman[*]}"
		info "  Fedora:        sudo dnf install -y ${dnf[*]}"
		if ((OPT_INSTALL_DEPS)) || { have_terminal && ask_yes "Install them now" n; }; then
			install_packages "${apt[*]}" "${pacman[*]}" "${dnf[*]}"
		else
			fatal 3 "missing prerequisites: ${missing[*]}" "install them as shown above, or run: sudo ./join.sh --install-deps"
		fi
	fi
	if ! docker info >/dev/null 2>&1; then
		fatal 3 "Docker is installed but not running (docker info fails)" "start it (systemctl start docker, or service docker start) and run join.sh again"
	fi
	check_engine_version
	check_engine_settings
}

apt_knows() { have_cmd apt-cache && apt-cache show -- "$1" >/dev/null 2>&1; }

# Docker 23.0.2 to 25.0.2 carry moby/swarmkit#3162: the constraint enforcer's
# HasResource compares discrete generic resources the wrong way round
# (api/genericresource/validate.go: "<" fixed to ">" in 25.0.3; 23.0.2 added
# the "!" before it, moby/swarmkit#3082), so a task reserving fewer gridx_cpu
# or gridx_mem than its node offers is rejected ("assigned node no longer
# meets constraints"): every Grid-X job. Read in moby's vendored swarmkit of
# each release tag: 20.10.x-23.0.1 and 25.0.3 on have the working pair, 24.0.x
# has it broken throughout.
check_engine_version() {
	local v
	v=$(docker version --format '{{.Server.Version}}' 2>/dev/null) || v=''
	ENGINE_VERSION=$v
	if [[ ! $v =~ ^([0-9]+)\.([0-9]+)\.([0-9]+) ]]; then
		warn "cannot read Docker's version ('$v'): Grid-X is tested on Docker 20.10 and 26.1"
		return 0
	fi
	local major=$((10#${BASH_REMATCH[1]})) minor=$((10#${BASH_REMATCH[2]})) patch=$((10#${BASH_REMATCH[3]}))
	# 23.0.2 <= version <= 25.0.2, as gridx.py's BROKEN_ENGINES
	if ((major == 24 || (major == 23 && (minor > 0 || patch >= 2)) || (major == 25 && minor == 0 && patch <= 2))); then
		fatal 3 "Docker $v cannot run Grid-X jobs: Docker 23.0.2 to 25.0.2 reject every task that reserves part of a node's generic resources, which is how Grid-X places jobs (moby/swarmkit#3162)" \
			"upgrade Docker to 25.0.3 or newer (Debian 13's docker.io, Docker CE from https://docs.docker.com/engine/install/) or use 20.10, then run join.sh again"
	fi
}

# Settings of the running engine that a worker cannot have.
check_engine_settings() {
	local content='' remap
	[[ -f $DAEMON_JSON ]] && content=$(<"$DAEMON_JSON")
	# Swarm mode refuses live-restore, and docker swarm join then fails with
	# "--live-restore daemon configuration is incompatible with swarm mode".
	if [[ $(docker info --format '{{.LiveRestoreEnabled}}' 2>/dev/null) == true ]] ||
		[[ $content =~ \"live-restore\"[[:space:]]*:[[:space:]]*true ]]; then
		fatal 3 "Docker runs with live-restore on, which swarm mode refuses" \
			"remove \"live-restore\": true from $DAEMON_JSON (or the --live-restore flag), restart Docker, then run join.sh again"
	fi
	# Docker's jump to DOCKER-USER, not a chain that something else made:
	# without it the rule keeping published ports on the VPN is never used.
	if ! iptables -C FORWARD -j DOCKER-USER >/dev/null 2>&1; then
		fatal 3 "iptables' FORWARD chain has no jump to DOCKER-USER: Docker runs without its iptables rules, so ports that jobs publish could not be kept off this machine's other networks" \
			"let Docker manage iptables (remove \"iptables\": false from $DAEMON_JSON or the --iptables=false flag), restart Docker, then run join.sh again"
	fi
	# A remapping of the volunteer's own is kept: it contains jobs the same
	# way, and replacing it would hide the images it holds.
	REMAP_KEPT=''
	if [[ $content =~ \"userns-remap\"[[:space:]]*:[[:space:]]*\"([^\"]*)\" ]]; then
		remap=${BASH_REMATCH[1]}
		[[ -z $remap || $remap == default ]] || REMAP_KEPT=$remap
	fi
}

install_packages() { # APT_LIST PACMAN_LIST DNF_LIST (space-separated)
	local list
	if have_cmd apt-get; then
		read -r -a list <<<"$1"
		cmd apt-get update
		cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y "${list[@]}"
	elif have_cmd pacman; then
		read -r -a list <<<"$2"
		cmd pacman -S --needed --noconfirm "${list[@]}"
	elif have_cmd dnf; then
		read -r -a list <<<"$3"
		cmd dnf install -y "${list[@]}"
	else
		fatal 3 "no apt-get, pacman or dnf here to install with" "install the packages above with this system's package manager"
	fi
	local tool
	for tool in wg wg-quick docker ip iptables; do
		have_cmd "$tool" || fatal 3 "'$tool' is still missing after the install" "install it by hand and run join.sh again"
	done
	if ! docker info >/dev/null 2>&1; then
		if systemd_runs; then cmd systemctl enable --now docker; else cmd service docker start; fi
		wait_docker
	fi
}

# ------------------------------------------------------------ preconditions ----

check_not_joined() {
	if [[ -f $LEGACY_STATE_DIR/state.env && -z ${GRIDX_STATE_DIR:-} ]]; then
		fatal 3 "this machine was joined by an older join.sh ($LEGACY_STATE_DIR/state.env exists)" "run $GRIDX_BUNDLE_DIR/leave.sh first, then join.sh again"
	fi
	if state_exists; then
		fatal 3 "this machine has already joined Grid-X, or a join stopped midway ($STATE_FILE exists)" "run $GRIDX_BUNDLE_DIR/leave.sh first (it undoes exactly what was done), then join.sh again"
	fi
	if link_exists "$IFACE"; then
		fatal 3 "a network interface named $IFACE already exists" "if it is an old Grid-X link, take it down (wg-quick down $IFACE), then run join.sh again"
	fi
	swarm_state
	case $REPLY in
	inactive) ;;
	unknown) fatal 3 "cannot read Docker's swarm state (docker info fails)" "check that Docker runs: docker info" ;;
	*) fatal 3 "Docker on this machine is already in a swarm (state: $REPLY)" "leave it first with: docker swarm leave (--force on a manager; this stops its swarm services), then run join.sh again" ;;
	esac
	check_routes
}

# A VPN subnet that overlaps a network this machine reaches would take those
# addresses away from it (or the VPN would never answer): refused.
check_routes() {
	local line net
	while read -r line; do
		read -r net _ <<<"$line"
		case $net in unreachable | prohibit | blackhole | throw | unicast) read -r _ net _ <<<"$line" ;; esac
		[[ $net == default || -z $net ]] && continue
		[[ $net == */* ]] || net+=/32
		is_ipv4 "${net%/*}" || continue
		if cidrs_overlap "$net" "$SUBNET"; then
			fatal 3 "the VPN subnet $SUBNET overlaps this machine's route '$line'" \
				"tell the hub admin to pick a subnet this network does not use (gridx hub init --subnet, e.g. 10.201.0.0/24) and send a new bundle"
		fi
	done < <(ip -4 route show 2>/dev/null || true)
}

# ------------------------------------------------------------------ answers ----

detect_machine() {
	local line
	MACHINE_CPUS=$(nproc)
	while IFS= read -r line; do
		if [[ $line =~ ^MemTotal:[[:space:]]*([0-9]+)[[:space:]]*kB ]]; then MACHINE_MEM_MIB=$((BASH_REMATCH[1] / 1024)); fi
	done <"$MEMINFO"
	((MACHINE_MEM_MIB > 0)) || fatal 3 "cannot read the memory size from $MEMINFO"
	MACHINE_GPUS=()
	if have_cmd nvidia-smi; then
		local out
		if out=$(nvidia-smi --query-gpu=uuid --format=csv,noheader 2>/dev/null); then
			GPUS_LISTED=1
			while read -r line; do
				[[ -n $line ]] && MACHINE_GPUS+=("$line")
			done <<<"$out"
		else
			warn "nvidia-smi is installed but cannot list GPUs (driver not loaded?)"
		fi
	fi
	info "this machine has $MACHINE_CPUS CPUs, $MACHINE_MEM_MIB MiB of memory and ${#MACHINE_GPUS[@]} GPUs"
}

check_cpus() {
	if ! is_count "$1"; then
		REPLY="'$1' is not a whole number"
	elif ((10#$1 == 0)); then
		REPLY="share at least 1 CPU"
	elif ((10#$1 > MACHINE_CPUS)); then
		REPLY="this machine has only $MACHINE_CPUS CPUs"
	else
		REPLY=$((10#$1))
		return 0
	fi
	return 1
}

check_memory() {
	memory_mib "$1" || return 1
	if ((REPLY > MACHINE_MEM_MIB)); then
		REPLY="this machine has only $MACHINE_MEM_MIB MiB of memory"
		return 1
	fi
}

check_gpu_count() {
	if ! is_count "$1"; then
		REPLY="'$1' is not a whole number"
	elif ((10#$1 > ${#MACHINE_GPUS[@]})); then
		if ((GPUS_LISTED)); then
			REPLY="this machine has only ${#MACHINE_GPUS[@]} GPUs"
		else
			REPLY="no GPU found here (nvidia-smi cannot list any); name them with --gpu-ids"
		fi
	else
		REPLY=$((10#$1))
		return 0
	fi
	return 1
}

# check_gpu_ids "ID,ID" -> GPU_PICK=(uuids); indexes map to nvidia-smi's order.
check_gpu_ids() {
	local ids id gpu found
	GPU_PICK=()
	IFS=, read -r -a ids <<<"$1"
	if ((${#ids[@]} == 0)) || [[ $1 == *,, || $1 == ,* || $1 == *, ]]; then
		REPLY="'$1' is not a comma-separated list of GPU ids"
		return 1
	fi
	for id in "${ids[@]}"; do
		if [[ ! $id =~ ^[A-Za-z0-9_.:][A-Za-z0-9_.:-]*$ ]]; then
			REPLY="'$id' is not a GPU id (like GPU-8f3a...)"
			return 1
		fi
		if ((GPUS_LISTED)); then
			if [[ $id =~ ^[0-9]+$ ]] && ((10#$id < ${#MACHINE_GPUS[@]})); then id=${MACHINE_GPUS[10#$id]}; fi
			found=0
			for gpu in "${MACHINE_GPUS[@]}"; do [[ $gpu == "$id" ]] && found=1; done
			if ((!found)); then
				REPLY="GPU '$id' is not on this machine (nvidia-smi lists: ${MACHINE_GPUS[*]:-none})"
				return 1
			fi
		fi
		for gpu in "${GPU_PICK[@]}"; do
			if [[ $gpu == "$id" ]]; then
				REPLY="GPU '$id' is named twice"
				return 1
			fi
		done
		GPU_PICK+=("$id")
	done
}

# choose CHECKER FLAG VALUE PROMPT DEFAULT -> REPLY: the flag's value, or the
# answer to the prompt (asked again until it passes the check).
choose() {
	local checker=$1 flag=$2 value=$3 prompt=$4 default=$5
	if [[ -n $value ]]; then
		"$checker" "$value" || fatal 2 "$flag $value: $REPLY"
		return 0
	fi
	have_terminal || no_terminal "'$prompt'" "$flag"
	while :; do
		ask "$prompt" "$default"
		value=$REPLY
		"$checker" "$value" && return 0
		warn "$REPLY"
	done
}

choose_resources() {
	choose check_cpus --cpus "$OPT_CPUS" "How many CPUs to share (1-$MACHINE_CPUS)" "$MACHINE_CPUS"
	SHARED_CPUS=$REPLY
	choose check_memory --memory "$OPT_MEMORY" "How much memory to share (e.g. 8G, at most ${MACHINE_MEM_MIB}M)" "${MACHINE_MEM_MIB}M"
	SHARED_MEM_MIB=$REPLY
	choose_gpus
}

choose_gpus() {
	local count
	SHARED_GPUS=()
	if [[ -n $OPT_GPU_IDS ]]; then
		check_gpu_ids "$OPT_GPU_IDS" || fatal 2 "--gpu-ids $OPT_GPU_IDS: $REPLY"
		if ((!GPUS_LISTED)); then
			warn "nvidia-smi cannot list GPUs here: sharing ${GPU_PICK[*]} as given, unchecked"
		fi
		if [[ -n $OPT_GPUS ]] && ((10#$OPT_GPUS != ${#GPU_PICK[@]})); then
			fatal 2 "--gpus $OPT_GPUS but --gpu-ids names ${#GPU_PICK[@]} GPUs" "give one of them, or make them agree"
		fi
		SHARED_GPUS=("${GPU_PICK[@]}")
		return 0
	fi
	if [[ -z $OPT_GPUS ]] && ((${#MACHINE_GPUS[@]} == 0)); then
		return 0 # nothing to share, nothing to ask
	fi
	choose check_gpu_count --gpus "$OPT_GPUS" "How many GPUs to share (0-${#MACHINE_GPUS[@]})" "${#MACHINE_GPUS[@]}"
	count=$REPLY
	((count > 0)) || return 0
	SHARED_GPUS=("${MACHINE_GPUS[@]:0:count}")
	if ((count < ${#MACHINE_GPUS[@]})) && [[ -z $OPT_GPUS ]]; then
		local i
		for i in "${!MACHINE_GPUS[@]}"; do info "  GPU $i: ${MACHINE_GPUS[i]}"; done
		local first=0
		for ((i = 1; i < count; i++)); do first+=",$i"; done
		while :; do
			ask "Which GPUs (indexes or UUIDs, comma-separated)" "$first"
			if check_gpu_ids "$REPLY"; then
				((${#GPU_PICK[@]} == count)) && break
				REPLY="name exactly $count GPUs"
			fi
			warn "$REPLY"
		done
		SHARED_GPUS=("${GPU_PICK[@]}")
	fi
}

# Bundles made with add-peer --pubkey carry a placeholder for the key.
choose_private_key() {
	local file=$OPT_PRIVATE_KEY key
	if [[ ${S[GRIDX_NEEDS_PRIVATE_KEY]:-0} != 1 ]]; then
		[[ -z $file ]] || fatal 2 "--private-key: this bundle already holds its WireGuard key" "leave --private-key out; it is for bundles made with add-peer --pubkey"
		PRIVATE_KEY=''
		return 0
	fi
	if [[ -z $file ]]; then
		have_terminal || no_terminal "for this machine's WireGuard private key (this bundle was made with add-peer --pubkey)" "--private-key FILE"
		info "This bundle was made from this machine's public key: its private key never left this machine."
		ask "Path to that WireGuard private key file" "/etc/wireguard/private.key"
		file=$REPLY
	fi
	[[ -f $file && -r $file ]] || fatal 2 "--private-key $file: no such readable file"
	read -r key <"$file" || true
	[[ $key =~ ^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw480]=$ ]] || fatal 2 "--private-key $file does not hold a WireGuard private key" "make one with: wg genkey > private.key (and give the hub admin: wg pubkey < private.key)"
	if [[ $(stat -c %a -- "$file") != *00 ]]; then
		warn "$file is readable by other users: chmod 600 $file"
	fi
	PRIVATE_KEY=$key
}

# ------------------------------------------------------------ the owner first ----
# When Grid-X may use this machine: agent.sh enforces it (README "The owner
# comes first"); `agent.sh policy` changes it later without leaving.

check_policy_flags() {
	if [[ -n $OPT_SHARE && $OPT_SHARE != idle && $OPT_SHARE != always ]]; then
		fatal 2 "--share '$OPT_SHARE' is not idle or always" "idle: only while you are away from this machine; always: whenever"
	fi
	if [[ -n $OPT_HOURS && $OPT_HOURS != any ]] && ! is_hours "$OPT_HOURS"; then
		fatal 2 "--hours '$OPT_HOURS' is not HH:MM-HH:MM" "e.g. --hours 22:00-08:00 (local time), or --hours any"
	fi
	return 0
}

choose_policy() {
	if [[ ! -f $GRIDX_BUNDLE_DIR/agent.sh ]]; then
		[[ -z $OPT_SHARE$OPT_HOURS ]] || fatal 2 "--share and --hours need the owner-activity agent, and this bundle has no agent.sh" "ask the hub admin for a fresh bundle (gridx hub refresh-bundle $NAME)"
		warn "this bundle has no agent.sh (an older hub made it): Grid-X's jobs will not pause while you use this machine; ask the hub admin for a fresh bundle"
		return 0
	fi
	AGENT_BUNDLED=1
	# what the agent runs with (coreutils, util-linux; libc's getconf)
	need_cmd dd od stat tr mkfifo getconf
	systemd_runs || need_cmd setsid
	default_share
	SHARE=${OPT_SHARE:-$REPLY}
	HOURS=${OPT_HOURS#any}
	if [[ -z $OPT_SHARE ]] && ((!OPT_YES)) && have_terminal; then
		info "When may Grid-X use this machine? idle: only while you are away from it (its jobs pause"
		info "within 2 s when you use it); always: whenever the hub has jobs for it. Default here: $REPLY ($SHARE_WHY)."
		while :; do
			ask "Share when (idle or always)" "$SHARE"
			[[ $REPLY == idle || $REPLY == always ]] && break
			warn "'$REPLY': answer idle or always"
		done
		SHARE=$REPLY
	fi
	if [[ -z $OPT_HOURS ]] && ((!OPT_YES)) && have_terminal; then
		while :; do
			ask "Only within these hours (HH:MM-HH:MM, local time; any)" any
			[[ $REPLY == any ]] || is_hours "$REPLY" && break
			warn "'$REPLY' is not HH:MM-HH:MM (like 22:00-08:00), or any"
		done
		HOURS=${REPLY#any}
	fi
}

# The plan's line for it.
policy_plan_line() {
	((AGENT_BUNDLED)) || return 0
	local -A AG=([SHARE]=$SHARE [HOURS]=$HOURS)
	local key
	for key in IDLE_S PREEMPT_S GRACE_S; do AG[$key]=${AGENT_DEFAULTS[$key]}; done
	agent_policy_text
	info "  owner     $REPLY"
}

step_agent() {
	((AGENT_BUNDLED)) || return 0
	agent_install "$SHARE" "$HOURS"
	ok "the owner-activity agent runs (share $SHARE${HOURS:+ within $HOURS})"
	printf -v POLICY_HINT '  sudo %s/agent.sh policy  when Grid-X may use it (now: %s%s)\n' "$GRIDX_BUNDLE_DIR" "$SHARE" "${HOURS:+ within $HOURS}"
	systemd_runs || info "no systemd here: after a restart, start the agent again with: sudo $AGENT_DIR/agent.sh start"
}

# ------------------------------------------------------------------ the plan ----
# Everything join will write is rendered into $WORK first, so that a bad
# input stops here, before the machine changes.

render_wg_config() {
	local line src=$GRIDX_BUNDLE_DIR/$IFACE.conf placed=0 saw_key=0 rule chain_up=''
	firewall_rule '%i'
	worker_rules '%i'
	for rule in "${WORKER_RULES[@]}"; do chain_up+="; iptables -A $WORKER_CHAIN $rule"; done
	{
		while IFS= read -r line || [[ -n $line ]]; do
			if [[ $line =~ ^[[:space:]]*PrivateKey[[:space:]]*=[[:space:]]*GRIDX_PRIVATE_KEY_PLACEHOLDER[[:space:]]*$ ]]; then
				[[ -n $PRIVATE_KEY ]] || fatal 3 "$IFACE.conf has no private key but settings.env does not say GRIDX_NEEDS_PRIVATE_KEY=1" "ask the hub admin for the bundle again"
				line="PrivateKey = $PRIVATE_KEY"
				saw_key=1
			fi
			printf '%s\n' "$line"
			if ((!placed)) && [[ $line =~ ^[[:space:]]*\[Interface\] ]]; then
				printf '# Added by Grid-X join.sh: ports that jobs publish, and the swarm ports, answer over this VPN only.\n'
				printf 'PostUp = iptables -N DOCKER-USER 2>/dev/null || true; iptables -I DOCKER-USER %s\n' "${FW_RULE[*]}"
				printf 'PostUp = iptables -N %s 2>/dev/null || iptables -F %s%s; iptables -C INPUT -j %s 2>/dev/null || iptables -I INPUT 1 -j %s\n' \
					"$WORKER_CHAIN" "$WORKER_CHAIN" "$chain_up" "$WORKER_CHAIN" "$WORKER_CHAIN"
				job_net_hook
				printf 'PostDown = iptables -D DOCKER-USER %s || true\n' "${FW_RULE[*]}"
				printf 'PostDown = iptables -D INPUT -j %s || true; iptables -F %s || true; iptables -X %s || true\n' \
					"$WORKER_CHAIN" "$WORKER_CHAIN" "$WORKER_CHAIN"
				placed=1
			fi
		done <"$src"
	} >"$WORK/wg.conf"
	((placed)) || fatal 3 "$src has no [Interface] section" "ask the hub admin for the bundle again"
	if [[ -n $PRIVATE_KEY ]] && ((!saw_key)); then
		fatal 3 "settings.env says GRIDX_NEEDS_PRIVATE_KEY=1 but $IFACE.conf has no 'PrivateKey = GRIDX_PRIVATE_KEY_PLACEHOLDER' line" "ask the hub admin for the bundle again"
	fi
	if [[ -e $WG_CONF || -L $WG_CONF ]]; then
		{ [[ ! -L $WG_CONF ]] && same_file "$WG_CONF" "$WORK/wg.conf"; } ||
			fatal 3 "$WG_CONF already exists with other content; join.sh never overwrites another WireGuard config" "if it is stale, move it away (mv $WG_CONF /root/), then run join.sh again"
		WG_CONF_SAME=1
	fi
}

render_key_line() {
	local pub=$GRIDX_BUNDLE_DIR/hub_ssh.pub key
	KEY_LINE=''
	((OPT_HUB_SSH)) || return 0
	if [[ ! -f $pub ]]; then
		warn "no hub_ssh.pub in the bundle: the hub will not be able to SSH here"
		return 0
	fi
	read -r key <"$pub" || true
	[[ $key =~ ^(ssh-ed25519|ssh-rsa|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+)\ [A-Za-z0-9+/=]+(\ [^[:cntrl:]]*)?$ ]] ||
		fatal 3 "$pub does not hold an SSH public key" "ask the hub admin for the bundle again"
	KEY_LINE="from=\"$HUB_VPN_IP\",no-agent-forwarding,no-X11-forwarding $key"
}

# The generic resources this machine advertises, as daemon.json strings: the
# names are the same as gridx.py's RES_CPU, RES_MEM and RES_GPU (what jobs reserve).
resource_list() {
	local gpu
	RESOURCES=("gridx_cpu=$SHARED_CPUS" "gridx_mem=$SHARED_MEM_MIB")
	for gpu in "${SHARED_GPUS[@]}"; do RESOURCES+=("NVIDIA-GPU=$gpu"); done
}

# The engine label (key: same as gridx.py's LABEL_HUB_SSH, value no) with which a worker that
# joined with --no-hub-ssh tells the hub (docker node inspect:
# .Description.Engine.Labels) that it declined.
HUB_SSH_LABEL=gridx.hub-ssh=no

# The keys join.sh sets, as JSON lines ("key": value), in DAEMON_KEYS.
daemon_keys() { # RES_JSON
	DAEMON_KEYS=("\"node-generic-resources\": $1")
	if ((OPT_CONTAINMENT)); then
		# userns-remap: a job's root is an unprivileged uid of this machine
		# (100000 up), so a bind mount of / reads and writes as nobody;
		# no-new-privileges: no setuid way back up inside the container.
		# Both in the engine, where no service the manager makes can turn
		# them off (swarm services have no --userns or --privileged).
		[[ -n $REMAP_KEPT ]] || DAEMON_KEYS+=('"userns-remap": "default"')
		DAEMON_KEYS+=('"no-new-privileges": true')
	fi
	# docker-proxy would listen on [::] for every published port, where the
	# IPv4 DOCKER-USER rule does not reach; without it the ports exist only
	# as IPv4 DNAT rules, which that rule filters.
	DAEMON_KEYS+=('"userland-proxy": false')
	((OPT_HUB_SSH)) || DAEMON_KEYS+=("\"labels\": [\"$HUB_SSH_LABEL\"]")
	if [[ -n $RUNTIME_PATH ]]; then
		json_str "$RUNTIME_PATH"
		DAEMON_KEYS+=('"default-runtime": "nvidia"' "\"runtimes\": {\"nvidia\": {\"path\": $REPLY, \"runtimeArgs\": []}}")
	fi
}

render_daemon_json() {
	local new=$WORK/daemon.json content='' res_json r key
	resource_list
	res_json=''
	for r in "${RESOURCES[@]}"; do
		json_str "$r"
		res_json+=${res_json:+, }$REPLY
	done
	res_json="[$res_json]"
	RUNTIME_PATH=''
	if ((${#SHARED_GPUS[@]})); then
		if have_cmd nvidia-container-runtime; then
			RUNTIME_PATH=$(command -v nvidia-container-runtime)
		else
			warn "GPUs are shared but nvidia-container-runtime is not installed: jobs will be placed here but will not see the GPUs (install the NVIDIA container toolkit, then leave and join again)"
		fi
	fi
	daemon_keys "$res_json"
	[[ -f $DAEMON_JSON ]] && content=$(<"$DAEMON_JSON")
	if [[ $content =~ ^[[:space:]]*(\{[[:space:]]*\})?[[:space:]]*$ ]]; then
		{
			printf '{'
			local sep=''
			for key in "${DAEMON_KEYS[@]}"; do
				printf '%s\n  %s' "$sep" "$key"
				sep=,
			done
			printf '\n}\n'
		} >"$new"
	elif have_cmd python3; then
		merge_with_python3 "$res_json" "$new"
	elif have_cmd jq; then
		merge_with_jq "$res_json" "$new"
	elif hand_merged "$content"; then
		cp -- "$DAEMON_JSON" "$new"
	else
		info "add these keys to $DAEMON_JSON, keeping what is there:"
		for key in "${DAEMON_KEYS[@]}"; do info "  $key"; done
		fatal 3 "$DAEMON_JSON already has settings, and neither python3 nor jq is here to merge into it" "add the keys above by hand (then join.sh leaves the file as it is), or install jq (apt-get install jq / pacman -S jq / dnf install jq), and run join.sh again"
	fi
	if [[ -f $DAEMON_JSON ]] && same_file "$DAEMON_JSON" "$new"; then DAEMON_CHANGE=0; else DAEMON_CHANGE=1; fi
}

# Without python3 or jq: does the file already say it all (added by hand)?
hand_merged() {
	local content=$1 r
	[[ $content == *'"node-generic-resources"'* ]] || return 1
	for r in "${RESOURCES[@]}"; do [[ $content == *"\"$r\""* ]] || return 1; done
	if ((OPT_CONTAINMENT)); then
		[[ $content =~ \"userns-remap\"[[:space:]]*:[[:space:]]*\"[^\"]+\" ]] || return 1
		[[ $content =~ \"no-new-privileges\"[[:space:]]*:[[:space:]]*true ]] || return 1
	fi
	[[ $content =~ \"userland-proxy\"[[:space:]]*:[[:space:]]*false ]] || return 1
	if ((OPT_HUB_SSH)); then
		[[ $content != *"\"$HUB_SSH_LABEL\""* ]] || return 1
	else
		[[ $content == *"\"$HUB_SSH_LABEL\""* ]] || return 1
	fi
	if [[ -n $RUNTIME_PATH ]]; then
		[[ $content =~ \"default-runtime\"[[:space:]]*:[[:space:]]*\"nvidia\" ]] || return 1
	fi
}

# Both mergers keep every key, drop old gridx_cpu/gridx_mem/NVIDIA-GPU (gridx.py's RES_*)
# entries and gridx.hub-ssh labels, keep a userns-remap already set, and keep
# the file's bytes when nothing would change.
merge_with_python3() { # RES_JSON NEW
	local rc=0
	python3 - "$DAEMON_JSON" "$2" "$1" "$RUNTIME_PATH" "$OPT_CONTAINMENT" "$OPT_HUB_SSH" "$HUB_SSH_LABEL" <<'EOF' || rc=$?
import json, sys
src, dst, res, runtime, containment, hub_ssh, label = sys.argv[1:8]
try:
    with open(src) as f:
        old = json.load(f)
except ValueError as e:
    sys.exit("%s is not valid JSON: %s" % (src, e))
if not isinstance(old, dict):
    sys.exit("%s is not a JSON object" % src)
new = json.loads(json.dumps(old))
kept = [r for r in new.get("node-generic-resources") or []
        if str(r).split("=", 1)[0] not in ("gridx_cpu", "gridx_mem", "NVIDIA-GPU")]
new["node-generic-resources"] = kept + json.loads(res)
if containment == "1":
    if not new.get("userns-remap"):
        new["userns-remap"] = "default"
    new["no-new-privileges"] = True
new["userland-proxy"] = False
labels = [x for x in new.get("labels") or [] if not str(x).startswith("gridx.hub-ssh=")]
if hub_ssh != "1":
    labels.append(label)
if labels or "labels" in new:
    new["labels"] = labels
if runtime:
    new["default-runtime"] = "nvidia"
    runtimes = new.setdefault("runtimes", {})
    runtimes.setdefault("nvidia", {}).update({"path": runtime})
    runtimes["nvidia"].setdefault("runtimeArgs", [])
with open(dst, "w") as f:
    if new == old:
        with open(src) as g:
            f.write(g.read())
    else:
        json.dump(new, f, indent=2)
        f.write("\n")
EOF
	((rc == 0)) || fatal 3 "cannot merge into $DAEMON_JSON (see above)" "fix the file so that it is one JSON object, and run join.sh again"
}

merge_with_jq() { # RES_JSON NEW
	# shellcheck disable=SC2016 # $res, $runtime... are jq's variables
	local filter='
		if type != "object" then error("not a JSON object") else . end
		| ."node-generic-resources" = ((."node-generic-resources" // [])
			| map(select(tostring | test("^(gridx_cpu|gridx_mem|NVIDIA-GPU)=") | not)) + $res)
		| if $containment == "1" then
			(if ((."userns-remap" // "") == "") then ."userns-remap" = "default" else . end)
			| ."no-new-privileges" = true else . end
		| ."userland-proxy" = false
		| ((.labels // []) | map(select(tostring | startswith("gridx.hub-ssh=") | not))
			+ (if $hub_ssh == "1" then [] else [$hublabel] end)) as $labels
		| if ($labels | length) > 0 or has("labels") then .labels = $labels else . end
		| if $runtime == "" then . else
			."default-runtime" = "nvidia"
			| .runtimes.nvidia.path = $runtime
			| .runtimes.nvidia.runtimeArgs //= [] end'
	jq --argjson res "$1" --arg runtime "$RUNTIME_PATH" --arg containment "$OPT_CONTAINMENT" \
		--arg hub_ssh "$OPT_HUB_SSH" --arg hublabel "$HUB_SSH_LABEL" "$filter" "$DAEMON_JSON" >"$2" ||
		fatal 3 "cannot merge into $DAEMON_JSON: it is not one valid JSON object" "fix the file, and run join.sh again"
	if [[ $(jq -S . "$DAEMON_JSON") == "$(jq -S . "$2")" ]]; then cp -- "$DAEMON_JSON" "$2"; fi
}

# The NVIDIA toolkit's config.toml, top-level keys (read in the toolkit's
# source, 1.13 to 1.20: cmd/nvidia-container-runtime-hook/container_config.go
# and internal/config/image/cuda_image.go):
#  - swarm-resource: when the container has DOCKER_RESOURCE_NVIDIA-GPU (what
#    swarm sets for the GPUs it assigned), that variable alone picks the
#    GPUs and the image's NVIDIA_VISIBLE_DEVICES is ignored
#    (CUDA.visibleEnvVars); a job that asked for none has no such variable,
#    and gridx sets NVIDIA_VISIBLE_DEVICES=void on it.
#  - accept-nvidia-visible-devices-envvar-when-unprivileged = true: the same
#    gate covers the swarm variable (CUDA.VisibleDevices, cuda_image.go: "if
#    i.isPrivileged || i.acceptEnvvarUnprivileged"; the hook's getDevices in
#    1.13-1.17), and no swarm task is privileged: false would hide every GPU
#    from every job. It is the toolkit's default; written so that a config
#    that turned it off does not silently do that.
NVIDIA_KEYS=(swarm-resource accept-nvidia-visible-devices-envvar-when-unprivileged)
declare -A NVIDIA_VALUES=([swarm-resource]='"DOCKER_RESOURCE_NVIDIA-GPU"' [accept-nvidia-visible-devices-envvar-when-unprivileged]=true)

render_nvidia_config() {
	local line key n i lines=()
	local -A at=() commented=()
	NVIDIA_CHANGE=0
	[[ -n $RUNTIME_PATH ]] || return 0
	check_toolkit_version
	if [[ -f $NVIDIA_CONFIG ]]; then
		while IFS= read -r line || [[ -n $line ]]; do lines+=("$line"); done <"$NVIDIA_CONFIG"
	fi
	# Where each key is set before the first [section]: its line, else the
	# first commented-out one (replacing both would set a key twice).
	for ((n = 0; n < ${#lines[@]}; n++)); do
		line=${lines[n]}
		[[ $line =~ ^[[:space:]]*\[ ]] && break
		for key in "${NVIDIA_KEYS[@]}"; do
			if [[ $line =~ ^[[:space:]]*${key}[[:space:]]*= ]]; then
				[[ -v at[$key] && ! -v commented[$key] ]] && continue
				at[$key]=$n
				unset "commented[$key]"
			elif [[ ! -v at[$key] && $line =~ ^[[:space:]]*#[[:space:]]*${key}[[:space:]]*= ]]; then
				at[$key]=$n commented[$key]=1
			fi
		done
	done
	{
		for key in "${NVIDIA_KEYS[@]}"; do
			[[ -v at[$key] ]] || printf '%s = %s\n' "$key" "${NVIDIA_VALUES[$key]}"
		done
		for ((i = 0; i < ${#lines[@]}; i++)); do
			line=${lines[i]}
			for key in "${NVIDIA_KEYS[@]}"; do
				[[ -v at[$key] && ${at[$key]} == "$i" ]] && line="$key = ${NVIDIA_VALUES[$key]}"
			done
			printf '%s\n' "$line"
		done
	} >"$WORK/nvidia-config.toml"
	if [[ -f $NVIDIA_CONFIG ]] && same_file "$NVIDIA_CONFIG" "$WORK/nvidia-config.toml"; then return 0; fi
	NVIDIA_CHANGE=1
}

# Toolkit 1.18 ignores the swarm's assignment (NVIDIA/nvidia-container-
# toolkit#1599: its runtime left out swarm-resource, back in 1.19.0's
# internal/runtime/runtime_factory.go).
check_toolkit_version() {
	local tool out
	TOOLKIT_VERSION=''
	for tool in nvidia-ctk nvidia-container-runtime-hook nvidia-container-toolkit nvidia-container-runtime; do
		have_cmd "$tool" || continue
		out=$("$tool" --version 2>/dev/null) || continue
		if [[ $out =~ [Vv]ersion[[:space:]]+v?([0-9]+)\.([0-9]+)\.([0-9]+) ]]; then
			TOOLKIT_VERSION=${BASH_REMATCH[1]}.${BASH_REMATCH[2]}.${BASH_REMATCH[3]}
			if ((10#${BASH_REMATCH[1]} == 1 && 10#${BASH_REMATCH[2]} < 19)); then
				warn "the NVIDIA container toolkit here is $TOOLKIT_VERSION, older than 1.19: 1.18 ignores the GPUs swarm assigns (NVIDIA/nvidia-container-toolkit#1599), so jobs may see none or all of this machine's GPUs; upgrade the toolkit to 1.19 or newer"
			fi
			return 0
		fi
	done
	warn "cannot read the NVIDIA container toolkit's version (nvidia-ctk --version): it needs to be 1.19 or newer for jobs to see only the GPUs swarm gave them"
}

confirm_plan() {
	local gpus=none docker_line
	((${#SHARED_GPUS[@]})) && gpus="${#SHARED_GPUS[@]} (${SHARED_GPUS[*]})"
	if ((DAEMON_CHANGE || NVIDIA_CHANGE)); then
		docker_line="merge the settings above into $DAEMON_JSON (saved first), restart Docker"
	else
		docker_line="$DAEMON_JSON already says this: no change, no restart"
	fi
	info ""
	info "${C_BOLD}About to join Grid-X as $NAME ($VPN_IP) through the hub at $HUB_ENDPOINT${C_OFF}"
	info "  share     $SHARED_CPUS CPUs, $SHARED_MEM_MIB MiB of memory, GPUs: $gpus"
	info "  VPN       write $WG_CONF, bring up $IFACE$(systemd_runs && printf ' (and at boot)')"
	info "  Docker    ${ENGINE_VERSION:+$ENGINE_VERSION: }$docker_line"
	if [[ -n $REGISTRY ]]; then
		info "  registry  trust the hub's image registry $REGISTRY (its CA in $CERTS_DIR/$REGISTRY/)"
	fi
	info "  swarm     join $MANAGER as $VPN_IP"
	if [[ -n $KEY_LINE ]]; then
		info "  SSH       trust the hub's key from $HUB_VPN_IP only ($AUTHORIZED_KEYS)"
	fi
	info "  firewall  the swarm's ports and the ports jobs publish answer over $IFACE only;"
	info "            jobs reach the internet only (iptables chains $JOB_CHAIN, $JOB_HOST_CHAIN)"
	policy_plan_line
	info "  undo      ./leave.sh puts all of this back"
	info ""
	grant_text
	((OPT_YES)) && return 0
	have_terminal || no_terminal "whether to continue" "--yes"
	ask_yes "Continue" y || fatal 1 "stopped: nothing was changed"
}

# What the volunteer grants, in the words of the README's section.
grant_text() {
	info "${C_BOLD}What you grant the hub ($HUB_VPN_IP):${C_OFF}"
	info "  - Jobs run here, each within what you share above."
	if ((OPT_CONTAINMENT)); then
		info "  - Jobs are contained by Docker's user-namespace remapping${REMAP_KEPT:+ (yours: $REMAP_KEPT)} and"
		info "    no-new-privileges: a job is root only inside its container. On this machine"
		info "    it has the rights of a user without an account: it cannot change your files"
		info "    or read private ones (what every user may read, it may read too)."
		info "  - Your own Docker: while joined, your images and containers are not visible"
		info "    (the remapped engine keeps its own); they come back after ./leave.sh."
	fi
	grant_network_text
	if [[ -n $KEY_LINE ]]; then
		info "  - The hub may SSH in as root, from $HUB_VPN_IP only (./join.sh --no-hub-ssh: it may not)."
	else
		info "  - The hub may not SSH in (it is told: the engine label $HUB_SSH_LABEL)."
	fi
	if ((!OPT_CONTAINMENT)); then
		warn "--no-containment: Docker is not remapped, so any service made on the hub's swarm manager can bind-mount / and read and write every file of this machine as root"
	fi
	info ""
}

# What jobs may reach, in the words of the README's section.
grant_network_text() {
	local dns="${JOB_DNS4[*]} ${JOB_DNS6[*]}"
	dns=${dns# }
	dns=${dns% }
	info "  - Jobs reach the internet and nothing private: not your networks (the private,"
	info "    link-local and CGNAT ranges, and the networks this machine is on), not this"
	info "    machine, not the VPN (the hub, other workers)${dns:+, except DNS to your name servers}."
	if [[ -n ${dns} ]]; then info "    Name servers: $dns."; fi
	if [[ -n ${S[GRIDX_JOB_ALLOW]:-} ]]; then
		info "    The hub's admin opened, for every job: ${S[GRIDX_JOB_ALLOW]}"
	fi
}

# The jobs' network, judged before anything changes: the bundle carries
# jobnet.sh (the allow-list was checked with settings.env), and what the
# grant text names.
render_job_network() {
	[[ -f $GRIDX_BUNDLE_DIR/jobnet.sh ]] || fatal 3 "$GRIDX_BUNDLE_DIR/jobnet.sh is missing: this folder is not a complete Grid-X bundle" "ask the hub admin for the bundle again (gridx hub refresh-bundle $NAME)"
	local content=''
	[[ -f $DAEMON_JSON ]] && content=$(<"$DAEMON_JSON")
	# "bridge" puts containers on an interface of the volunteer's choosing
	# (often the LAN's own bridge): jobs would not be on docker0.
	if [[ $content =~ \"bridge\"[[:space:]]*:[[:space:]]*\"([^\"]*)\" && ${BASH_REMATCH[1]} != docker0 ]]; then
		fatal 3 "$DAEMON_JSON sets \"bridge\": \"${BASH_REMATCH[1]}\": containers would sit on that interface, where join.sh cannot keep jobs off your networks" \
			"remove \"bridge\" from $DAEMON_JSON (Docker then uses docker0), restart Docker, then run join.sh again"
	fi
	job_resolvers
}

# wg-quick's PreUp puts the jobs' network back before the VPN comes up (after
# a reboot: iptables rules do not survive one), from the copy join.sh keeps.
# Before, not after: a worker starts no task until it reaches the manager
# over the VPN (measured: Docker 20.10 restarted without the VPN left a
# running job's container exited), so no job runs without the rules.
job_net_hook() {
	shell_quote "$STATE_DIR/jobnet/jobnet.sh"
	printf 'PreUp = bash %s apply\n' "$REPLY"
}

# ------------------------------------------------------------------ steps ----
# Each records its change in the state just before making it.

step_state_dir() {
	local created=0 gpus
	# root's own folder: where the backups leave.sh restores live
	only_root_writes "${STATE_DIR%/*}"
	if [[ ! -d $STATE_DIR ]]; then
		cmd mkdir -p -m 0700 -- "$STATE_DIR"
		created=1
	fi
	only_root_writes "$STATE_DIR"
	[[ -d $BACKUP_DIR ]] || mkdir -m 0700 -- "$BACKUP_DIR"
	only_root_writes "$BACKUP_DIR"
	gpus=${SHARED_GPUS[*]}
	state_set NAME "$NAME" INTERFACE "$IFACE" VPN_IP "$VPN_IP" HUB_VPN_IP "$HUB_VPN_IP" \
		HUB_ENDPOINT "$HUB_ENDPOINT" MANAGER "$MANAGER" JOINED_AT "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
		COMPLETE 0 SHARED_CPUS "$SHARED_CPUS" SHARED_MEMORY_MIB "$SHARED_MEM_MIB" \
		SHARED_GPU_IDS "${gpus// /,}" CONTAINMENT "$OPT_CONTAINMENT" HUB_SSH "$OPT_HUB_SSH" \
		CREATED_STATE_DIR "$created"
}

# Before the link, Docker's restart and the swarm join: no job ever runs here
# without it. The copy of the scripts is what PreUp runs.
step_job_network() {
	local dir=$STATE_DIR/jobnet f
	state_set JOB_NET_DIR "$dir" JOB_ALLOW "${S[GRIDX_JOB_ALLOW]:-}" VPN_SUBNET "$SUBNET"
	[[ -d $dir ]] || cmd mkdir -m 0700 -- "$dir"
	for f in jobnet.sh lib.sh; do
		atomic_write "$dir/$f" 0700 <"$GRIDX_BUNDLE_DIR/$f"
	done
	job_net_apply || fatal 1 "the jobs' network rules could not be put in place (see iptables' message above)" "fix what iptables says, then run join.sh again"
	ok "jobs reach the internet only${S[GRIDX_JOB_ALLOW]:+, and ${S[GRIDX_JOB_ALLOW]}}"
}

step_wg_config() {
	if ((WG_CONF_SAME)); then
		info "$WG_CONF already holds this bundle's config"
		return 0
	fi
	if [[ ! -d $WG_DIR ]]; then
		state_set CREATED_WG_DIR "$WG_DIR"
		cmd mkdir -p -m 0700 "$WG_DIR"
	fi
	state_set WG_CONFIG "$WG_CONF"
	printf '[#] write %s (mode 0600)\n' "$WG_CONF" >&2
	atomic_write "$WG_CONF" 0600 <"$WORK/wg.conf"
}

# Where the kernel has no WireGuard, wg-quick starts wireguard-go, which stays
# in this terminal's session: the hangup sent when the terminal (or sudo's
# pty) closes would end it and the link with it (seen in the lab with
# docker exec -it). Ignored signals stay ignored through wg-quick into it.
step_link_up() {
	firewall_rule "$IFACE"
	state_set LINK_UP 1 FIREWALL_RULE "${FW_RULE[*]}" WORKER_CHAIN "$WORKER_CHAIN"
	(
		trap '' HUP
		cmd wg-quick up "$WG_CONF"
	)
}

step_wait_handshake() {
	local waited=0 limit=$((10#$OPT_HANDSHAKE_TIMEOUT)) pubkey
	info "waiting for the hub at $HUB_ENDPOINT to answer (up to $limit s)"
	while :; do
		latest_handshake "$IFACE" || true
		if ((REPLY > 0)); then
			ok "the hub answered: VPN up ($VPN_IP)"
			return 0
		fi
		((waited < limit)) || break
		# Traffic into the tunnel makes WireGuard start a handshake now.
		if ((waited % 5 == 0)); then
			((waited == 0)) || info "  no answer yet ($waited/$limit s)"
			(printf 'gridx' >"/dev/udp/$HUB_VPN_IP/9") 2>/dev/null || true
		fi
		sleep 1
		waited=$((waited + 1))
	done
	pubkey=$(wg show "$IFACE" public-key 2>/dev/null || printf '?')
	info "The hub did not answer. Check, in this order:"
	info "  - the hub's address: $IFACE.conf says Endpoint = $HUB_ENDPOINT; is that the hub's public address,"
	info "    reachable from here?"
	info "  - the hub's UDP port ${HUB_ENDPOINT##*:}: open in the hub's firewall (and its cloud security group),"
	info "    forwarded to the hub if it sits behind a router, and 'wg show' on the hub lists it"
	info "  - this network lets outgoing UDP to port ${HUB_ENDPOINT##*:} through (some office or school networks do not)"
	info "  - the hub knows this machine: 'gridx hub list-peers' lists $NAME ($VPN_IP) with public key $pubkey"
	fatal 1 "no handshake with the hub within $limit s" "fix the above and run join.sh again (--handshake-timeout 60 waits longer)"
}

step_docker_config() {
	local backup=absent
	if ((DAEMON_CHANGE)); then
		if [[ ! -d ${DAEMON_JSON%/*} ]]; then
			state_set CREATED_DOCKER_DIR 1
			cmd mkdir -p -m 0755 "${DAEMON_JSON%/*}"
		fi
		if [[ -e $DAEMON_JSON ]]; then
			backup=$BACKUP_DIR/daemon.json
			cp -p "$DAEMON_JSON" "$backup"
		fi
		cp "$WORK/daemon.json" "$BACKUP_DIR/daemon.json.written"
		record_dockremap
		state_set DAEMON_JSON "$DAEMON_JSON" DAEMON_JSON_BACKUP "$backup"
		install_file "$WORK/daemon.json" "$DAEMON_JSON" 0644
	fi
	if ((NVIDIA_CHANGE)); then
		backup=absent
		if [[ ! -d ${NVIDIA_CONFIG%/*} ]]; then
			state_set CREATED_NVIDIA_DIR 1
			cmd mkdir -p -m 0755 "${NVIDIA_CONFIG%/*}"
		fi
		if [[ -e $NVIDIA_CONFIG ]]; then
			backup=$BACKUP_DIR/nvidia-config.toml
			cp -p "$NVIDIA_CONFIG" "$backup"
		fi
		cp "$WORK/nvidia-config.toml" "$BACKUP_DIR/nvidia-config.toml.written"
		state_set NVIDIA_CONFIG "$NVIDIA_CONFIG" NVIDIA_CONFIG_BACKUP "$backup"
		install_file "$WORK/nvidia-config.toml" "$NVIDIA_CONFIG" 0644
	fi
	if ((DAEMON_CHANGE || NVIDIA_CHANGE)); then
		restart_docker
	else
		info "Docker's configuration already says this: Docker is not restarted"
	fi
	check_containment
}

# Will dockerd create its dockremap user for this join? (leave.sh removes it)
record_dockremap() {
	((OPT_CONTAINMENT)) && [[ -z $REMAP_KEPT ]] || return 0
	if have_cmd getent && ! getent passwd dockremap >/dev/null 2>&1; then
		state_set DOCKREMAP_CREATED 1
	else
		state_set DOCKREMAP_CREATED 0
	fi
}

# The restarted engine does what daemon.json says, or the join stops (and
# rolls back) before the swarm can place anything here.
check_containment() {
	((OPT_CONTAINMENT)) || return 0
	local opts
	opts=$(docker info --format '{{range .SecurityOptions}}{{.}} {{end}}' 2>/dev/null) || opts=''
	[[ $opts == *name=userns* ]] ||
		fatal 1 "Docker restarted without user-namespace remapping (docker info lists: ${opts:-nothing})" "look at Docker's log (journalctl -u docker, /var/log/docker.log): it may lack /etc/subuid support (the shadow/uidmap tools); or join with --no-containment, knowing what it allows"
	ok "Docker runs with user-namespace remapping and no-new-privileges"
}

# install_file NEW PATH MODE: replace PATH atomically, keeping its mode and
# owner when it exists.
install_file() {
	local new=$1 path=$2 mode=$3 tmp
	printf '[#] write %s\n' "$path" >&2
	if [[ -e $path ]]; then
		tmp=$(mktemp "${path%/*}/.${path##*/}.XXXXXX")
		cp -p "$path" "$tmp"
		cat "$new" >"$tmp"
		sync "$tmp" 2>/dev/null || sync
		mv -f "$tmp" "$path"
	else
		atomic_write "$path" "$mode" <"$new"
	fi
}

step_registry_ca() {
	[[ -n $REGISTRY ]] || return 0
	local path dir created=0 backup=absent
	registry_ca_path "$REGISTRY"
	path=$REPLY dir=${REPLY%/*}
	if [[ ! -d $CERTS_DIR ]]; then
		created=2
	elif [[ ! -d $dir ]]; then
		created=1
	fi
	if [[ -L $path || (-e $path && ! -f $path) ]]; then
		fatal 1 "$path is not a plain file: join.sh will not write the registry's CA through it" "look at what it is, move it away, then run join.sh again"
	fi
	if [[ -f $path ]]; then
		backup=$BACKUP_DIR/registry-ca.crt
		cp -p -- "$path" "$backup"
	fi
	state_set REGISTRY "$REGISTRY" REGISTRY_CA_BACKUP "$backup" REGISTRY_DIRS_CREATED "$created"
	if ((created)); then cmd mkdir -p -m 0755 -- "$dir"; fi
	printf '[#] write %s (the hub registry'"'"'s CA)\n' "$path" >&2
	atomic_write "$path" 0644 <"$REGISTRY_CA"
}

step_swarm_join() {
	state_set SWARM_JOINED 1
	if ! cmd_secret "$SWARM_TOKEN" docker swarm join --token "$SWARM_TOKEN" --advertise-addr "$VPN_IP" \
		--listen-addr "$VPN_IP:2377" --data-path-addr "$VPN_IP" -- "$MANAGER"; then
		fatal 1 "could not join the swarm at $MANAGER (see Docker's message above)" "a wrong or rotated token? ask the hub admin to run 'gridx hub refresh-bundle $NAME' on the hub and send you the new bundle"
	fi
}

step_authorized_keys() {
	[[ -n $KEY_LINE ]] || return 0
	local path=$AUTHORIZED_KEYS dir=${AUTHORIZED_KEYS%/*} l new_dir=0 new_file=0 backup=absent
	if [[ -f $path ]]; then
		while IFS= read -r l || [[ -n $l ]]; do
			if [[ $l == "$KEY_LINE" ]]; then
				info "the hub's key is already trusted in $path"
				return 0
			fi
		done <"$path"
	fi
	[[ -d $dir ]] || new_dir=1
	[[ -e $path ]] || new_file=1
	if ((!new_file)); then
		backup=$BACKUP_DIR/authorized_keys
		cp -p "$path" "$backup"
	fi
	state_set AUTHORIZED_KEYS "$path" AUTHORIZED_KEYS_LINE "$KEY_LINE" AUTHORIZED_KEYS_BACKUP "$backup" \
		CREATED_SSH_DIR "$new_dir" CREATED_AUTHORIZED_KEYS "$new_file"
	if ((new_dir)); then cmd mkdir -p -m 0700 "$dir"; fi
	if ((new_file)); then
		cmd touch "$path"
		chmod 0600 "$path"
	fi
	printf '[#] add the hub key (from %s only) to %s\n' "$HUB_VPN_IP" "$path" >&2
	if [[ -s $path && -n $(tail -c 1 "$path") ]]; then printf '\n' >>"$path"; fi
	printf '%s\n' "$KEY_LINE" >>"$path"
}

# The rule comes with the link (PostUp); Docker keeps DOCKER-USER's rules
# over its restart. Check, and put it back if something removed it.
step_check_firewall() {
	iptables -C FORWARD -j DOCKER-USER >/dev/null 2>&1 ||
		fatal 1 "after its restart Docker has no jump to DOCKER-USER in iptables' FORWARD chain: ports that jobs publish would reach other networks" "let Docker manage iptables (no \"iptables\": false), then run join.sh again"
	firewall_rule_present "$IFACE" || cmd iptables -I DOCKER-USER "${FW_RULE[@]}"
	worker_chain_present || fatal 1 "the $WORKER_CHAIN chain (swarm ports over the VPN only) is not in iptables' INPUT chain after wg-quick up" "look at what removed it (a firewall manager?), then run join.sh again"
}

step_boot_unit() {
	if ! systemd_runs; then
		info "no systemd here: after a restart, bring the VPN back with: wg-quick up $IFACE"
		return 0
	fi
	local unit=wg-quick@$IFACE
	systemctl is-enabled --quiet "$unit" 2>/dev/null && return 0
	state_set BOOT_UNIT "$unit"
	cmd systemctl enable "$unit"
}

step_done() {
	local gpus=none here=$GRIDX_BUNDLE_DIR
	state_set COMPLETE 1
	ROLLBACK_ARMED=0
	((${#SHARED_GPUS[@]})) && gpus="${#SHARED_GPUS[@]}: ${SHARED_GPUS[*]}"
	cat <<EOF

${O_GREEN}${O_BOLD}Done.${O_OFF} $NAME ($VPN_IP) is a Grid-X worker. It shares:
  CPUs     $SHARED_CPUS
  memory   $SHARED_MEM_MIB MiB
  GPUs     $gpus
Jobs from the hub at $HUB_VPN_IP can run here now. Next:
  sudo $here/status.sh     link, handshake and swarm state (exit 0 = healthy)
  sudo $here/leave.sh      stop sharing and put this machine back as it was
${POLICY_HINT}What was changed is recorded in $STATE_JSON.
EOF
}

# ---------------------------------------------------------------- rollback ----

on_exit() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	if ((ROLLBACK_ARMED)); then
		ROLLBACK_ARMED=0
		info ""
		warn "join did not finish: undoing what it changed, newest first"
		if undo_all; then
			info "rolled back: this machine is as it was before join.sh ran"
		else
			warn "some changes could not be undone; fix what is said above, then run: sudo $GRIDX_BUNDLE_DIR/leave.sh"
		fi
		((rc == 130)) || rc=1
	fi
	[[ -n $WORK ]] && rm -rf "$WORK"
	exit "$rc"
}

arm_rollback() {
	ROLLBACK_ARMED=1
}

# ------------------------------------------------------------------- main ----

main() {
	parse_args "$@"
	# the bundle is input: judged before root, tools or Docker are asked for
	init_paths
	load_settings
	check_bundle
	ensure_root "changes the network and Docker settings" "$@"
	need_cmd mktemp sha256sum nproc stat
	check_prerequisites
	check_not_joined
	trap on_exit EXIT
	trap 'exit 130' INT TERM
	WORK=$(mktemp -d)
	choose_private_key
	render_wg_config
	render_key_line
	detect_machine
	choose_resources
	choose_policy
	render_daemon_json
	render_nvidia_config
	render_job_network
	confirm_plan

	arm_rollback
	step_state_dir
	step_job_network
	step_wg_config
	step_link_up
	step_wait_handshake
	step_docker_config
	step_registry_ca
	step_swarm_join
	step_authorized_keys
	step_check_firewall
	step_boot_unit
	step_agent
	step_done
}

main "$@"
