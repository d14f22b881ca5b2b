# shellcheck shell=bash
#
# lib.sh - what join.sh, leave.sh and status.sh share. Sourced, never run.
#
# Defines functions only; nothing here changes the machine until a script
# calls a step. Sections, in dependency order:
#   output · running commands · paths · values files (settings.env, state.env)
#   · the journal of changes (state) · checks · Docker · undo (used by both
#   join.sh's rollback and leave.sh, so removal matches installation exactly)
#
# Paths, overridable through the environment (tests point them at a temporary
# folder; the defaults are the real ones):
#   GRIDX_WG_DIR              /etc/wireguard
#   GRIDX_DOCKER_DAEMON_JSON  /etc/docker/daemon.json
#   GRIDX_NVIDIA_CONFIG       /etc/nvidia-container-runtime/config.toml
#   GRIDX_AUTHORIZED_KEYS     ROOT_HOME/.ssh/authorized_keys
#   GRIDX_STATE_DIR           $HOME/.gridx
#   GRIDX_MEMINFO             /proc/meminfo
#   GRIDX_SYSTEMD_RUN_DIR     /run/systemd/system (exists = systemd runs)
#   GRIDX_DOCKER_WAIT         60 (seconds to wait for Docker after a restart)
#   NO_COLOR                  set: no colour even on a terminal
#
# The caller sets GRIDX_BUNDLE_DIR (its own folder) and GRIDX_PROG (its name)
# before sourcing this file.

# Associative arrays, [[ -v array[key] ]] and empty arrays under set -u.
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
	printf 'error: Grid-X needs bash 4.4 or newer (this is %s)\n' "$BASH_VERSION" >&2
	exit 3
fi

# ---------------------------------------------------------------- output ----
# Progress, warnings and errors go to stderr; results to stdout. Colour only
# on a terminal and when NO_COLOR is unset.

if [[ -t 2 && -z ${NO_COLOR:-} ]]; then
	C_BOLD=$'\e[1m' C_RED=$'\e[31m' C_YELLOW=$'\e[33m' C_GREEN=$'\e[32m' C_OFF=$'\e[0m'
else
	C_BOLD='' C_RED='' C_YELLOW='' C_GREEN='' C_OFF=''
fi
# The same for what goes to stdout (the "Done." blocks).
# shellcheck disable=SC2034 # used by the scripts
if [[ -t 1 && -z ${NO_COLOR:-} ]]; then
	O_BOLD=$'\e[1m' O_GREEN=$'\e[32m' O_OFF=$'\e[0m'
else
	O_BOLD='' O_GREEN='' O_OFF=''
fi

info() { printf '%s\n' "$*" >&2; }
warn() { printf '%swarning:%s %s\n' "$C_YELLOW$C_BOLD" "$C_OFF" "$*" >&2; }
hint() { printf '%shint:%s %s\n' "$C_BOLD" "$C_OFF" "$*" >&2; }
ok() { printf '%s%s%s\n' "$C_GREEN" "$*" "$C_OFF" >&2; }

# fatal CODE MESSAGE [HINT]: say why we stop (and what to do), exit CODE.
# Exit codes: 1 operation failed, 2 bad usage or input, 3 precondition missing.
fatal() {
	local code=$1
	printf '%serror:%s %s\n' "$C_RED$C_BOLD" "$C_OFF" "$2" >&2
	if [[ -n ${3:-} ]]; then hint "$3"; fi
	exit "$code"
}

# ------------------------------------------------------- running commands ----
# Every external command that changes the machine is echoed first, as
# wg-quick does: "[#] cmd args".

# What the commands print goes to stderr too: stdout is for results only.
cmd() {
	printf '[#] %s\n' "$*" >&2
	"$@" >&2
}

# cmd_secret SECRET CMD ARGS...: like cmd, but SECRET is not printed.
cmd_secret() {
	local secret=$1 shown
	shift
	shown="$*"
	printf '[#] %s\n' "${shown//"$secret"/<hidden>}" >&2
	"$@" >&2
}

have_cmd() { command -v "$1" >/dev/null 2>&1; }

need_cmd() {
	local tool
	for tool in "$@"; do
		have_cmd "$tool" || fatal 3 "$GRIDX_PROG needs '$tool', which is not installed" "install it with this system's package manager, then run $GRIDX_PROG again"
	done
}

# Re-run the whole script under sudo when not root, saying why. Without a
# terminal (cron) sudo must not ask for a password: sudo -n.
ensure_root() {
	local why=$1
	shift
	[[ $EUID -eq 0 ]] && return 0
	have_cmd sudo || fatal 3 "$GRIDX_PROG must run as root ($why)" "run it as root: su -c '$GRIDX_BUNDLE_DIR/$GRIDX_PROG'"
	if [[ -t 0 ]]; then
		info "$GRIDX_PROG $why, so it needs root: running it again with sudo"
		exec sudo -- bash "$GRIDX_BUNDLE_DIR/$GRIDX_PROG" "$@"
	fi
	exec sudo -n -- bash "$GRIDX_BUNDLE_DIR/$GRIDX_PROG" "$@"
}

# ------------------------------------------------------------------ paths ----

root_home() {
	local uid home
	while IFS=: read -r _ _ uid _ _ home _; do
		if [[ $uid == 0 && -n $home ]]; then
			REPLY=$home
			return 0
		fi
	done </etc/passwd
	REPLY=/root
}

# shellcheck disable=SC2034 # the scripts use these
init_paths() {
	root_home
	WG_DIR=${GRIDX_WG_DIR:-/etc/wireguard}
	DAEMON_JSON=${GRIDX_DOCKER_DAEMON_JSON:-/etc/docker/daemon.json}
	NVIDIA_CONFIG=${GRIDX_NVIDIA_CONFIG:-/etc/nvidia-container-runtime/config.toml}
	AUTHORIZED_KEYS=${GRIDX_AUTHORIZED_KEYS:-$REPLY/.ssh/authorized_keys}
	STATE_DIR=${GRIDX_STATE_DIR:-${HOME:-$REPLY}/.gridx}
	STATE_FILE=$STATE_DIR/state.env
	STATE_JSON=$STATE_DIR/worker_config.json
	BACKUP_DIR=$STATE_DIR/backup
	MEMINFO=${GRIDX_MEMINFO:-/proc/meminfo}
	SYSTEMD_RUN_DIR=${GRIDX_SYSTEMD_RUN_DIR:-/run/systemd/system}
}

systemd_runs() { [[ -d $SYSTEMD_RUN_DIR ]]; }

# ------------------------------------------------------------ values files ----
# settings.env and state.env hold KEY='value' lines, every value shell-quoted.
# They are read as data, never run: only single quotes, '"'"' or \' between
# them, double quotes without expansions, and plain safe words are accepted.

# shell_quote VALUE -> REPLY: 'value' with every ' written as '\''
shell_quote() {
	local q="'\\''"
	REPLY="'${1//\'/$q}'"
}

# unquote RAW -> REPLY; fails on anything that would need a shell to read.
unquote() {
	local s=$1 out=''
	local re_sq="^'([^']*)'(.*)\$" re_dq='^"([^"$`\\]*)"(.*)$'
	local re_esc='^\\(.)(.*)$' re_word='^([A-Za-z0-9_@%+=:,./-]+)(.*)$'
	while [[ -n $s ]]; do
		if [[ $s =~ $re_sq || $s =~ $re_dq || $s =~ $re_esc || $s =~ $re_word ]]; then
			out+=${BASH_REMATCH[1]}
			s=${BASH_REMATCH[2]}
		else
			return 1
		fi
	done
	REPLY=$out
}

# read_values FILE ARRAY: fill the associative array ARRAY from FILE.
read_values() {
	local file=$1 array=$2 line key n=0 re_kv='^([A-Za-z_][A-Za-z0-9_]*)=(.*)$'
	while IFS= read -r line || [[ -n $line ]]; do
		n=$((n + 1))
		[[ $line =~ ^[[:space:]]*(#|$) ]] && continue
		if [[ $line =~ $re_kv ]] && key=${BASH_REMATCH[1]} && unquote "${BASH_REMATCH[2]}"; then
			printf -v "${array}[$key]" '%s' "$REPLY"
		else
			fatal 3 "$file line $n is not a KEY='value' line" "get a fresh copy of the file from the hub admin"
		fi
	done <"$file"
}

# Settings of the bundle -> S[...]. Required keys are checked by the caller.
declare -A S=()

load_settings() {
	local file=$GRIDX_BUNDLE_DIR/settings.env
	[[ -f $file ]] || fatal 3 "$file is missing: this folder is not a complete Grid-X bundle" "ask the hub admin for the bundle again (gridx hub add-peer NAME)"
	read_values "$file" S
	S[GRIDX_INTERFACE]=${S[GRIDX_INTERFACE]:-gridx0}
	[[ ${S[GRIDX_INTERFACE]} =~ ^[a-zA-Z0-9_=+.-]{1,15}$ ]] || fatal 3 "GRIDX_INTERFACE '${S[GRIDX_INTERFACE]}' in settings.env is not a valid interface name"
	# shellcheck disable=SC2034 # the scripts use it
	IFACE=${S[GRIDX_INTERFACE]}
}

# atomic_write PATH MODE < content: temporary file in the same folder with
# the final mode set before anything is written, sync, rename.
atomic_write() {
	local path=$1 mode=$2 tmp
	tmp=$(umask 077 && mktemp "${path%/*}/.${path##*/}.XXXXXX")
	chmod "$mode" "$tmp"
	cat >"$tmp"
	sync "$tmp" 2>/dev/null || sync
	mv -f "$tmp" "$path"
}

# same_file A B: byte for byte equal.
same_file() {
	[[ -f $1 && -f $2 ]] || return 1
	local a b
	a=$(sha256sum <"$1") b=$(sha256sum <"$2")
	[[ $a == "$b" ]]
}

# json_str VALUE -> REPLY: a JSON string literal.
json_str() {
	local s=$1 out='' c i code
	for ((i = 0; i < ${#s}; i++)); do
		c=${s:i:1}
		case $c in
		'"') out+='\"' ;;
		\\) out+="\\\\" ;;
		$'\n') out+='\n' ;;
		$'\t') out+='\t' ;;
		$'\r') out+='\r' ;;
		[[:cntrl:]])
			printf -v code '%d' "'$c"
			printf -v c '\\u%04x' "$code"
			out+=$c
			;;
		*) out+=$c ;;
		esac
	done
	REPLY="\"$out\""
}

# json_str_list "a,b,c" -> REPLY: ["a","b","c"]
json_str_list() {
	local item out='' list
	IFS=, read -r -a list <<<"$1"
	for item in "${list[@]}"; do
		json_str "$item"
		out+=${out:+,}$REPLY
	done
	REPLY="[$out]"
}

# ------------------------------------------------------------------ state ----
# The state is a journal: join.sh records each change just before it makes
# it, so its rollback, leave.sh, and leave.sh after a join that was killed
# midway all undo exactly what was done. Keys (all in state.env and, as the
# same facts, in worker_config.json):
#   NAME INTERFACE VPN_IP HUB_VPN_IP HUB_ENDPOINT MANAGER JOINED_AT COMPLETE
#   SHARED_CPUS SHARED_MEMORY_MIB SHARED_GPU_IDS (comma-separated)
#   and the changes, each present only while it is in effect:
#   CREATED_STATE_DIR CREATED_WG_DIR WG_CONFIG LINK_UP FIREWALL_RULE (its
#   iptables arguments) CREATED_DOCKER_DIR DAEMON_JSON DAEMON_JSON_BACKUP (a
#   file, or "absent") CREATED_NVIDIA_DIR NVIDIA_CONFIG NVIDIA_CONFIG_BACKUP
#   DOCKER_RESTART_PENDING SWARM_JOINED AUTHORIZED_KEYS
#   AUTHORIZED_KEYS_LINE AUTHORIZED_KEYS_BACKUP CREATED_SSH_DIR
#   CREATED_AUTHORIZED_KEYS BOOT_UNIT

declare -A ST=()
STATE_ORDER=(NAME INTERFACE VPN_IP HUB_VPN_IP HUB_ENDPOINT MANAGER JOINED_AT COMPLETE
	SHARED_CPUS SHARED_MEMORY_MIB SHARED_GPU_IDS
	CREATED_STATE_DIR CREATED_WG_DIR WG_CONFIG LINK_UP FIREWALL_RULE CREATED_DOCKER_DIR
	DAEMON_JSON DAEMON_JSON_BACKUP CREATED_NVIDIA_DIR NVIDIA_CONFIG NVIDIA_CONFIG_BACKUP
	DOCKER_RESTART_PENDING SWARM_JOINED AUTHORIZED_KEYS AUTHORIZED_KEYS_LINE AUTHORIZED_KEYS_BACKUP
	CREATED_SSH_DIR CREATED_AUTHORIZED_KEYS BOOT_UNIT)

state_exists() { [[ -f $STATE_FILE ]]; }

load_state() { read_values "$STATE_FILE" ST; }

# state_set KEY VALUE [KEY VALUE...], then save. state_unset KEY..., then save.
state_set() {
	while (($# >= 2)); do
		ST[$1]=$2
		shift 2
	done
	save_state
}

state_unset() {
	local key
	for key in "$@"; do unset "ST[$key]"; done
	save_state
}

save_state() {
	local key
	[[ -d $STATE_DIR ]] || return 0
	{
		printf '# Grid-X worker state, written by join.sh, read by leave.sh and status.sh.\n'
		for key in "${STATE_ORDER[@]}"; do
			[[ -v ST[$key] ]] || continue
			shell_quote "${ST[$key]}"
			printf '%s=%s\n' "$key" "$REPLY"
		done
	} | atomic_write "$STATE_FILE" 0600
	state_json | atomic_write "$STATE_JSON" 0600
}

# The same facts as JSON. Numbers stay numbers, flags become booleans.
state_json() {
	local key value lower
	printf '{\n  "version": 1'
	for key in "${STATE_ORDER[@]}"; do
		[[ -v ST[$key] ]] || continue
		value=${ST[$key]}
		lower=${key,,}
		case $key in
		SHARED_GPU_IDS) json_str_list "$value" ;;
		SHARED_CPUS | SHARED_MEMORY_MIB) REPLY=$value ;;
		COMPLETE | LINK_UP | DOCKER_RESTART_PENDING | SWARM_JOINED | CREATED_STATE_DIR | CREATED_DOCKER_DIR | \
			CREATED_NVIDIA_DIR | CREATED_SSH_DIR | CREATED_AUTHORIZED_KEYS)
			[[ $value == 1 ]] && REPLY=true || REPLY=false
			;;
		*) json_str "$value" ;;
		esac
		printf ',\n  "%s": %s' "$lower" "$REPLY"
	done
	printf '\n}\n'
}

# --------------------------------------------------------------- checks ----

link_exists() { ip link show dev "$1" >/dev/null 2>&1; }

link_is_up() {
	local out
	out=$(ip -o link show dev "$1" 2>/dev/null) || return 1
	[[ $out =~ [\<,]UP[,\>] ]]
}

# latest_handshake IFACE -> REPLY: newest handshake time (epoch s), 0 if none.
latest_handshake() {
	local out line t newest=0
	out=$(wg show "$1" latest-handshakes 2>/dev/null) || {
		REPLY=0
		return 1
	}
	while read -r line; do
		t=${line##*[[:space:]]}
		[[ $t =~ ^[0-9]+$ ]] && ((t > newest)) && newest=$t
	done <<<"$out"
	REPLY=$newest
}

swarm_state() {
	REPLY=$(docker info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null) || REPLY=unknown
	[[ -n $REPLY ]] || REPLY=unknown
}

# The rule that keeps ports published by jobs on the VPN: forwarded traffic
# that Docker DNATed to a container and that did not come in on the VPN
# interface is dropped. Only in the connection's original direction: the
# container's replies come in on docker0 and belong to the DNATed connection
# too (without --ctdir the VPN could not reach the port either; measured).
# FW_RULE=(args after "iptables -I DOCKER-USER").
firewall_rule() {
	FW_RULE=(-m conntrack --ctstate DNAT --ctdir ORIGINAL ! -i "$1" -m comment --comment gridx -j DROP)
}

firewall_rule_present() {
	firewall_rule "$1"
	iptables -C DOCKER-USER "${FW_RULE[@]}" >/dev/null 2>&1
}

# --------------------------------------------------------------- Docker ----

restart_docker() {
	if systemd_runs; then
		cmd systemctl restart docker || return 1
	else
		cmd service docker restart || return 1
	fi
	wait_docker
}

wait_docker() { # polls 5 times a second: Docker is usually back within 2 s
	local tries=0 limit=${GRIDX_DOCKER_WAIT:-60}
	until docker info >/dev/null 2>&1; do
		if ((tries >= limit * 5)); then
			fatal 1 "Docker did not come back within $limit s after the restart" "look at its log: journalctl -u docker, or /var/log/docker.log"
		fi
		((tries % 25 == 0)) && info "waiting for Docker to answer ($((tries / 5))/$limit s)"
		sleep 0.2
		tries=$((tries + 1))
	done
}

# ----------------------------------------------------------------- undo ----
# One function per change, each tolerant of a change already undone, each
# forgetting its record once done. undo_all runs them in the reverse order of
# join.sh's steps and returns 1 if any of them failed (the record stays, so
# running leave.sh again retries exactly what is left).

restore_file() { # PATH BACKUP(file or "absent")
	local path=$1 backup=$2
	if [[ $backup == absent ]]; then
		if [[ -e $path ]]; then cmd rm -f "$path"; fi
	else
		[[ -f $backup ]] || {
			warn "backup $backup is missing: $path left as it is"
			return 1
		}
		if [[ -e $path ]] && same_file "$path" "$backup"; then return 0; fi
		local tmp
		printf '[#] restore %s as it was before join\n' "$path" >&2
		tmp=$(mktemp "${path%/*}/.${path##*/}.XXXXXX")
		cp -p "$backup" "$tmp"
		mv -f "$tmp" "$path"
	fi
}

# file_differs PATH BACKUP: does PATH differ from BACKUP ("absent" too)?
file_differs() {
	local path=$1 backup=$2
	if [[ $backup == absent ]]; then
		[[ -e $path ]]
	elif same_file "$path" "$backup"; then
		return 1
	fi
}

# Someone edited the file after join wrote it: keep their version beside it.
keep_edited_copy() { # PATH WRITTEN_COPY
	local path=$1 written=$2
	if [[ -f $path && -f $written ]] && ! same_file "$path" "$written"; then
		warn "$path was edited after join; restoring the original and keeping the edited one as $path.gridx-edited"
		cmd cp -p "$path" "$path.gridx-edited"
	fi
}

undo_boot_unit() {
	[[ -v ST[BOOT_UNIT] ]] || return 0
	if have_cmd systemctl; then cmd systemctl disable "${ST[BOOT_UNIT]}" || return 1; fi
	state_unset BOOT_UNIT
}

undo_authorized_keys() {
	[[ -v ST[AUTHORIZED_KEYS] ]] || return 0
	local path=${ST[AUTHORIZED_KEYS]} line=${ST[AUTHORIZED_KEYS_LINE]} backup=${ST[AUTHORIZED_KEYS_BACKUP]:-absent}
	local expected kept l dir
	if [[ -f $path ]]; then
		# Exactly as join left it: put back the original bytes.
		expected=$(mktemp "$STATE_DIR/.expected.XXXXXX")
		if [[ $backup != absent ]]; then
			cat "$backup" >"$expected"
			# join added a newline first when the file did not end with one
			if [[ -s $backup && -n $(tail -c 1 "$backup") ]]; then printf '\n' >>"$expected"; fi
		fi
		printf '%s\n' "$line" >>"$expected"
		if same_file "$path" "$expected"; then
			if [[ $backup == absent ]]; then
				printf '[#] remove the hub key line from %s\n' "$path" >&2
				: >"$path"
			else
				printf '[#] restore %s as it was before join\n' "$path" >&2
				cat "$backup" >"$path"
			fi
		else
			# Edited since: remove our line only, every other line kept.
			kept=$expected
			: >"$kept"
			while IFS= read -r l || [[ -n $l ]]; do
				[[ $l == "$line" ]] || printf '%s\n' "$l" >>"$kept"
			done <"$path"
			printf '[#] remove the hub key line from %s\n' "$path" >&2
			cat "$kept" >"$path"
		fi
		rm -f "$expected"
	fi
	if [[ ${ST[CREATED_AUTHORIZED_KEYS]:-0} == 1 && -f $path && ! -s $path ]]; then cmd rm -f "$path"; fi
	dir=${path%/*}
	if [[ ${ST[CREATED_SSH_DIR]:-0} == 1 && -d $dir ]]; then
		if [[ -z $(ls -A "$dir") ]]; then cmd rmdir "$dir"; fi
	fi
	state_unset AUTHORIZED_KEYS AUTHORIZED_KEYS_LINE AUTHORIZED_KEYS_BACKUP CREATED_SSH_DIR CREATED_AUTHORIZED_KEYS
}

undo_swarm() {
	[[ -v ST[SWARM_JOINED] ]] || return 0
	swarm_state
	case $REPLY in
	inactive) ;;
	unknown)
		warn "Docker does not answer, so this machine cannot leave the swarm now"
		return 1
		;;
	*) cmd docker swarm leave --force || return 1 ;;
	esac
	state_unset SWARM_JOINED
}

# undo_docker_file KEY DIR_KEY WRITTEN_COPY: put back the file recorded under
# KEY (backup in KEY_BACKUP; DIR_KEY=1 when join created its folder). When
# that changes its bytes, Docker's restart is recorded as pending first.
undo_docker_file() {
	local key=$1 dir_key=$2 path backup
	[[ -v ST[$key] ]] || return 0
	path=${ST[$key]} backup=${ST[${key}_BACKUP]}
	keep_edited_copy "$path" "$3"
	if file_differs "$path" "$backup"; then state_set DOCKER_RESTART_PENDING 1; fi
	restore_file "$path" "$backup" || return 1
	if [[ ${ST[$dir_key]:-0} == 1 ]]; then rmdir "${path%/*}" 2>/dev/null || true; fi
	state_unset "$key" "${key}_BACKUP" "$dir_key"
}

undo_docker_config() {
	undo_docker_file NVIDIA_CONFIG CREATED_NVIDIA_DIR "$BACKUP_DIR/nvidia-config.toml.written" || return 1
	undo_docker_file DAEMON_JSON CREATED_DOCKER_DIR "$BACKUP_DIR/daemon.json.written" || return 1
	[[ -v ST[DOCKER_RESTART_PENDING] ]] || return 0
	restart_docker || return 1
	state_unset DOCKER_RESTART_PENDING
}

undo_link() {
	[[ -v ST[LINK_UP] ]] || return 0
	local iface=${ST[INTERFACE]} conf=${ST[WG_CONFIG]:-$WG_DIR/${ST[INTERFACE]}.conf}
	if link_exists "$iface"; then
		if [[ -n $conf && -f $conf ]]; then
			cmd wg-quick down "$conf" || return 1
		else
			cmd ip link delete dev "$iface" || return 1
		fi
	fi
	state_unset LINK_UP
}

# wg-quick down removes the rule (PostDown); this catches a link that went
# away without it, and a rule join.sh added itself.
undo_firewall() {
	[[ -v ST[FIREWALL_RULE] ]] || return 0
	local tries=0 rule
	# the rule as join wrote it, whatever this version of the scripts writes
	read -r -a rule <<<"${ST[FIREWALL_RULE]}"
	if have_cmd iptables; then
		while ((tries++ < 8)) && iptables -C DOCKER-USER "${rule[@]}" >/dev/null 2>&1; do
			cmd iptables -D DOCKER-USER "${rule[@]}" || return 1
		done
	fi
	state_unset FIREWALL_RULE
}

undo_wg_config() {
	if [[ -v ST[WG_CONFIG] ]]; then
		if [[ -e ${ST[WG_CONFIG]} ]]; then cmd rm -f "${ST[WG_CONFIG]}" || return 1; fi
		state_unset WG_CONFIG
	fi
	if [[ -v ST[CREATED_WG_DIR] ]]; then
		rmdir "${ST[CREATED_WG_DIR]}" 2>/dev/null || true
		state_unset CREATED_WG_DIR
	fi
}

# Returns 0 when everything is undone (and the state is gone), 1 otherwise.
undo_all() {
	local step failed=0 rc errexit=0
	[[ $- == *e* ]] && errexit=1
	for step in undo_boot_unit undo_authorized_keys undo_swarm undo_docker_config undo_link undo_firewall undo_wg_config; do
		# In a subshell with errexit on (not in a tested context, where bash
		# would switch errexit off), so a failing command ends only this step.
		set +e
		(
			set -e
			"$step"
		)
		rc=$?
		if [[ $rc != 0 ]]; then
			warn "could not undo everything in ${step#undo_}; the record stays in $STATE_FILE"
			failed=1
		fi
		# The step ran in a subshell: read back what it recorded.
		ST=()
		if state_exists; then load_state; fi
	done
	if [[ $errexit == 1 ]]; then set -e; fi
	[[ $failed == 0 ]] || return 1
	rm -rf "$BACKUP_DIR"
	rm -f "$STATE_FILE" "$STATE_JSON"
	if [[ ${ST[CREATED_STATE_DIR]:-0} == 1 ]]; then rmdir "$STATE_DIR" 2>/dev/null || true; fi
	ST=()
	return 0
}
