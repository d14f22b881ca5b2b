#!/usr/bin/env bash
#
# agent.sh - the owner comes first: Grid-X's jobs here pause while this machine's owner uses it.
#
# join.sh installs a copy of this script (and lib.sh) in /var/lib/gridx/agent/
# and keeps it running: the systemd service gridx-agent where systemd runs,
# else `agent.sh supervise`, a loop that starts it again if it dies (without
# an init system nothing starts it after a reboot: `agent.sh start` does).
# leave.sh stops and removes it, and unpauses everything first.
#
#   sudo ./agent.sh policy                         # the sharing policy now
#   sudo ./agent.sh policy --share always          # change it: the agent follows at once
#   sudo ./agent.sh policy --share idle --hours 22:00-08:00 --idle-time 5m
#   sudo ./agent.sh status [--json]                # what it does now (status.sh shows it too)
#   sudo ./agent.sh start                          # start it again (no systemd: after a reboot)
#   agent.sh run | supervise                       # the service itself (as root)
#
# Policy (agent.env, see lib.sh "the owner's agent" for every setting):
#   SHARE=always   Grid-X's jobs run whenever the hub places them here
#   SHARE=idle     they run only while the owner is away: any owner activity
#                  pauses them; IDLE_S (5 min) without any goes on again
#   HOURS=22:00-08:00  either policy only within these hours (local time)
#
# Owner activity, measured as root (each source a function below, unit-tested
# with recorded samples):
#   input     the kernel's input events of keyboards, mice, touchpads and
#             joysticks (/dev/input/event*, read as they come: USB and PS/2
#             alike, under X, Wayland or a text console)
#   logind    a session whose IdleHint says its user came back (loginctl)
#   terminal  access times of /dev/tty[0-9]* and /dev/pts/* (a shell that
#             read a keystroke; the kernel moves them once in 8 s at most)
#   cpu       CPU used outside Grid-X's containers: the machine's (the
#             cgroup root's cpuacct.usage, or cpu.stat on cgroup v2, else
#             /proc/stat) less what their cgroups used, every CPU_PERIOD_MS
#   gpu       nvidia-smi's compute apps whose pids are in no Grid-X container
#
# What the agent does (STATE, also reported to the hub):
#   sharing        Grid-X's containers run
#   paused         SHARE=idle and the owner is active: every Grid-X container
#                  here is paused (docker pause: the cgroup freezer; memory
#                  stays); owner away for IDLE_S -> unpaused, sharing again
#   outside-hours  outside HOURS: paused the same way
#   preempting     paused for PREEMPT_S (10 min), or a program outside Grid-X
#                  computes on a GPU this machine shares: reported to the hub
#                  first, then unpaused and stopped (docker stop -t GRACE_S:
#                  SIGTERM, SIGKILL GRACE_S later) so the hub runs them
#                  elsewhere; then paused (or sharing) again, with nothing left
# Grid-X's containers are swarm task containers (label com.docker.swarm.task.id):
# this engine is in Grid-X's swarm only; the owner's own containers are never touched.
#
# Reports: one line over TCP to the hub's VPN address, port HUB_PORT (5002),
# on every change and every HEARTBEAT_S (30 s), never blocking the agent:
#   gridx-agent 1 state=STATE since=EPOCH reason=REASON policy=POLICY hours=HOURS preempt_at=EPOCH tasks=ID,ID mem_mib=N
# (docs/CONTRACT.md "Owner-activity reports" says what each field means).
#
# Files (STATE_DIR/agent, root's only): agent.env (settings), status.env (what
# it does now: status.sh reads it), agent.log (without systemd; with it, the
# journal), supervisor.pid, events.fifo (its readers wake the loop through it),
# agent.lock.
# Path overrides for tests: GRIDX_PROC_DIR (/proc), GRIDX_DEV_DIR (/dev), and
# lib.sh's (GRIDX_STATE_DIR...).
#
# Exit codes: 0 ok, 1 failed, 2 bad usage or input, 3 a precondition is
# missing (not root, not joined, no agent installed).

set -euo pipefail
export LC_ALL=C
umask 077

GRIDX_PROG=agent.sh
GRIDX_BUNDLE_DIR=${BASH_SOURCE[0]%/*}
[[ $GRIDX_BUNDLE_DIR != "${BASH_SOURCE[0]}" ]] || GRIDX_BUNDLE_DIR=.
GRIDX_BUNDLE_DIR=$(cd "$GRIDX_BUNDLE_DIR" && pwd -P)
# shellcheck source=lib.sh
. "$GRIDX_BUNDLE_DIR/lib.sh"

PROC=${GRIDX_PROC_DIR:-/proc}
DEV=${GRIDX_DEV_DIR:-/dev}

usage() {
	cat <<EOF
Usage: sudo ./agent.sh policy [--share idle|always] [--hours HH:MM-HH:MM|any]
                              [--idle-time T] [--preempt-time T] [--grace T]
                              [--cpu-busy PERCENT] [--input-devices auto|PATH,PATH]
       sudo ./agent.sh status [--json]
       sudo ./agent.sh start

Grid-X's owner-activity agent: while you use this machine, Grid-X's jobs here
pause (share "idle"), or they run whenever placed here (share "always");
either only within the hours you give.

  policy          show the policy, or change it (the agent follows at once):
    --share idle|always  idle: only while you are away from this machine
    --hours HH:MM-HH:MM  only within these hours, local time (22:00-08:00
                         crosses midnight); "any": at any time
    --idle-time T        away this long before jobs go on (default 5m)
    --preempt-time T     paused this long, jobs are stopped to run elsewhere (10m)
    --grace T            SIGTERM to SIGKILL when stopped (60s)
    --cpu-busy PERCENT   your programs' CPU use that counts as you, in % of
                         one core, held 1 s (default 25)
    --input-devices auto|PATH,PATH  input devices to watch (auto: keyboards,
                         mice, touchpads, joysticks)
    T is seconds, or with s, m or h (90, 5m, 1h).
  status [--json] what it does now
  start           start it again (where there is no systemd, after a reboot)

Exit status: 0 ok, 1 failed, 2 bad usage or input, 3 not root, not joined,
or the agent is not installed.
EOF
}

# ------------------------------------------------------------------- time ----

# now_cs -> REPLY: centiseconds since boot (/proc/uptime: monotonic, no fork).
now_cs() {
	local up
	read -r up _ </proc/uptime
	REPLY=$((10#${up%.*} * 100 + 10#${up#*.}))
}

epoch() { printf -v REPLY '%(%s)T' -1; }

minute_of_day() {
	local h m
	printf -v h '%(%H)T' -1
	printf -v m '%(%M)T' -1
	REPLY=$((10#$h * 60 + 10#$m))
}

# A wait without a fork: read from a pipe nobody writes (SLEEP_FD).
pause_s() { read -r -t "$1" -u "$SLEEP_FD" _ || true; }

log() { printf '%(%F %T)T %s\n' -1 "$*" >&2; }

# last_job -> REPLY: the pid of the job just started in the background.
# shellcheck disable=SC2128 # $! (lib.sh's printf -v "${array}[...]" misleads shellcheck)
last_job() { REPLY=$!; }

# ----------------------------------------------------------- source: input ----

# owner_events WORDS TYPE_INDEX: among these events (od -tu2, one event a
# line), is there a person's: EV_KEY (1), EV_REL (2) or EV_ABS (3)? EV_SYN,
# EV_MSC (scan codes come with keys anyway), EV_LED (set by software), EV_SW,
# EV_SND and EV_REP are not a person.
owner_events() {
	local -a w
	while read -r -a w; do
		case ${w[$2]:-} in 1 | 2 | 3) return 0 ;; esac
	done <<<"$1"
	return 1
}

# struct input_event: a timeval (two longs), then u16 type, u16 code, s32
# value: 24 bytes where a long is 64 bits, 16 where it is 32. As od -tu2
# words, the type is word 8 or word 4.
event_layout() {
	local bits
	bits=$(getconf LONG_BIT 2>/dev/null) || bits=64
	if [[ $bits == 32 ]]; then EVENT_BYTES=16 EVENT_TYPE_WORD=4; else EVENT_BYTES=24 EVENT_TYPE_WORD=8; fi
}

# input_reader DEVICE: "input DEVICE" into the loop's FIFO on a person's
# event, at most once a second however fast they come (the kernel keeps what
# comes meanwhile; one read then takes it all); ends when the device goes.
# One read(2) of up to 64 events: evdev hands out whole events only.
input_reader() {
	local dev=$1 fd words
	if [[ -p $dev ]]; then exec {fd}<>"$dev"; else exec {fd}<"$dev"; fi
	while words=$(dd bs=$((EVENT_BYTES * 64)) count=1 status=none <&"$fd" 2>/dev/null | od -An -v -tu2 -w"$EVENT_BYTES") &&
		[[ -n $words ]]; do
		if owner_events "$words" "$EVENT_TYPE_WORD"; then
			printf 'input %s\n' "$dev" >&"$EV_FD"
			pause_s 1
		fi
	done
}

# The devices to watch now: INPUT_DEVICES=auto reads /proc/bus/input/devices
# (a keyboard plugged in later is found at the next look, every 10 s).
input_paths() {
	local event
	WATCH=()
	if [[ ${AG[INPUT_DEVICES]} != auto ]]; then
		IFS=, read -r -a WATCH <<<"${AG[INPUT_DEVICES]}"
		return 0
	fi
	[[ -r $PROC/bus/input/devices ]] || return 0
	input_devices "$PROC/bus/input/devices"
	for event in "${INPUT_DEVS[@]}"; do WATCH+=("$DEV/input/$event"); done
}

declare -A READERS=()

watch_inputs() {
	local dev
	local -A want=()
	WATCH=()
	((WATCH_OWNER == 0)) || input_paths
	for dev in "${WATCH[@]}"; do
		want[$dev]=1
		if [[ -v READERS[$dev] ]] && kill -0 "${READERS[$dev]}" 2>/dev/null; then continue; fi
		[[ -e $dev ]] || continue
		input_reader "$dev" &
		last_job
		READERS[$dev]=$REPLY
		log "watching $dev"
	done
	for dev in "${!READERS[@]}"; do
		if [[ ! -v want[$dev] ]] || ! kill -0 "${READERS[$dev]}" 2>/dev/null; then
			kill "${READERS[$dev]}" 2>/dev/null || true
			unset "READERS[$dev]"
		fi
	done
}

# ---------------------------------------------------------- source: logind ----

# logind_since SHOW_OUTPUT -> REPLY: when (epoch s) the user of a session
# came back, by its desktop's word: the newest IdleSinceHint (µs) of the
# sessions whose IdleHint is "no"; 0 if none says so. (A desktop that never
# sets the hint says nothing; the input devices still do.)
logind_since() {
	local line hint='' since=0 best=0
	while IFS= read -r line || [[ -n $line ]]; do
		case $line in
		IdleHint=*) hint=${line#*=} ;;
		IdleSinceHint=*) [[ ${line#*=} =~ ^[0-9]{1,19}$ ]] && since=$((10#${line#*=} / 1000000)) ;;
		'')
			[[ $hint == no ]] && ((since > best)) && best=$since
			hint='' since=0
			;;
		esac
	done <<<"$1"
	[[ $hint == no ]] && ((since > best)) && best=$since
	REPLY=$best
}

logind_poll() {
	local ids out
	ids=$(loginctl list-sessions --no-legend 2>/dev/null | while read -r id _; do printf '%s ' "$id"; done) || return 0
	[[ -n ${ids// /} ]] || return 0
	# shellcheck disable=SC2086 # session IDs, one word each
	out=$(loginctl show-session -p IdleHint -p IdleSinceHint $ids 2>/dev/null) || return 0
	logind_since "$out"
	((REPLY > 0)) && note_activity logind "$REPLY"
	return 0
}

# -------------------------------------------------------- source: terminal ----

# tty_atime STAT_OUTPUT -> REPLY: the newest access time among terminals
# (epoch s), 0 if none.
tty_atime() {
	local t best=0
	while read -r t; do
		[[ $t =~ ^[0-9]{1,12}$ ]] && ((10#$t > best)) && best=$((10#$t))
	done <<<"$1"
	REPLY=$best
}

# The consoles (tty1...) and pseudo-terminals (ssh, terminal windows) of
# this machine; a Grid-X container's terminals live in its own /dev/pts.
tty_poll() {
	local f files=() out
	for f in "$DEV"/tty[0-9]* "$DEV"/pts/[0-9]*; do [[ -e $f ]] && files+=("$f"); done
	((${#files[@]})) || return 0
	out=$(stat -c %X -- "${files[@]}" 2>/dev/null) || true
	tty_atime "$out"
	((REPLY > 0)) && note_activity terminal "$REPLY"
	return 0
}

# ------------------------------------------------------------- cgroups ----

# cgroup_mounts MOUNTINFO -> CG_MP[c] (mount point) and CG_ROOT[c] (the
# cgroup it shows: "/" on a machine, the container's own in a container) for
# the v1 controllers cpuacct and memory, and [unified] for cgroup v2.
declare -A CG_MP=() CG_ROOT=()
cgroup_mounts() {
	local -a f
	local i o
	CG_MP=() CG_ROOT=()
	while read -r -a f; do
		for ((i = 6; i < ${#f[@]}; i++)); do [[ ${f[i]} == - ]] && break; done
		case ${f[i + 1]:-} in
		cgroup2) [[ -v CG_MP[unified] ]] || CG_MP[unified]=${f[4]} CG_ROOT[unified]=${f[3]} ;;
		cgroup)
			for o in ${f[i + 3]//,/ }; do
				case $o in
				cpuacct | memory) [[ -v CG_MP[$o] ]] || CG_MP[$o]=${f[4]} CG_ROOT[$o]=${f[3]} ;;
				esac
			done
			;;
		esac
	done <"$1"
}

# cgroup_of CGROUP_FILE CONTROLLER -> CG_DIR (its folder here) and CG_PATH
# (the path the file names): the v1 line of CONTROLLER where it is mounted,
# else the cgroup v2 line ("0::PATH").
cgroup_of() {
	local id ctrls path c key=''
	CG_DIR='' CG_PATH=''
	while IFS=: read -r id ctrls path; do
		if [[ -n $ctrls && -v CG_MP[$2] ]]; then
			for c in ${ctrls//,/ }; do [[ $c == "$2" ]] && key=$2; done
		elif [[ $id == 0 && -z $ctrls && ! -v CG_MP[$2] && -v CG_MP[unified] ]]; then
			key=unified
		fi
		[[ -n $key ]] && break
	done <"$1"
	[[ -n $key ]] || return 1
	CG_PATH=$path
	if [[ ${CG_ROOT[$key]} == / ]]; then
		CG_DIR=${CG_MP[$key]}$path
	elif [[ $path == "${CG_ROOT[$key]}" || $path == "${CG_ROOT[$key]}"/* ]]; then
		CG_DIR=${CG_MP[$key]}${path#"${CG_ROOT[$key]}"}
	else
		return 1 # outside what this machine's mount shows
	fi
	CG_DIR=${CG_DIR%/}
}

# cgroup_cpu_ns DIR -> REPLY: CPU time a cgroup used, in ns (v1
# cpuacct.usage; v2 cpu.stat's usage_usec).
cgroup_cpu_ns() {
	local key value
	if [[ -f $1/cpuacct.usage ]]; then
		read -r REPLY 2>/dev/null <"$1/cpuacct.usage" && [[ $REPLY =~ ^[0-9]+$ ]]
		return
	fi
	[[ -f $1/cpu.stat ]] || return 1
	while read -r key value; do
		if [[ $key == usage_usec && $value =~ ^[0-9]+$ ]]; then
			REPLY=$((value * 1000))
			return 0
		fi
	done 2>/dev/null <"$1/cpu.stat"
	return 1
}

# cgroup_mem_bytes DIR -> REPLY: memory a cgroup holds (v1
# memory.usage_in_bytes, v2 memory.current), page cache included.
cgroup_mem_bytes() {
	local f
	for f in "$1/memory.usage_in_bytes" "$1/memory.current"; do
		if [[ -f $f ]] && read -r REPLY 2>/dev/null <"$f" && [[ $REPLY =~ ^[0-9]+$ ]]; then return 0; fi
	done
	REPLY=0
	return 1
}

# ------------------------------------------------------------ source: cpu ----

# proc_stat_busy FILE -> REPLY: the machine's busy CPU time in ns, from the
# "cpu" line of /proc/stat: user, nice, system, irq, softirq and steal
# (guest time is already inside user); idle and iowait are not busy.
proc_stat_busy() {
	local cpu user nice system irq softirq steal
	read -r cpu user nice system _ _ irq softirq steal _ <"$1" || return 1
	[[ $cpu == cpu && $user$nice$system$irq$softirq =~ ^[0-9]+$ ]] || return 1
	REPLY=$(((user + nice + system + irq + softirq + ${steal:-0}) * (1000000000 / CLK_TCK)))
}

# Where the machine's own CPU time is read: the root of the cgroup tree this
# machine sees (all its processes; in a container, the container's, where
# /proc/stat would be the whole host's), else /proc/stat.
cpu_total_source() {
	if [[ -v CG_MP[cpuacct] ]] && cgroup_cpu_ns "${CG_MP[cpuacct]}"; then
		CPU_TOTAL=${CG_MP[cpuacct]}
	elif [[ -v CG_MP[unified] ]] && cgroup_cpu_ns "${CG_MP[unified]}"; then
		CPU_TOTAL=${CG_MP[unified]}
	else
		CPU_TOTAL=$PROC/stat
	fi
}

cpu_total_ns() {
	if [[ $CPU_TOTAL == "$PROC/stat" ]]; then proc_stat_busy "$CPU_TOTAL"; else cgroup_cpu_ns "$CPU_TOTAL"; fi
}

# outside_pct TOTAL_DELTA_NS GRIDX_DELTA_NS ELAPSED_CS -> REPLY: CPU used
# outside Grid-X's containers over the interval, in % of one core.
outside_pct() {
	local elapsed_ns=$(($3 * 10000000))
	((elapsed_ns > 0)) || return 1
	REPLY=$((($1 - $2) * 100 / elapsed_ns))
	((REPLY >= 0)) || REPLY=0
}

# self_cpu_ns STAT -> REPLY: CPU time of a process and of its children that
# ended, in ns, from /proc/PID/stat (utime, stime, cutime, cstime: fields 14
# to 17, counted after the name, which may hold spaces).
self_cpu_ns() {
	local -a f
	# shellcheck disable=SC2206 # numbers and a state letter: split on purpose
	f=(${1##*) })
	[[ ${f[11]:-}${f[12]:-}${f[13]:-}${f[14]:-} =~ ^[0-9]+$ ]] || return 1
	REPLY=$(((f[11] + f[12] + f[13] + f[14]) * (1000000000 / CLK_TCK)))
}

# One sample: busy when the owner's programs used CPU_BUSY_PCT of a core or
# more in every sample for CPU_BUSY_MS (CPU_BUSY_FROM: since when). Not the owner's: Grid-X's
# containers, and the agent itself with the docker commands it ran. A
# sample across a change of Grid-X's containers (one started, one ended) is
# skipped: a container's use before it was seen would count as the owner's.
CPU_PREV_TOTAL=0 CPU_PREV_CS=0 CPU_BUSY_FROM=0 CPU_OUTSIDE_PCT=0 CPU_PREV_SELF=0
declare -A C_CPU=()
cpu_sample() {
	local total id sum=0 skip=$CONTAINERS_CHANGED stat self=0
	cpu_total_ns || return 0
	total=$REPLY
	if { read -r stat </proc/$$/stat; } 2>/dev/null && self_cpu_ns "$stat"; then self=$REPLY; fi
	((CPU_PREV_CS == 0)) || sum=$((self - CPU_PREV_SELF))
	CPU_PREV_SELF=$self
	for id in "${!C_TASK[@]}"; do
		if ! cgroup_cpu_ns "${C_CPUDIR[$id]:-/nonexistent}"; then
			skip=1
			continue
		fi
		if [[ -v C_CPU[$id] ]]; then sum=$((sum + REPLY - C_CPU[$id])); else skip=1; fi
		C_CPU[$id]=$REPLY
	done
	if ((CPU_PREV_CS > 0 && !skip)) && outside_pct $((total - CPU_PREV_TOTAL)) "$sum" $((NOW_CS - CPU_PREV_CS)); then
		CPU_OUTSIDE_PCT=$REPLY
		if ((REPLY >= AG[CPU_BUSY_PCT])); then
			((CPU_BUSY_FROM > 0)) || CPU_BUSY_FROM=$CPU_PREV_CS
			((NOW_CS - CPU_BUSY_FROM < AG[CPU_BUSY_MS] / 10)) || note_activity cpu
		else
			CPU_BUSY_FROM=0
		fi
	fi
	CPU_PREV_TOTAL=$total CPU_PREV_CS=$NOW_CS CONTAINERS_CHANGED=0
	return 0
}

# ------------------------------------------------------------ source: gpu ----

# gpu_scan NVIDIA_SMI_OUTPUT (--query-compute-apps=pid,gpu_uuid
# --format=csv,noheader) -> GPU_OUTSIDE (uuid -> 1: a process outside
# Grid-X's containers computes there) and GPU_CONFLICT (Grid-X containers
# with a process on a GPU this machine shares where an outside one computes
# too: the owner's program wants that GPU). pid_container says whose a pid is.
declare -A GPU_OUTSIDE=()
GPU_CONFLICT=()
gpu_scan() {
	local pid uuid rest id
	local -A holders=()
	GPU_OUTSIDE=() GPU_CONFLICT=()
	while IFS=', ' read -r pid uuid rest; do
		[[ $pid =~ ^[0-9]+$ && -n $uuid ]] || continue
		if pid_container "$pid"; then
			holders[$uuid]+=" $REPLY"
		else
			GPU_OUTSIDE[$uuid]=1
		fi
	done <<<"$1"
	for uuid in "${!GPU_OUTSIDE[@]}"; do
		[[ ,${ST[SHARED_GPU_IDS]:-}, == *",$uuid,"* && -v holders[$uuid] ]] || continue
		for id in ${holders[$uuid]}; do
			[[ " ${GPU_CONFLICT[*]} " == *" $id "* ]] || GPU_CONFLICT+=("$id")
		done
	done
	return 0
}

# pid_container PID -> REPLY: the Grid-X container whose cgroup holds PID.
pid_container() {
	local id
	REPLY=''
	[[ -r $PROC/$1/cgroup ]] && cgroup_of "$PROC/$1/cgroup" cpuacct || return 1
	for id in "${!C_CGPATH[@]}"; do
		if [[ $CG_PATH == "${C_CGPATH[$id]}" || $CG_PATH == "${C_CGPATH[$id]}"/* ]]; then
			REPLY=$id
			return 0
		fi
	done
	return 1
}

gpu_poll() {
	local out
	out=$(nvidia-smi --query-compute-apps=pid,gpu_uuid --format=csv,noheader 2>/dev/null) || return 0
	gpu_scan "$out"
	((${#GPU_OUTSIDE[@]} == 0)) || note_activity gpu
	return 0
}

# ------------------------------------------------------ Grid-X's containers ----
# id -> task ID, service (job) name, state (running, paused), cgroup folders
# (cpuacct, memory) and path (to match a pid's). From docker ps when Docker
# says something changed (docker events) and at every heartbeat.

declare -A C_TASK=() C_JOB=() C_STATE=() C_CPUDIR=() C_MEMDIR=() C_CGPATH=()
CONTAINERS_CHANGED=0 CONTAINERS_DIRTY=1 DOCKER_FAILED=0

refresh_containers() {
	local out id state task job new=()
	local -A seen=()
	# Asked again when docker events (started again every 10 s while Docker
	# is away) says so, or at the next reconcile: not at every sample.
	CONTAINERS_DIRTY=0
	out=$(docker ps --no-trunc --filter "label=$TASK_LABEL" \
		--format '{{.ID}} {{.State}} {{.Label "com.docker.swarm.task.id"}} {{.Label "com.docker.swarm.service.name"}}' 2>/dev/null) || {
		((DOCKER_FAILED++)) || log "docker ps failed: Grid-X's containers unknown until Docker answers"
		return 1
	}
	((DOCKER_FAILED == 0)) || log "Docker answers again"
	DOCKER_FAILED=0
	while read -r id state task job; do
		[[ $id =~ ^[0-9a-f]{12,64}$ && $task =~ ^[0-9a-z]+$ ]] || continue
		seen[$id]=1
		[[ -v C_TASK[$id] ]] || new+=("$id")
		C_TASK[$id]=$task C_STATE[$id]=$state C_JOB[$id]=${job:-?}
	done <<<"$out"
	for id in "${!C_TASK[@]}"; do
		[[ -v seen[$id] ]] && continue
		unset "C_TASK[$id]" "C_JOB[$id]" "C_STATE[$id]" "C_CPUDIR[$id]" "C_MEMDIR[$id]" "C_CGPATH[$id]" "C_CPU[$id]"
		CONTAINERS_CHANGED=1
	done
	((${#new[@]})) || return 0
	CONTAINERS_CHANGED=1
	container_cgroups "${new[@]}"
}

# The cgroups of new containers, from their main process.
container_cgroups() {
	local out id pid
	out=$(docker inspect --format '{{.Id}} {{.State.Pid}}' "$@" 2>/dev/null) || true
	while read -r id pid; do
		[[ -v C_TASK[$id] && $pid =~ ^[1-9][0-9]*$ && -r $PROC/$pid/cgroup ]] || continue
		if cgroup_of "$PROC/$pid/cgroup" cpuacct; then C_CPUDIR[$id]=$CG_DIR C_CGPATH[$id]=$CG_PATH; fi
		if cgroup_of "$PROC/$pid/cgroup" memory; then C_MEMDIR[$id]=$CG_DIR; fi
	done <<<"$out"
}

# ids_in_state STATE -> IDS: Grid-X's containers in STATE, less those being
# preempted (a frozen process cannot take its SIGTERM).
ids_in_state() {
	local id
	IDS=()
	for id in "${!C_TASK[@]}"; do
		[[ ${C_STATE[$id]} == "$1" && ! -v PREEMPTING[$id] ]] && IDS+=("$id")
	done
	return 0
}

pause_running() {
	local id
	ids_in_state running
	((${#IDS[@]})) || return 0
	if docker pause "${IDS[@]}" >/dev/null 2>&1; then
		log "paused ${#IDS[@]} Grid-X container(s): $(container_names "${IDS[@]}")"
	else
		log "docker pause failed for some of $(container_names "${IDS[@]}")"
		CONTAINERS_DIRTY=1
	fi
	for id in "${IDS[@]}"; do C_STATE[$id]=paused; done
}

unpause_paused() {
	local id
	ids_in_state paused
	((${#IDS[@]})) || return 0
	if docker unpause "${IDS[@]}" >/dev/null 2>&1; then
		log "unpaused ${#IDS[@]} Grid-X container(s): $(container_names "${IDS[@]}")"
	else
		log "docker unpause failed for some of $(container_names "${IDS[@]}")"
		CONTAINERS_DIRTY=1
	fi
	for id in "${IDS[@]}"; do C_STATE[$id]=running; done
}

container_names() {
	local id out=''
	for id in "$@"; do out+=${out:+, }${C_JOB[$id]:-?}/${C_TASK[$id]:-?}; done
	printf '%s' "$out"
}

# The docker events stream wakes the loop when a Grid-X container starts,
# ends, or is paused or unpaused by anyone.
watch_docker() {
	if [[ -n ${EVENTS_PID:-} ]] && kill -0 "$EVENTS_PID" 2>/dev/null; then return 0; fi
	(
		docker events --filter type=container --filter "label=$TASK_LABEL" --filter event=start \
			--filter event=die --filter event=pause --filter event=unpause --format '{{.Action}}' 2>/dev/null |
			while read -r action; do printf 'docker %s\n' "$action" >&"$EV_FD"; done
	) &
	last_job
	EVENTS_PID=$REPLY
	CONTAINERS_DIRTY=1
}

# ------------------------------------------------------ what the agent does ----

STATE=starting SINCE=0 REASON=- SPELL_SINCE=0 LAST_ACTIVE=0 LAST_REASON=- NOW=0 NOW_CS=0
STOPPER_PID='' PREEMPT_IDS=() MEM_MIB=0 HUB_OK_AT=0 SENT_KEY=''
declare -A PREEMPTING=()

# note_activity SOURCE [EPOCH]: the owner did something at EPOCH (now).
note_activity() {
	local t=${2:-$NOW}
	if ((t > LAST_ACTIVE)); then LAST_ACTIVE=$t LAST_REASON=$1; fi
}

# decide -> WANT, WANT_REASON: what the policy asks for now.
decide() {
	if [[ -n ${AG[HOURS]} ]]; then
		minute_of_day
		if ! in_hours "${AG[HOURS]}" "$REPLY"; then
			WANT=outside-hours WANT_REASON=hours
			return 0
		fi
	fi
	if [[ ${AG[SHARE]} == idle ]] && ((LAST_ACTIVE > 0 && NOW - LAST_ACTIVE < AG[IDLE_S])); then
		WANT=paused WANT_REASON=$LAST_REASON
		return 0
	fi
	WANT=sharing WANT_REASON=-
}

set_state() { # STATE REASON [SINCE]
	[[ $1 == "$STATE" && $2 == "$REASON" ]] && return 0
	log "$1$([[ $2 == - ]] || printf " (%s)" "$2") (was $STATE)"
	STATE=$1 REASON=$2 SINCE=${3:-$NOW}
}

act() {
	decide
	if [[ -n $STOPPER_PID ]]; then
		if kill -0 "$STOPPER_PID" 2>/dev/null; then
			[[ $WANT == sharing ]] || pause_running
			return 0
		fi
		wait "$STOPPER_PID" 2>/dev/null || true
		STOPPER_PID='' PREEMPT_IDS=() PREEMPTING=()
		log "preemption done"
		refresh_containers || true
	fi
	if [[ $WANT == sharing ]]; then
		if [[ $STATE != sharing ]]; then
			unpause_paused
			SPELL_SINCE=0
			set_state sharing -
		fi
	else
		if [[ $STATE == sharing || $SPELL_SINCE == 0 ]]; then SPELL_SINCE=$NOW; fi
		pause_running
		# back from a preemption, or after a restart: since the spell began
		if [[ $STATE == preempting || $STATE == starting ]]; then
			set_state "$WANT" "$WANT_REASON" "$SPELL_SINCE"
		else
			set_state "$WANT" "$WANT_REASON"
		fi
		if ((${#C_TASK[@]} && NOW >= SPELL_SINCE + AG[PREEMPT_S])); then
			preempt "$WANT_REASON" "${!C_TASK[@]}"
			return 0
		fi
	fi
	if ((${#GPU_CONFLICT[@]})) && [[ ${AG[SHARE]} == idle ]]; then
		local id live=()
		for id in "${GPU_CONFLICT[@]}"; do [[ -v C_TASK[$id] ]] && live+=("$id"); done
		GPU_CONFLICT=()
		((${#live[@]} == 0)) || preempt gpu "${live[@]}"
	fi
	return 0
}

# preempt REASON ID...: the hub hears it first (a preemption, not a
# failure), then the containers are unpaused (a frozen process cannot take
# its SIGTERM) and stopped, in the background: the loop goes on watching.
preempt() {
	local reason=$1 paused=() id
	shift
	PREEMPT_IDS=("$@")
	for id in "$@"; do
		PREEMPTING[$id]=1
		[[ ${C_STATE[$id]} == paused ]] && paused+=("$id")
	done
	STATE=preempting REASON=$reason SINCE=$NOW
	log "preempting ($reason): $(container_names "$@"): SIGTERM now, SIGKILL after ${AG[GRACE_S]} s"
	publish wait
	(
		if ((${#paused[@]})); then docker unpause "${paused[@]}" >/dev/null 2>&1; fi
		docker stop -t "${AG[GRACE_S]}" "$@" >/dev/null 2>&1
	) &
	last_job
	STOPPER_PID=$REPLY
}

# ------------------------------------------------------------------ reports ----

# What the hub and status.sh are told: the tasks this state holds (paused,
# or being stopped), the memory they hold, when they will be preempted.
shown_tasks() {
	local id
	SHOWN_IDS=()
	case $STATE in
	sharing | starting) ;;
	preempting) SHOWN_IDS=("${PREEMPT_IDS[@]}") ;;
	*) for id in "${!C_TASK[@]}"; do SHOWN_IDS+=("$id"); done ;;
	esac
	TASKS='' JOBS='' PREEMPT_AT=0
	for id in "${SHOWN_IDS[@]}"; do TASKS+=${TASKS:+,}${C_TASK[$id]:-?} JOBS+=${JOBS:+,}${C_JOB[$id]:-?}; done
	case $STATE in
	preempting) PREEMPT_AT=$SINCE ;;
	paused | outside-hours) ((${#SHOWN_IDS[@]} == 0)) || PREEMPT_AT=$((SPELL_SINCE + AG[PREEMPT_S])) ;;
	esac
	return 0
}

# The wire line (docs/CONTRACT.md): one line, fields in this order.
report_line() {
	local state=$STATE
	[[ $state != starting ]] || state=sharing
	REPLY="gridx-agent 1 state=$state since=$SINCE reason=$REASON policy=${AG[SHARE]} hours=${AG[HOURS]:--}"
	REPLY+=" preempt_at=$PREEMPT_AT tasks=${TASKS:--} mem_mib=$MEM_MIB"
}

# send_report LINE: in the background, so that a hub that does not answer
# (or a SYN that nobody answers) never holds the agent up: reaped, or
# killed after REPORT_TIMEOUT_S, by reap_sender; a failed send is sent again
# at the next heartbeat, with the state of then.
REPORT_TIMEOUT_S=5 SENDER_PID='' SENDER_CS=0 SEND_FAILED=0
send_report() {
	reap_sender force
	(
		exec 3<>"/dev/tcp/${ST[HUB_VPN_IP]}/${AG[HUB_PORT]}" || exit 1
		printf '%s\n' "$1" >&3 || exit 1
		read -r -t "$REPORT_TIMEOUT_S" reply <&3 || exit 1
		[[ ${reply%$'\r'} == ok ]]
	) 2>/dev/null &
	last_job
	SENDER_PID=$REPLY SENDER_CS=$NOW_CS
}

reap_sender() { # [force]: a sender still running is killed
	[[ -n $SENDER_PID ]] || return 0
	if kill -0 "$SENDER_PID" 2>/dev/null; then
		if [[ ${1:-} != force ]] && ((NOW_CS - SENDER_CS < REPORT_TIMEOUT_S * 100)); then return 0; fi
		kill "$SENDER_PID" 2>/dev/null || true
	fi
	if wait "$SENDER_PID" 2>/dev/null; then
		HUB_OK_AT=$NOW
		((SEND_FAILED == 0)) || log "the hub at ${ST[HUB_VPN_IP]}:${AG[HUB_PORT]} answers again"
		SEND_FAILED=0
	else
		((SEND_FAILED++)) || log "no answer from the hub at ${ST[HUB_VPN_IP]}:${AG[HUB_PORT]}: sent again at the next heartbeat"
	fi
	SENDER_PID=''
}

# publish [wait]: status.env for status.sh, and the line for the hub; with
# wait, up to REPORT_TIMEOUT_S for the hub's answer (before a preemption).
publish() {
	local tries=0 id
	shown_tasks
	MEM_MIB=0
	for id in "${SHOWN_IDS[@]}"; do
		cgroup_mem_bytes "${C_MEMDIR[$id]:-/nonexistent}" || true
		MEM_MIB=$((MEM_MIB + REPLY / 1048576))
	done
	report_line
	SENT_KEY="$STATE $REASON $TASKS $PREEMPT_AT ${AG[SHARE]} ${AG[HOURS]} ${!READERS[*]}"
	send_report "$REPLY"
	write_status
	if [[ ${1:-} == wait ]]; then
		while kill -0 "$SENDER_PID" 2>/dev/null && ((tries++ < REPORT_TIMEOUT_S * 10)); do pause_s 0.1; done
		reap_sender force
	fi
}

# A change worth telling at once: state, reason, tasks, preemption time,
# policy (and, for status.sh, the input devices watched).
publish_if_changed() {
	shown_tasks
	[[ "$STATE $REASON $TASKS $PREEMPT_AT ${AG[SHARE]} ${AG[HOURS]} ${!READERS[*]}" == "$SENT_KEY" ]] || publish
}

write_status() {
	local key tmp=$AGENT_STATUS.tmp
	local -A out=([STATE]=$STATE [SINCE]=$SINCE [REASON]=$REASON [POLICY]=${AG[SHARE]} [HOURS]=${AG[HOURS]}
		[PREEMPT_AT]=$PREEMPT_AT [TASKS]=$TASKS [JOBS]=$JOBS [MEM_MIB]=$MEM_MIB [LAST_ACTIVE]=$LAST_ACTIVE
		[LAST_REASON]=$LAST_REASON [SPELL_SINCE]=$SPELL_SINCE [UPDATED]=$NOW [PID]=$$ [HUB_OK_AT]=$HUB_OK_AT
		[HUB]=${ST[HUB_VPN_IP]}:${AG[HUB_PORT]} [CPU_OUTSIDE_PCT]=$CPU_OUTSIDE_PCT [WATCHING]="${!READERS[*]}")
	{
		printf '# What the Grid-X owner-activity agent does now: written by agent.sh, read by status.sh.\n'
		for key in "${AGENT_STATUS_KEYS[@]}"; do
			shell_quote "${out[$key]}"
			printf '%s=%s\n' "$key" "$REPLY"
		done
	} >"$tmp" && mv -f -- "$tmp" "$AGENT_STATUS"
}

# What the last agent knew (its state, the owner's last activity) carries
# over a restart: a job paused before stays paused as long as it should.
restore_status() {
	local -A last=()
	[[ -f $AGENT_STATUS ]] || return 0
	(read_values "$AGENT_STATUS" last) >/dev/null 2>&1 || return 0
	read_values "$AGENT_STATUS" last
	[[ ${last[LAST_ACTIVE]:-} =~ ^[0-9]{1,12}$ ]] && LAST_ACTIVE=${last[LAST_ACTIVE]} LAST_REASON=${last[LAST_REASON]:--}
	[[ $LAST_REASON =~ ^(input|terminal|logind|cpu|gpu)$ ]] || LAST_REASON=-
	case ${last[STATE]:-} in
	paused | outside-hours | preempting)
		[[ ${last[SPELL_SINCE]:-} =~ ^[1-9][0-9]{0,11}$ ]] && SPELL_SINCE=${last[SPELL_SINCE]}
		;;
	esac
	return 0
}

# ----------------------------------------------------------------- the loop ----

STOPPING=0 RELOAD=0 EVENTS_PID=''

# Settings into numbers the loop uses. WATCH_OWNER: 0 when the policy
# never pauses for the owner (always, at any hour): nothing is measured then
# (outside the hours, the clock alone pauses).
apply_settings() {
	WATCH_OWNER=1
	[[ ${AG[SHARE]} == idle ]] || WATCH_OWNER=0
	FAST_CS=$((AG[CPU_PERIOD_MS] / 10))
}

reload() {
	RELOAD=0
	if (load_agent_settings) 2>/dev/null; then
		load_agent_settings
		apply_settings
		log "settings read again: share ${AG[SHARE]}${AG[HOURS]:+, hours ${AG[HOURS]}}, idle ${AG[IDLE_S]} s, preempt ${AG[PREEMPT_S]} s"
		watch_inputs
		SENT_KEY='' # the hub and status.sh hear of it at once
	else
		log "agent.env is not valid: the settings stay as they were"
	fi
}

# every NAME PERIOD_CS: due now (and the next time set)?
declare -A NEXT=()
every() {
	[[ -v NEXT[$1] ]] && ((NOW_CS < NEXT[$1])) && return 1
	NEXT[$1]=$((NOW_CS + $2))
}

# How often the loop looks: CPU_PERIOD_MS while Grid-X's containers run
# here and the owner is watched (2 s to pause them); once a second otherwise
# (nothing to pause, or all paused already: the owner's CPU keeps them so,
# or goes; the hub hears of an owner within about a second all the same);
# every 5 s when nothing is measured (share always: only the hours, docker
# events and the heartbeat matter, and docker events wake it at once).
SLOW_CS=100 IDLE_CS=500
loop() {
	local line wait_cs wait_s period
	while ((!STOPPING)); do
		period=$IDLE_CS
		if ((WATCH_OWNER)); then
			period=$SLOW_CS
			[[ $STATE != sharing || ${#C_TASK[@]} == 0 ]] || period=$FAST_CS
		fi
		now_cs
		wait_cs=$((${NEXT[cpu]:-0} - REPLY))
		((wait_cs > 0)) || wait_cs=1
		((wait_cs <= period)) || wait_cs=$period
		printf -v wait_s '%d.%02d' $((wait_cs / 100)) $((wait_cs % 100))
		if read -r -t "$wait_s" -u "$EV_FD" line; then
			case $line in
			input\ *) note_activity input ;;
			wake) ;; # a signal to take now (agent_wake)
			*) CONTAINERS_DIRTY=1 ;;
			esac
		fi
		((RELOAD == 0)) || reload
		now_cs
		NOW_CS=$REPLY
		epoch
		NOW=$REPLY
		# docker events said something changed: a new task is paused at once
		# when the owner is here
		((CONTAINERS_DIRTY == 0)) || refresh_containers || true
		if every cpu "$period"; then
			((WATCH_OWNER == 0)) || cpu_sample
		fi
		if ((WATCH_OWNER)); then
			if every tty $((AG[TTY_POLL_S] * 100)); then tty_poll; fi
			if ((HAVE_LOGINCTL)) && every logind $((AG[LOGIND_POLL_S] * 100)); then logind_poll; fi
			if ((HAVE_NVIDIA_SMI)) && every gpu $((AG[GPU_POLL_S] * 100)); then gpu_poll; fi
		fi
		if every inputs 1000; then
			watch_inputs
			watch_docker
		fi
		act
		reap_sender
		# docker events says what changes; docker ps once in 5 min in case it
		# missed something (it costs more than the rest of a minute's work).
		if every reconcile 30000; then refresh_containers || true; fi
		if every heartbeat $((AG[HEARTBEAT_S] * 100)); then
			publish
		else
			publish_if_changed
		fi
	done
}

# The end (SIGTERM: leave.sh, systemctl stop, the supervisor): nothing stays
# paused; the readers and the events stream end with it.
shutdown() {
	local dev
	log "stopping: unpausing Grid-X's containers"
	unpause_grid_tasks >/dev/null 2>&1 || log "could not unpause (Docker does not answer)"
	STATE=stopped
	shown_tasks
	write_status
	for dev in "${!READERS[@]}"; do kill "${READERS[$dev]}" 2>/dev/null; done
	[[ -z $EVENTS_PID ]] || kill "$EVENTS_PID" 2>/dev/null
	[[ -z $SENDER_PID ]] || kill "$SENDER_PID" 2>/dev/null
	# In a session of its own (systemd's, or the supervisor's setsid), what
	# the readers started (dd, docker events) goes too.
	session_of $$
	[[ $REPLY != "$$" ]] || kill_session $$
	log "stopped"
}

# ---------------------------------------------------------------- commands ----

need_root_here() {
	[[ $EUID -eq 0 ]] || fatal 3 "agent.sh $1 runs as root (it is a service: join.sh starts it)" "sudo $GRIDX_BUNDLE_DIR/agent.sh $1"
}

# The record of the join and the agent's files: root's, and there.
load_joined() {
	init_paths
	find_legacy_state
	state_exists || fatal 3 "this machine has not joined Grid-X (no $STATE_FILE)" "join first: sudo ./join.sh"
	load_state
	[[ -v ST[AGENT_DIR] ]] || fatal 3 "the owner-activity agent is not installed here (this machine joined with a bundle without it)" "leave and join again with a fresh bundle: sudo ./leave.sh && sudo ./join.sh"
	load_agent_settings
}

cmd_run() {
	local lock
	need_root_here run
	load_joined
	is_ipv4 "${ST[HUB_VPN_IP]:-}" || fatal 3 "$STATE_FILE has no HUB_VPN_IP"
	need_cmd docker dd od stat
	exec {lock}>>"$AGENT_DIR/agent.lock"
	if have_cmd flock && ! flock -n "$lock"; then fatal 3 "another agent runs already (it holds $AGENT_DIR/agent.lock)"; fi
	set +e # a service: a command that fails is logged, and the loop goes on
	apply_settings
	[[ -p $AGENT_FIFO ]] || { rm -f -- "$AGENT_FIFO" && mkfifo -m 0600 -- "$AGENT_FIFO"; } || fatal 1 "cannot make $AGENT_FIFO"
	exec {EV_FD}<>"$AGENT_FIFO"
	exec {SLEEP_FD}<> <(:)
	event_layout
	CLK_TCK=$(getconf CLK_TCK 2>/dev/null) || CLK_TCK=100
	[[ $CLK_TCK =~ ^[1-9][0-9]*$ ]] || CLK_TCK=100
	cgroup_mounts "$PROC/self/mountinfo"
	cpu_total_source
	HAVE_LOGINCTL=0 HAVE_NVIDIA_SMI=0
	if have_cmd loginctl && [[ -d $SYSTEMD_RUN_DIR ]]; then HAVE_LOGINCTL=1; fi
	if have_cmd nvidia-smi; then HAVE_NVIDIA_SMI=1; fi
	restore_status
	trap 'STOPPING=1' TERM INT
	# SIGUSR1, not SIGHUP: the supervisor ignores SIGHUP (a closing terminal's),
	# and a signal ignored when a shell starts cannot be trapped in it.
	trap 'RELOAD=1' USR1
	now_cs
	NOW_CS=$REPLY
	epoch
	NOW=$REPLY
	SINCE=$NOW
	log "started (pid $$): share ${AG[SHARE]}${AG[HOURS]:+ within ${AG[HOURS]}}, idle ${AG[IDLE_S]} s, preempt after ${AG[PREEMPT_S]} s, grace ${AG[GRACE_S]} s; CPU from $CPU_TOTAL; logind $HAVE_LOGINCTL, nvidia-smi $HAVE_NVIDIA_SMI; reports to ${ST[HUB_VPN_IP]}:${AG[HUB_PORT]}"
	watch_docker
	watch_inputs
	refresh_containers
	tty_poll
	loop
	shutdown
}

# supervise: the agent, started again when it ends (after 1 s, doubling up
# to 60 s while it keeps failing); SIGTERM stops both.
cmd_supervise() {
	local rc started backoff=1 tries
	need_root_here supervise
	init_paths
	[[ -d $AGENT_DIR ]] || fatal 3 "$AGENT_DIR is missing: the agent is not installed"
	if agent_pid_of "$AGENT_PIDFILE" supervise && [[ $REPLY != "$$" ]]; then
		info "the agent's supervisor runs already (pid $REPLY)"
		return 0
	fi
	printf '%s\n' "$$" | atomic_write "$AGENT_PIDFILE" 0600
	SUP_STOP=0 CHILD=''
	trap 'SUP_STOP=1; [[ -z $CHILD ]] || kill -TERM "$CHILD" 2>/dev/null' TERM INT
	trap '' HUP
	set +e
	exec {SLEEP_FD}<> <(:)
	while ((!SUP_STOP)); do
		rotate_log
		now_cs
		started=$REPLY
		setsid bash "$AGENT_DIR/agent.sh" run </dev/null >>"$AGENT_LOG" 2>&1 &
		last_job
		CHILD=$REPLY
		tries=0
		while kill -0 "$CHILD" 2>/dev/null; do
			wait "$CHILD"
			rc=$?
			if ((SUP_STOP)) && kill -0 "$CHILD" 2>/dev/null; then
				((tries++ < 300)) || kill -KILL "$CHILD" 2>/dev/null
				pause_s 0.1
			fi
		done
		kill_session "$CHILD"
		CHILD=''
		((SUP_STOP == 0)) || break
		now_cs
		((REPLY - started < 6000)) || backoff=1
		printf '%(%F %T)T supervisor: the agent ended (exit %s); starting it again in %s s\n' -1 "$rc" "$backoff" >>"$AGENT_LOG"
		for ((tries = 0; tries < backoff * 10 && !SUP_STOP; tries++)); do pause_s 0.1; done
		backoff=$((backoff * 2 > 60 ? 60 : backoff * 2))
	done
	if agent_pid_of "$AGENT_PIDFILE" supervise && [[ $REPLY == "$$" ]]; then rm -f -- "$AGENT_PIDFILE"; fi
}

# agent.log stays small: one older copy, rotated at 1 MiB when the agent starts.
rotate_log() {
	local size
	[[ -f $AGENT_LOG ]] || return 0
	size=$(stat -c %s -- "$AGENT_LOG" 2>/dev/null) || return 0
	((size < 1048576)) || mv -f -- "$AGENT_LOG" "$AGENT_LOG.1"
}

cmd_start() {
	ensure_root "starts the owner-activity agent" start "$@"
	load_joined
	if [[ -v ST[AGENT_UNIT] ]]; then
		cmd systemctl start "$AGENT_UNIT_NAME"
	else
		if agent_pid_of "$AGENT_PIDFILE" supervise; then
			info "the agent runs already (supervisor pid $REPLY)"
			return 0
		fi
		agent_launch || fatal 1 "the agent's supervisor did not start" "look at $AGENT_LOG"
	fi
	ok "the owner-activity agent runs"
}

# policy flags -> CHANGES (KEY=VALUE), each checked before anything else.
declare -A CHANGES=()
parse_policy() {
	local opt value key
	while (($#)); do
		opt=$1
		if [[ $opt == --*=* ]]; then
			value=${opt#*=} opt=${opt%%=*}
			shift
			set -- "$opt" "$value" "$@"
		fi
		case $opt in
		-h | --help)
			usage
			exit 0
			;;
		--share | --hours | --idle-time | --preempt-time | --grace | --cpu-busy | --input-devices)
			if (($# < 2)) || [[ $2 == --* ]]; then fatal 2 "$opt needs a value" "see $GRIDX_PROG --help"; fi
			value=$2
			shift 2
			;;
		*) fatal 2 "unknown option '$opt'" "see $GRIDX_PROG --help" ;;
		esac
		case $opt in
		--share) key=SHARE ;;
		--hours)
			key=HOURS
			[[ $value != any ]] || value=''
			[[ -z $value ]] || is_hours "$value" || fatal 2 "--hours '$value' is not HH:MM-HH:MM" "e.g. --hours 22:00-08:00 (local time; may cross midnight), or --hours any"
			;;
		--idle-time | --preempt-time | --grace)
			seconds_value "$value" || fatal 2 "$opt '$value' is not a time" "e.g. $opt 90, $opt 5m, $opt 1h"
			value=$REPLY
			case $opt in --idle-time) key=IDLE_S ;; --preempt-time) key=PREEMPT_S ;; --grace) key=GRACE_S ;; esac
			;;
		--cpu-busy)
			key=CPU_BUSY_PCT
			value=${value%\%}
			;;
		--input-devices) key=INPUT_DEVICES ;;
		esac
		REPLY=''
		check_agent_value "$key" "$value" || fatal 2 "$opt '${2:-$value}': must be $REPLY" "see $GRIDX_PROG --help"
		CHANGES[$key]=$value
	done
}

cmd_policy() {
	local key changed=0 pid
	parse_policy "$@"
	ensure_root "reads and changes the owner-activity agent's settings" policy "$@"
	load_joined
	for key in "${!CHANGES[@]}"; do
		[[ ${AG[$key]} == "${CHANGES[$key]}" ]] && continue
		AG[$key]=${CHANGES[$key]}
		changed=1
	done
	if ((changed)); then
		printf '[#] write %s\n' "$AGENT_ENV" >&2
		write_agent_settings
		read_agent_status
		pid=${ASTAT[PID]:-}
		if agent_pid_is "$pid" run; then
			kill -USR1 "$pid"
			agent_wake
			ok "the agent follows the new policy now"
		else
			warn "the agent is not running: the policy holds once it starts (sudo $AGENT_DIR/agent.sh start)"
		fi
	fi
	agent_policy_text
	printf '%s\n' "$REPLY"
}

cmd_status() {
	local json=0
	while (($#)); do
		case $1 in
		--json) json=1 ;;
		-h | --help)
			usage
			exit 0
			;;
		*) fatal 2 "unknown option '$1'" "see $GRIDX_PROG --help" ;;
		esac
		shift
	done
	ensure_root "reads the owner-activity agent's state" status "$@"
	load_joined
	read_agent_status
	if ((json)); then
		agent_json
		printf '%s\n' "$REPLY"
	else
		agent_human
	fi
	agent_running || {
		warn "the owner-activity agent is not running (start it: sudo $AGENT_DIR/agent.sh start)"
		exit 1
	}
}

main() {
	local command=${1:-}
	(($#)) && shift
	case $command in
	run) cmd_run "$@" ;;
	supervise) cmd_supervise "$@" ;;
	start) cmd_start "$@" ;;
	policy) cmd_policy "$@" ;;
	status) cmd_status "$@" ;;
	-h | --help) usage ;;
	'') fatal 2 "agent.sh needs a command: policy, status or start" "see $GRIDX_PROG --help" ;;
	*) fatal 2 "unknown command '$command'" "see $GRIDX_PROG --help" ;;
	esac
}

# Sourced by the unit tests for its functions; run, it runs main.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
