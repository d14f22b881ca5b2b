"""The owner-activity agent (bundle_templates/agent.sh, and its part of
lib.sh, join.sh, leave.sh and status.sh).

Two halves:
- each source and rule as a bash function, sourced from agent.sh and fed the
  samples of tests/data/agent/ (README there: which are recorded, which
  composed);
- the agent running for real, installed by join.sh from a bundle with fake
  system commands (worker_machine.Lab): a fake engine whose containers
  are files, fake cgroup folders whose CPU counters the test moves, a FIFO
  as an input device, and a TCP receiver on 127.0.0.1 standing in for the
  hub (the wire line of docs/CONTRACT.md "Owner-activity reports").
"""

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time

import pytest
import worker_machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(ROOT, "bundle_templates")
AGENT = os.path.join(TEMPLATES, "agent.sh")
DATA = os.path.join(ROOT, "tests", "data", "agent")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the scripts re-run themselves under sudo when not root")

# The wire line, field by field (docs/CONTRACT.md).
LINE = re.compile(
    r"^gridx-agent 1 state=(sharing|paused|outside-hours|preempting) since=(\d+) "
    r"reason=(-|input|terminal|logind|cpu|gpu|hours) policy=(idle|always) hours=(-|\d\d:\d\d-\d\d:\d\d) "
    r"preempt_at=(\d+) tasks=(-|[0-9a-z]+(?:,[0-9a-z]+)*) mem_mib=(\d+)$"
)


def data(name):
    return os.path.join(DATA, name)


def sh(script, env=None, ok=True):
    """bash with agent.sh sourced (its functions; main does not run), then
    SCRIPT; its stdout."""
    full = "set -u\n. %s\nset +e\n%s\n" % (shlex.quote(AGENT), script)
    r = subprocess.run(["bash", "-c", full], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, NO_COLOR="1", **(env or {})))
    if ok:
        assert r.returncode == 0, r.stderr
    return r.stdout


# ------------------------------------------------------------------ lint ----


# shellcheck -S style of agent.sh (and lib.sh, which it sources) is `make
# lint`'s, which CI runs before the tests.


def test_strict_documented_and_executable():
    text = open(AGENT).read()
    assert text.split("\n")[2].startswith("# agent.sh - ")
    assert "set -euo pipefail" in text and "export LC_ALL=C" in text
    assert os.stat(AGENT).st_mode & stat.S_IXUSR
    # sourced by these tests: main runs only when it is run
    assert text.rstrip().endswith('if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi')


def test_the_port_is_the_one_gridx_names():
    """lib.sh's default report port says it is gridx.py's AGENT_PORT (the hub
    listens there), which bundles carry as GRIDX_AGENT_PORT."""
    import gridx

    lib = open(os.path.join(TEMPLATES, "lib.sh")).read()
    m = re.search(r"# Same as gridx.py's AGENT_PORT[^\n]*\n(?:#[^\n]*\n)*AGENT_PORT_DEFAULT=(\d+)", lib)
    assert m, "lib.sh must say its port is gridx.py's AGENT_PORT"
    assert int(m.group(1)) == gridx.AGENT_PORT == int(gridx.worker_settings(
        "w", "gridx0", "10.0.0.2", "10.0.0.1", "h:1", "10.0.0.0/24", "10.0.0.1:2377", False)["GRIDX_AGENT_PORT"])


# ----------------------------------------------------------- source: cpu ----


def proc_stat_busy_ns(path):
    fields = open(path).readline().split()
    assert fields[0] == "cpu"
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) * 10_000_000  # USER_HZ 100


def test_proc_stat_busy_from_recorded_snapshots():
    out = sh("CLK_TCK=100\nfor f in %s %s; do proc_stat_busy $f; echo $REPLY; done"
             % (data("proc_stat_1"), data("proc_stat_2"))).split()
    assert [int(x) for x in out] == [proc_stat_busy_ns(data("proc_stat_1")), proc_stat_busy_ns(data("proc_stat_2"))]
    # recorded 1 s apart on 2 cores: the machine was busy for at most 2 s of CPU
    assert 0 < int(out[1]) - int(out[0]) <= 2_200_000_000


def test_proc_stat_that_is_not_one_is_refused(tmp_path):
    (tmp_path / "stat").write_text("intr 1 2 3\n")
    assert sh("CLK_TCK=100; proc_stat_busy %s && echo yes || echo no" % (tmp_path / "stat")).strip() == "no"


CONTAINER = "24f582ad67ddf830ee19fd3480d9afd351e32b8928c3194c6ab36bdfdbf5a14d"
NODE = "70f0464c4c1cb65a1f4a9daae3af237fe34f5819e53de037fb5ab7bd5432e5ab"
V2_SCOPE = "/system.slice/docker-4f3c2a1b9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b.scope"


@pytest.mark.parametrize("mountinfo, cgroup, controller, want_dir, want_path", [
    # a lab worker: the mount shows the worker's own cgroup as its root, and
    # /proc/PID/cgroup the full path: the folder is the mount plus the rest
    ("mountinfo_v1_docker_in_docker", "cgroup_v1_docker_in_docker", "cpuacct",
     "/sys/fs/cgroup/cpuacct/docker/" + CONTAINER, "/docker/%s/docker/%s" % (NODE, CONTAINER)),
    ("mountinfo_v1_docker_in_docker", "cgroup_v1_docker_in_docker", "memory",
     "/sys/fs/cgroup/memory/docker/" + CONTAINER, "/docker/%s/docker/%s" % (NODE, CONTAINER)),
    # a machine with v1 controllers and the unified tree: the v1 controller wins
    ("mountinfo_hybrid_host", "cgroup_hybrid_host", "cpuacct", "/sys/fs/cgroup/cpuacct", "/"),
    # cgroup v2 only: the one tree, for CPU and memory alike
    ("mountinfo_v2_host", "cgroup_v2_docker", "cpuacct", "/sys/fs/cgroup" + V2_SCOPE, V2_SCOPE),
    ("mountinfo_v2_host", "cgroup_v2_docker", "memory", "/sys/fs/cgroup" + V2_SCOPE, V2_SCOPE),
])
def test_cgroup_folders_from_recorded_mounts(mountinfo, cgroup, controller, want_dir, want_path):
    out = sh("cgroup_mounts %s; cgroup_of %s %s || echo FAILED; echo \"$CG_DIR\"; echo \"$CG_PATH\""
             % (data(mountinfo), data(cgroup), controller))
    assert out.split("\n")[:2] == [want_dir, want_path]


def test_a_cgroup_outside_this_machines_view_is_none(tmp_path):
    """A process whose cgroup lies outside the mount's root (another
    container's, seen from a lab worker) has no folder here."""
    (tmp_path / "cgroup").write_text("2:cpuacct:/docker/somebody-else/docker/x\n")
    out = sh("cgroup_mounts %s; cgroup_of %s cpuacct && echo yes || echo no"
             % (data("mountinfo_v1_docker_in_docker"), tmp_path / "cgroup"))
    assert out.strip() == "no"


def test_cgroup_counters_v1_and_v2(tmp_path):
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir()
    v2.mkdir()
    (v1 / "cpuacct.usage").write_text("123456789\n")
    (v1 / "memory.usage_in_bytes").write_text("%d\n" % (300 * 1048576))
    (v2 / "cpu.stat").write_text("usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n")
    (v2 / "memory.current").write_text("%d\n" % (64 * 1048576))
    out = sh("for d in %s %s %s; do cgroup_cpu_ns $d && echo $REPLY || echo none; cgroup_mem_bytes $d; echo $REPLY;"
             " done" % (v1, v2, tmp_path / "gone")).split()
    assert out == ["123456789", str(300 * 1048576), "2500000", str(64 * 1048576), "none", "0"]


def test_the_machines_cpu_is_read_from_its_cgroup_root_else_proc_stat(tmp_path):
    """In a container /proc/stat is the whole host's: the root of the cgroup
    tree this machine sees is its own."""
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cpuacct.usage").write_text("42\n")
    mounts = tmp_path / "mountinfo"
    mounts.write_text("33 31 0:30 / %s rw,relatime - cgroup cgroup rw,cpuacct\n" % root)
    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cpu.stat").write_text("usage_usec 7\n")
    mounts2 = tmp_path / "mountinfo2"
    mounts2.write_text("35 24 0:30 / %s rw shared:9 - cgroup2 cgroup2 rw\n" % v2)
    none = tmp_path / "mountinfo3"
    none.write_text("24 1 259:2 / / rw - ext4 /dev/sda1 rw\n")
    out = sh("PROC=/proc\nfor m in %s %s %s; do cgroup_mounts $m; cpu_total_source; echo $CPU_TOTAL; done"
             % (mounts, mounts2, none)).split()
    assert out == [str(root), str(v2), "/proc/stat"]


def test_outside_share_of_a_core():
    out = sh("outside_pct 1000000000 250000000 100; echo $REPLY; outside_pct 100 900 100; echo $REPLY;"
             "outside_pct 1 1 0 && echo yes || echo no").split()
    assert out == ["75", "0", "no"]


def cpu_sampling(tmp_path, steps, busy_pct=25, busy_ms=500):
    """Run cpu_sample over STEPS: (root ns added, container ns added,
    centiseconds passed); print LAST_ACTIVE and CPU_OUTSIDE_PCT after each."""
    root, cont = tmp_path / "root", tmp_path / "cont"
    root.mkdir()
    cont.mkdir()
    (root / "cpuacct.usage").write_text("0\n")
    (cont / "cpuacct.usage").write_text("0\n")
    script = ["CLK_TCK=100; CPU_TOTAL=%s; CONTAINERS_CHANGED=0; NOW_CS=1000; NOW=5000" % root,
              "declare -A AG=([CPU_BUSY_PCT]=%d [CPU_BUSY_MS]=%d)" % (busy_pct, busy_ms),
              "C_TASK[c1]=t1; C_CPUDIR[c1]=%s" % cont,
              "r=0 c=0; cpu_sample"]
    for add_root, add_cont, cs in steps:
        script.append("r=$((r + %d)) c=$((c + %d)); echo $r > %s/cpuacct.usage; echo $c > %s/cpuacct.usage"
                      % (add_root, add_cont, root, cont))
        script.append("NOW_CS=$((NOW_CS + %d)) NOW=$((NOW + 1)); cpu_sample; echo $LAST_ACTIVE $CPU_OUTSIDE_PCT"
                      % cs)
    return [tuple(map(int, line.split())) for line in sh("\n".join(script)).split("\n") if line]


def test_cpu_busy_counts_once_held_for_the_hold_time(tmp_path):
    q = 250_000_000  # a quarter of a second of one core
    # the owner's program at 40 % of a core: not yet after one 250 ms sample,
    # counted after two (500 ms held), at that sample's time
    out = cpu_sampling(tmp_path, [(q * 40 // 100, 0, 25), (q * 40 // 100, 0, 25), (q * 40 // 100, 0, 25)])
    assert [o[0] for o in out] == [0, 5002, 5003]
    assert all(35 <= o[1] <= 40 for o in out), out


def test_cpu_a_lone_spike_and_grid_x_own_use_do_not_count(tmp_path):
    q = 250_000_000
    out = cpu_sampling(tmp_path, [
        (q, 0, 25),           # a spike: one sample at 100 %
        (0, 0, 25),           # gone
        (q, q, 25),           # Grid-X's job at a full core: all its own
        (q, q, 25),
        (q * 20 // 100, 0, 25), (q * 20 // 100, 0, 25), (q * 20 // 100, 0, 25),  # 20 %: below 25
    ])
    assert [o[0] for o in out] == [0] * 7, out


def test_cpu_a_sample_across_a_change_of_containers_is_skipped(tmp_path):
    """A container first seen during a sample has used CPU before: that is
    not the owner's, so the sample is not judged."""
    q = 250_000_000
    out = cpu_sampling(tmp_path, [(q, 0, 25)], busy_ms=0)
    assert out[0][0] == 5001  # busy_ms 0: one busy sample counts
    root = tmp_path / "skip"
    root.mkdir()
    (root / "cpuacct.usage").write_text("0\n")
    script = ("CLK_TCK=100; CPU_TOTAL=%s; NOW_CS=1000; NOW=5000\n"
              "declare -A AG=([CPU_BUSY_PCT]=25 [CPU_BUSY_MS]=0)\n"
              "cpu_sample; echo 1000000000 > %s/cpuacct.usage; CONTAINERS_CHANGED=1; NOW_CS=1025 NOW=5001; cpu_sample\n"
              "echo $LAST_ACTIVE") % (root, root)
    assert sh(script).strip() == "0"


# --------------------------------------------------------- source: input ----


def test_input_devices_a_person_moves():
    out = sh("input_devices %s; echo ${INPUT_DEVS[*]}; echo $INPUT_PERSON;"
             "input_devices %s; echo ${INPUT_DEVS[*]}; echo $INPUT_PERSON"
             % (data("input_devices_laptop"), data("input_devices_server"))).split("\n")
    # keyboard, touchpad, USB mouse, and the power button (pressed by a person);
    # not the lid switch, the accelerometer, the PC speaker, the headphone jack
    assert out[0].split() == ["event0", "event3", "event5", "event7"]
    assert out[1] == "1"
    assert out[2].split() == ["event0"] and out[3] == "0"


@pytest.mark.parametrize("sample, person", [
    ("events_key_a.bin", True), ("events_mouse_move.bin", True), ("events_touchpad.bin", True),
    ("events_led_only.bin", False),
])
def test_owner_events_from_event_bytes(sample, person):
    out = sh("words=$(od -An -v -tu2 -w24 < %s); owner_events \"$words\" 8 && echo yes || echo no" % data(sample))
    assert out.strip() == ("yes" if person else "no")


def test_input_reader_wakes_the_loop_on_a_persons_events_only(tmp_path):
    dev, out = tmp_path / "event3", tmp_path / "loop"
    script = """
mkfifo %(dev)s %(out)s
exec {EV_FD}<>%(out)s
exec {SLEEP_FD}<> <(:)
EVENT_BYTES=24 EVENT_TYPE_WORD=8
input_reader %(dev)s &
reader=$!
sleep 0.3
cat %(led)s > %(dev)s
read -r -t 1 -u $EV_FD line && echo "after led: $line" || echo "after led: nothing"
cat %(key)s > %(dev)s
read -r -t 3 -u $EV_FD line && echo "after key: $line" || echo "after key: nothing"
kill $reader
""" % {"dev": dev, "out": out, "led": data("events_led_only.bin"), "key": data("events_key_a.bin")}
    assert sh(script).split("\n")[:2] == ["after led: nothing", "after key: input %s" % dev]


# -------------------------------------------------- source: logind, terminal ----


def test_logind_says_when_a_user_came_back():
    out = sh("logind_since \"$(cat %s)\"; echo $REPLY; logind_since ''; echo $REPLY" % data("loginctl_show_sessions"))
    assert out.split() == ["1796660000", "0"]


def test_terminals_newest_access_time(tmp_path):
    dev = tmp_path / "dev"
    (dev / "pts").mkdir(parents=True)
    for name, atime in [("tty1", 1000), ("tty7", 1500), ("pts/0", 2000), ("pts/ptmx", 9000), ("ttyS0", 9999)]:
        (dev / name).touch()
        os.utime(dev / name, (atime, atime))
    out = sh("NOW=3000; tty_poll; echo $LAST_ACTIVE $LAST_REASON", env={"GRIDX_DEV_DIR": str(dev)})
    # consoles and pseudo-terminals; not ptmx, not a serial line
    assert out.split() == ["2000", "terminal"]


# ----------------------------------------------------------- source: gpu ----

GPU_A = "GPU-5f1b0c4e-6a3a-11ee-8c99-0242ac120002"
GPU_B = "GPU-9d2e4b7a-1c3f-4e5d-8a6b-7c8d9e0f1a2b"


@pytest.mark.parametrize("shared, conflict", [(GPU_A, "c1"), (GPU_B, ""), ("", "")])
def test_gpu_apps_matched_to_grid_x_containers(tmp_path, shared, conflict):
    """4242 runs in a Grid-X container on GPU A; 5151 (GPU A) and 6161 (GPU
    B) are the owner's. The owner computes on both GPUs; a conflict is a
    Grid-X container on a shared GPU where the owner computes too."""
    proc = tmp_path / "proc"
    for pid, cgroup in [(4242, data("cgroup_v2_docker")), (5151, data("cgroup_v2_owner")),
                        (6161, data("cgroup_v2_owner"))]:
        (proc / str(pid)).mkdir(parents=True)
        shutil.copy(cgroup, proc / str(pid) / "cgroup")
    script = ("cgroup_mounts %s\ndeclare -A ST=([SHARED_GPU_IDS]=%s)\nC_CGPATH[c1]=%s\n"
              "gpu_scan \"$(cat %s)\"\necho \"${!GPU_OUTSIDE[*]}\"\necho \"${GPU_CONFLICT[*]}\"") % (
        data("mountinfo_v2_host"), shlex.quote(shared), V2_SCOPE, data("nvidia_smi_compute_apps"))
    out = sh(script, env={"GRIDX_PROC_DIR": str(proc)}).split("\n")
    assert sorted(out[0].split()) == sorted([GPU_A, GPU_B])
    assert out[1] == conflict


def test_gpu_no_apps_no_activity():
    out = sh("gpu_scan ''; echo ${#GPU_OUTSIDE[@]} ${#GPU_CONFLICT[@]}")
    assert out.split() == ["0", "0"]


# ------------------------------------------------------------ the policy ----


@pytest.mark.parametrize("hours, ok", [
    ("22:00-08:00", True), ("08:00-17:30", True), ("00:00-23:59", True),
    ("24:00-08:00", False), ("8:00-17:00", False), ("08:00-08:00", False), ("08:60-09:00", False),
    ("08:00", False), ("-08:00-09:00", False), ("08:00-09:00 ", False), ("$(reboot)", False),
])
def test_hours_format(hours, ok):
    assert sh("is_hours %s && echo yes || echo no" % shlex.quote(hours)).strip() == ("yes" if ok else "no")


@pytest.mark.parametrize("hours, minute, inside", [
    ("22:00-08:00", 23 * 60, True), ("22:00-08:00", 3 * 60, True), ("22:00-08:00", 8 * 60, False),
    ("22:00-08:00", 12 * 60, False), ("22:00-08:00", 22 * 60, True),
    ("08:00-17:00", 8 * 60, True), ("08:00-17:00", 17 * 60, False), ("08:00-17:00", 23 * 60, False),
])
def test_hours_window(hours, minute, inside):
    assert sh("in_hours %s %d && echo yes || echo no" % (hours, minute)).strip() == ("yes" if inside else "no")


@pytest.mark.parametrize("value, seconds", [("90", 90), ("90s", 90), ("5m", 300), ("2h", 7200), ("5x", None),
                                            ("-5", None), ("", None), ("1.5m", None)])
def test_times_for_the_policy(value, seconds):
    out = sh("seconds_value %s && echo $REPLY || echo bad" % shlex.quote(value)).strip()
    assert out == (str(seconds) if seconds is not None else "bad")


def window_without_now():
    """An hours window that the present minute lies outside (and 2 minutes
    either way, so the test does not race the clock)."""
    now = time.localtime()
    start = (now.tm_hour * 60 + now.tm_min + 3) % 1440
    end = (start + 60) % 1440
    return "%02d:%02d-%02d:%02d" % (start // 60, start % 60, end // 60, end % 60)


@pytest.mark.parametrize("share, hours, last_active_ago, want", [
    ("idle", "", 10, "paused input"),        # active 10 s ago, idle time 300 s
    ("idle", "", 400, "sharing -"),          # away long enough
    ("idle", "", None, "sharing -"),         # never seen
    ("always", "", 1, "sharing -"),          # always: the owner never pauses it
    ("always", "outside", None, "outside-hours hours"),
    ("idle", "outside", 1, "outside-hours hours"),
])
def test_decide(share, hours, last_active_ago, want):
    hours = window_without_now() if hours == "outside" else hours
    last = "0" if last_active_ago is None else "$((NOW - %d))" % last_active_ago
    out = sh("epoch; NOW=$REPLY; declare -A AG=([SHARE]=%s [HOURS]=%s [IDLE_S]=300)\nLAST_ACTIVE=%s LAST_REASON=input\n"
             "decide; echo $WANT $WANT_REASON" % (share, shlex.quote(hours), last))
    assert out.strip() == want


def test_report_line_is_the_contracts():
    out = sh("""declare -A AG=([SHARE]=idle [HOURS]=22:00-08:00 [PREEMPT_S]=600)
STATE=paused SINCE=1796667606 REASON=cpu SPELL_SINCE=1796667606 PREEMPT_IDS=()
C_TASK[a]=qqaung6ee9bsx6c7wxjogciwa C_JOB[a]=train C_TASK[b]=kyaibacx5jy7ildfxcgn7tnnh C_JOB[b]=cnt
shown_tasks; MEM_MIB=812; report_line; echo "$REPLY"
STATE=sharing REASON=-; shown_tasks; MEM_MIB=0; AG[HOURS]=''; report_line; echo "$REPLY"
""")
    paused, sharing = out.strip().split("\n")
    m = LINE.match(paused)
    assert m, paused
    assert m.group(1, 2, 3, 4, 5, 6, 8) == ("paused", "1796667606", "cpu", "idle", "22:00-08:00", "1796668206", "812")
    assert sorted(m.group(7).split(",")) == ["kyaibacx5jy7ildfxcgn7tnnh", "qqaung6ee9bsx6c7wxjogciwa"]
    assert sharing == "gridx-agent 1 state=sharing since=1796667606 reason=- policy=idle hours=- preempt_at=0 " \
                      "tasks=- mem_mib=0"


@pytest.mark.parametrize("devices, cpuinfo, want", [
    ("input_devices_laptop", "flags\t\t: fpu vme de pse sse2", "idle"),
    ("input_devices_laptop", "flags\t\t: fpu vme hypervisor sse2", "always"),   # a VM's emulated keyboard
    ("input_devices_server", "flags\t\t: fpu vme de pse sse2", "always"),
    (None, "flags\t\t: fpu", "always"),                                          # no input devices at all
])
def test_default_share(tmp_path, devices, cpuinfo, want):
    proc = tmp_path / "proc"
    (proc / "bus" / "input").mkdir(parents=True)
    if devices:
        shutil.copy(data(devices), proc / "bus" / "input" / "devices")
    (proc / "cpuinfo").write_text("processor\t: 0\n%s\n\n" % cpuinfo)
    out = sh("init_paths; default_share; echo $REPLY", env={
        "GRIDX_PROC_DIR": str(proc), "GRIDX_SYSTEMD_RUN_DIR": str(tmp_path / "none"),
        "GRIDX_STATE_DIR": str(tmp_path / "state")})
    assert out.strip() == want


def test_a_desktop_session_on_this_screen():
    out = sh("desktop_session $'Type=wayland\\nRemote=no' && echo a;"
             "desktop_session $'Type=x11\\nRemote=yes' || echo b;"
             "desktop_session $'Type=tty\\nRemote=no\\n\\nType=x11\\nRemote=no' && echo c")
    assert out.split() == ["a", "b", "c"]


# =========================================================================
# The agent running: installed by join.sh, with a fake engine and fake cgroups
# =========================================================================

# Real tools the agent needs besides worker_machine's (it is a volunteer's
# machine without Python: none of these is a Python).
AGENT_TOOLS = ["dd", "od", "setsid", "mkfifo", "getconf", "flock", "tr", "kill", "ps"]

# The fake engine's containers, ahead of worker_machine's docker stub:
# $FAKE/containers/ID holds "STATE TASK JOB PID"; every call is also written
# with its time to $FAKE/timeline (to see what came before what).
DOCKER_CONTAINERS = r"""
printf '%s docker %s\n' "$EPOCHREALTIME" "$*" >>"$FAKE/timeline"
case $1 in
ps)
    [[ -f $FAKE/fail/docker-ps ]] && { echo "Cannot connect to the Docker daemon" >&2; exit 1; }
    quiet=0 status=''
    for a in "$@"; do case $a in -q) quiet=1 ;; status=*) status=${a#status=} ;; esac; done
    for f in "$FAKE"/containers/*; do
        [[ -f $f ]] || continue
        read -r state task job pid <"$f"
        [[ -z $status || $state == "$status" ]] || continue
        if ((quiet)); then echo "${f##*/}"; else echo "${f##*/} $state $task $job"; fi
    done
    exit 0 ;;
inspect)
    shift
    [[ $1 == --format ]] && shift 2
    for id in "$@"; do
        [[ -f $FAKE/containers/$id ]] || continue
        read -r state task job pid <"$FAKE/containers/$id"
        echo "$id $pid"
    done
    exit 0 ;;
pause | unpause)
    op=$1
    shift
    for id in "$@"; do
        f=$FAKE/containers/$id
        [[ -f $f ]] || { echo "Error: No such container: $id" >&2; exit 1; }
        read -r state task job pid <"$f"
        if [[ $op == pause ]]; then state=paused; else state=running; fi
        echo "$state $task $job $pid" >"$f"
    done
    echo "$op" >>"$FAKE/events"
    exit 0 ;;
stop)
    shift
    [[ $1 == -t ]] && shift 2
    for id in "$@"; do rm -f "$FAKE/containers/$id"; done
    echo die >>"$FAKE/events"
    exit 0 ;;
events) exec tail -n 0 -f "$FAKE/events" ;;
esac
"""

NVIDIA_SMI_AGENT = r"""
echo "nvidia-smi $*" >>"$FAKE/log"
case "$*" in
*--query-compute-apps*) cat "$FAKE/gpu_apps" 2>/dev/null ;;
*) cat "$FAKE/gpus" ;;
esac
"""

# systemd as far as the agent's unit goes: `enable --now` starts its
# ExecStart (with its Environment=) in a session of its own, as systemd does.
SYSTEMCTL_AGENT = r"""
echo "systemctl $*" >>"$FAKE/log"
unit=${GRIDX_SYSTEMD_UNIT_DIR:-/nonexistent}/gridx-agent.service
# a zombie (ended, not yet reaped by init) is not running, as for systemd
running() {
    local stat
    [[ -f $FAKE/agent_unit.pid ]] && { read -r stat <"/proc/$(<"$FAKE/agent_unit.pid")/stat"; } 2>/dev/null &&
        stat=${stat##*) } && [[ ${stat%% *} != Z ]]
}
case "$*" in
"enable --now gridx-agent.service" | "start gridx-agent.service")
    running && exit 0
    envline=$(grep '^Environment=' "$unit"); envline=${envline#Environment=}
    exec_start=$(grep '^ExecStart=' "$unit"); exec_start=${exec_start#ExecStart=}
    env "$envline" setsid $exec_start </dev/null >>"$FAKE/agent_unit.log" 2>&1 &
    echo $! >"$FAKE/agent_unit.pid"
    exit 0 ;;
"is-active --quiet gridx-agent.service") running; exit ;;
"stop gridx-agent.service")
    if running; then
        pid=$(<"$FAKE/agent_unit.pid"); kill -TERM "$pid"
        for ((i = 0; i < 100; i++)); do running || break; sleep 0.1; done
    fi
    exit 0 ;;
esac
[[ $1 == is-enabled ]] && exit 1
[[ $1 == restart && -f $FAKE/fail/docker-restart ]] && exit 1
exit 0
"""

MIB = 1048576
TASK = "qqaung6ee9bsx6c7wxjogciwa"
CID = "7c37f20c65ad" + "0" * 52


class Hub:
    """The hub's receiver as the contract says: one line a connection, the
    reply `ok` (answer=False: it reads and never answers). Lines are kept
    with the time they came and the address they came from."""

    def __init__(self, answer=True):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.lines = []
        self.held = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            conn.settimeout(5)
            data = b""
            try:
                while not data.endswith(b"\n") and len(data) < 4096:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if self.answer:
                    conn.sendall(b"ok\n")
            except OSError:
                pass
            self.lines.append((time.time(), peer[0], data.decode(errors="replace")))
            if self.answer:
                conn.close()
            else:
                self.held.append(conn)

    def states(self):
        return [LINE.match(line.rstrip("\n")).group(1) for _, _, line in self.lines if LINE.match(line.rstrip("\n"))]

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


def wait_for(predicate, timeout, what, interval=0.05):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError("timed out after %s s waiting for %s" % (timeout, what))
        time.sleep(interval)


def alive(pid):
    """Running (a zombie waiting for its parent's wait is not)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def session_pids(sid):
    """Processes whose session is SID."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[3] == str(sid):
            pids.append(int(entry))
    return pids


class AgentLab(worker_machine.Lab):
    """worker_machine's fake machine, with agent.sh in its bundle, a VPN on
    loopback addresses (the hub's receiver is this test's), a fake /proc
    (cgroup mounts, input devices, container pids) and /dev."""

    def __init__(self, tmp, hub):
        self.hub = hub
        super().__init__(tmp)
        self.proc = tmp / "proc"
        self.dev = tmp / "dev"
        self.cg = tmp / "cg"
        for d in (self.proc / "self", self.proc / "bus" / "input", self.dev / "pts", self.cg / "cpuacct",
                  self.cg / "memory", self.fake / "containers"):
            d.mkdir(parents=True)
        (self.proc / "self" / "mountinfo").write_text(
            "31 23 0:28 / %s rw,relatime - tmpfs tmpfs rw\n"
            "33 31 0:30 / %s rw,relatime - cgroup cgroup rw,cpuacct\n"
            "36 31 0:33 / %s rw,relatime - cgroup cgroup rw,memory\n"
            % (self.cg, self.cg / "cpuacct", self.cg / "memory"))
        (self.proc / "bus" / "input" / "devices").write_text("")
        (self.proc / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu sse2\n\n")
        shutil.copy(data("proc_stat_1"), self.proc / "stat")
        (self.cg / "cpuacct" / "cpuacct.usage").write_text("0\n")
        (self.fake / "events").write_text("")
        self.fifo = tmp / "kbd"
        os.mkfifo(self.fifo, 0o600)
        self.stub("docker", DOCKER_CONTAINERS + worker_machine.STUBS["docker"])
        for tool in AGENT_TOOLS:
            self.link(tool)

    def write_bundle(self, private_key=worker_machine.PRIVATE_KEY):
        self.settings.update(GRIDX_HUB_VPN_IP="127.0.0.1", GRIDX_VPN_IP="127.0.0.2", GRIDX_SUBNET="127.0.0.0/24",
                             GRIDX_MANAGER="127.0.0.1:2377", GRIDX_AGENT_PORT=str(self.hub.port))
        super().write_bundle(private_key)
        shutil.copy(AGENT, self.bundle / "agent.sh")

    def env(self, **extra):
        return super().env(GRIDX_PROC_DIR=str(self.proc), GRIDX_DEV_DIR=str(self.dev), **extra)

    # -- the agent
    @property
    def agent_dir(self):
        return self.state / "agent"

    def status(self):
        p = self.agent_dir / "status.env"
        if not p.exists():
            return {}
        out = {}
        for line in p.read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                key, value = line.split("=", 1)
                out[key] = value.strip("'")
        return out

    def agent_pid(self):
        return int(self.status().get("PID") or 0)

    def policy(self, *args, ok=True):
        r = self.run("agent.sh", "policy", *args)
        if ok:
            assert r.returncode == 0, r.stderr
        return r

    def set_agent(self, **values):
        """Settings that have no policy flag, written as the volunteer could,
        then read again by the agent (SIGUSR1)."""
        path = self.agent_dir / "agent.env"
        lines = [x for x in path.read_text().splitlines() if x.split("=", 1)[0] not in values]
        lines += ["%s='%s'" % kv for kv in values.items()]
        path.write_text("\n".join(lines) + "\n")
        os.kill(self.agent_pid(), signal.SIGUSR1)

    def wait_state(self, state, timeout=10):
        return wait_for(lambda: self.status() if self.status().get("STATE") == state else None, timeout,
                        "the agent's state %s (now %s)" % (state, self.status().get("STATE")))

    def watch_fifo(self):
        """The FIFO as the input device, idle time 2 s; once its reader runs."""
        self.policy("--share", "idle", "--idle-time", "2", "--input-devices", str(self.fifo))
        wait_for(lambda: str(self.fifo) in self.status().get("WATCHING", ""), 15, "the agent reading the FIFO")

    def press_key(self, sample="events_key_a.bin"):
        with open(self.fifo, "wb") as f:  # the agent holds it open: no wait
            f.write(open(data(sample), "rb").read())
        return time.time()

    # -- the engine
    def add_container(self, cid=CID, task=TASK, job="train", pid=4242, state="running", mem_mib=100):
        (self.cg / "cpuacct" / "docker" / cid).mkdir(parents=True)
        (self.cg / "cpuacct" / "docker" / cid / "cpuacct.usage").write_text("0\n")
        (self.cg / "memory" / "docker" / cid).mkdir(parents=True)
        (self.cg / "memory" / "docker" / cid / "memory.usage_in_bytes").write_text("%d\n" % (mem_mib * MIB))
        (self.proc / str(pid)).mkdir()
        (self.proc / str(pid) / "cgroup").write_text("4:memory:/docker/%s\n2:cpuacct:/docker/%s\n0::/\n" % (cid, cid))
        (self.fake / "containers" / cid).write_text("%s %s %s %d\n" % (state, task, job, pid))
        with open(self.fake / "events", "a") as f:
            f.write("start\n")

    def container_state(self, cid=CID):
        p = self.fake / "containers" / cid
        return p.read_text().split()[0] if p.exists() else None

    def timeline(self):
        p = self.fake / "timeline"
        out = []
        for line in (p.read_text().splitlines() if p.exists() else []):
            t, cmd = line.split(" ", 1)
            out.append((float(t), cmd))
        return out

    def first(self, prefix):
        return next((t for t, cmd in self.timeline() if cmd.startswith(prefix)), None)

    def burn(self, path, ns_per_s, seconds):
        """Move a cgroup's CPU counter as a program using NS_PER_S of CPU a
        second would, for SECONDS (in a thread)."""
        def run():
            end = time.time() + seconds
            last = time.time()
            while time.time() < end:
                time.sleep(0.05)
                now = time.time()
                value = int(path.read_text()) + int(ns_per_s * (now - last))
                path.write_text("%d\n" % value)
                last = now
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def cleanup(self):
        """leave.sh; whatever it left running is a failure of the test that
        made it, but must not outlive the test either."""
        sids = {self.agent_pid()}
        pidfile = self.agent_dir / "supervisor.pid"
        if pidfile.exists():
            sids.add(int(pidfile.read_text().split()[0] or 0))
        if (self.fake / "agent_unit.pid").exists():
            sids.add(int((self.fake / "agent_unit.pid").read_text()))
        if self.state.exists():
            self.run("leave.sh")
        mark = ("FAKE=%s" % self.fake).encode()
        for sid in sids - {0}:
            for pid in session_pids(sid):
                try:  # this lab's processes only (a pid may have been taken again)
                    with open("/proc/%d/environ" % pid, "rb") as f:
                        if mark in f.read().split(b"\0"):
                            os.kill(pid, signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    pass


@pytest.fixture
def hub():
    h = Hub()
    yield h
    h.close()


@pytest.fixture
def alab(tmp_path, hub):
    lab = AgentLab(tmp_path, hub)
    yield lab
    lab.cleanup()


@pytest.fixture(scope="module")
def joined_idle(tmp_path_factory):
    """One machine joined with share idle, its agent running, for the tests
    that must leave it as it was (each checks that it did)."""
    hub = Hub()
    lab = AgentLab(tmp_path_factory.mktemp("joined"), hub)
    try:
        joined(lab, "--share", "idle")
        yield lab
    finally:
        lab.cleanup()
        hub.close()


def joined(lab, *extra):
    r = lab.join("--cpus", "2", "--memory", "1G", "--yes", *extra)
    wait_for(lambda: lab.status().get("STATE") in ("sharing", "paused", "outside-hours"), 15,
             "the agent's first status")
    return r


# ------------------------------------------------------------ installed ----


def test_join_installs_the_agent_and_it_reports(alab, hub):
    r = joined(alab, "--share", "idle", "--hours", "22:00-08:00")
    assert "agent.sh policy" in r.stdout and "owner     idle:" in r.stderr
    st = alab.state / "state.env"
    assert "AGENT_DIR='%s'" % alab.agent_dir in st.read_text() and "AGENT_SUPERVISED='1'" in st.read_text()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in alab.agent_dir.iterdir()}
    assert stat.S_IMODE(alab.agent_dir.stat().st_mode) == 0o700
    assert modes["agent.sh"] == 0o700 and modes["lib.sh"] == 0o600 and modes["agent.env"] == 0o600
    assert (alab.agent_dir / "agent.sh").read_bytes() == open(AGENT, "rb").read()
    env = (alab.agent_dir / "agent.env").read_text()
    assert "SHARE='idle'\n" in env and "HOURS='22:00-08:00'\n" in env and "HUB_PORT='%d'\n" % hub.port in env
    supervisor = int((alab.agent_dir / "supervisor.pid").read_text())
    assert "agent.sh supervise" in open("/proc/%d/cmdline" % supervisor).read().replace("\0", " ")
    # the hub hears it from the worker's address, in the contract's words
    wait_for(lambda: hub.lines, 10, "a report")
    _, peer, line = hub.lines[0]
    m = LINE.match(line.rstrip("\n"))
    assert m and line.endswith("\n") and peer == "127.0.0.1", line
    assert m.group(4, 5) == ("idle", "22:00-08:00")
    r = alab.run("status.sh", "--json")
    doc = __import__("json").loads(r.stdout)
    assert doc["agent"]["running"] is True and doc["agent"]["policy"] == "idle"
    assert doc["agent"]["hours"] == "22:00-08:00" and doc["agent"]["state"] in ("sharing", "outside-hours")
    human = alab.run("status.sh").stdout
    assert "sharing         idle:" in human and "within 22:00-08:00" in human


def test_input_pauses_within_2_s_and_idle_unpauses(alab, hub):
    joined(alab, "--share", "idle")
    alab.add_container()
    alab.watch_fifo()
    wait_for(lambda: alab.status().get("STATE") == "sharing", 10, "sharing")
    # an LED set by software is not a person
    alab.press_key("events_led_only.bin")
    time.sleep(1.5)
    assert alab.container_state() == "running"
    alab.policy("--idle-time", "4")
    t0 = alab.press_key()
    wait_for(lambda: alab.first("docker pause"), 2, "docker pause within 2 s of the key")
    assert alab.first("docker pause") - t0 < 2.0
    assert "docker pause %s" % CID in [c for _, c in alab.timeline()]
    st = alab.wait_state("paused")
    assert st["REASON"] == "input" and st["TASKS"] == TASK and st["JOBS"] == "train"
    human = alab.run("status.sh").stdout
    assert "now             paused since " in human and ": the owner is active (input)" in human, human
    assert "jobs paused: train (tasks %s), holding 100 MiB of memory" % TASK in human, human
    assert "they will be stopped at " in human and "unless the owner is away 4 s before" in human, human
    line = wait_for(lambda: [x for _, _, x in hub.lines if " state=paused " in x], 5, "the paused report")[0]
    m = LINE.match(line.rstrip("\n"))
    assert m.group(3) == "input" and m.group(7) == TASK and m.group(8) == "100"
    assert int(m.group(6)) == int(m.group(2)) + 600  # preempted after the default 10 min
    # away for the idle time (4 s): unpaused, and the hub hears it
    st = alab.wait_state("sharing", timeout=10)
    assert alab.container_state() == "running"
    # the report follows the state file: on a loaded machine, a moment later
    wait_for(lambda: hub.states()[-1] == "sharing", 5, "the sharing report")
    human = alab.run("status.sh").stdout
    assert "now             sharing since" in human


def test_owner_cpu_pauses_and_grid_x_own_cpu_does_not(alab):
    joined(alab, "--share", "idle")
    alab.add_container()
    alab.policy("--idle-time", "2")
    wait_for(lambda: alab.status().get("TASKS") == "" and alab.first("docker inspect"), 10, "the container seen")
    root = alab.cg / "cpuacct" / "cpuacct.usage"
    job = alab.cg / "cpuacct" / "docker" / CID / "cpuacct.usage"
    # the job at a full core: root and container move together
    alab.burn(root, 1e9, 3)
    alab.burn(job, 1e9, 3).join()
    assert alab.container_state() == "running" and alab.first("docker pause") is None
    # the owner's program at 60 % of a core
    t0 = time.time()
    alab.burn(root, 0.6e9, 2)
    wait_for(lambda: alab.first("docker pause"), 3, "docker pause")
    assert alab.first("docker pause") - t0 < 2.0
    assert alab.wait_state("paused")["REASON"] == "cpu"
    alab.wait_state("sharing", timeout=10)


def test_a_keystroke_in_a_terminal_pauses(alab):
    joined(alab, "--share", "idle")
    alab.add_container()
    alab.policy("--idle-time", "3")
    pts = alab.dev / "pts" / "0"
    pts.touch()
    os.utime(pts, (time.time() - 3600, time.time() - 3600))
    time.sleep(2.5)
    assert alab.container_state() == "running"
    now = time.time()
    os.utime(pts, (now, now - 3600))  # a shell read a key: the access time moves
    st = alab.wait_state("paused", timeout=5)
    assert st["REASON"] == "terminal"


def test_preemption_is_reported_before_the_job_is_stopped(alab, hub):
    joined(alab, "--share", "idle")
    alab.add_container()
    alab.watch_fifo()
    alab.policy("--idle-time", "60", "--preempt-time", "2", "--grace", "1")
    alab.press_key()
    alab.wait_state("paused")
    wait_for(lambda: alab.first("docker stop"), 10, "docker stop")
    stop = alab.first("docker stop")
    assert "docker stop -t 1 %s" % CID in [c for _, c in alab.timeline()]
    preempting = [(t, line) for t, _, line in hub.lines if " state=preempting " in line]
    assert preempting and preempting[0][0] <= stop, (preempting, stop)
    m = LINE.match(preempting[0][1].rstrip("\n"))
    assert m.group(3) == "input" and m.group(7) == TASK and m.group(6) == m.group(2)
    # unpaused first: a frozen process cannot take its SIGTERM; never paused again after
    unpause = [t for t, c in alab.timeline() if c.startswith("docker unpause")]
    assert unpause and unpause[0] < stop
    assert not [t for t, c in alab.timeline() if c.startswith("docker pause") and t > unpause[0]]
    # nothing left: still paused for the owner, with nothing to preempt
    st = wait_for(lambda: alab.status() if alab.status().get("STATE") == "paused" and not alab.status().get("TASKS")
                  else None, 10, "paused with no tasks")
    assert st["PREEMPT_AT"] == "0"
    wait_for(lambda: any(" state=paused " in x and " tasks=- " in x for _, _, x in hub.lines), 5, "the report")


def test_a_program_wanting_a_shared_gpu_preempts_at_once(alab, hub):
    alab.with_gpus("GPU-1111")
    alab.stub("nvidia-smi", NVIDIA_SMI_AGENT)
    joined(alab, "--share", "idle", "--gpus", "1")
    alab.add_container(pid=4242)
    alab.policy("--idle-time", "60")
    alab.set_agent(GPU_POLL_S="1")
    (alab.proc / "5151").mkdir()
    (alab.proc / "5151" / "cgroup").write_text("4:memory:/user.slice\n2:cpuacct:/user.slice\n0::/\n")
    time.sleep(1.5)
    (alab.fake / "gpu_apps").write_text("4242, GPU-1111\n")  # the job alone: nothing happens
    time.sleep(2.5)
    assert alab.container_state() == "running"
    (alab.fake / "gpu_apps").write_text("4242, GPU-1111\n5151, GPU-1111\n")
    wait_for(lambda: alab.first("docker stop"), 8, "docker stop")
    line = [x for _, _, x in hub.lines if " state=preempting " in x][0]
    assert " reason=gpu " in line and " tasks=%s " % TASK in line


def test_outside_the_hours_jobs_pause(alab, hub):
    joined(alab, "--share", "always")
    alab.add_container()
    alab.policy("--hours", window_without_now())
    st = alab.wait_state("outside-hours")
    assert st["REASON"] == "hours"
    wait_for(lambda: alab.container_state() == "paused", 5, "the job paused")
    wait_for(lambda: "outside-hours" in hub.states(), 5, "the report")
    alab.policy("--hours", "any")
    alab.wait_state("sharing")
    assert alab.container_state() == "running"


def test_always_never_pauses_for_the_owner(alab):
    joined(alab, "--share", "always")
    alab.add_container()
    alab.policy("--input-devices", str(alab.fifo))
    time.sleep(1.5)
    assert alab.status().get("WATCHING") == ""  # nothing measured: nothing to pause for
    alab.burn(alab.cg / "cpuacct" / "cpuacct.usage", 1e9, 2).join()
    assert alab.container_state() == "running" and alab.status()["STATE"] == "sharing"


@pytest.mark.parametrize("hub_kind", ["silent", "closed"])
def test_a_hub_that_does_not_answer_never_holds_the_agent_up(alab, hub_kind):
    joined(alab, "--share", "idle")
    alab.add_container()
    alab.watch_fifo()
    if hub_kind == "silent":
        other = Hub(answer=False)
        port = other.port
    else:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    alab.set_agent(HUB_PORT=str(port))
    wait_for(lambda: alab.status().get("HUB", "").endswith(":%d" % port), 5, "the new port")
    t0 = alab.press_key()
    wait_for(lambda: alab.first("docker pause"), 2, "docker pause within 2 s of the key")
    assert alab.first("docker pause") - t0 < 2.0
    if hub_kind == "silent":
        wait_for(lambda: other.lines or other.held, 5, "the silent hub reached")
        other.close()


def test_docker_away_is_said_once_and_not_asked_at_every_sample(alab):
    joined(alab, "--share", "idle")
    alab.add_container()
    wait_for(lambda: alab.first("docker inspect"), 10, "the container seen")
    alab.fail("docker-ps")
    with open(alab.fake / "events", "a") as f:
        f.write("start\n")
    time.sleep(3)
    t = time.time() - 2.5
    assert len([c for at, c in alab.timeline() if at > t and c.startswith("docker ps")]) <= 1
    log = (alab.agent_dir / "agent.log").read_text()
    assert log.count("docker ps failed") == 1
    alab.unfail("docker-ps")
    with open(alab.fake / "events", "a") as f:
        f.write("start\n")
    wait_for(lambda: "Docker answers again" in (alab.agent_dir / "agent.log").read_text(), 5, "Docker back")
    assert alab.agent_pid() and alive(alab.agent_pid())


# --------------------------------------------------------------- leaving ----


def test_leave_unpauses_then_removes_the_agent(alab):
    joined(alab, "--share", "idle")
    alab.add_container()
    alab.watch_fifo()
    alab.policy("--idle-time", "600")
    alab.press_key()
    alab.wait_state("paused")
    wait_for(lambda: alab.container_state() == "paused", 5, "the job paused")
    supervisor = int((alab.agent_dir / "supervisor.pid").read_text())
    agent = alab.agent_pid()
    r = alab.run("leave.sh")
    assert r.returncode == 0, r.stderr
    assert alab.container_state() == "running"
    unpause = alab.first("docker unpause")
    assert unpause and unpause < alab.first("docker swarm leave")
    assert not alab.agent_dir.exists() and not alab.state.exists()
    assert [p for p in session_pids(supervisor) + session_pids(agent) if alive(p)] == []


def test_leave_unpauses_what_a_dead_agent_left_paused(alab):
    """leave.sh does not trust the agent to have done it: every paused
    Grid-X container goes on."""
    joined(alab, "--share", "always")
    alab.add_container(state="paused")
    alab.add_container(cid="b" * 64, task="other", pid=4343, state="paused")
    supervisor = int((alab.agent_dir / "supervisor.pid").read_text())
    for pid in session_pids(supervisor) + session_pids(alab.agent_pid()):
        with contextlib.suppress(ProcessLookupError):  # a child that ended meanwhile
            os.kill(pid, signal.SIGKILL)
    r = alab.run("leave.sh")
    assert r.returncode == 0, r.stderr
    assert alab.container_state() == "running" and alab.container_state("b" * 64) == "running"


def test_the_supervisor_restarts_a_killed_agent_which_keeps_the_pause(alab, hub):
    joined(alab, "--share", "idle")
    alab.add_container()
    alab.watch_fifo()
    alab.policy("--idle-time", "600")
    alab.press_key()
    alab.wait_state("paused")
    wait_for(lambda: alab.container_state() == "paused", 5, "the job paused")
    old = alab.agent_pid()
    left = session_pids(old)
    assert len(left) > 1  # its readers and docker events
    killed = time.time()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: alab.agent_pid() not in (0, old), 15, "a new agent")
    st = alab.wait_state("paused")
    assert st["REASON"] == "input"
    # the owner is still there: never unpaused meanwhile
    assert alab.container_state() == "paused"
    assert not [c for t, c in alab.timeline() if t > killed and c.startswith("docker unpause")]
    assert [p for p in left if alive(p)] == []  # what the killed one left is gone
    assert "supervisor: the agent ended" in (alab.agent_dir / "agent.log").read_text()


def test_status_says_when_the_agent_is_not_running(alab):
    joined(alab, "--share", "idle")
    assert alab.run("status.sh").returncode == 0
    supervisor = int((alab.agent_dir / "supervisor.pid").read_text())
    for pid in session_pids(supervisor) + session_pids(alab.agent_pid()):
        with contextlib.suppress(ProcessLookupError):  # a child that ended meanwhile
            os.kill(pid, signal.SIGKILL)
    r = alab.run("status.sh")
    assert r.returncode == 1 and "the owner-activity agent is not running" in r.stderr
    r = alab.run("agent.sh", "start")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: alab.run("status.sh").returncode == 0, 15, "healthy again")


def test_join_under_systemd_installs_the_unit_and_leave_removes_it(alab):
    (alab.tmp / "systemd").mkdir()
    units = alab.tmp / "units"
    units.mkdir()
    alab.stub("systemctl", SYSTEMCTL_AGENT)
    env = alab.env(GRIDX_SYSTEMD_RUN_DIR=str(alab.tmp / "systemd"), GRIDX_SYSTEMD_UNIT_DIR=str(units))
    r = alab.run("join.sh", "--cpus", "1", "--memory", "1G", "--yes", "--share", "idle", env=env)
    assert r.returncode == 0, r.stderr
    unit = (units / "gridx-agent.service").read_text()
    assert "ExecStart=%s %s/agent.sh run\n" % (shutil.which("bash", path=str(alab.bin)), alab.agent_dir) in unit
    assert "Environment=GRIDX_STATE_DIR=%s\n" % alab.state in unit
    assert "KillMode=mixed\n" in unit and "Restart=always\n" in unit and "WantedBy=multi-user.target" in unit
    log = alab.log()
    assert log.index("systemctl daemon-reload") < log.index("systemctl enable --now gridx-agent.service")
    assert "AGENT_UNIT='%s'" % (units / "gridx-agent.service") in (alab.state / "state.env").read_text()
    assert not (alab.agent_dir / "supervisor.pid").exists()
    wait_for(lambda: alab.status().get("STATE") == "sharing", 15, "the unit's agent")
    r = alab.run("leave.sh", env=env)
    assert r.returncode == 0, r.stderr
    log = alab.log()
    assert "systemctl stop gridx-agent.service" in log and "systemctl disable gridx-agent.service" in log
    assert not (units / "gridx-agent.service").exists() and not alab.agent_dir.exists()


# ---------------------------------------------------------------- policy ----


@pytest.mark.parametrize("args, says", [
    (["--share", "sometimes"], "--share 'sometimes': must be idle or always"),
    (["--hours", "25:00-08:00"], "--hours '25:00-08:00' is not HH:MM-HH:MM"),
    (["--idle-time", "5x"], "--idle-time '5x' is not a time"),
    (["--idle-time", "0"], "--idle-time '0': must be seconds from 1"),
    (["--cpu-busy", "-5"], "--cpu-busy '-5': must be a percentage of one core"),
    (["--input-devices", "/dev/input/event3,../x"], "must be auto, or absolute paths"),
    (["--share"], "--share needs a value"),
    (["--bogus", "1"], "unknown option '--bogus'"),
])
def test_policy_bad_input_is_exit_2_and_changes_nothing(joined_idle, args, says):
    before = (joined_idle.agent_dir / "agent.env").read_bytes()
    r = joined_idle.policy(*args, ok=False)
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], r.stderr
    assert (joined_idle.agent_dir / "agent.env").read_bytes() == before
    assert joined_idle.status().get("POLICY") == "idle" and alive(joined_idle.agent_pid())


def test_policy_change_is_followed_without_leaving(alab, hub):
    joined(alab, "--share", "idle")
    r = alab.policy("--share", "always", "--hours", "22:00-08:00", "--preempt-time", "15m")
    assert "always:" in r.stdout and "the agent follows the new policy now" in r.stderr
    env = (alab.agent_dir / "agent.env").read_text()
    assert "SHARE='always'\n" in env and "PREEMPT_S='900'\n" in env and "# IDLE_S='300' (the default)" in env
    wait_for(lambda: alab.status().get("POLICY") == "always" and alab.status().get("HOURS") == "22:00-08:00", 5,
             "the agent on the new policy")
    wait_for(lambda: any(" policy=always hours=22:00-08:00 " in x for _, _, x in hub.lines), 5, "the hub told")
    assert alab.policy().stdout.startswith("always:")  # no flag: shows it


def test_agent_settings_someone_else_can_write_are_refused(alab):
    joined(alab, "--share", "idle")
    env = alab.agent_dir / "agent.env"
    env.chmod(0o666)
    r = alab.policy("--share", "always", ok=False)
    assert r.returncode == 3 and "can be written by someone other than root" in r.stderr
    env.chmod(0o600)
    witness = alab.tmp / "ran"
    env.write_text(env.read_text() + "HOURS='$(touch %s)'\n" % witness)
    r = alab.policy(ok=False)
    assert r.returncode == 3 and "HOURS" in r.stderr
    assert not witness.exists()
    r = alab.run("status.sh")
    assert r.returncode == 1 and "settings" in r.stderr


def test_a_forged_status_pid_is_not_signalled(alab):
    """status.env names the agent's pid; a policy change signals it only when
    that pid really is the agent (SIGUSR1 would end another program)."""
    joined(alab, "--share", "idle")
    victim = subprocess.Popen(["sleep", "60"])
    try:
        agent = alab.agent_dir
        supervisor = int((agent / "supervisor.pid").read_text())
        for pid in session_pids(supervisor) + session_pids(alab.agent_pid()):
            with contextlib.suppress(ProcessLookupError):  # a child that ended meanwhile
                os.kill(pid, signal.SIGKILL)
        text = (agent / "status.env").read_text()
        (agent / "status.env").write_text(re.sub(r"PID='\d+'", "PID='%d'" % victim.pid, text))
        r = alab.policy("--share", "always")
        assert "the agent is not running" in r.stderr
        time.sleep(0.5)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


# -------------------------------------------------------------- join.sh ----


@pytest.mark.parametrize("args, says", [
    (["--share", "sometimes"], "--share 'sometimes' is not idle or always"),
    (["--hours", "22-08"], "--hours '22-08' is not HH:MM-HH:MM"),
    (["--share", "--yes"], "--share needs a value"),
])
def test_join_policy_flags_are_checked_before_anything(alab, args, says):
    before = alab.snapshot()
    r = alab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes", *args)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    worker_machine.assert_nothing_changed(alab, before)


@pytest.mark.parametrize("devices, want", [("input_devices_laptop", "idle"), ("input_devices_server", "always")])
def test_join_yes_takes_the_default_for_this_machine(alab, devices, want):
    shutil.copy(data(devices), alab.proc / "bus" / "input" / "devices")
    joined(alab)
    assert "SHARE='%s'\n" % want in (alab.agent_dir / "agent.env").read_text()


def test_a_bundle_without_the_agent_joins_without_it(alab):
    (alab.bundle / "agent.sh").unlink()
    r = alab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes", "--share", "idle")
    assert r.returncode == 2 and "this bundle has no agent.sh" in r.stderr
    r = alab.join()
    assert "this bundle has no agent.sh" in r.stderr and not alab.agent_dir.exists()
    assert "AGENT_DIR" not in (alab.state / "state.env").read_text()
    assert alab.run("status.sh", "--json").returncode == 0


def test_join_asks_when_to_share_on_a_terminal(alab):
    shutil.copy(data("input_devices_laptop"), alab.proc / "bus" / "input" / "devices")
    answers = [(b"Share when (idle or always) [idle]", b"sometimes\n"), (b"answer idle or always", b"\n"),
               (b"Only within these hours", b"9-5\n"), (b"is not HH:MM-HH:MM", b"22:00-07:30\n"),
               (b"Continue", b"\n")]
    code, text = worker_machine.answer_prompts([str(alab.bundle / "join.sh"), "--cpus", "2", "--memory", "1G"],
                                               alab.env(), answers)
    assert code == 0, text
    assert not answers, text
    assert "a keyboard or mouse is attached" in text
    env = (alab.agent_dir / "agent.env").read_text()
    assert "SHARE='idle'\n" in env and "HOURS='22:00-07:30'\n" in env
