"""The owner comes first, on the real lab (issue 21, the worker's side): the
owner-activity agent that join.sh installs on worker2, with a Grid-X job
there printing a counter and the time every 50 ms.

- a CPU-bound program started on worker2 outside Docker (its owner's)
  pauses the job within 2 s: the counter stops (the delay from the
  program's start to the job's last line, and to the cgroup freezer's
  FROZEN, over several tries: p50 and p95 printed); after the idle time
  (3 s here, set through the agent's policy) the job goes on where it
  stopped;
- input events: this kernel has no uinput (CONFIG_INPUT_UINPUT is not set:
  there is no /dev/uinput to make a keyboard with), so the agent reads a
  FIFO named as its input device, fed the recorded event streams of
  tests/data/agent (a key: pauses; an LED set by software: does not);
- the reports reach a receiver in the hub container on the hub's VPN
  address, from worker2's VPN address, in the contract's words
  (docs/CONTRACT.md "Owner-activity reports");
- busy past the preemption time: the hub hears "preempting" before the job
  gets its SIGTERM (unpaused first: it prints that it got it);
- the agent's CPU use over a minute on an idle worker (printed);
- leave.sh stops the agent and leaves nothing frozen.

worker2 needs a bundle with agent.sh (gridx.py's BUNDLE_SCRIPTS): where
setup joined it with an older one, it leaves and joins again with a fresh
bundle first; it is joined again (policy as setup's) at the end.
"""

import hashlib
import json
import os
import re
import statistics
import subprocess
import time

import pytest
from e2e_helpers import HUB_VPN_IP, container, copy_bundle, hub, node_exec, ok, wait_peer_ready, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data", "agent")
AGENT = os.path.join(ROOT, "bundle_templates", "agent.sh")
NODE = "worker2"
BUNDLE = "/root/gridx-worker2-bundle"
AGENT_DIR = "/var/lib/gridx/agent"
# The test's receiver: its own port, so that the hub's (gridx.py's
# AGENT_PORT, 5002) may listen at the same time.
PORT = 5091
RECEIVED = "/tmp/gridx-e2e-reports.log"
FIFO = "/run/gridx-e2e-kbd"
JOB = "owner-counter"
TRIES = 8
LINE = re.compile(
    r"^gridx-agent 1 state=(sharing|paused|outside-hours|preempting) since=(\d+) "
    r"reason=(-|input|terminal|logind|cpu|gpu|hours) policy=(idle|always) hours=(-|\d\d:\d\d-\d\d:\d\d) "
    r"preempt_at=(\d+) tasks=(-|[0-9a-z]+(?:,[0-9a-z]+)*) mem_mib=(\d+)$"
)

RECEIVER = r"""
import socket, sys, time
ip, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ip, port))
s.listen(16)
open(log + ".pid", "w").write("%d\n" % __import__("os").getpid())
while True:
    c, peer = s.accept()
    c.settimeout(5)
    data = b""
    try:
        while not data.endswith(b"\n") and len(data) < 4096:
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
        c.sendall(b"ok\n")
    except OSError:
        pass
    c.close()
    with open(log, "a") as f:
        f.write("%.3f %s %s\n" % (time.time(), peer[0], data.decode(errors="replace").rstrip("\n")))
"""

# The job: a counter with the time, every 50 ms; on SIGTERM it says so.
COUNTER = """import signal, sys, time
i = 0
def term(*_):
    print("SIGTERM", i, "%.3f" % time.time(), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
while True:
    print(i, "%.3f" % time.time(), flush=True)
    i += 1
    time.sleep(0.05)
"""


def w2(script, timeout=120, check=True):
    """bash in worker2; its stdout."""
    proc = node_exec(NODE, ["bash", "-c", script], timeout=timeout)
    if check:
        ok(proc, script[:80])
    return proc.stdout


def state_env(path="/var/lib/gridx/state.env"):
    out = {}
    for line in w2("cat %s 2>/dev/null || true" % path).splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value.strip("'")
    return out


def agent_status():
    return state_env(AGENT_DIR + "/status.env")


def policy(*args):
    return ok(node_exec(NODE, [BUNDLE + "/agent.sh", "policy", *args]), "agent.sh policy")


def set_port(port):
    """The report port (no policy flag: it comes from the bundle)."""
    w2("f=%s/agent.env; sed -i '/^HUB_PORT=/d' $f; echo \"HUB_PORT='%d'\" >> $f; . %s/status.env; kill -USR1 $PID"
       % (AGENT_DIR, port, AGENT_DIR))
    wait_until(lambda: agent_status().get("HUB", "").endswith(":%d" % port), 10, "the agent on the test's port")


def join_worker2(cpus, extra=()):
    """leave (if joined), a fresh bundle from the hub, join."""
    node_exec(NODE, [BUNDLE + "/leave.sh"], timeout=300)
    ok(hub("hub", "refresh-bundle", NODE), "refresh-bundle")
    copy_bundle("/etc/gridx/bundles/gridx-%s-bundle" % NODE, NODE)
    if node_exec(NODE, ["test", "-f", BUNDLE + "/agent.sh"]).returncode != 0:
        pytest.fail("the hub's bundle has no agent.sh: gridx.py's BUNDLE_SCRIPTS must list it", pytrace=False)
    ok(node_exec(NODE, [BUNDLE + "/join.sh", "--yes", "--cpus", str(cpus), "--memory", "4G", *extra], timeout=300),
       "join.sh on worker2")
    wait_peer_ready(NODE, timeout=120)  # its resources known before a job is placed there


def received():
    """The receiver's lines: (time, peer, line)."""
    out = []
    for row in ok(node_exec("hub", "cat %s 2>/dev/null || true" % RECEIVED), "reports").splitlines():
        t, peer, line = row.split(" ", 2)
        out.append((float(t), peer, line))
    return out


def percentile(values, p):
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))]


class Job:
    """The counter job's container on worker2: its freezer and its log."""

    def __init__(self):
        def found():
            out = w2("docker ps -q --no-trunc --filter label=com.docker.swarm.service.name=%s" % JOB).split()
            return out[0] if out else None
        self.id = wait_until(found, 180, "the counter job running on worker2", interval=2)
        info = w2("docker inspect -f '{{.LogPath}} {{index .Config.Labels \"com.docker.swarm.task.id\"}}' %s"
                  % self.id).split()
        self.log, self.task = info
        self.freezer = "/sys/fs/cgroup/freezer/docker/%s/freezer.state" % self.id
        if w2("test -r %s && echo yes || echo no" % self.freezer).strip() != "yes":
            pytest.skip("no cgroup v1 freezer file for the job (a cgroup v2 host): the delays are read from it")

    def lines(self):
        out = []
        for row in w2("cat %s" % self.log).splitlines():
            text = json.loads(row)["log"].split()
            if len(text) == 2:
                out.append((int(text[0]), float(text[1])))
        return out

    def try_owner(self, start):
        """START (bash) the owner's doing, in worker2, once the job runs and
        the agent shares; until the freezer says FROZEN: the times, and the
        job's last line then and 1 s later."""
        script = r"""
fz=%(fz)s log=%(log)s
for ((i = 0; i < 200; i++)); do [[ $(<$fz) == THAWED ]] && break; sleep 0.1; done
sleep 1.5
t0=$EPOCHREALTIME
%(start)s
for ((i = 0; i < 500; i++)); do [[ $(<$fz) == FROZEN ]] && break; sleep 0.02; done
t1=$EPOCHREALTIME
state=$(<$fz)
before=$(tail -n 1 $log)
sleep 1
after=$(tail -n 1 $log)
[[ -z ${owner:-} ]] || kill $owner
echo "$t0"; echo "$t1"; echo "$state"; echo "$before"; echo "$after"
""" % {"fz": self.freezer, "log": self.log, "start": start}
        t0, t1, state, before, after = w2(script, timeout=120).splitlines()[-5:]
        last = json.loads(before)["log"].split()
        return {"t0": float(t0), "frozen": float(t1) - float(t0), "state": state,
                "counter": int(last[0]), "last_print": float(last[1]) - float(t0), "after": after == before}

    def wait_thawed(self, timeout=30):
        wait_until(lambda: w2("cat %s" % self.freezer).strip() == "THAWED", timeout, "the job thawed", interval=0.5)


@pytest.fixture(scope="module")
def owner(lab):
    """worker2 joined with the agent, the receiver in the hub, the counter
    job with one replica on each worker (each reserves all a worker shares)."""
    joined = state_env()
    cpus = joined.get("SHARED_CPUS") or "2"
    # setup joins with the bundle the hub made then: the agent it installed
    # must be this checkout's
    installed = w2("sha256sum < %s/agent.sh 2>/dev/null || true" % AGENT_DIR).split()
    if "AGENT_DIR" not in joined or installed[:1] != [hashlib.sha256(open(AGENT, "rb").read()).hexdigest()]:
        join_worker2(cpus)
    # a worker container restarted by an earlier test has no init to start it
    ok(node_exec(NODE, [AGENT_DIR + "/agent.sh", "start"], timeout=60), "agent.sh start")
    wait_until(lambda: w2(". %s/status.env 2>/dev/null && kill -0 \"$PID\" 2>/dev/null && echo yes || true"
                          % AGENT_DIR).strip() == "yes", 20, "the agent's status from a running agent")
    ok(node_exec("hub", "cat > /tmp/gridx-e2e-receiver.py", input=RECEIVER), "receiver")
    node_exec("hub", "rm -f %s; kill $(cat %s.pid 2>/dev/null) 2>/dev/null; sleep 0.2" % (RECEIVED, RECEIVED))
    ok(node_exec("hub", ["sh", "-c", "python3 /tmp/gridx-e2e-receiver.py %s %d %s >/dev/null 2>&1 &"
                         % (HUB_VPN_IP, PORT, RECEIVED)]), "start the receiver")
    wait_until(lambda: node_exec("hub", "test -s %s.pid" % RECEIVED).returncode == 0, 20, "the receiver")
    set_port(PORT)
    policy("--share", "idle", "--idle-time", "3", "--preempt-time", "600", "--input-devices", "auto")
    hub("jobs", "delete", JOB)
    ok(hub("jobs", "run", "--name", JOB, "--replicas", "3", "--cpus", cpus, "--memory", "256M", "python:3.11",
           "--", "python3", "-u", "-c", COUNTER), "jobs run")
    job = Job()
    yield {"job": job, "cpus": cpus, "vpn_ip": state_env()["VPN_IP"]}
    hub("jobs", "delete", JOB)
    node_exec("hub", "kill $(cat %s.pid) 2>/dev/null" % RECEIVED)
    # the lab as setup leaves it: worker2 joined (with the agent, default policy)
    if node_exec(NODE, ["test", "-f", "/var/lib/gridx/state.env"]).returncode != 0:
        join_worker2(cpus)


def test_owner_cpu_pauses_the_job_within_2_s_and_idle_resumes_it(owner):
    job = owner["job"]
    tries = []
    for _ in range(TRIES):
        t = job.try_owner("bash -c 'while :; do :; done' & owner=$!")
        assert t["state"] == "FROZEN", "not paused within 10 s of the owner's program: %s" % t
        assert t["after"], "the counter went on while paused: %s" % t
        tries.append(t)
        # away for the idle time: it goes on where it stopped
        job.wait_thawed()
        time.sleep(0.5)
        after = [n for n, _ in job.lines() if n > t["counter"]]
        assert after and after[0] == t["counter"] + 1, "did not go on from %d: %s" % (t["counter"], after[:3])
    frozen = [t["frozen"] for t in tries]
    last_print = [t["last_print"] for t in tries]
    print("\nowner's CPU -> job frozen (s): p50 %.2f p95 %.2f max %.2f over %d tries: %s"
          % (statistics.median(frozen), percentile(frozen, 95), max(frozen), len(frozen),
             " ".join("%.2f" % x for x in frozen)))
    print("owner's CPU -> the job's last line before the pause (s): p50 %.2f p95 %.2f"
          % (statistics.median(last_print), percentile(last_print, 95)))
    print("host load: %s" % open("/proc/loadavg").read().strip())
    assert statistics.median(frozen) < 2.0


def test_recorded_key_events_pause_the_job_and_an_led_does_not(owner):
    job = owner["job"]
    uinput = w2("test -e /dev/uinput && echo yes || echo no").strip()
    print("\n/dev/uinput in the lab: %s (this kernel: CONFIG_INPUT_UINPUT not set); events through a FIFO" % uinput)
    for name in ("events_key_a.bin", "events_led_only.bin"):  # bytes as they are
        ok(subprocess.run(["docker", "cp", os.path.join(DATA, name), "%s:/tmp/%s" % (container(NODE), name)],
                          capture_output=True, text=True, timeout=60), "docker cp " + name)
    w2("[ -p %s ] || mkfifo -m 0600 %s" % (FIFO, FIFO))
    policy("--input-devices", FIFO)
    wait_until(lambda: FIFO in agent_status().get("WATCHING", ""), 15, "the agent reading the FIFO")
    # an LED set by software: no person, no pause
    t = job.try_owner("cat /tmp/events_led_only.bin > %s; sleep 2" % FIFO)
    assert t["state"] == "THAWED", t
    delays = []
    for _ in range(3):
        t = job.try_owner("cat /tmp/events_key_a.bin > %s" % FIFO)
        assert t["state"] == "FROZEN" and t["after"], t
        delays.append(t["frozen"])
        assert agent_status()["REASON"] == "input"
        job.wait_thawed()
    print("key event -> job frozen (s): %s" % " ".join("%.2f" % x for x in delays))
    assert statistics.median(delays) < 2.0
    policy("--input-devices", "auto")


def test_the_hub_hears_each_change_from_worker2(owner):
    job = owner["job"]
    start = time.time()
    t = job.try_owner("bash -c 'while :; do :; done' & owner=$!")
    assert t["state"] == "FROZEN"
    job.wait_thawed()
    time.sleep(1)
    lines = [(at, peer, line) for at, peer, line in received() if at >= start - 1]
    for _, peer, line in lines:
        assert LINE.match(line), line
        assert peer == owner["vpn_ip"], (peer, line)  # the worker is known by its VPN address
    states = [LINE.match(line).groups() for _, _, line in lines]
    paused = [s for s in states if s[0] == "paused"]
    assert paused and paused[0][2] == "cpu" and paused[0][3] == "idle" and paused[0][4] == "-"
    assert paused[0][6] == job.task and int(paused[0][7]) > 0
    assert int(paused[0][5]) == int(paused[0][1]) + 600
    assert states[-1][0] == "sharing" and states[-1][5] == "0" and states[-1][6] == "-"
    print("\nreports: " + " | ".join(line for _, _, line in lines))


def test_agent_cpu_use_idle(owner):
    """The agent's session (it, its readers, docker events, what it ran and
    waited for) over GRIDX_E2E_AGENT_CPU_S (20 s; make bench: 60) with nobody
    at worker2: with the idle policy (the job running: CPU sampled every 250
    ms) and with always."""
    seconds = int(os.environ.get("GRIDX_E2E_AGENT_CPU_S") or 20)
    script = r"""
. %s/status.env
tck=$(getconf CLK_TCK)
total() { local s=0 f st rest; for f in /proc/[0-9]*/stat; do { read -r st <$f; } 2>/dev/null || continue
    rest=${st##*) }; set -- $rest; [[ $4 == $PID ]] && s=$((s + ${12} + ${13} + ${14} + ${15})); done; echo $s; }
a=$(total); sleep %d; b=$(total)
echo "$(( (b - a) * 100000 / tck / %d ))"
""" % (AGENT_DIR, seconds, seconds)
    out = {}
    for share in ("idle", "always"):
        policy("--share", share)
        time.sleep(3)
        out[share] = int(w2(script, timeout=seconds + 120).split()[-1]) / 1000
    print("\nagent CPU over %d s idle on worker2: idle policy %.3f %% of one core, always %.3f %%"
          % (seconds, out["idle"], out["always"]))
    policy("--share", "idle")
    assert out["idle"] < 5 and out["always"] < 5  # a loop that spins would show tens of %


def test_busy_past_the_preemption_time_the_hub_hears_before_the_sigterm(owner):
    job = owner["job"]
    policy("--idle-time", "30", "--preempt-time", "4", "--grace", "10")
    start = time.time()
    w2("nohup bash -c 'while :; do :; done' >/dev/null 2>&1 & echo $! > /tmp/owner.pid")
    try:
        def ended():
            return w2("docker ps -q --no-trunc --filter id=%s" % job.id).strip() == ""
        wait_until(ended, 60, "the job stopped", interval=1)
    finally:
        w2("kill $(cat /tmp/owner.pid)")
    sigterm = [row for row in w2("cat %s" % job.log).splitlines() if '"SIGTERM ' in row]
    assert sigterm, "the job never got its SIGTERM (it was frozen, or killed)"
    term_at = float(json.loads(sigterm[0])["log"].split()[2])
    preempting = [(at, line) for at, _, line in received() if at >= start and " state=preempting " in line]
    assert preempting, "no preempting report"
    at, line = preempting[0]
    assert " tasks=%s " % job.task in line and " reason=cpu " in line
    assert at <= term_at, "the hub heard it %.3f s after the job's SIGTERM" % (at - term_at)
    print("\npreempting report %.3f s before the job's SIGTERM: %s" % (term_at - at, line))
    policy("--idle-time", "3", "--preempt-time", "600", "--grace", "60")


def test_leave_stops_the_agent_and_leaves_nothing_frozen(owner):
    """Last: worker2 leaves (the fixture joins it again)."""
    hub("jobs", "delete", JOB)  # every worker free: one replica each again
    ok(hub("jobs", "run", "--name", JOB + "-2", "--replicas", "3", "--cpus", owner["cpus"], "--memory", "256M",
           "python:3.11", "--", "sleep", "600"), "jobs run")
    try:
        def running():
            out = w2("docker ps -q --no-trunc --filter label=com.docker.swarm.service.name=%s-2" % JOB).split()
            return out[0] if out else None
        cid = wait_until(running, 180, "a task on worker2", interval=2)
        fz = "/sys/fs/cgroup/freezer/docker/%s/freezer.state" % cid
        policy("--idle-time", "600")
        w2("nohup bash -c 'while :; do :; done' >/dev/null 2>&1 & echo $! > /tmp/owner.pid")
        wait_until(lambda: w2("cat %s" % fz).strip() == "FROZEN", 20, "the task frozen", interval=0.5)
        # what the freezer says, until the container is gone
        w2("nohup bash -c 'f=%s; last=; while [ -e $f ]; do s=$(cat $f 2>/dev/null); "
           "[ \"$s\" = \"$last\" ] || echo \"$s\" >> /tmp/freezer.log; last=$s; sleep 0.05; done; echo gone >> "
           "/tmp/freezer.log' >/dev/null 2>&1 &" % fz)
        r = node_exec(NODE, [BUNDLE + "/leave.sh"], timeout=300)
        ok(r, "leave.sh")
        time.sleep(1)
        seen = w2("cat /tmp/freezer.log; rm -f /tmp/freezer.log").split()
        assert seen[0] == "FROZEN" and "THAWED" in seen, seen
        left = w2("grep -l FROZEN /sys/fs/cgroup/freezer/docker/*/freezer.state 2>/dev/null || true").split()
        assert left == []
        assert w2("test -e %s && echo yes || echo no" % AGENT_DIR).strip() == "no"
        assert "agent.sh" not in w2("ps -eo args")
    finally:
        w2("kill $(cat /tmp/owner.pid) 2>/dev/null; true")
        hub("jobs", "delete", JOB + "-2")
