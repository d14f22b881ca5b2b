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
#   -y, --yes              answer yes to "continue?" (values still need flags
#                          when there is no terminal)
#   -h, --help             this text
#
# Reads, from its own folder (GRIDX_BUNDLE_DIR):
#   settings.env     GRIDX_NAME GRIDX_INTERFACE GRIDX_VPN_IP GRIDX_HUB_VPN_IP
#                    GRIDX_HUB_ENDPOINT GRIDX_SUBNET GRIDX_MANAGER
#                    GRIDX_NEEDS_PRIVATE_KEY GRIDX_VERSION (values, not code)
#   GRIDX_INTERFACE.conf  the WireGuard config (gridx0.conf)
#   swarm-token      the swarm's worker join token
#   hub_ssh.pub      the hub's SSH public key (optional: without it the hub
#                    cannot SSH here)
# and the path overrides listed in lib.sh (GRIDX_WG_DIR, GRIDX_STATE_DIR...).
#
# What it changes, in this order, each step recorded in the state folder
# just before it is made (so that a failure, or leave.sh, undoes exactly it):
#   1. ~/.gridx/ (state.env, worker_config.json, backups)
#   2. /etc/wireguard/gridx0.conf (0600), never any other WireGuard config;
#      its PostUp/PostDown add and remove the DOCKER-USER iptables rule that
#      keeps ports published by jobs reachable over the VPN only
#   3. the gridx0 link (wg-quick up), then waits for the hub's handshake
#   4. /etc/docker/daemon.json, merged (generic resources gridx_cpu,
#      gridx_mem, NVIDIA-GPU; the nvidia runtime when GPUs are shared), and
#      the toolkit's swarm-resource setting; Docker restarts only if changed
#   5. the swarm membership (advertise, listen and data-path on the VPN IP)
#   6. one line in root's authorized_keys: the hub's key, from its VPN IP only
#   7. wg-quick@gridx0 enabled at boot, where systemd runs
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
OPT_YES=0 OPT_INSTALL_DEPS=0 OPT_HANDSHAKE_TIMEOUT=30
MACHINE_CPUS=0 MACHINE_MEM_MIB=0 GPUS_LISTED=0 MACHINE_GPUS=()
SHARED_CPUS=0 SHARED_MEM_MIB=0 SHARED_GPUS=()
VPN_IP='' HUB_VPN_IP='' HUB_ENDPOINT='' MANAGER='' NAME=''
WG_CONF='' WG_CONF_SAME=0 KEY_LINE='' RUNTIME_PATH=''
DAEMON_CHANGE=0 NVIDIA_CHANGE=0 WORK='' ROLLBACK_ARMED=0

usage() {
	cat <<EOF
Usage: sudo ./join.sh [--cpus N] [--memory SIZE] [--gpus N] [--gpu-ids ID,ID]
                      [--private-key FILE] [--install-deps]
                      [--handshake-timeout SECONDS] [-y|--yes]

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
		--cpus | --memory | --gpus | --gpu-ids | --private-key | --handshake-timeout)
			if (($# < 2)) || [[ $2 == --* ]]; then fatal 2 "$opt needs a value" "see $GRIDX_PROG --help"; fi
			value=$2
			shift 2
			;;
		-y | --yes | --install-deps)
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
		esac
	done
	# What can be judged without the machine is judged now, before anything.
	if [[ -n $OPT_CPUS ]] && ! is_count "$OPT_CPUS"; then fatal 2 "--cpus '$OPT_CPUS' is not a whole number" "e.g. --cpus 4"; fi
	if [[ -n $OPT_CPUS ]] && ((10#$OPT_CPUS == 0)); then fatal 2 "--cpus 0: share at least 1 CPU" "to share nothing, do not join"; fi
	if [[ -n $OPT_MEMORY ]] && ! memory_mib "$OPT_MEMORY"; then fatal 2 "--memory '$OPT_MEMORY': $REPLY" "e.g. --memory 8G or --memory 512M"; fi
	if [[ -n $OPT_GPUS ]] && ! is_count "$OPT_GPUS"; then fatal 2 "--gpus '$OPT_GPUS' is not a whole number" "e.g. --gpus 1, or --gpus 0"; fi
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

# The bundle's files and values; missing values come from the wg config.
check_bundle() {
	local conf=$GRIDX_BUNDLE_DIR/$IFACE.conf line
	[[ -f $conf ]] || fatal 3 "$conf is missing: this folder is not a complete Grid-X bundle" "ask the hub admin for the bundle again"
	[[ -s $GRIDX_BUNDLE_DIR/swarm-token ]] || fatal 3 "$GRIDX_BUNDLE_DIR/swarm-token is missing or empty" "ask the hub admin for the bundle again"
	VPN_IP=${S[GRIDX_VPN_IP]:-}
	HUB_ENDPOINT=${S[GRIDX_HUB_ENDPOINT]:-}
	while IFS= read -r line || [[ -n $line ]]; do
		if [[ -z $VPN_IP && $line =~ ^[[:space:]]*Address[[:space:]]*=[[:space:]]*([0-9.]+) ]]; then VPN_IP=${BASH_REMATCH[1]}; fi
		if [[ -z $HUB_ENDPOINT && $line =~ ^[[:space:]]*Endpoint[[:space:]]*=[[:space:]]*([^[:space:]]+) ]]; then HUB_ENDPOINT=${BASH_REMATCH[1]}; fi
	done <"$conf"
	VPN_IP=${VPN_IP%/*}
	MANAGER=${S[GRIDX_MANAGER]:-}
	HUB_VPN_IP=${S[GRIDX_HUB_VPN_IP]:-${MANAGER%:*}}
	MANAGER=${MANAGER:-$HUB_VPN_IP:2377}
	NAME=${S[GRIDX_NAME]:-$(uname -n)}
	local ip_re='^([0-9]{1,3}\.){3}[0-9]{1,3}$'
	[[ $VPN_IP =~ $ip_re ]] || fatal 3 "settings.env has no valid GRIDX_VPN_IP ('$VPN_IP')" "ask the hub admin for the bundle again"
	[[ $HUB_VPN_IP =~ $ip_re ]] || fatal 3 "settings.env has no valid GRIDX_HUB_VPN_IP ('$HUB_VPN_IP')" "ask the hub admin for the bundle again"
	[[ -n $HUB_ENDPOINT ]] || fatal 3 "neither settings.env nor $IFACE.conf says where the hub is (GRIDX_HUB_ENDPOINT / Endpoint)" "ask the hub admin for the bundle again"
	WG_CONF=$WG_DIR/$IFACE.conf
}

# ----------------------------------------------------------- prerequisites ----

# Every missing tool at once, with the install command for each system.
check_prerequisites() {
	local missing=() apt=() pacman=() dnf=()
	if ! have_cmd wg || ! have_cmd wg-quick; then
		missing+=("wg/wg-quick") apt+=(wireguard-tools) pacman+=(wireguard-tools) dnf+=(wireguard-tools)
	fi
	if ! have_cmd docker; then
		missing+=(docker) apt+=(docker.io) pacman+=(docker) dnf+=(moby-engine)
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
	local route
	while read -r route; do
		if [[ -n $route && $route != default* ]]; then
			warn "this machine already routes $HUB_VPN_IP ($route): the VPN subnet may clash with a local network"
		fi
	done < <(ip -4 route show match "$HUB_VPN_IP" 2>/dev/null || true)
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
		if [[ ! $id =~ ^[A-Za-z0-9_.:-]+$ ]]; then
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
	if [[ $(stat -c %a "$file") != *00 ]]; then
		warn "$file is readable by other users: chmod 600 $file"
	fi
	PRIVATE_KEY=$key
}

# ------------------------------------------------------------------ the plan ----
# Everything join will write is rendered into $WORK first, so that a bad
# input stops here, before the machine changes.

render_wg_config() {
	local line src=$GRIDX_BUNDLE_DIR/$IFACE.conf placed=0 saw_key=0
	firewall_rule '%i'
	{
		while IFS= read -r line || [[ -n $line ]]; do
			if [[ $line =~ ^[[:space:]]*PrivateKey[[:space:]]*=[[:space:]]*GRIDX_PRIVATE_KEY_PLACEHOLDER[[:space:]]*$ ]]; then
				[[ -n $PRIVATE_KEY ]] || fatal 3 "$IFACE.conf has no private key but settings.env does not say GRIDX_NEEDS_PRIVATE_KEY=1" "ask the hub admin for the bundle again"
				line="PrivateKey = $PRIVATE_KEY"
				saw_key=1
			fi
			printf '%s\n' "$line"
			if ((!placed)) && [[ $line =~ ^[[:space:]]*\[Interface\] ]]; then
				printf '# Added by Grid-X join.sh: ports that jobs publish answer over this VPN only.\n'
				printf 'PostUp = iptables -N DOCKER-USER 2>/dev/null || true; iptables -I DOCKER-USER %s\n' "${FW_RULE[*]}"
				printf 'PostDown = iptables -D DOCKER-USER %s || true\n' "${FW_RULE[*]}"
				placed=1
			fi
		done <"$src"
	} >"$WORK/wg.conf"
	((placed)) || fatal 3 "$src has no [Interface] section" "ask the hub admin for the bundle again"
	if [[ -n $PRIVATE_KEY ]] && ((!saw_key)); then
		fatal 3 "settings.env says GRIDX_NEEDS_PRIVATE_KEY=1 but $IFACE.conf has no 'PrivateKey = GRIDX_PRIVATE_KEY_PLACEHOLDER' line" "ask the hub admin for the bundle again"
	fi
	if [[ -e $WG_CONF ]]; then
		same_file "$WG_CONF" "$WORK/wg.conf" ||
			fatal 3 "$WG_CONF already exists with other content; join.sh never overwrites another WireGuard config" "if it is stale, move it away (mv $WG_CONF /root/), then run join.sh again"
		WG_CONF_SAME=1
	fi
}

render_key_line() {
	local pub=$GRIDX_BUNDLE_DIR/hub_ssh.pub key
	KEY_LINE=''
	if [[ ! -f $pub ]]; then
		warn "no hub_ssh.pub in the bundle: the hub will not be able to SSH here"
		return 0
	fi
	read -r key <"$pub" || true
	[[ $key =~ ^(ssh-ed25519|ssh-rsa|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+)\ [A-Za-z0-9+/=]+(\ [^[:cntrl:]]*)?$ ]] ||
		fatal 3 "$pub does not hold an SSH public key" "ask the hub admin for the bundle again"
	KEY_LINE="from=\"$HUB_VPN_IP\",no-agent-forwarding,no-X11-forwarding $key"
}

# The generic resources this machine advertises, as daemon.json strings.
resource_list() {
	local gpu
	RESOURCES=("gridx_cpu=$SHARED_CPUS" "gridx_mem=$SHARED_MEM_MIB")
	for gpu in "${SHARED_GPUS[@]}"; do RESOURCES+=("NVIDIA-GPU=$gpu"); done
}

render_daemon_json() {
	local new=$WORK/daemon.json content='' res_json r
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
	[[ -f $DAEMON_JSON ]] && content=$(<"$DAEMON_JSON")
	if [[ $content =~ ^[[:space:]]*(\{[[:space:]]*\})?[[:space:]]*$ ]]; then
		{
			printf '{\n  "node-generic-resources": %s' "$res_json"
			if [[ -n $RUNTIME_PATH ]]; then
				json_str "$RUNTIME_PATH"
				printf ',\n  "default-runtime": "nvidia",\n  "runtimes": {"nvidia": {"path": %s, "runtimeArgs": []}}' "$REPLY"
			fi
			printf '\n}\n'
		} >"$new"
	elif have_cmd python3; then
		merge_with_python3 "$res_json" "$new"
	elif have_cmd jq; then
		merge_with_jq "$res_json" "$new"
	elif hand_merged "$content"; then
		cp "$DAEMON_JSON" "$new"
	else
		info "add these keys to $DAEMON_JSON, keeping what is there:"
		info "  \"node-generic-resources\": $res_json"
		if [[ -n $RUNTIME_PATH ]]; then
			info "  \"default-runtime\": \"nvidia\","
			info "  \"runtimes\": {\"nvidia\": {\"path\": \"$RUNTIME_PATH\", \"runtimeArgs\": []}}"
		fi
		fatal 3 "$DAEMON_JSON already has settings, and neither python3 nor jq is here to merge into it" "add the keys above by hand (then join.sh leaves the file as it is), or install jq (apt-get install jq / pacman -S jq / dnf install jq), and run join.sh again"
	fi
	if [[ -f $DAEMON_JSON ]] && same_file "$DAEMON_JSON" "$new"; then DAEMON_CHANGE=0; else DAEMON_CHANGE=1; fi
}

# Without python3 or jq: does the file already say it all (added by hand)?
hand_merged() {
	local content=$1 r
	[[ $content == *'"node-generic-resources"'* ]] || return 1
	for r in "${RESOURCES[@]}"; do [[ $content == *"\"$r\""* ]] || return 1; done
	if [[ -n $RUNTIME_PATH ]]; then
		[[ $content =~ \"default-runtime\"[[:space:]]*:[[:space:]]*\"nvidia\" ]] || return 1
	fi
}

# Both mergers keep every key, drop old gridx_cpu/gridx_mem/NVIDIA-GPU
# entries, and keep the file's bytes when nothing would change.
merge_with_python3() { # RES_JSON NEW
	local rc=0
	python3 - "$DAEMON_JSON" "$2" "$1" "$RUNTIME_PATH" <<'EOF' || rc=$?
import json, sys
src, dst, res, runtime = sys.argv[1:5]
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
	# shellcheck disable=SC2016 # $res and $runtime are jq's variables
	local filter='
		if type != "object" then error("not a JSON object") else . end
		| ."node-generic-resources" = ((."node-generic-resources" // [])
			| map(select(tostring | test("^(gridx_cpu|gridx_mem|NVIDIA-GPU)=") | not)) + $res)
		| if $runtime == "" then . else
			."default-runtime" = "nvidia"
			| .runtimes.nvidia.path = $runtime
			| .runtimes.nvidia.runtimeArgs //= [] end'
	jq --argjson res "$1" --arg runtime "$RUNTIME_PATH" "$filter" "$DAEMON_JSON" >"$2" ||
		fatal 3 "cannot merge into $DAEMON_JSON: it is not one valid JSON object" "fix the file, and run join.sh again"
	if [[ $(jq -S . "$DAEMON_JSON") == "$(jq -S . "$2")" ]]; then cp "$DAEMON_JSON" "$2"; fi
}

# The toolkit reads the GPUs swarm assigned from DOCKER_RESOURCE_NVIDIA-GPU.
render_nvidia_config() {
	local want='swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"' line replaced=0 top=1
	NVIDIA_CHANGE=0
	[[ -n $RUNTIME_PATH ]] || return 0
	{
		if [[ -f $NVIDIA_CONFIG ]]; then
			while IFS= read -r line || [[ -n $line ]]; do
				[[ $line =~ ^[[:space:]]*\[ ]] && top=0
				if ((top && !replaced)) && [[ $line =~ ^[[:space:]]*#?[[:space:]]*swarm-resource[[:space:]]*= ]]; then
					line=$want
					replaced=1
				fi
				printf '%s\n' "$line"
			done <"$NVIDIA_CONFIG"
		fi
	} >"$WORK/nvidia.body"
	if ((replaced)); then
		mv "$WORK/nvidia.body" "$WORK/nvidia-config.toml"
	else
		{
			printf '%s\n' "$want"
			cat "$WORK/nvidia.body"
		} >"$WORK/nvidia-config.toml"
	fi
	if [[ -f $NVIDIA_CONFIG ]] && same_file "$NVIDIA_CONFIG" "$WORK/nvidia-config.toml"; then return 0; fi
	NVIDIA_CHANGE=1
}

confirm_plan() {
	local gpus=none docker_line
	((${#SHARED_GPUS[@]})) && gpus="${#SHARED_GPUS[@]} (${SHARED_GPUS[*]})"
	if ((DAEMON_CHANGE || NVIDIA_CHANGE)); then
		docker_line="merge the shared resources into $DAEMON_JSON (saved first), restart Docker"
	else
		docker_line="$DAEMON_JSON already says this: no change, no restart"
	fi
	info ""
	info "${C_BOLD}About to join Grid-X as $NAME ($VPN_IP) through the hub at $HUB_ENDPOINT${C_OFF}"
	info "  share     $SHARED_CPUS CPUs, $SHARED_MEM_MIB MiB of memory, GPUs: $gpus"
	info "  VPN       write $WG_CONF, bring up $IFACE$(systemd_runs && printf ' (and at boot)')"
	info "  Docker    $docker_line"
	info "  swarm     join $MANAGER as $VPN_IP"
	[[ -n $KEY_LINE ]] && info "  SSH       trust the hub's key from $HUB_VPN_IP only ($AUTHORIZED_KEYS)"
	info "  firewall  ports that jobs publish answer over $IFACE only"
	info "  undo      ./leave.sh puts all of this back"
	info ""
	((OPT_YES)) && return 0
	have_terminal || no_terminal "whether to continue" "--yes"
	ask_yes "Continue" y || fatal 1 "stopped: nothing was changed"
}

# ------------------------------------------------------------------ steps ----
# Each records its change in the state just before making it.

step_state_dir() {
	local created=0 gpus
	if [[ ! -d $STATE_DIR ]]; then
		cmd mkdir -p -m 0700 "$STATE_DIR"
		created=1
	fi
	[[ -d $BACKUP_DIR ]] || mkdir -m 0700 "$BACKUP_DIR"
	gpus=${SHARED_GPUS[*]}
	state_set NAME "$NAME" INTERFACE "$IFACE" VPN_IP "$VPN_IP" HUB_VPN_IP "$HUB_VPN_IP" \
		HUB_ENDPOINT "$HUB_ENDPOINT" MANAGER "$MANAGER" JOINED_AT "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
		COMPLETE 0 SHARED_CPUS "$SHARED_CPUS" SHARED_MEMORY_MIB "$SHARED_MEM_MIB" \
		SHARED_GPU_IDS "${gpus// /,}" CREATED_STATE_DIR "$created"
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
	state_set LINK_UP 1 FIREWALL_RULE "${FW_RULE[*]}"
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

step_swarm_join() {
	local token
	read -r token <"$GRIDX_BUNDLE_DIR/swarm-token" || true
	state_set SWARM_JOINED 1
	if ! cmd_secret "$token" docker swarm join --token "$token" --advertise-addr "$VPN_IP" \
		--listen-addr "$VPN_IP:2377" --data-path-addr "$VPN_IP" "$MANAGER"; then
		fatal 1 "could not join the swarm at $MANAGER (see Docker's message above)" "a wrong or rotated token? ask the hub admin for a fresh bundle (gridx hub add-peer $NAME)"
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
	firewall_rule_present "$IFACE" && return 0
	if iptables -L DOCKER-USER -n >/dev/null 2>&1; then
		cmd iptables -I DOCKER-USER "${FW_RULE[@]}"
	else
		warn "iptables has no DOCKER-USER chain (Docker runs with iptables off?): ports that jobs publish may be reachable from other networks here"
	fi
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
What was changed is recorded in $STATE_JSON.
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
	ensure_root "changes the network and Docker settings" "$@"
	init_paths
	need_cmd mktemp sha256sum nproc
	load_settings
	check_bundle
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
	render_daemon_json
	render_nvidia_config
	confirm_plan

	arm_rollback
	step_state_dir
	step_wg_config
	step_link_up
	step_wait_handshake
	step_docker_config
	step_swarm_join
	step_authorized_keys
	step_check_firewall
	step_boot_unit
	step_done
}

main "$@"
