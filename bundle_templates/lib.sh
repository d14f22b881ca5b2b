# shellcheck shell=bash
#
# lib.sh - what join.sh, leave.sh, status.sh and agent.sh share. Sourced, never run.
#
# Defines functions only (and PATH, below); nothing here changes the machine
# until a script calls a step. Sections, in dependency order:
#   PATH · output · running commands · paths · values files (settings.env, state.env)
#   · the journal of changes (state) · checks · Docker · the owner's agent
#   (installed, stopped, its settings) · undo (used by both join.sh's
#   rollback and leave.sh, so removal matches installation exactly)
#
# Paths, overridable through the environment (tests point them at a temporary
# folder; the defaults are the real ones):
#   GRIDX_WG_DIR              /etc/wireguard
#   GRIDX_DOCKER_DAEMON_JSON  /etc/docker/daemon.json
#   GRIDX_NVIDIA_CONFIG       /etc/nvidia-container-runtime/config.toml
#   GRIDX_AUTHORIZED_KEYS     ROOT_HOME/.ssh/authorized_keys
#   GRIDX_ROOT_HOME           root's home from /etc/passwd (where an older
#                             join.sh kept its state: ROOT_HOME/.gridx)
#   GRIDX_STATE_DIR           /var/lib/gridx (root's own folder: never under
#                             $HOME, which sudo -E hands over from the user)
#   GRIDX_DOCKER_CERTS_DIR    /etc/docker/certs.d (Docker's per-registry CAs:
#                             the hub registry's goes in HOST:PORT/ca.crt)
#   GRIDX_SUBUID, GRIDX_SUBGID  /etc/subuid, /etc/subgid (where dockerd
#                             adds its dockremap user's ranges)
#   GRIDX_MEMINFO             /proc/meminfo
#   GRIDX_RESOLV_CONF         /etc/resolv.conf (the name servers Docker gives
#                             containers, unless daemon.json says "dns")
#   GRIDX_RESOLVED_CONF       /run/systemd/resolve/resolv.conf (Docker's pick
#                             when resolv.conf names only 127.0.0.53)
#   GRIDX_SYSTEMD_RUN_DIR     /run/systemd/system (exists = systemd runs)
#   GRIDX_SYSTEMD_UNIT_DIR    /etc/systemd/system (the agent's unit goes there)
#   GRIDX_PROC_DIR            /proc (input devices and CPU flags for join's
#                             default policy; agent.sh reads its sources there)
#   GRIDX_DOCKER_WAIT         60 (seconds to wait for Docker after a restart)
#   GRIDX_LOCAL_BIN           /usr/local/sbin:/usr/local/bin (added to PATH
#                             where it lacks them: see "PATH" below)
#   NO_COLOR                  set: no colour even on a terminal
#
# The caller sets GRIDX_BUNDLE_DIR (its own folder) and GRIDX_PROG (its name)
# before sourcing this file.

# Associative arrays, [[ -v array[key] ]] and empty arrays under set -u.
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
	printf 'error: Grid-X needs bash 4.4 or newer (this is %s)\n' "$BASH_VERSION" >&2
	exit 3
fi

# ------------------------------------------------------------------ PATH ----
# sudo replaces PATH with its secure_path, and Debian's since forky (sudo
# 1.9.17: /usr/sbin:/usr/bin:/sbin:/bin), like RHEL's, leaves /usr/local out:
# `sudo ./join.sh` would not find what the volunteer installed there (jq,
# nvidia-smi, a Docker from static binaries). Its folders are added at the
# end, where PATH lacks them: what PATH already names keeps its place and
# comes first. Runs when sourced: every command the scripts look up comes
# after it, and the programs they start (wg-quick) inherit it.
path_with_local_bin() {
	local dir dirs
	IFS=: read -r -a dirs <<<"${GRIDX_LOCAL_BIN-/usr/local/sbin:/usr/local/bin}"
	for dir in "${dirs[@]}"; do
		if [[ -n $dir && :$PATH: != *":$dir:"* ]]; then PATH=${PATH:+$PATH:}$dir; fi
	done
	export PATH
}
path_with_local_bin

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

# The owner-activity agent's systemd unit (see "the owner's agent" below).
AGENT_UNIT_NAME=gridx-agent.service

root_home() {
	local uid home
	if [[ -n ${GRIDX_ROOT_HOME:-} ]]; then # tests: a root home of their own
		REPLY=$GRIDX_ROOT_HOME
		return 0
	fi
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
	# join.sh before 2026-12 kept its state in $HOME/.gridx, which under sudo
	# was root's home: leave.sh and status.sh still find it there.
	LEGACY_STATE_DIR=$REPLY/.gridx
	set_state_dir "${GRIDX_STATE_DIR:-/var/lib/gridx}"
	MEMINFO=${GRIDX_MEMINFO:-/proc/meminfo}
	RESOLV_CONF=${GRIDX_RESOLV_CONF:-/etc/resolv.conf}
	RESOLVED_CONF=${GRIDX_RESOLVED_CONF:-/run/systemd/resolve/resolv.conf}
	SYSTEMD_RUN_DIR=${GRIDX_SYSTEMD_RUN_DIR:-/run/systemd/system}
	AGENT_UNIT=${GRIDX_SYSTEMD_UNIT_DIR:-/etc/systemd/system}/$AGENT_UNIT_NAME
	SUBUID=${GRIDX_SUBUID:-/etc/subuid}
	SUBGID=${GRIDX_SUBGID:-/etc/subgid}
	CERTS_DIR=${GRIDX_DOCKER_CERTS_DIR:-/etc/docker/certs.d} # same default as gridx.py's docker_certs_dir
	local path
	for path in "$WG_DIR" "$DAEMON_JSON" "$NVIDIA_CONFIG" "$AUTHORIZED_KEYS" "$STATE_DIR" "$CERTS_DIR" "$AGENT_UNIT"; do
		[[ $path == /* ]] || fatal 2 "'$path' is not an absolute path" "the GRIDX_* path overrides take absolute paths"
	done
}

# shellcheck disable=SC2034 # the scripts use these
set_state_dir() {
	STATE_DIR=$1
	STATE_FILE=$STATE_DIR/state.env
	STATE_JSON=$STATE_DIR/worker_config.json
	BACKUP_DIR=$STATE_DIR/backup
	# the owner-activity agent's installed copy, settings, status, log
	AGENT_DIR=$STATE_DIR/agent
	AGENT_ENV=$AGENT_DIR/agent.env
	AGENT_STATUS=$AGENT_DIR/status.env
	AGENT_PIDFILE=$AGENT_DIR/supervisor.pid
	AGENT_LOG=$AGENT_DIR/agent.log
	AGENT_FIFO=$AGENT_DIR/events.fifo
}

# leave.sh and status.sh of a machine joined by an older join.sh: its state
# in root's home (the default path only, never one from the environment).
find_legacy_state() {
	if [[ -z ${GRIDX_STATE_DIR:-} && ! -e $STATE_FILE && -f $LEGACY_STATE_DIR/state.env ]]; then
		info "this machine was joined by an older join.sh: its record is in $LEGACY_STATE_DIR"
		set_state_dir "$LEGACY_STATE_DIR"
	fi
}

# only_root_writes PATH...: refuse (exit 3) a path that anyone but root
# could have written: a link, not owned by root, or writable by group or
# others. leave.sh acts on what the state says; a state someone else could
# write would let them choose what root removes or copies. One stat for all
# of them (leave.sh checks the state again after each of its steps).
only_root_writes() {
	local path paths=() lines=() i owner mode
	for path in "$@"; do
		[[ -e $path || -L $path ]] || continue
		if [[ -L $path ]]; then
			fatal 3 "$path is a symbolic link: Grid-X's state must be root's own file" "look at who made it; remove the link, then run $GRIDX_PROG again"
		fi
		paths+=("$path")
	done
	((${#paths[@]})) || return 0
	mapfile -t lines < <(stat -c '%u %a' -- "${paths[@]}")
	for i in "${!paths[@]}"; do
		read -r owner mode <<<"${lines[$i]:-? ?}"
		if [[ $owner != 0 || ! $mode =~ ^[0-7]+$ ]] || (((8#$mode & 8#022) != 0)); then
			fatal 3 "${paths[$i]} can be written by someone other than root (owner uid $owner, mode $mode): $GRIDX_PROG will not act on it" \
				"check who changed it; if the content is right: chown root:root ${paths[$i]} && chmod go-w ${paths[$i]}, then run $GRIDX_PROG again"
		fi
	done
}

check_state_owner() {
	local backups=()
	if [[ -d $BACKUP_DIR ]]; then
		local f
		for f in "$BACKUP_DIR"/* "$BACKUP_DIR"/.[!.]*; do
			if [[ -e $f || -L $f ]]; then backups+=("$f"); fi
		done
	fi
	# and the copy of the scripts that wg-quick's PreUp runs as root
	only_root_writes "$STATE_DIR" "$STATE_FILE" "$STATE_JSON" "$BACKUP_DIR" "${backups[@]}" \
		"$STATE_DIR/jobnet" "$STATE_DIR/jobnet/jobnet.sh" "$STATE_DIR/jobnet/lib.sh"
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

# read_values FILE ARRAY [CODE]: fill the associative array ARRAY from FILE;
# a line that is not KEY='value' is exit CODE (3: a damaged record; 2: a
# bundle file, which is input).
read_values() {
	local file=$1 array=$2 code=${3:-3} line key n=0 re_kv='^([A-Za-z_][A-Za-z0-9_]*)=(.*)$'
	while IFS= read -r line || [[ -n $line ]]; do
		n=$((n + 1))
		[[ $line =~ ^[[:space:]]*(#|$) ]] && continue
		if [[ $line =~ $re_kv ]] && key=${BASH_REMATCH[1]} && unquote "${BASH_REMATCH[2]}"; then
			printf -v "${array}[$key]" '%s' "$REPLY"
		else
			fatal "$code" "$file line $n is not a KEY='value' line" "get a fresh copy of the file from the hub admin"
		fi
	done <"$file"
}

# ------------------------------------------------------------ validators ----
# Every value from a bundle, a flag or the WireGuard config is checked before
# it is used; none may begin with '-', so none can reach a command as an
# option.

# is_ipv4 A.B.C.D (no leading zeros: 010 would be octal to some tools)
is_ipv4() {
	local re='^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$'
	[[ $1 =~ $re ]]
}

is_port() { [[ $1 =~ ^[1-9][0-9]{0,4}$ ]] && ((10#$1 <= 65535)); }

# is_ipv4_port A.B.C.D:PORT
is_ipv4_port() { [[ $1 == *:* ]] && is_ipv4 "${1%:*}" && is_port "${1##*:}"; }

# is_endpoint HOST:PORT, HOST an IPv4 address, [IPv6] or a DNS name.
is_endpoint() {
	local host=${1%:*} port=${1##*:}
	[[ $1 == *:* ]] && is_port "$port" || return 1
	if [[ $host =~ ^\[[0-9A-Fa-f:.]+\]$ ]]; then return 0; fi
	is_ipv4 "$host" && return 0
	[[ ! $host =~ ^[0-9.]+$ ]] && is_dns_name "$host"
}

is_dns_label() { [[ $1 =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]]; }

is_dns_name() {
	local label labels
	((${#1} <= 253)) || return 1
	IFS=. read -r -a labels <<<"${1,,}"
	((${#labels[@]})) && [[ $1 != *. && $1 != .* && $1 != *..* ]] || return 1
	for label in "${labels[@]}"; do is_dns_label "$label" || return 1; done
}

# wg-quick's rule for interface names, without a leading '-' or dots alone;
# same as gridx.py's valid_interface.
is_interface() { [[ $1 =~ ^[a-zA-Z0-9_=+.][a-zA-Z0-9_=+.-]{0,14}$ && $1 != . && $1 != .. ]]; }

# ip_int A.B.C.D -> REPLY: the address as a number.
ip_int() {
	local a b c d
	IFS=. read -r a b c d <<<"$1"
	REPLY=$(((10#$a << 24) | (10#$b << 16) | (10#$c << 8) | 10#$d))
}

# is_cidr A.B.C.D/N [MIN_PREFIX]: a network address with its prefix.
is_cidr() {
	local ip=${1%/*} prefix=${1##*/} min=${2:-0}
	[[ $1 == */* ]] && is_ipv4 "$ip" && [[ $prefix =~ ^[0-9]{1,2}$ ]] || return 1
	((10#$prefix >= min && 10#$prefix <= 32)) || return 1
	ip_int "$ip"
	local mask=$(((0xffffffff << (32 - 10#$prefix)) & 0xffffffff))
	((REPLY == (REPLY & mask)))
}

# cidr_inside A.B.C.D[/N] NET/M: the first lies wholly inside the second.
cidr_inside() {
	local ip=${1%/*} prefix=32 net=${2%/*} nprefix=${2##*/} a mask
	[[ $1 == */* ]] && prefix=${1##*/}
	((10#$prefix >= 10#$nprefix)) || return 1
	ip_int "$ip"
	a=$REPLY
	ip_int "$net"
	mask=$(((0xffffffff << (32 - 10#$nprefix)) & 0xffffffff))
	(((a & mask) == (REPLY & mask)))
}

# cidrs_overlap A/N B/M: one contains the other.
cidrs_overlap() {
	local p1=${1##*/} p2=${2##*/} p a mask
	[[ $1 == */* ]] || p1=32
	[[ $2 == */* ]] || p2=32
	p=$((10#$p1 < 10#$p2 ? 10#$p1 : 10#$p2))
	ip_int "${1%/*}"
	a=$REPLY
	ip_int "${2%/*}"
	mask=$(((0xffffffff << (32 - p)) & 0xffffffff))
	((p == 0)) && mask=0
	(((a & mask) == (REPLY & mask)))
}

# ipv6_words ADDR -> REPLY: its eight 16-bit words as numbers, space-separated;
# fails on anything else (a zone "%eth0" or an embedded IPv4 tail included).
ipv6_words() {
	local a=${1,,} head tail word re='^[0-9a-f]{1,4}(:[0-9a-f]{1,4})*$'
	local -a h=() t=() words=()
	[[ $a =~ ^[0-9a-f:]{2,39}$ ]] || return 1
	if [[ $a == *::* ]]; then
		head=${a%%::*} tail=${a#*::}
		[[ (-z $head || $head =~ $re) && (-z $tail || $tail =~ $re) ]] || return 1
		[[ -z $head ]] || IFS=: read -r -a h <<<"$head"
		[[ -z $tail ]] || IFS=: read -r -a t <<<"$tail"
		((${#h[@]} + ${#t[@]} <= 7)) || return 1
		words=("${h[@]}")
		while ((${#words[@]} + ${#t[@]} < 8)); do words+=(0); done
		words+=("${t[@]}")
	else
		[[ $a =~ $re ]] || return 1
		IFS=: read -r -a words <<<"$a"
		((${#words[@]} == 8)) || return 1
	fi
	REPLY=''
	for word in "${words[@]}"; do REPLY+="$((16#$word)) "; done
	REPLY=${REPLY% }
}

# is_ipv6_cidr ADDR[/N] [MIN_PREFIX]: an IPv6 network address (no bits set
# beyond its prefix; no prefix is /128).
is_ipv6_cidr() {
	local prefix=128 min=${2:-0} bits i
	local -a words
	if [[ $1 == */* ]]; then
		prefix=${1##*/}
		[[ $prefix =~ ^[0-9]{1,3}$ ]] || return 1
	fi
	((10#$prefix >= min && 10#$prefix <= 128)) || return 1
	ipv6_words "${1%/*}" || return 1
	read -r -a words <<<"$REPLY"
	for i in 0 1 2 3 4 5 6 7; do
		bits=$((10#$prefix - 16 * i))
		((bits >= 16)) && continue
		((bits < 0)) && bits=0
		(((words[i] & (0xffff >> bits)) == 0)) || return 1
	done
}

# The allow-list: what the hub's admin opens for every job (GRIDX_JOB_ALLOW
# in settings.env, jobnet.sh allow VALUE). Entries separated by spaces:
#   ADDRESS[/PREFIX][:PROTO[/PORT[-PORT]]]     PROTO tcp or udp
#   [IPV6-ADDRESS[/PREFIX]][:PROTO[/PORT[-PORT]]]
# e.g. "203.0.113.7 10.0.0.1:tcp/5000 192.168.5.0/24:udp/5000-5010
# [fd00::5]:tcp/443". An address alone is /32 (/128); a prefix names a
# network (no bits set beyond it), at least /8 (IPv6 /16): an allow-list names
# servers, not the private ranges themselves.
JOB_ALLOW_MAX=64

# job_allow_parse VALUE -> JOB_ALLOW4=() JOB_ALLOW6=(), each entry the
# iptables arguments that match it ("-d NET [-p PROTO [--dport P[:Q]]]");
# fails with REPLY saying which entry is wrong and why.
job_allow_parse() {
	local entry net proto ports lo hi family match
	local re4='^([0-9.]+)(/([0-9]{1,3}))?(:([a-z]+)(/([0-9]+)(-([0-9]+))?)?)?$'
	local re6='^\[([0-9A-Fa-f:]+)(/([0-9]{1,3}))?\](:([a-z]+)(/([0-9]+)(-([0-9]+))?)?)?$'
	local -a entries
	JOB_ALLOW4=() JOB_ALLOW6=()
	read -r -d '' -a entries <<<"$1" || true
	if ((${#entries[@]} > JOB_ALLOW_MAX)); then
		REPLY="${#entries[@]} entries: at most $JOB_ALLOW_MAX"
		return 1
	fi
	for entry in "${entries[@]}"; do
		if [[ $entry =~ $re4 ]]; then
			family=4 net=${BASH_REMATCH[1]}/${BASH_REMATCH[3]:-32}
		elif [[ $entry =~ $re6 ]]; then
			family=6 net=${BASH_REMATCH[1]}/${BASH_REMATCH[3]:-128}
		elif [[ $entry == *:*:* && $entry != \[* ]]; then
			REPLY="'$entry': an IPv6 address goes in brackets ([fd00::5], [fd00::/64]:tcp/443)"
			return 1
		elif [[ $entry =~ :[0-9]+$ ]]; then
			REPLY="'$entry': name the protocol before the port (ADDRESS:tcp/PORT or ADDRESS:udp/PORT)"
			return 1
		else
			REPLY="'$entry' is not ADDRESS[/PREFIX][:tcp|udp[/PORT[-PORT]]] (IPv6 in brackets: [fd00::5]:tcp/443)"
			return 1
		fi
		proto=${BASH_REMATCH[5]} lo=${BASH_REMATCH[7]} hi=${BASH_REMATCH[9]}
		if ((family == 4)); then
			if ! is_ipv4 "${net%/*}"; then
				REPLY="'$entry': ${net%/*} is not an IPv4 address"
				return 1
			fi
			if ! is_cidr "$net"; then
				REPLY="'$entry': /${net##*/} is not a prefix of an IPv4 network, or the address has bits set beyond it (name the network's first address, or the address alone)"
				return 1
			fi
			if ((10#${net##*/} < 8)); then
				REPLY="'$entry': /${net##*/} is broader than /8: the allow-list names servers and their networks, not whole address ranges"
				return 1
			fi
		else
			if ! ipv6_words "${net%/*}"; then
				REPLY="'$entry': ${net%/*} is not an IPv6 address"
				return 1
			fi
			if ! is_ipv6_cidr "$net"; then
				REPLY="'$entry': /${net##*/} is not a prefix of an IPv6 network, or the address has bits set beyond it (name the network's first address, or the address alone)"
				return 1
			fi
			if ((10#${net##*/} < 16)); then
				REPLY="'$entry': /${net##*/} is broader than /16: the allow-list names servers and their networks, not whole address ranges"
				return 1
			fi
		fi
		match="-d $net"
		if [[ -n $proto ]]; then
			if [[ $proto != tcp && $proto != udp ]]; then
				REPLY="'$entry': the protocol is tcp or udp, not '$proto'"
				return 1
			fi
			match+=" -p $proto"
		fi
		if [[ -n $lo ]]; then
			ports=$lo
			[[ -n $hi ]] && ports+=-$hi
			if ! is_port "$lo" || { [[ -n $hi ]] && ! is_port "$hi"; }; then
				REPLY="'$entry': $ports is not a port (1-65535) or a range of them (PORT-PORT)"
				return 1
			fi
			if [[ -n $hi ]] && ((10#$lo > 10#$hi)); then
				REPLY="'$entry': the range $ports goes down: write LOW-HIGH"
				return 1
			fi
			match+=" --dport $((10#$lo))"
			[[ -n $hi ]] && match+=":$((10#$hi))"
		fi
		if ((family == 4)); then JOB_ALLOW4+=("$match"); else JOB_ALLOW6+=("$match"); fi
	done
	return 0
}

# Settings of the bundle -> S[...].
declare -A S=()

# bad_setting KEY WHAT: a settings.env value that cannot be used: exit 2.
bad_setting() {
	fatal 2 "settings.env: $1 '${S[$1]}' is not $2" "ask the hub admin for the bundle again (gridx hub add-peer NAME, or gridx hub refresh-bundle NAME)"
}

# Every value of settings.env that the scripts use, checked.
check_settings() {
	local key
	S[GRIDX_INTERFACE]=${S[GRIDX_INTERFACE]:-gridx0}
	is_interface "${S[GRIDX_INTERFACE]}" || bad_setting GRIDX_INTERFACE "an interface name (1-15 letters, digits and _=+.-)"
	for key in "${!S[@]}"; do
		case $key in
		GRIDX_INTERFACE) ;;
		GRIDX_NAME) is_dns_label "${S[$key]}" || bad_setting "$key" "a DNS label (lowercase letters, digits and '-')" ;;
		GRIDX_VPN_IP | GRIDX_HUB_VPN_IP) is_ipv4 "${S[$key]}" || bad_setting "$key" "an IPv4 address" ;;
		GRIDX_MANAGER) is_ipv4_port "${S[$key]}" || bad_setting "$key" "IPv4:port (like 10.0.0.1:2377)" ;;
		GRIDX_REGISTRY) is_ipv4_port "${S[$key]}" || bad_setting "$key" "IPv4:port (like 10.0.0.1:5000)" ;;
		GRIDX_AGENT_PORT) is_port "${S[$key]}" || bad_setting "$key" "a TCP port (like 5002)" ;;
		GRIDX_HUB_ENDPOINT) is_endpoint "${S[$key]}" || bad_setting "$key" "host:port (like 203.0.113.7:51820)" ;;
		GRIDX_SUBNET) is_cidr "${S[$key]}" 8 || bad_setting "$key" "an IPv4 network (like 10.0.0.0/24)" ;;
		GRIDX_NEEDS_PRIVATE_KEY) [[ ${S[$key]} =~ ^[01]$ ]] || bad_setting "$key" "0 or 1" ;;
		GRIDX_VERSION) [[ ${S[$key]} =~ ^[0-9A-Za-z][0-9A-Za-z.+~_-]*$ ]] || bad_setting "$key" "a version" ;;
		GRIDX_JOB_ALLOW)
			job_allow_parse "${S[$key]}" ||
				fatal 2 "settings.env: GRIDX_JOB_ALLOW: $REPLY" "ask the hub admin to correct the allow-list and send the bundle again"
			;;
		*) ;; # a key from a newer gridx: never used here
		esac
	done
}

load_settings() {
	local file=$GRIDX_BUNDLE_DIR/settings.env
	[[ -f $file ]] || fatal 3 "$file is missing: this folder is not a complete Grid-X bundle" "ask the hub admin for the bundle again (gridx hub add-peer NAME)"
	read_values "$file" S 2
	check_settings
	# shellcheck disable=SC2034 # the scripts use it
	IFACE=${S[GRIDX_INTERFACE]}
}

# atomic_write PATH MODE < content: a new temporary file in the same folder,
# created with the final mode (the umask it is created under gives it; chmod
# only for modes no umask gives, with x bits), written, synced, renamed over
# PATH. The shell creates it exclusively (noclobber: a file or link already
# there makes it fail, never followed); its name has the script's PID and a
# random number, and the folders written are root's.
atomic_write() {
	local path=$1 mode=$2 tmp
	new_file_beside "$path" "$mode" cat || return 1
	tmp=$REPLY
	commit_file "$tmp" "$mode" "$path"
}

# atomic_write_texts MODE PATH TEXT [PATH TEXT]...: the same for each PATH
# with TEXT as its content, no cat, one sync for all, then the renames in
# order (the state and its JSON copy are written so at every step of join
# and leave).
atomic_write_texts() {
	local mode=$1 tmps=() paths=() i
	shift
	while (($# >= 2)); do
		ATOMIC_TEXT=$2
		new_file_beside "$1" "$mode" write_atomic_text || return 1
		tmps+=("$REPLY") paths+=("$1")
		shift 2
	done
	if (((8#$mode & ~0666) != 0)); then chmod "$mode" "${tmps[@]}"; fi
	sync "${tmps[@]}" 2>/dev/null || sync
	for i in "${!tmps[@]}"; do mv -f -- "${tmps[$i]}" "${paths[$i]}"; done
}

write_atomic_text() { printf '%s' "$ATOMIC_TEXT"; }

# new_file_beside PATH MODE WRITER -> REPLY: the temporary file, made new and
# filled by WRITER (a command writing the content to stdout), in a subshell
# whose umask gives MODE's read and write bits. A name already taken (a
# killed run's) is tried again with another.
new_file_beside() {
	local path=$1 mode=$2 writer=$3 mask tries tmp
	printf -v mask '%03o' $((0777 & ~8#$mode))
	for tries in 1 2 3 4 5; do
		tmp=${path%/*}/.${path##*/}.gridx-$$-$RANDOM$RANDOM
		[[ ! -e $tmp && ! -L $tmp ]] || continue
		if (umask "$mask" && set -C && "$writer" >"$tmp"); then
			REPLY=$tmp
			return 0
		fi
		break
	done
	rm -f -- "$tmp"
	warn "cannot write a new file beside $path (try $tries)"
	return 1
}

# commit_file TMP MODE PATH: the mode a umask could not give, sync, rename.
commit_file() {
	local tmp=$1 mode=$2 path=$3
	if (((8#$mode & ~0666) != 0)); then chmod "$mode" "$tmp"; fi
	sync "$tmp" 2>/dev/null || sync
	mv -f -- "$tmp" "$path"
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
	if [[ $s != *[\"\\[:cntrl:]]* ]]; then # nothing to escape (most values)
		REPLY="\"$s\""
		return 0
	fi
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
#   CONTAINMENT (1: userns-remap and no-new-privileges asked for) HUB_SSH
#   (0: --no-hub-ssh)
#   CREATED_STATE_DIR JOB_NET_DIR (the folder of the copy of jobnet.sh and
#   lib.sh that wg-quick's PreUp runs) JOB_ALLOW (the allow-list in force,
#   GRIDX_JOB_ALLOW's grammar) VPN_SUBNET (closed to jobs too)
#   JOB_DOCKER_USER6 (1: ip6tables had no DOCKER-USER chain; the apply made it)
#   CREATED_WG_DIR WG_CONFIG LINK_UP FIREWALL_RULE (its
#   iptables arguments) WORKER_CHAIN (the INPUT chain of the swarm ports)
#   DOCKREMAP_CREATED (1: the user dockerd makes for "userns-remap":
#   "default" did not exist before join)
#   CREATED_DOCKER_DIR DAEMON_JSON DAEMON_JSON_BACKUP (a
#   file, or "absent") CREATED_NVIDIA_DIR NVIDIA_CONFIG NVIDIA_CONFIG_BACKUP
#   DOCKER_RESTART_PENDING SWARM_JOINED AUTHORIZED_KEYS
#   AUTHORIZED_KEYS_LINE AUTHORIZED_KEYS_BACKUP CREATED_SSH_DIR
#   CREATED_AUTHORIZED_KEYS BOOT_UNIT
#   REGISTRY (the hub registry's HOST:PORT, whose CA join.sh installed as
#   CERTS_DIR/HOST:PORT/ca.crt) REGISTRY_CA_BACKUP (a file, or "absent")
#   REGISTRY_DIRS_CREATED (0, 1: the HOST:PORT folder, 2: CERTS_DIR too)
#   AGENT_DIR (STATE_DIR/agent: the owner-activity agent's copy, settings
#   and status) AGENT_UNIT (its systemd unit file) AGENT_SUPERVISED (1: run
#   by its own supervisor loop, no systemd)

declare -A ST=()
STATE_ORDER=(NAME INTERFACE VPN_IP HUB_VPN_IP HUB_ENDPOINT MANAGER JOINED_AT COMPLETE
	SHARED_CPUS SHARED_MEMORY_MIB SHARED_GPU_IDS CONTAINMENT HUB_SSH
	CREATED_STATE_DIR JOB_NET_DIR JOB_ALLOW VPN_SUBNET JOB_DOCKER_USER6 CREATED_WG_DIR WG_CONFIG LINK_UP FIREWALL_RULE WORKER_CHAIN CREATED_DOCKER_DIR
	DAEMON_JSON DAEMON_JSON_BACKUP CREATED_NVIDIA_DIR NVIDIA_CONFIG NVIDIA_CONFIG_BACKUP
	DOCKER_RESTART_PENDING DOCKREMAP_CREATED REGISTRY REGISTRY_CA_BACKUP REGISTRY_DIRS_CREATED
	SWARM_JOINED AUTHORIZED_KEYS AUTHORIZED_KEYS_LINE AUTHORIZED_KEYS_BACKUP
	CREATED_SSH_DIR CREATED_AUTHORIZED_KEYS BOOT_UNIT AGENT_DIR AGENT_UNIT AGENT_SUPERVISED)

state_exists() { [[ -f $STATE_FILE ]]; }

# The record is root's, and names only the paths join.sh uses: leave.sh
# removes and restores exactly these, whatever else the file might say.
load_state() {
	check_state_owner
	read_values "$STATE_FILE" ST
	check_state
}

# state_expect KEY VALUE...: the recorded KEY, when present, is one of VALUEs.
state_expect() {
	local key=$1 v
	shift
	[[ -v ST[$key] ]] || return 0
	for v in "$@"; do [[ ${ST[$key]} == "$v" ]] && return 0; done
	fatal 3 "$STATE_FILE: $key is '${ST[$key]}', not what join.sh records (${*})" "the record was changed by hand; put it back, or undo the join by hand"
}

check_state() {
	local iface=${ST[INTERFACE]:-}
	is_interface "$iface" || fatal 3 "$STATE_FILE: INTERFACE '$iface' is not an interface name" "the record was changed by hand; put it back, or undo the join by hand"
	firewall_rule "$iface"
	state_expect WG_CONFIG "$WG_DIR/$iface.conf"
	state_expect CREATED_WG_DIR "$WG_DIR"
	state_expect DAEMON_JSON "$DAEMON_JSON"
	state_expect DAEMON_JSON_BACKUP absent "$BACKUP_DIR/daemon.json"
	state_expect NVIDIA_CONFIG "$NVIDIA_CONFIG"
	state_expect NVIDIA_CONFIG_BACKUP absent "$BACKUP_DIR/nvidia-config.toml"
	state_expect AUTHORIZED_KEYS "$AUTHORIZED_KEYS"
	state_expect AUTHORIZED_KEYS_BACKUP absent "$BACKUP_DIR/authorized_keys"
	state_expect BOOT_UNIT "wg-quick@$iface"
	state_expect FIREWALL_RULE "${FW_RULE[*]}"
	state_expect WORKER_CHAIN "$WORKER_CHAIN"
	if [[ -v ST[REGISTRY] ]] && ! is_ipv4_port "${ST[REGISTRY]}"; then
		fatal 3 "$STATE_FILE: REGISTRY '${ST[REGISTRY]}' is not IPv4:port" "the record was changed by hand; put it back, or undo the join by hand"
	fi
	state_expect REGISTRY_CA_BACKUP absent "$BACKUP_DIR/registry-ca.crt"
	state_expect REGISTRY_DIRS_CREATED 0 1 2
	state_expect JOB_NET_DIR "$STATE_DIR/jobnet"
	if [[ -v ST[JOB_ALLOW] ]] && ! job_allow_parse "${ST[JOB_ALLOW]}"; then
		fatal 3 "$STATE_FILE: JOB_ALLOW: $REPLY" "the record was changed by hand; put it back, or set a new allow-list: jobnet.sh allow 'VALUE'"
	fi
	if [[ -v ST[VPN_SUBNET] ]] && ! is_cidr "${ST[VPN_SUBNET]}" 8; then
		fatal 3 "$STATE_FILE: VPN_SUBNET '${ST[VPN_SUBNET]}' is not an IPv4 network" "the record was changed by hand; put it back, or undo the join by hand"
	fi
	state_expect AGENT_DIR "$AGENT_DIR"
	state_expect AGENT_UNIT "$AGENT_UNIT"
	state_expect AGENT_SUPERVISED 1
}

# registry_ca_path HOST:PORT -> REPLY: where Docker reads that registry's CA.
registry_ca_path() { REPLY=$CERTS_DIR/$1/ca.crt; }

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
	local key text
	[[ -d $STATE_DIR ]] || return 0
	text=$'# Grid-X worker state, written by join.sh, read by leave.sh and status.sh.\n'
	for key in "${STATE_ORDER[@]}"; do
		[[ -v ST[$key] ]] || continue
		shell_quote "${ST[$key]}"
		text+="$key=$REPLY"$'\n'
	done
	state_json
	atomic_write_texts 0600 "$STATE_FILE" "$text" "$STATE_JSON" "$REPLY"
}

# state_json -> REPLY: the same facts as JSON. Numbers stay numbers, flags
# become booleans.
state_json() {
	local key value lower out
	out=$'{\n  "version": 1'
	for key in "${STATE_ORDER[@]}"; do
		[[ -v ST[$key] ]] || continue
		value=${ST[$key]}
		lower=${key,,}
		case $key in
		SHARED_GPU_IDS) json_str_list "$value" ;;
		SHARED_CPUS | SHARED_MEMORY_MIB | REGISTRY_DIRS_CREATED) REPLY=$value ;;
		COMPLETE | LINK_UP | DOCKER_RESTART_PENDING | SWARM_JOINED | CREATED_STATE_DIR | CREATED_DOCKER_DIR | \
			CREATED_NVIDIA_DIR | CREATED_SSH_DIR | CREATED_AUTHORIZED_KEYS | CONTAINMENT | HUB_SSH | DOCKREMAP_CREATED | \
			JOB_DOCKER_USER6 | AGENT_SUPERVISED)
			[[ $value == 1 ]] && REPLY=true || REPLY=false
			;;
		*) json_str "$value" ;;
		esac
		out+=$',\n  "'"$lower"'": '"$REPLY"
	done
	REPLY=$out$'\n}\n'
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

# The swarm's gossip (7946/tcp+udp) and overlay data (4789/udp) ports, and
# the manager port 2377/tcp, answer over the VPN only: VXLAN listens on every
# interface (moby/moby#47667). An INPUT chain like the hub's GRIDX-INPUT
# (gridx.py firewall_rules), its own name so a hub that is also a test
# worker keeps both. WORKER_RULES: the arguments after "-A $WORKER_CHAIN".
WORKER_CHAIN=GRIDX-WORKER
worker_rules() { # IFACE
	WORKER_RULES=("-i $1 -j RETURN" "-i lo -j RETURN")
	local port
	for port in tcp:2377 tcp:7946 udp:7946 udp:4789; do
		WORKER_RULES+=("-p ${port%:*} --dport ${port#*:} -j DROP")
	done
}

worker_chain_present() { iptables -C INPUT -j "$WORKER_CHAIN" >/dev/null 2>&1; }

firewall_rule_present() {
	firewall_rule "$1"
	iptables -C DOCKER-USER "${FW_RULE[@]}" >/dev/null 2>&1
}

# ------------------------------------------------------------ jobs' network ----
# What a job may reach: the internet, and nothing private. Not the
# volunteer's networks (the private, link-local and CGNAT ranges, and every
# network this machine is on), not this machine (any of its addresses), not
# the VPN (the hub, other workers), except the name servers its container is
# given (DNS only) and what the hub's admin opens for every job (the
# allow-list, GRIDX_JOB_ALLOW). Two chains per family (iptables, and
# ip6tables where it works):
#   GRIDX-JOBS       forwarded traffic from the jobs' bridges, jumped to from
#                    DOCKER-USER (Docker keeps that chain's rules over its
#                    restarts and runs it before its own); closed networks
#                    are rejected, the rest goes on to Docker's rules
#   GRIDX-JOBS-HOST  INPUT from the jobs' bridges: a container reaching one
#                    of this machine's own addresses arrives here, whatever
#                    the interface that address is on; all of it is rejected
# Both let replies through first (conntrack ESTABLISHED,RELATED): a port a
# job publishes on the VPN (Jupyter) still answers. Rejected, not dropped: a
# job fails at once ("no route to host") instead of waiting for a timeout.
# The chains' contents are replaced in one iptables-restore (atomic: no
# moment with the chain half full); join.sh applies them before the link,
# Docker's restart and the swarm join; wg-quick's PreUp again before the VPN
# comes up (after a reboot); jobnet.sh when the allow-list changes; leave.sh
# removes them. A VPN going down leaves them in place.

JOB_CHAIN=GRIDX-JOBS
JOB_HOST_CHAIN=GRIDX-JOBS-HOST
# Where jobs' containers sit: a swarm task with no network of its own is on
# the default bridge (docker0: measured, Docker 20.10); a task attached to an
# overlay network (gridx-jobs, by hand) also has a leg on docker_gwbridge.
JOB_BRIDGES=(docker0 docker_gwbridge)
JOB_PRIVATE4=(10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 169.254.0.0/16 100.64.0.0/10)
JOB_PRIVATE6=(fc00::/7 fe80::/10)

# job_tool FAMILY -> REPLY: iptables or ip6tables, when it works here
# (ip6tables fails on a kernel without IPv6: nothing to filter there).
job_tool() {
	if [[ $1 == 4 ]]; then
		REPLY=iptables
		return 0
	fi
	REPLY=ip6tables
	have_cmd ip6tables && have_cmd ip6tables-restore && ip6tables -w 10 -S INPUT >/dev/null 2>&1
}

# job_resolvers -> JOB_DNS4=() JOB_DNS6=(): the name servers Docker gives a
# job's container, picked as Docker picks them: daemon.json's "dns" when it
# has one, else the host's resolv.conf (systemd-resolved's upstream file when
# that names only its stub 127.0.0.53), loopback ones left out (inside a
# container they would be its own). Often the volunteer's router
# (192.168.1.1): DNS, and only DNS, to exactly these is let through, or jobs
# could not resolve a name.
job_resolvers() {
	local content='' list addr re_dns='"dns"[[:space:]]*:[[:space:]]*\[([^]]*)\]' re_str='"([^"]*)"(.*)'
	local -a found=()
	JOB_DNS4=() JOB_DNS6=()
	[[ -f $DAEMON_JSON ]] && content=$(<"$DAEMON_JSON")
	if [[ $content =~ $re_dns ]]; then
		list=${BASH_REMATCH[1]}
		while [[ $list =~ $re_str ]]; do
			found+=("${BASH_REMATCH[1]}")
			list=${BASH_REMATCH[2]}
		done
	else
		resolv_nameservers "$RESOLV_CONF"
		read -r -a found <<<"$REPLY"
		if [[ ${found[*]} == 127.0.0.53 && -f $RESOLVED_CONF ]]; then
			resolv_nameservers "$RESOLVED_CONF"
			read -r -a found <<<"$REPLY"
		fi
	fi
	for addr in "${found[@]}"; do
		addr=${addr%%%*}
		if is_ipv4 "$addr"; then
			[[ $addr == 127.* ]] || JOB_DNS4+=("$addr")
		elif ipv6_words "$addr" && [[ $REPLY != "0 0 0 0 0 0 0 1" ]]; then
			JOB_DNS6+=("$addr")
		fi
	done
	return 0
}

# resolv_nameservers FILE -> REPLY: its nameserver addresses, space-separated.
resolv_nameservers() {
	local word addr
	REPLY=''
	[[ -f $1 ]] || return 0
	while read -r word addr _; do
		[[ $word == nameserver && -n $addr ]] && REPLY+=${REPLY:+ }$addr
	done <"$1"
	return 0
}

# job_onlink -> JOB_ONLINK4=() JOB_ONLINK6=(): the networks this machine is
# on (routes with no gateway in the main table), beyond the private ranges:
# a LAN of public addresses (a university's, an IPv6 home network) is the
# volunteer's network too. Read when the rules are applied: a laptop that
# moves takes its new network's at the next apply (jobnet.sh apply, or the
# VPN coming up).
job_onlink() {
	local line net min
	JOB_ONLINK4=() JOB_ONLINK6=()
	while read -r line; do
		[[ -n $line && $line != *" via "* ]] || continue
		read -r net _ <<<"$line"
		[[ $net == */* ]] || net+=/32
		is_cidr "$net" 8 || continue
		for min in "${JOB_PRIVATE4[@]}"; do cidr_inside "$net" "$min" && continue 2; done
		JOB_ONLINK4+=("$net")
	done < <(ip -4 route show 2>/dev/null || true)
	while read -r line; do
		[[ -n $line && $line != *" via "* ]] || continue
		read -r net _ <<<"$line"
		[[ $net == */* ]] || net+=/128
		is_ipv6_cidr "$net" 16 || continue
		ipv6_words "${net%/*}"
		read -r min _ <<<"$REPLY"
		# fc00::/7 and fe80::/10 are closed already; ::1 and multicast are not routed
		((min >= 0xfc00 || min == 0)) && continue
		JOB_ONLINK6+=("$net")
	done < <(ip -6 route show 2>/dev/null || true)
}

# job_rules FAMILY -> JOB_RULES=(the iptables-restore input for both chains)
# from JOB_ALLOW4/6 (job_allow_parse), JOB_DNS4/6, JOB_ONLINK4/6 and
# ST[VPN_SUBNET].
job_rules() {
	local reject chain rule r net
	local -a opens=() closed=()
	if [[ $1 == 4 ]]; then
		reject='REJECT --reject-with icmp-admin-prohibited'
		for r in "${JOB_DNS4[@]}"; do opens+=("-d $r/32 -p udp --dport 53" "-d $r/32 -p tcp --dport 53"); done
		opens+=("${JOB_ALLOW4[@]}")
		closed=("${JOB_PRIVATE4[@]}")
		[[ -n ${ST[VPN_SUBNET]:-} ]] && closed+=("${ST[VPN_SUBNET]}")
		for net in "${JOB_ONLINK4[@]}"; do
			[[ -n ${ST[VPN_SUBNET]:-} ]] && cidr_inside "$net" "${ST[VPN_SUBNET]}" && continue
			closed+=("$net")
		done
	else
		reject='REJECT --reject-with icmp6-adm-prohibited'
		for r in "${JOB_DNS6[@]}"; do opens+=("-d $r/128 -p udp --dport 53" "-d $r/128 -p tcp --dport 53"); done
		opens+=("${JOB_ALLOW6[@]}")
		closed=("${JOB_PRIVATE6[@]}" "${JOB_ONLINK6[@]}")
	fi
	JOB_RULES=('*filter' ":$JOB_CHAIN - [0:0]" ":$JOB_HOST_CHAIN - [0:0]")
	for chain in "$JOB_CHAIN" "$JOB_HOST_CHAIN"; do
		JOB_RULES+=("-A $chain -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN")
		for rule in "${opens[@]}"; do JOB_RULES+=("-A $chain $rule -j RETURN"); done
		if [[ $chain == "$JOB_CHAIN" ]]; then
			for net in "${closed[@]}"; do JOB_RULES+=("-A $chain -d $net -j $reject"); done
		else
			JOB_RULES+=("-A $chain -j $reject")
		fi
	done
	JOB_RULES+=(COMMIT)
}

# job_jumps FAMILY -> JOB_JUMPS=("CHAIN MATCH... -j TARGET"...): where the
# chains are jumped to from. IPv6 also straight from FORWARD: where Docker
# does not manage ip6tables nothing runs DOCKER-USER (and Docker never
# reorders that FORWARD then).
job_jumps() {
	local br
	JOB_JUMPS=()
	for br in "${JOB_BRIDGES[@]}"; do
		JOB_JUMPS+=("DOCKER-USER -i $br -j $JOB_CHAIN" "INPUT -i $br -j $JOB_HOST_CHAIN")
		[[ $1 == 6 ]] && JOB_JUMPS+=("FORWARD -i $br -j $JOB_CHAIN")
	done
	return 0
}

# job_net_apply: the chains filled anew and jumped to, for the allow-list
# in ST[JOB_ALLOW] (checked by check_state), with the resolvers and networks
# of now.
job_net_apply() {
	local fam tool jump
	local -a args
	job_allow_parse "${ST[JOB_ALLOW]:-}" || return 1
	job_resolvers
	job_onlink
	for fam in 4 6; do
		job_tool "$fam" || continue
		tool=$REPLY
		if ! "$tool" -w 10 -S DOCKER-USER >/dev/null 2>&1; then
			# Docker makes it when it starts, and keeps what it holds; ip6tables'
			# only where Docker manages ip6tables: then leave.sh removes it.
			[[ $fam == 6 ]] && state_set JOB_DOCKER_USER6 1
			cmd "$tool" -w 10 -N DOCKER-USER || return 1
		fi
		job_rules "$fam"
		printf '[#] %s-restore --noflush: %s and %s, %d rules (the jobs'"'"' network)\n' \
			"$tool" "$JOB_CHAIN" "$JOB_HOST_CHAIN" $((${#JOB_RULES[@]} - 4)) >&2
		printf '%s\n' "${JOB_RULES[@]}" | "$tool-restore" -w 10 --noflush || return 1
		job_jumps "$fam"
		for jump in "${JOB_JUMPS[@]}"; do
			read -r -a args <<<"$jump"
			"$tool" -w 10 -C "${args[@]}" >/dev/null 2>&1 || cmd "$tool" -w 10 -I "${args[@]}" || return 1
		done
	done
}

# job_net_present: the IPv4 chains are in place and jumped to.
job_net_present() {
	local jump
	local -a args
	job_jumps 4
	for jump in "${JOB_JUMPS[@]}"; do
		read -r -a args <<<"$jump"
		iptables -w 10 -C "${args[@]}" >/dev/null 2>&1 || return 1
	done
}

# job_net_remove: every jump to the chains, then the chains; ip6tables'
# DOCKER-USER when the apply made it and it is still empty and unused.
job_net_remove() {
	local fam tool jump chain tries
	local -a args
	for fam in 4 6; do
		job_tool "$fam" || continue
		tool=$REPLY
		job_jumps "$fam"
		for jump in "${JOB_JUMPS[@]}"; do
			read -r -a args <<<"$jump"
			tries=0
			while ((tries++ < 8)) && "$tool" -w 10 -C "${args[@]}" >/dev/null 2>&1; do
				cmd "$tool" -w 10 -D "${args[@]}" || return 1
			done
		done
		for chain in "$JOB_CHAIN" "$JOB_HOST_CHAIN"; do
			"$tool" -w 10 -S "$chain" >/dev/null 2>&1 || continue
			cmd "$tool" -w 10 -F "$chain" || return 1
			cmd "$tool" -w 10 -X "$chain" || return 1
		done
		if [[ $fam == 6 && ${ST[JOB_DOCKER_USER6]:-0} == 1 && $(ip6tables -w 10 -S DOCKER-USER 2>/dev/null) == "-N DOCKER-USER" ]]; then
			cmd ip6tables -w 10 -X DOCKER-USER || true
		fi
	done
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

# ------------------------------------------------------- the owner's agent ----
# agent.sh pauses Grid-X's containers while this machine's owner uses it
# (README: "The owner comes first"). join.sh installs a copy of agent.sh and
# lib.sh in STATE_DIR/agent/ (the bundle folder may move or go), with the
# agent's settings in agent.env there, and runs it: as gridx-agent.service
# where systemd runs, else under `agent.sh supervise`, a loop that starts it
# again when it dies (its pid in supervisor.pid; without an init system
# nothing starts it after a reboot: `agent.sh start` does, join.sh says so).
# leave.sh stops it and unpauses every Grid-X container first.

# Swarm's label on every task container. This engine is in Grid-X's swarm
# and no other, so a container with it was placed there by the hub; the
# owner's own containers (docker run, compose) never have it.
TASK_LABEL=com.docker.swarm.task.id

# agent.env: its keys, in the order written, and their defaults. Why these
# numbers (README "The owner comes first" says the same):
#   IDLE_S 300       away this long before Grid-X goes on: HTCondor's desktop
#                    policy continues after 5 min idle; BOINC calls a machine
#                    in use for 3 min after the last input
#   PREEMPT_S 600    paused this long, the jobs are stopped so that they run
#                    elsewhere: HTCondor preempts after 10 min suspended
#   GRACE_S 60       SIGTERM to SIGKILL: a job's time to write its checkpoint
#                    (Docker's own 10 s is short for a model and optimizer)
#   CPU_BUSY_PCT 25  the owner's programs (all CPU use outside Grid-X's
#                    containers) at a quarter of a core or more. HTCondor's
#                    HighLoad is 0.5 of a load average, which counts a
#                    program waiting for a core too; CPU time does not, so
#                    a program that competes with Grid-X's (or, in the lab,
#                    with other machines) for the cores shows less: measured
#                    in a lab worker under a host load of 24 on 2 cores, a
#                    busy loop got 28-75 % per 0.5 s sample. A machine at
#                    rest stays below it: 1-2 %, short spikes to 10 %
#   CPU_BUSY_MS 500  held for half a second (two samples), so that a
#                    lone spike (10 % in one sample, above) does not count;
#                    the agent's own docker commands are not counted at all.
#                    HTCondor waits 2 min, too long for the 2 s goal
#   CPU_PERIOD_MS 250  the CPU sample while Grid-X's containers run here:
#                    busy seen 0.5-0.75 s after it begins (a 1 s hold with
#                    500 ms samples gave a p95 of 2.5 s under that load);
#                    once a second when nothing runs to pause
#   TTY_POLL_S 2     terminals' access times (the kernel moves them once in
#                    8 s at most, so a keystroke in a terminal is seen within
#                    10 s; a keyboard's own events within a second)
#   LOGIND_POLL_S 5, GPU_POLL_S 5  loginctl and nvidia-smi are whole programs
#   HEARTBEAT_S 30   the hub hears the agent's state at least this often
#   HUB_PORT         settings.env's GRIDX_AGENT_PORT, else AGENT_PORT_DEFAULT
#   INPUT_DEVICES    auto: keyboards, mice, touchpads and joysticks listed in
#                    /proc/bus/input/devices; or PATH,PATH (those only)
AGENT_KEYS=(SHARE HOURS IDLE_S PREEMPT_S GRACE_S CPU_BUSY_PCT CPU_BUSY_MS CPU_PERIOD_MS TTY_POLL_S LOGIND_POLL_S
	GPU_POLL_S HEARTBEAT_S HUB_PORT INPUT_DEVICES)
# Same as gridx.py's AGENT_PORT: the hub's TCP port for the agent's reports,
# next to the registry's 5000 (7946 is swarm gossip).
AGENT_PORT_DEFAULT=5002
declare -A AGENT_DEFAULTS=([SHARE]=always [HOURS]='' [IDLE_S]=300 [PREEMPT_S]=600 [GRACE_S]=60 [CPU_BUSY_PCT]=25
	[CPU_BUSY_MS]=500 [CPU_PERIOD_MS]=250 [TTY_POLL_S]=2 [LOGIND_POLL_S]=5 [GPU_POLL_S]=5 [HEARTBEAT_S]=30
	[HUB_PORT]=$AGENT_PORT_DEFAULT [INPUT_DEVICES]=auto)
# shellcheck disable=SC2034 # the scripts use it
declare -A AG=()

# is_hours HH:MM-HH:MM (local time; the end may be past midnight)
is_hours() {
	local re='^([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]$'
	[[ $1 =~ $re && ${1%-*} != "${1#*-}" ]]
}

# hours_minutes HH:MM -> REPLY minutes after midnight
hours_minutes() { REPLY=$((10#${1%:*} * 60 + 10#${1#*:})); }

# in_hours HH:MM-HH:MM MINUTE_OF_DAY: is that minute inside the window?
in_hours() {
	local start end m=$2
	hours_minutes "${1%-*}"
	start=$REPLY
	hours_minutes "${1#*-}"
	end=$REPLY
	if ((start < end)); then
		((m >= start && m < end))
	else
		((m >= start || m < end))
	fi
}

# seconds_value VALUE -> REPLY seconds: 90, 90s, 5m, 2h.
seconds_value() {
	[[ $1 =~ ^([0-9]{1,6})([smh]?)$ ]] || return 1
	REPLY=$((10#${BASH_REMATCH[1]}))
	case ${BASH_REMATCH[2]} in
	m) REPLY=$((REPLY * 60)) ;;
	h) REPLY=$((REPLY * 3600)) ;;
	esac
}

# in_range VALUE MIN MAX: a whole number within [MIN, MAX].
in_range() { [[ $1 =~ ^[0-9]{1,7}$ ]] && ((10#$1 >= $2 && 10#$1 <= $3)); }

# check_agent_value KEY VALUE: fails with REPLY = what the value must be.
check_agent_value() {
	local key=$1 v=$2 path
	case $key in
	SHARE) [[ $v == idle || $v == always ]] || REPLY="idle or always" ;;
	HOURS) [[ -z $v ]] || is_hours "$v" || REPLY="HH:MM-HH:MM (like 22:00-08:00), or empty for any time" ;;
	IDLE_S) in_range "$v" 1 86400 || REPLY="seconds from 1 to 86400" ;;
	PREEMPT_S) in_range "$v" 1 604800 || REPLY="seconds from 1 to 604800" ;;
	GRACE_S) in_range "$v" 0 3600 || REPLY="seconds from 0 to 3600" ;;
	CPU_BUSY_PCT) in_range "$v" 1 100000 || REPLY="a percentage of one core, from 1" ;;
	CPU_BUSY_MS) in_range "$v" 0 600000 || REPLY="milliseconds from 0 to 600000" ;;
	CPU_PERIOD_MS) in_range "$v" 100 10000 || REPLY="milliseconds from 100 to 10000" ;;
	TTY_POLL_S | LOGIND_POLL_S | GPU_POLL_S) in_range "$v" 1 3600 || REPLY="seconds from 1 to 3600" ;;
	HEARTBEAT_S) in_range "$v" 2 3600 || REPLY="seconds from 2 to 3600" ;;
	HUB_PORT) is_port "$v" || REPLY="a TCP port" ;;
	INPUT_DEVICES)
		if [[ $v != auto ]]; then
			local -a paths
			IFS=, read -r -a paths <<<"$v"
			((${#paths[@]})) || REPLY="auto, or absolute paths separated by commas"
			for path in "${paths[@]}"; do
				[[ $path =~ ^/[A-Za-z0-9_./:+-]+$ && $path != */../* && $path != */.. ]] || REPLY="auto, or absolute paths separated by commas"
			done
		fi
		;;
	*) REPLY="a key the agent knows (${AGENT_KEYS[*]})" ;;
	esac
	[[ -z ${REPLY:-} ]]
}

# load_agent_settings: AG from agent.env over the defaults; a damaged file
# (someone else could write it, or a value that is not what join.sh or
# `agent.sh policy` write) is exit 3. Keys of a newer agent are ignored.
load_agent_settings() {
	local key
	local -A raw=()
	only_root_writes "$AGENT_DIR"
	only_root_writes "$AGENT_ENV"
	[[ -f $AGENT_ENV ]] || fatal 3 "$AGENT_ENV is missing: the owner-activity agent is not set up here" "run leave.sh, then join.sh again"
	read_values "$AGENT_ENV" raw
	AG=()
	for key in "${AGENT_KEYS[@]}"; do
		AG[$key]=${raw[$key]-${AGENT_DEFAULTS[$key]}}
		REPLY=''
		check_agent_value "$key" "${AG[$key]}" || fatal 3 "$AGENT_ENV: $key '${AG[$key]}' is not $REPLY" "put it right with: sudo $AGENT_DIR/agent.sh policy --help"
	done
}

# agent.env holds the policy and what differs from the defaults, so that an
# agent with better defaults uses them; the defaults are listed as comments.
write_agent_settings() {
	local key
	{
		printf '# Grid-X owner-activity agent settings: written by join.sh and agent.sh policy, read by agent.sh.\n'
		for key in "${AGENT_KEYS[@]}"; do
			shell_quote "${AG[$key]}"
			if [[ $key == SHARE || $key == HOURS || $key == HUB_PORT || ${AG[$key]} != "${AGENT_DEFAULTS[$key]}" ]]; then
				printf '%s=%s\n' "$key" "$REPLY"
			else
				printf '# %s=%s (the default)\n' "$key" "$REPLY"
			fi
		done
	} | atomic_write "$AGENT_ENV" 0600
}

# input_devices FILE (/proc/bus/input/devices) -> INPUT_DEVS (event names to
# watch) and INPUT_PERSON (1: a keyboard or a mouse is attached).
# Watched: what a person moves or presses: the kbd handler with keys
# (keyboards, and buttons such as power or brightness), a mouseN handler
# (mice, touchpads, touchscreens, tablets) or jsN (joysticks); never an
# accelerometer (INPUT_PROP_ACCELEROMETER, bit 6 of PROP: its events are the
# machine tilting). A person: a keyboard (keys that repeat, EV_REP) or a mouse.
input_devices() {
	local line handlers='' ev=0 prop=0
	INPUT_DEVS=() INPUT_PERSON=0
	while IFS= read -r line || [[ -n $line ]]; do
		case $line in
		'H: Handlers='*) handlers=${line#H: Handlers=} ;;
		'B: EV='*) hex_value "${line#B: EV=}" && ev=$REPLY ;;
		'B: PROP='*) hex_value "${line#B: PROP=}" && prop=$REPLY ;;
		'')
			input_device_seen "$handlers" "$ev" "$prop"
			handlers='' ev=0 prop=0
			;;
		esac
	done <"$1"
	input_device_seen "$handlers" "$ev" "$prop"
}

hex_value() { [[ $1 =~ ^[0-9a-fA-F]{1,15}$ ]] && REPLY=$((16#$1)); }

input_device_seen() { # HANDLERS EV PROP
	local word event='' kbd=0 pointer=0
	for word in $1; do
		case $word in
		event[0-9]*) event=$word ;;
		kbd) kbd=1 ;;
		mouse[0-9]* | js[0-9]*) pointer=1 ;;
		esac
	done
	[[ -n $event ]] || return 0
	((($3 & 0x40) == 0)) || return 0
	if ((kbd && ($2 & 0x2) || pointer)); then INPUT_DEVS+=("$event"); fi
	if ((kbd && ($2 & 0x100000))) || [[ " $1 " == *" mouse"[0-9]* ]]; then INPUT_PERSON=1; fi
	return 0
}

# desktop_session SHOW_OUTPUT (loginctl show-session -p Type -p Remote ID...):
# is one of the sessions a desktop on this machine's own screen?
desktop_session() {
	local line type='' remote=''
	while IFS= read -r line || [[ -n $line ]]; do
		case $line in
		Type=*) type=${line#Type=} ;;
		Remote=*) remote=${line#Remote=} ;;
		'')
			[[ $type =~ ^(x11|wayland|mir)$ && $remote == no ]] && return 0
			type='' remote=''
			;;
		esac
	done <<<"$1"
	[[ $type =~ ^(x11|wayland|mir)$ && $remote == no ]]
}

# is_virtual_machine CPUINFO: the CPU flags say "hypervisor" (its keyboard
# and mouse are the emulator's, whoever sits at the host).
is_virtual_machine() {
	local line
	while IFS= read -r line; do
		[[ $line == flags* ]] || continue
		[[ " $line " == *" hypervisor "* ]]
		return
	done <"$1"
	return 1
}

# default_share -> REPLY (idle or always) and SHARE_WHY: "idle" where a
# person uses this machine (a keyboard or mouse that is not a virtual
# machine's, or a desktop session on its screen), "always" on a server.
# shellcheck disable=SC2034 # join.sh shows SHARE_WHY
default_share() {
	local proc=${GRIDX_PROC_DIR:-/proc} ids out
	INPUT_PERSON=0
	if [[ -r $proc/bus/input/devices ]]; then input_devices "$proc/bus/input/devices"; fi
	if ((INPUT_PERSON)) && ! { [[ -r $proc/cpuinfo ]] && is_virtual_machine "$proc/cpuinfo"; }; then
		REPLY=idle SHARE_WHY="a keyboard or mouse is attached: someone uses this machine"
		return 0
	fi
	if have_cmd loginctl && systemd_runs; then
		ids=$(loginctl list-sessions --no-legend 2>/dev/null | while read -r id _; do printf '%s ' "$id"; done) || ids=''
		# shellcheck disable=SC2086 # session IDs, one word each
		if [[ -n ${ids// /} ]] && out=$(loginctl show-session -p Type -p Remote $ids 2>/dev/null) && desktop_session "$out"; then
			REPLY=idle SHARE_WHY="a desktop session is open on this machine's screen"
			return 0
		fi
	fi
	REPLY=always SHARE_WHY="no keyboard or mouse (or a virtual machine's) and no desktop session: a server"
}

# agent_pid_is PID WORD: PID is alive and runs agent.sh WORD (a pid file
# outliving its process, or a pid taken again by another program, is not).
agent_pid_is() {
	local cmdline
	[[ $1 =~ ^[1-9][0-9]*$ && -r /proc/$1/cmdline ]] || return 1
	cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
	[[ $cmdline == *"$AGENT_DIR/agent.sh $2"* ]]
}

# agent_pid_of PIDFILE WORD -> REPLY: the pid in PIDFILE when agent_pid_is.
agent_pid_of() {
	local pid
	REPLY=''
	[[ -f $1 ]] || return 1
	read -r pid 2>/dev/null <"$1" || return 1
	agent_pid_is "$pid" "$2" || return 1
	REPLY=$pid
}

# Is the agent running (its unit active, or its supervisor alive)?
agent_running() {
	if [[ -v ST[AGENT_UNIT] ]]; then
		systemctl is-active --quiet "$AGENT_UNIT_NAME" 2>/dev/null
	else
		agent_pid_of "$AGENT_PIDFILE" supervise
	fi
}

# Start the supervisor in a session of its own (not this terminal's, whose
# hangup would end it), with no terminal and nothing inherited on its fds.
agent_launch() {
	local tries=0
	if agent_pid_of "$AGENT_PIDFILE" supervise; then return 0; fi
	printf '[#] setsid bash %s supervise &\n' "$AGENT_DIR/agent.sh" >&2
	(
		trap '' HUP
		exec setsid bash "$AGENT_DIR/agent.sh" supervise </dev/null >/dev/null 2>&1
	) &
	until agent_pid_of "$AGENT_PIDFILE" supervise; do
		((tries++ < 50)) || return 1
		sleep 0.1
	done
}

# agent_wake: a line into the agent's FIFO, so that a signal just sent is
# taken now (bash runs a trap once its read's timeout ends, up to 5 s). Open
# read-write: never blocks, whether the agent reads it or not.
agent_wake() {
	local fd
	[[ -p $AGENT_FIFO ]] || return 0
	exec {fd}<>"$AGENT_FIFO"
	printf 'wake\n' >&"$fd"
	exec {fd}>&-
}

# pid_running PID: alive, and not a zombie. The supervisor's parent is init
# (join.sh started it and ended), and a process that ended stays a zombie,
# which kill -0 still finds, until init reaps it: seconds where init is slow
# to, forever in a container whose PID 1 never does.
pid_running() {
	local stat
	{ read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
	stat=${stat##*) }
	[[ ${stat%% *} != Z ]]
}

# Stop the agent; it unpauses what it paused as it ends.
agent_stop() {
	local tries=0 pid
	if [[ -v ST[AGENT_UNIT] ]]; then
		if have_cmd systemctl; then cmd systemctl stop "$AGENT_UNIT_NAME" || return 1; fi
		return 0
	fi
	agent_pid_of "$AGENT_PIDFILE" supervise || return 0
	pid=$REPLY
	cmd kill -TERM "$pid" || return 1
	# The agent has GRACE-free work to do (docker unpause): 20 s is plenty.
	while pid_running "$pid" && ((tries++ < 200)); do
		agent_wake
		sleep 0.1
	done
	if pid_running "$pid"; then
		warn "the agent's supervisor ($pid) did not stop within 20 s: killing it"
		kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
	fi
	# What an agent killed outright left (its own session: readers, docker events).
	read_agent_status
	if agent_pid_is "${ASTAT[PID]:-}" run; then kill_session "${ASTAT[PID]}"; fi
	rm -f -- "$AGENT_PIDFILE"
}

# session_of PID -> REPLY: its session id (/proc/PID/stat, after the name).
session_of() {
	local stat rest
	REPLY=''
	{ read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
	rest=${stat##*) }
	read -r _ _ _ REPLY _ <<<"$rest"
}

# kill_session SID: SIGKILL to every process of the session SID but the
# caller: what an agent that was killed outright left (its readers, docker
# events). The agent and its supervisor each lead a session of their own.
kill_session() {
	local f pid
	[[ $1 =~ ^[1-9][0-9]*$ && $1 != 1 ]] || return 0
	for f in /proc/[0-9]*/stat; do
		pid=${f#/proc/} pid=${pid%/stat}
		[[ $pid != "$$" && $pid != "$BASHPID" ]] || continue
		session_of "$pid" && [[ $REPLY == "$1" ]] && kill -KILL "$pid" 2>/dev/null
	done
	return 0
}

# status.env, written by the agent: what it does now (agent.sh says what each
# key holds; docs/CONTRACT.md too).
# shellcheck disable=SC2034 # agent.sh writes them
AGENT_STATUS_KEYS=(STATE SINCE REASON POLICY HOURS PREEMPT_AT TASKS JOBS MEM_MIB LAST_ACTIVE LAST_REASON SPELL_SINCE
	UPDATED PID HUB_OK_AT HUB CPU_OUTSIDE_PCT WATCHING)
declare -A ASTAT=()

# read_agent_status -> ASTAT (empty when the agent has written none yet, or
# it is not the agent's: root's only, KEY='value' lines).
read_agent_status() {
	ASTAT=()
	[[ -f $AGENT_STATUS && ! -L $AGENT_STATUS ]] || return 0
	only_root_writes "$AGENT_STATUS"
	(read_values "$AGENT_STATUS" ASTAT) >/dev/null 2>&1 || return 0
	read_values "$AGENT_STATUS" ASTAT
}

# clock EPOCH -> REPLY: local time of day, with the date when not today.
clock() {
	local day today
	printf -v day '%(%F)T' "$1"
	printf -v today '%(%F)T' -1
	if [[ $day == "$today" ]]; then printf -v REPLY '%(%H:%M:%S)T' "$1"; else printf -v REPLY '%(%F %H:%M)T' "$1"; fi
}

# duration SECONDS -> REPLY: 45 s, 5 min, 2 h 30 min.
duration() {
	local s=$1
	if ((s < 120)); then
		REPLY="$s s"
	elif ((s < 7200)); then
		REPLY="$((s / 60)) min"
	else
		REPLY="$((s / 3600)) h"
		((s % 3600 < 60)) || REPLY+=" $((s % 3600 / 60)) min"
	fi
}

# agent_policy_text -> REPLY: the policy of AG, in words.
agent_policy_text() {
	local idle preempt
	duration "${AG[IDLE_S]}"
	idle=$REPLY
	duration "${AG[PREEMPT_S]}"
	preempt=$REPLY
	if [[ ${AG[SHARE]} == idle ]]; then
		REPLY="idle: Grid-X's jobs run only while you are away ($idle without keyboard, mouse, terminal, or your programs using a CPU or GPU); paused $preempt, they stop (${AG[GRACE_S]} s to save their work) and run elsewhere"
	else
		REPLY="always: Grid-X's jobs run whenever the hub places them here"
	fi
	if [[ -n ${AG[HOURS]} ]]; then REPLY+="; only within ${AG[HOURS]} (outside: paused, then stopped after $preempt)"; fi
}

# agent_human: the agent's lines of status.sh (AG and ASTAT read).
agent_human() {
	local state=${ASTAT[STATE]:-} since when tasks
	agent_policy_text
	printf '  %-15s %s
' sharing "$REPLY"
	if ! agent_running; then
		printf '  %-15s %s
' agent "not running (start it: sudo $AGENT_DIR/agent.sh start)"
		return 0
	fi
	clock "${ASTAT[SINCE]:-0}"
	since=$REPLY
	case $state in
	sharing) printf '  %-15s %s
' now "sharing since $since" ;;
	paused) printf '  %-15s %s
' now "paused since $since: the owner is active (${ASTAT[REASON]:-?})" ;;
	outside-hours) printf '  %-15s %s
' now "paused since $since: outside the hours ${ASTAT[HOURS]:-?}" ;;
	preempting) printf '  %-15s %s
' now "stopping Grid-X's jobs since $since (${ASTAT[REASON]:-?}): SIGTERM, then SIGKILL after ${AG[GRACE_S]} s" ;;
	'') printf '  %-15s %s
' now "starting" ;;
	*) printf '  %-15s %s
' now "$state" ;;
	esac
	if [[ -n ${ASTAT[TASKS]:-} ]]; then
		tasks=${ASTAT[JOBS]//,/, }
		[[ $state == preempting ]] && when=stopped || when=paused
		printf '  %-15s %s
' '' "jobs $when: $tasks (tasks ${ASTAT[TASKS]//,/, }), holding ${ASTAT[MEM_MIB]:-0} MiB of memory"
	fi
	if ((${ASTAT[PREEMPT_AT]:-0} > 0)) && [[ $state != preempting ]]; then
		clock "${ASTAT[PREEMPT_AT]}"
		when=$REPLY
		duration "${AG[IDLE_S]}"
		if [[ $state == paused ]]; then
			printf '  %-15s %s
' '' "they will be stopped at $when (to run elsewhere) unless the owner is away $REPLY before"
		else
			printf '  %-15s %s
' '' "they will be stopped at $when (to run elsewhere)"
		fi
	fi
	if ((${ASTAT[HUB_OK_AT]:-0} > 0)); then
		clock "${ASTAT[HUB_OK_AT]}"
		printf '  %-15s %s
' hub "heard the agent at $REPLY (${ASTAT[HUB]:-?})"
	else
		printf '  %-15s %s
' hub "has not answered the agent yet (${ASTAT[HUB]:-?})"
	fi
}

# agent_json -> REPLY: the agent's part of status.sh --json.
agent_json() {
	local running=false hours=null key
	agent_running && running=true
	if [[ -n ${AG[HOURS]} ]]; then
		json_str "${AG[HOURS]}"
		hours=$REPLY
	fi
	local out="{\"installed\": true, \"running\": $running, \"policy\": \"${AG[SHARE]}\", \"hours\": $hours"
	out+=", \"idle_s\": ${AG[IDLE_S]}, \"preempt_s\": ${AG[PREEMPT_S]}, \"grace_s\": ${AG[GRACE_S]}"
	json_str "${ASTAT[STATE]:-}"
	out+=", \"state\": $REPLY"
	json_str "${ASTAT[REASON]:--}"
	out+=", \"reason\": $REPLY"
	for key in SINCE PREEMPT_AT MEM_MIB LAST_ACTIVE HUB_OK_AT; do
		[[ ${ASTAT[$key]:-0} =~ ^[0-9]+$ ]] || ASTAT[$key]=0
		out+=", \"${key,,}\": ${ASTAT[$key]:-0}"
	done
	json_str_list "${ASTAT[TASKS]:-}"
	out+=", \"tasks\": $REPLY"
	json_str_list "${ASTAT[JOBS]:-}"
	out+=", \"jobs\": $REPLY}"
	REPLY=$out
}

# Every paused Grid-X container goes on: leave.sh leaves nothing paused.
unpause_grid_tasks() {
	local ids
	ids=$(docker ps -q --no-trunc --filter "label=$TASK_LABEL" --filter status=paused 2>/dev/null) || {
		warn "Docker does not answer: cannot check for paused Grid-X containers"
		return 1
	}
	[[ -n $ids ]] || return 0
	# shellcheck disable=SC2086 # container IDs, one per line
	cmd docker unpause $ids
}

# The systemd unit: KillMode=mixed sends SIGTERM to the agent alone (it
# unpauses, then ends its readers); what is left after it gets SIGKILL.
render_agent_unit() {
	cat <<UNIT
# Grid-X owner-activity agent, installed by join.sh, removed by leave.sh.
[Unit]
Description=Grid-X owner-activity agent (pauses Grid-X's jobs while this machine's owner uses it)
After=docker.service
Wants=docker.service

[Service]
Environment=GRIDX_STATE_DIR=$STATE_DIR
ExecStart=$1 $AGENT_DIR/agent.sh run
Restart=always
RestartSec=2
KillMode=mixed
TimeoutStopSec=30

[Install]
WantedBy=multi-user.target
UNIT
}

# agent_install SHARE HOURS: the copy, its settings, the service; then wait
# for the agent's first status (it is what protects the owner: a join whose
# agent does not start is rolled back).
agent_install() {
	local bash_path tries=0 key
	[[ $STATE_DIR =~ ^/[A-Za-z0-9_./-]+$ ]] || fatal 3 "the state folder $STATE_DIR has characters a systemd unit cannot hold" "use a plain path for GRIDX_STATE_DIR"
	state_set AGENT_DIR "$AGENT_DIR"
	[[ -d $AGENT_DIR ]] || cmd mkdir -m 0700 -- "$AGENT_DIR"
	printf '[#] install %s and lib.sh in %s\n' agent.sh "$AGENT_DIR" >&2
	atomic_write "$AGENT_DIR/agent.sh" 0700 <"$GRIDX_BUNDLE_DIR/agent.sh"
	atomic_write "$AGENT_DIR/lib.sh" 0600 <"$GRIDX_BUNDLE_DIR/lib.sh"
	for key in "${AGENT_KEYS[@]}"; do AG[$key]=${AGENT_DEFAULTS[$key]}; done
	AG[SHARE]=$1 AG[HOURS]=$2 AG[HUB_PORT]=${S[GRIDX_AGENT_PORT]:-$AGENT_PORT_DEFAULT}
	write_agent_settings
	if systemd_runs; then
		bash_path=$(command -v bash)
		state_set AGENT_UNIT "$AGENT_UNIT"
		printf '[#] write %s\n' "$AGENT_UNIT" >&2
		render_agent_unit "$bash_path" | atomic_write "$AGENT_UNIT" 0644
		cmd systemctl daemon-reload
		cmd systemctl enable --now "$AGENT_UNIT_NAME"
	else
		state_set AGENT_SUPERVISED 1
		agent_launch || fatal 1 "the owner-activity agent's supervisor did not start" "look at $AGENT_LOG"
	fi
	until [[ -f $AGENT_STATUS ]]; do
		((tries++ < 100)) || fatal 1 "the owner-activity agent did not start within 10 s" "look at $AGENT_LOG (or journalctl -u $AGENT_UNIT_NAME)"
		sleep 0.1
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
		if [[ -e $path ]]; then cmd rm -f -- "$path"; fi
	else
		[[ -f $backup ]] || {
			warn "backup $backup is missing: $path left as it is"
			return 1
		}
		if [[ -e $path ]] && same_file "$path" "$backup"; then return 0; fi
		local tmp
		printf '[#] restore %s as it was before join\n' "$path" >&2
		tmp=$(mktemp "${path%/*}/.${path##*/}.XXXXXX")
		cp -p -- "$backup" "$tmp"
		mv -f -- "$tmp" "$path"
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
		cmd cp -p -- "$path" "$path.gridx-edited"
	fi
}

# The agent first: stopped (it unpauses as it ends), then every paused Grid-X
# container unpaused whatever the agent did, so that nothing stays frozen
# and the swarm leave after this stops running containers, not frozen ones.
undo_agent() {
	[[ -v ST[AGENT_DIR] ]] || return 0
	agent_stop || return 1
	unpause_grid_tasks || return 1
	if [[ -v ST[AGENT_UNIT] ]]; then
		if have_cmd systemctl; then cmd systemctl disable "$AGENT_UNIT_NAME" || return 1; fi
		if [[ -e $AGENT_UNIT ]]; then
			cmd rm -f -- "$AGENT_UNIT"
			if have_cmd systemctl; then cmd systemctl daemon-reload || true; fi
		fi
		state_unset AGENT_UNIT
	fi
	if [[ -d $AGENT_DIR ]]; then cmd rm -rf -- "$AGENT_DIR"; fi
	state_unset AGENT_DIR AGENT_SUPERVISED
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
			if [[ -s $backup && -n $(tail -c 1 -- "$backup") ]]; then printf '\n' >>"$expected"; fi
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
	if [[ ${ST[CREATED_AUTHORIZED_KEYS]:-0} == 1 && -f $path && ! -s $path ]]; then cmd rm -f -- "$path"; fi
	dir=${path%/*}
	if [[ ${ST[CREATED_SSH_DIR]:-0} == 1 && -d $dir ]]; then
		if [[ -z $(ls -A -- "$dir") ]]; then cmd rmdir -- "$dir"; fi
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
	if [[ ${ST[$dir_key]:-0} == 1 ]]; then rmdir -- "${path%/*}" 2>/dev/null || true; fi
	state_unset "$key" "${key}_BACKUP" "$dir_key"
}

undo_docker_config() {
	undo_docker_file NVIDIA_CONFIG CREATED_NVIDIA_DIR "$BACKUP_DIR/nvidia-config.toml.written" || return 1
	undo_docker_file DAEMON_JSON CREATED_DOCKER_DIR "$BACKUP_DIR/daemon.json.written" || return 1
	[[ -v ST[DOCKER_RESTART_PENDING] ]] || return 0
	restart_docker || return 1
	state_unset DOCKER_RESTART_PENDING
}

# The hub registry's CA: back as it was (removed, or the earlier file put
# back), then the folders join made, when empty. Docker reads certs.d at each
# pull: no restart.
undo_registry_ca() {
	[[ -v ST[REGISTRY] ]] || return 0
	local path dir backup=${ST[REGISTRY_CA_BACKUP]:-absent} created=${ST[REGISTRY_DIRS_CREATED]:-0}
	registry_ca_path "${ST[REGISTRY]}"
	path=$REPLY dir=${REPLY%/*}
	restore_file "$path" "$backup" || return 1
	if ((created >= 1)) && [[ -d $dir ]]; then rmdir -- "$dir" 2>/dev/null || true; fi
	if ((created >= 2)) && [[ -d $CERTS_DIR ]]; then rmdir -- "$CERTS_DIR" 2>/dev/null || true; fi
	state_unset REGISTRY REGISTRY_CA_BACKUP REGISTRY_DIRS_CREATED
}

# "userns-remap": "default" makes dockerd create the user dockremap and its
# ranges in /etc/subuid and /etc/subgid; once Docker runs without remapping
# again (undo_docker_config, before), they go when join was what made them.
# The remapped engine's data, /var/lib/docker/100000.100000, is left: leave.sh
# says where it is.
undo_dockremap() {
	[[ -v ST[DOCKREMAP_CREATED] ]] || return 0
	local f kept line found
	if [[ ${ST[DOCKREMAP_CREATED]} == 1 ]]; then
		if have_cmd getent && getent passwd dockremap >/dev/null 2>&1; then
			cmd userdel dockremap || return 1
		fi
		for f in "$SUBUID" "$SUBGID"; do
			[[ -f $f ]] || continue
			kept='' found=0
			while IFS= read -r line || [[ -n $line ]]; do
				if [[ $line == dockremap:* ]]; then found=1; else kept+=$line$'\n'; fi
			done <"$f"
			if ((found)); then
				printf '[#] remove the dockremap range from %s\n' "$f" >&2
				printf '%s' "$kept" >"$f"
			fi
		done
	fi
	state_unset DOCKREMAP_CREATED
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

# wg-quick down removes the rules (PostDown); this catches a link that went
# away without it, and a rule join.sh added itself.
undo_firewall() {
	local tries=0 rule
	if [[ -v ST[FIREWALL_RULE] ]]; then
		# the rule as join wrote it (check_state made sure it is Grid-X's)
		read -r -a rule <<<"${ST[FIREWALL_RULE]}"
		if have_cmd iptables; then
			while ((tries++ < 8)) && iptables -C DOCKER-USER "${rule[@]}" >/dev/null 2>&1; do
				cmd iptables -D DOCKER-USER "${rule[@]}" || return 1
			done
		fi
		state_unset FIREWALL_RULE
	fi
	if [[ -v ST[WORKER_CHAIN] ]]; then
		if have_cmd iptables; then
			tries=0
			while ((tries++ < 8)) && worker_chain_present; do
				cmd iptables -D INPUT -j "$WORKER_CHAIN" || return 1
			done
			if iptables -S "$WORKER_CHAIN" >/dev/null 2>&1; then
				cmd iptables -F "$WORKER_CHAIN" || return 1
				cmd iptables -X "$WORKER_CHAIN" || return 1
			fi
		fi
		state_unset WORKER_CHAIN
	fi
}

undo_wg_config() {
	if [[ -v ST[WG_CONFIG] ]]; then
		if [[ -e ${ST[WG_CONFIG]} ]]; then cmd rm -f -- "${ST[WG_CONFIG]}" || return 1; fi
		state_unset WG_CONFIG
	fi
	if [[ -v ST[CREATED_WG_DIR] ]]; then
		rmdir -- "${ST[CREATED_WG_DIR]}" 2>/dev/null || true
		state_unset CREATED_WG_DIR
	fi
}

# The jobs' network: the rules (wg-quick down leaves them: a VPN going down
# must not open anything), then the copy of the scripts PreUp ran.
undo_job_network() {
	[[ -v ST[JOB_NET_DIR] ]] || return 0
	if have_cmd iptables; then job_net_remove || return 1; fi
	if [[ -e ${ST[JOB_NET_DIR]} ]]; then cmd rm -rf -- "${ST[JOB_NET_DIR]}" || return 1; fi
	state_unset JOB_NET_DIR JOB_ALLOW VPN_SUBNET JOB_DOCKER_USER6
}

# Returns 0 when everything is undone (and the state is gone), 1 otherwise.
undo_all() {
	local step failed=0 rc errexit=0
	[[ $- == *e* ]] && errexit=1
	for step in undo_agent undo_boot_unit undo_authorized_keys undo_swarm undo_registry_ca undo_docker_config undo_dockremap undo_link \
		undo_firewall undo_wg_config undo_job_network; do
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
	rm -rf -- "$BACKUP_DIR"
	rm -f -- "$STATE_FILE" "$STATE_JSON"
	if [[ ${ST[CREATED_STATE_DIR]:-0} == 1 ]]; then rmdir -- "$STATE_DIR" 2>/dev/null || true; fi
	ST=()
	return 0
}
