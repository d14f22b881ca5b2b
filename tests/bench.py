#!/usr/bin/env python3
"""Grid-X benchmarks: Grid-X against the raw tools it wraps, on the lab.

`make bench` runs this after `make demo` (the lab must exist or be buildable).
Standard library only. One run measures everything below; every figure is a
median over repeated runs, and every ratio compares two things measured side
by side (interleaved) in the same run. It prints a Markdown table (each
figure, its target, met or missed) and writes bench-results.json.

  lab      `./test.sh start` + `setup` from built images to 4 Ready nodes
           (the lab's containers and volumes are removed first, images kept;
           runs first, so everything after it runs on a fresh lab)
  startup  `python3 gridx.py --help` / `python3 -c "import argparse"` (<= 1.5x);
           `gridx --version` of the command `pip install .` gives (in a new
           venv, tests/pip_install.py) / `python3 -c "import argparse"` (<= 1.5x);
           `dist/gridx --help` / `python3 gridx.py --help` (<= 3x)
  jobs     `gridx jobs run --wait python:3.11 true` / bare `docker service
           create --mode replicated-job ...` + polling `docker service ps`
           (<= 1.2x)
  state    `gridx jobs list` and `gridx cluster` with 2 and with 200 jobs:
           docker calls and Engine API requests, as `gridx -v` echoes them
           (same number), time with 200 / bare `docker service ls` (<= 2x)
  addpeer  the 1st and the 250th `gridx hub add-peer` on the lab hub (the /24
           filled; 250th <= 1.5x the 1st), a ping from the hub to worker1 over
           the VPN during the first 50 losing nothing; the peers are removed
           afterwards
  join     `./join.sh --yes ...` from start to node Ready on the hub / bare
           `wg-quick up` + `docker swarm join`, same kind of container (<= 1.5x)
  users    `gridx jobs run --wait python:3.11 true --manager gridx@10.0.0.1`
           from a user container (node image, no docker CLI, dist/gridx, set
           up from its user bundle) / the same `gridx jobs run --wait` as
           root on the hub (<= 1.3x), interleaved; once more with a limit set
           for the user (the fair-share check's docker calls), for information
  workdir  `gridx jobs run --workdir DIR python:3.11 'sleep 30'` of 100 MB
           (fresh random data each time and each side) from start to the
           task Running / bare `docker build` of the same Dockerfile and
           context + `docker push` to the hub registry + `docker service
           create` + the same polling (<= 1.3x), interleaved; also each
           side's time until its job was created (the rest is the worker's
           pull), and in the JSON gridx -v's commands with their start times;
           the jobs, the images (hub, registry, workers) and folders are
           removed afterwards
  results  `gridx jobs results JOB DEST` of a completed job's 100 MB --output
           (collected from its worker over the VPN, then copied to DEST) /
           bare `scp` of the same bytes from that worker with the hub's key
           (<= 1.3x), interleaved; hub watch is stopped meanwhile (it would
           collect first) and started again as test.sh's start_watch does;
           the jobs' ended containers are removed from the workers
  owner    the owner's agent on worker2 (tests/e2e/test_owner_lab.py's
           measures, run by pytest against this lab): owner's CPU -> the
           job frozen, p50 and p95 (<= 2 s); the agent's CPU over 60 s idle
           (<= 0.5% of one core); a job's 100 MB --checkpoint taken by the
           hub (take_checkpoint, as hub watch) / bare scp of the same bytes
           from that worker, and restored (checkpoint_image: the layer made
           and pushed, then the worker's docker pull) / bare scp of them
           from the hub to the worker, interleaved
  forward  100 MB of a member's Jupyter through `gridx jobs jupyter --forward`
           in a user container (GET /files/… with bash's /dev/tcp) / bare
           `scp` of the same bytes from the job's worker to the hub with the
           hub's key (<= 1.5x), interleaved; the bytes checked on both sides

Usage: python3 tests/bench.py [--only SECTION,...] [--skip SECTION,...]
                              [--json PATH] [--quick]

Environment: GRIDX_LAB_NAME, GRIDX_LAB_NET, GRIDX_LAB_SUITE (which lab, as for
test.sh).
Exit status: 0 every section ran (targets met or not: the table says),
1 a section failed to run, 2 bad usage.
"""

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from pip_install import InstallError, install

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_SH = os.path.join(ROOT, "test.sh")
BINARY = os.path.join(ROOT, "dist", "gridx")
LAB = os.environ.get("GRIDX_LAB_NAME") or "gridx-lab"
LAB_NET = os.environ.get("GRIDX_LAB_NET") or "172.29.240"
HUB = LAB + "-hub"
WORKERS = ("worker1", "worker2", "worker3")
SUITE = os.environ.get("GRIDX_LAB_SUITE") or "bookworm"  # as test.sh
NODE_IMAGE = "gridx-lab-node:" + SUITE
HUB_IMAGE = "gridx-lab-hub:" + SUITE
JOB_IMAGE = "python:3.11"
JOIN_NODE = LAB + "-benchjoin"
JOIN_IP = LAB_NET + ".30"
# The capability settings of docker-compose.yml (as tests/e2e/conftest.py).
NODE_RUN_FLAGS = [
    "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--device", "/dev/net/tun", "--device-cgroup-rule", "a *:* rwm",
    "--label", "io.gridx.lab.name=" + LAB, "--label", "io.gridx.lab.suite=" + SUITE,
]
SECTIONS = ("lab", "startup", "jobs", "state", "addpeer", "join", "users", "workdir", "results", "owner", "forward")
BENCH_LABEL = "gridx.bench"  # on every swarm service the bench makes itself
SCRIPTS = os.path.join(ROOT, "tests", "bench")


def bench_script(name):
    """A shell script of tests/bench/ (where shellcheck reads it, make lint),
    without its header comments: the text sent to bash -c."""
    with open(os.path.join(SCRIPTS, name + ".sh")) as script:
        return "\n" + "".join(line for line in script if not line.startswith("# shellcheck shell=")
                              and not line.startswith("# Sent by tests/bench.py as "))

# Shell helpers sent with every script run in the hub: `t LABEL CMD...` runs
# CMD (output dropped) and prints "T LABEL MICROSECONDS EXIT_STATUS".
HUB_PRELUDE = bench_script("hub_prelude")


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def sh(argv, timeout=300, check=True, input=None):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise BenchError(f"`{' '.join(argv)[:120]}` exited {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc


def hub_bash(script, *args, timeout=300, check=True, container=HUB):
    """Run a bash script (with HUB_PRELUDE) in a lab container."""
    return sh(["docker", "exec", container, "bash", "-c", HUB_PRELUDE + script, "bench", *map(str, args)],
              timeout=timeout, check=check)


def timings(output):
    """Parse the `T LABEL US RC` lines of HUB_PRELUDE's t(): {label: [(s, rc)]}."""
    found = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "T":
            found.setdefault(parts[1], []).append((int(parts[2]) / 1e6, int(parts[3])))
    return found


def median(values):
    return statistics.median(values) if values else None


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt_s(seconds):
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def container_running(name):
    proc = sh(["docker", "inspect", "-f", "{{.State.Running}}", name], check=False)
    return proc.returncode == 0 and proc.stdout.strip() == "true"


def wait_ready(name, timeout=90):
    deadline = time.monotonic() + timeout
    while sh(["docker", "exec", name, "test", "-e", "/run/gridx-lab.ready"], check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise BenchError(f"{name}: dockerd not ready after {timeout} s")
        time.sleep(0.3)


class Results:
    """The table rows and the raw figures behind them."""

    def __init__(self):
        self.rows = []
        self.raw = {}
        self.notes = []
        self.errors = {}

    def row(self, key, what, value, baseline=None, target=None, met=None, shown=None, note=""):
        """value/baseline in seconds (or counts when shown gives the text)."""
        r = ratio(value, baseline) if isinstance(value, float) and isinstance(baseline, float) else None
        self.rows.append({
            "key": key, "what": what, "value": value, "baseline": baseline, "ratio": r,
            "target": target, "met": met, "shown": shown, "note": note,
        })
        return r


def target_ratio(limit, r):
    return None if r is None else r <= limit


# ---------------------------------------------------------------------------
# 6. The lab: start + setup from built images
# ---------------------------------------------------------------------------


def remove_lab_containers():
    """The lab's containers, volumes and network; images stay."""
    ids = set()
    for flt in (f"label=com.docker.compose.project={LAB}", f"label=io.gridx.lab.name={LAB}"):
        ids.update(sh(["docker", "ps", "-aq", "--filter", flt]).stdout.split())
    if ids:
        sh(["docker", "rm", "-f", "-v", *sorted(ids)], timeout=120)
    for node in ("hub",) + WORKERS:
        sh(["docker", "volume", "rm", f"{LAB}-{node}-docker"], check=False)
    sh(["docker", "network", "rm", LAB], check=False)


def stage_times(stderr):
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"== (.+?): done in ([0-9.]+)s", stderr)}


def bench_lab(res, args):
    images = [i for i in (NODE_IMAGE, HUB_IMAGE, JOB_IMAGE)
              if sh(["docker", "image", "inspect", i], check=False).returncode != 0]
    if images:
        log(f"images missing ({', '.join(images)}): building them first (not timed)")
        sh([TEST_SH, "start"], timeout=1800)
    log(f"removing lab {LAB}'s containers and volumes (images kept)")
    remove_lab_containers()
    t0 = time.monotonic()
    start = sh([TEST_SH, "start"], timeout=600)
    t1 = time.monotonic()
    setup = sh([TEST_SH, "setup"], timeout=600)
    t2 = time.monotonic()
    stages = {**stage_times(start.stderr), **stage_times(setup.stderr)}
    # test.sh's stage that gets the job images into the nodes: start's since
    # issue 20 (before the joins), setup's before (its older names after)
    loading = next((stages[n] for n in ("job images into every node", "job images: hub registry -> workers",
                                        "load job images into workers") if n in stages), 0.0)
    res.raw["lab"] = {"start_s": t1 - t0, "setup_s": t2 - t1, "stages": stages}
    total = t2 - t0
    res.row("lab", "`./test.sh start` + `setup`, built images, to 4 Ready nodes", total,
            shown=f"{total:.1f} s", target="(none set)", met=None,
            note=f"start {t1 - t0:.1f} s, setup {t2 - t1:.1f} s; getting the job images into the nodes "
                 f"{loading:.1f} s of it")
    res.row("lab setup", "`./test.sh setup` of that lab (hub init, 3 joins), built images", t2 - t1,
            shown=f"{t2 - t1:.1f} s", target="≤ 15 s", met=(t2 - t1) <= 15)


# ---------------------------------------------------------------------------
# 1. Start-up
# ---------------------------------------------------------------------------


def pick_python(override=None):
    """The interpreter to time: python3 on PATH, unless it is pyenv's (its shim
    is a shell script, and its builds start slower): then /usr/bin/python3."""
    if override:
        return override, override
    found = shutil.which("python3") or sys.executable
    with open(found, "rb") as handle:
        is_script = handle.read(2) == b"#!"
    if (is_script or "/.pyenv/" in found) and os.path.exists("/usr/bin/python3"):
        return "/usr/bin/python3", f"/usr/bin/python3 (python3 on PATH is pyenv's: {found})"
    return found, found


def binary_state():
    """'ok', or why dist/gridx cannot be measured. Builds it when missing or stale."""
    sources = [os.path.join(ROOT, "gridx.py")] + [
        os.path.join(ROOT, "bundle_templates", n) for n in os.listdir(os.path.join(ROOT, "bundle_templates"))]
    newest = max(os.path.getmtime(p) for p in sources)
    if os.path.exists(BINARY) and os.path.getmtime(BINARY) >= newest:
        return "ok"
    log("dist/gridx missing or older than gridx.py: make binary")
    proc = subprocess.run(["make", "-C", ROOT, "binary"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not os.path.exists(BINARY):
        return "not built (make binary failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1] + ")"
    return "ok"


def time_commands(commands, reps, warmup=2):
    """Run each argv in turn, round after round: {label: [seconds]}."""
    out = {label: [] for label in commands}
    for i in range(warmup + reps):
        for label, argv in commands.items():
            t0 = time.perf_counter()
            proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            elapsed = time.perf_counter() - t0
            if proc.returncode != 0:
                raise BenchError(f"{' '.join(argv)} exited {proc.returncode}")
            if i >= warmup:
                out[label].append(elapsed)
    return out


def bench_startup(res, args):
    python, shown = pick_python(args.python)
    res.raw["interpreter"] = shown
    reps = 9 if args.quick else 21
    cached = tempfile.mkdtemp(prefix="gridx-bench-")
    try:
        # The console script of `pip install .`, in a venv of the same interpreter.
        installed = None
        try:
            venv, how = install(os.path.join(cached, "pip"), python=python)
            installed = os.path.join(venv, "bin", "gridx")
            res.raw["startup_installed_build"] = how
        except (InstallError, subprocess.TimeoutExpired) as error:
            res.raw["startup_installed_build"] = f"install failed: {error}"
        # The same code imported as a module with its bytecode cached (what a
        # launcher that imports gridx gets), for comparison.
        copy = os.path.join(cached, "gridx.py")
        shutil.copy(os.path.join(ROOT, "gridx.py"), copy)
        sh([python, "-c", "import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)",
            copy, importlib.util.cache_from_source(copy)])
        commands = {
            "script": [python, os.path.join(ROOT, "gridx.py"), "--help"],
            "argparse": [python, "-c", "import argparse"],
            "module": [python, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import gridx; "
                       "sys.exit(gridx.main(['--help']))", cached],
        }
        if installed:
            commands["installed"] = [installed, "--version"]
        state = binary_state()
        if state == "ok":
            commands["binary"] = [BINARY, "--help"]
        got = time_commands(commands, reps)
    finally:
        shutil.rmtree(cached, ignore_errors=True)
    med = {k: median(v) for k, v in got.items()}
    res.raw["startup"] = {"runs": got, "median_s": med, "binary": state}
    r = ratio(med["script"], med["argparse"])
    res.row("startup", f"`python3 gridx.py --help` vs `python3 -c \"import argparse\"` ({reps} runs each)",
            med["script"], med["argparse"], "≤ 1.5×", target_ratio(1.5, r))
    if "installed" in med:
        r = ratio(med["installed"], med["argparse"])
        res.row("startup-installed", "`gridx --version` of the `pip install .` command (console script, "
                "bytecode cached) vs `python3 -c \"import argparse\"`", med["installed"], med["argparse"],
                "≤ 1.5×", target_ratio(1.5, r))
    else:
        res.row("startup-installed", "`gridx --version` of the `pip install .` command", None, None, "≤ 1.5×",
                False, shown=res.raw["startup_installed_build"][:160])
    r = ratio(med["module"], med["argparse"])
    res.row("startup-module", "same code imported with its bytecode cached (`import gridx; main()`), for "
            "comparison", med["module"], med["argparse"], "(info)", None)
    if "binary" in med:
        r = ratio(med["binary"], med["script"])
        res.row("startup-binary", "`dist/gridx --help` (static) vs `python3 gridx.py --help`",
                med["binary"], med["script"], "≤ 3×", target_ratio(3, r))
    else:
        res.row("startup-binary", "`dist/gridx --help` vs `python3 gridx.py --help`", None, None, "≤ 3×",
                False, shown=state)


# ---------------------------------------------------------------------------
# 4. Job overhead
# ---------------------------------------------------------------------------

JOBS_SCRIPT = bench_script("jobs")


def bench_jobs(res, args):
    reps = 3 if args.quick else 5
    try:
        out = hub_bash(JOBS_SCRIPT, reps, timeout=300).stdout
    finally:
        hub_bash("gridx jobs delete $(seq -f 'gxbench-run%g' 1 $1) >/dev/null 2>&1; "
                 "docker service rm $(docker service ls -q --filter label=gridx.bench) >/dev/null 2>&1; true",
                 reps, check=False)
    got = timings(out)
    errors = sorted({line[2:].strip() for line in out.splitlines() if line.startswith("E ") and line[2:].strip()})
    ok = {k: [s for s, rc in v if rc == 0] for k, v in got.items()}
    failed = {k: sum(1 for _, rc in v if rc != 0) for k, v in got.items()}
    med = {k: median(v) for k, v in ok.items()}
    res.raw["jobs"] = {"runs": got, "median_ok_s": med, "failed": failed, "errors": errors}
    r = ratio(med.get("gridx"), med.get("bare"))
    note = ""
    if failed.get("gridx"):
        note = (f"gridx runs that FAILED: {failed['gridx']}/{reps} ({'; '.join(errors)[:160]}); "
                f"median of the {len(ok['gridx'])} that passed")
    if failed.get("bare"):
        note += f" bare runs that failed: {failed['bare']}/{reps}"
    met = target_ratio(1.2, r)
    if failed.get("gridx"):
        met = False
    res.row("jobs", f"`gridx jobs run --wait python:3.11 true` vs bare `service create` + poll ({reps} each)",
            med.get("gridx"), med.get("bare"), "≤ 1.2×", met, note=note.strip())


# ---------------------------------------------------------------------------
# 5. Reading state at scale
# ---------------------------------------------------------------------------

STATE_SETUP = bench_script("state_setup")

STATE_MEASURE = bench_script("state_measure")

STATE_FILL = bench_script("state_fill")


def state_point(res, reps):
    out = hub_bash(STATE_MEASURE, reps, timeout=300).stdout
    if "C-FAIL" in out:
        raise BenchError("gridx -v failed while its calls were counted: " + out)
    calls = {m.group(1): int(m.group(2)) for m in re.finditer(r"^C (\S+) (\d+)$", out, re.M)}
    jobs = int(re.search(r"^N (\d+)$", out, re.M).group(1))
    got = timings(out)
    if any(rc for v in got.values() for _, rc in v):
        raise BenchError("a timed command failed: " + repr(got))
    med = {k: median([s for s, _ in v]) for k, v in got.items()}
    return {"jobs": jobs, "calls": calls, "median_s": med, "runs": got}


def bench_state(res, args):
    reps = 5 if args.quick else 7
    big = 200
    existing = int(hub_bash(STATE_SETUP).stdout.strip() or 0)
    made = []
    try:
        small_n = 2
        for i in range(existing, small_n):
            name = f"gxbench-small{i}"
            made.append(name)
            hub_bash("gridx jobs run --wait --name $1 python:3.11 true >/dev/null 2>&1; true", name)
        small = state_point(res, reps)
        t0 = time.monotonic()
        hub_bash(STATE_FILL, big - small["jobs"], timeout=400)
        fill_s = time.monotonic() - t0
        large = state_point(res, reps)
    finally:
        hub_bash("docker service rm $(docker service ls -q --filter label=gridx.bench) >/dev/null 2>&1; "
                 "[ $# -eq 0 ] || gridx jobs delete \"$@\" >/dev/null 2>&1; rm -rf /tmp/gridx-bench; true",
                 *made, check=False, timeout=300)
    res.raw["state"] = {"small": small, "large": large, "fill_s": fill_s}
    n1, n2 = small["jobs"], large["jobs"]
    for cmd, what in (("list", "gridx jobs list"), ("cluster", "gridx cluster")):
        c1, c2 = small["calls"].get(cmd if cmd != "list" else "jobs"), large["calls"].get(
            cmd if cmd != "list" else "jobs")
        res.row(f"state-calls-{cmd}", f"`{what}`: docker calls and Engine API requests with {n1} and with {n2} jobs",
                None, shown=f"{c1} / {c2}", target="same", met=(c1 == c2 and c1 is not None))
    for cmd, what in (("list", "gridx jobs list"), ("cluster", "gridx cluster")):
        res.row(f"state-time-{cmd}", f"`{what}` with {n2} jobs vs bare `docker service ls` of them "
                f"({reps} runs each; the lab's gridx imports gridx.py, bytecode cached, as installed)",
                large["median_s"][cmd], large["median_s"]["bare"], "≤ 2×",
                target_ratio(2, ratio(large["median_s"][cmd], large["median_s"]["bare"])),
                note=f"with {n1} jobs: {fmt_s(small['median_s'][cmd])} vs {fmt_s(small['median_s']['bare'])}")
    if n2 != big:
        res.notes.append(f"state: {n2} jobs instead of {big}")
    res.notes.append(f"state: {big - n1} of the {n2} jobs are pending services with gridx's labels, made by "
                     f"`docker service create` in {fill_s:.0f} s (a constraint no node meets keeps them pending)")


# ---------------------------------------------------------------------------
# 2. Growth of add-peer
# ---------------------------------------------------------------------------

ADDPEER_SCRIPT = bench_script("addpeer")

REMOVE_SCRIPT = bench_script("remove")


def ping_loss(lines):
    """(lost, sent): replies missing among the packets sent before the last reply."""
    seqs = sorted({int(m.group(1)) for m in (re.search(r"icmp_seq=(\d+) ", line) for line in lines) if m})
    if not seqs:
        return None, 0
    missing = set(range(1, seqs[-1] + 1)) - set(seqs)
    sent = 0
    for line in lines:
        m = re.search(r"(\d+) packets transmitted", line)
        if m:
            sent = int(m.group(1))
    # at most one packet can still be in flight when ping is stopped
    lost = len(missing) + max(0, sent - seqs[-1] - 1)
    return lost, sent


def bench_addpeer(res, args):
    peers = json.loads(hub_bash("gridx hub list-peers --json").stdout)["peers"]
    config = json.loads(hub_bash("cat /etc/gridx/hub_config.json").stdout)
    import ipaddress

    hosts = ipaddress.ip_network(config["subnet"]).num_addresses - 2
    free = hosts - 1 - len(peers)  # the hub's own address
    n = min(250, free)
    if n < 60:
        raise BenchError(f"only {free} free addresses in {config['subnet']}: remove peers first")
    target = next(p["ip"] for p in peers if p["name"] == "worker1")
    t0 = time.monotonic()
    try:
        out = hub_bash(ADDPEER_SCRIPT, n, 50, target, timeout=600).stdout
    finally:
        t1 = time.monotonic()
        left = hub_bash(REMOVE_SCRIPT, timeout=600, check=False).stdout.strip()
        t2 = time.monotonic()
    times = [s for s, rc in timings(out).get("add", [])]
    fails = sum(1 for _, rc in timings(out).get("add", []) if rc)
    if fails or len(times) < n:
        raise BenchError(f"add-peer failed {fails} times, {len(times)}/{n} timed")
    first, last = median(times[:5]), median(times[-5:])
    lost, sent = ping_loss([line[2:] for line in out.splitlines() if line.startswith("P ")])
    res.raw["addpeer"] = {"n": n, "times_s": times, "first_s": first, "last_s": last, "ping_sent": sent,
                          "ping_lost": lost, "add_total_s": t1 - t0, "remove_total_s": t2 - t1,
                          "left_over": left, "existing_peers": len(peers)}
    res.row("addpeer", f"`gridx hub add-peer`: the {n}th vs the 1st (medians of 5 around each; "
            f"{len(peers)} peers existed; the /24 filled)", last, first, "≤ 1.5×",
            target_ratio(1.5, ratio(last, first)),
            note=f"{n} added in {t1 - t0:.0f} s; removed in parallel in {t2 - t1:.0f} s")
    res.row("addpeer-ping", "ping hub → worker1 over the VPN every 50 ms while 50 peers are added", None,
            shown=f"{lost} lost of {sent}", target="0 lost", met=(lost == 0 and sent > 0))
    if left not in ("", "0"):
        res.notes.append(f"addpeer: {left} bench peers were left on the hub")


# ---------------------------------------------------------------------------
# 3. Join
# ---------------------------------------------------------------------------

POLL_READY = bench_script("poll_ready")

BARE_JOIN = bench_script("bare_join")

BARE_LEAVE = bench_script("bare_leave")


def node_ids():
    return sh(["docker", "exec", HUB, "docker", "node", "ls", "--format", "{{.ID}}"]).stdout.split()


def timed_join(argv):
    """Seconds from starting argv (in the join node) to a new node Ready on the hub."""
    known = node_ids()
    poll = subprocess.Popen(["docker", "exec", HUB, "bash", "-c", POLL_READY, "poll", *known],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(0.3)  # the poller has read its first node list
        t0 = time.monotonic()
        join = subprocess.Popen(["docker", "exec", JOIN_NODE, *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        line = ""
        deadline = t0 + 120
        while not line.startswith("READY") and time.monotonic() < deadline:
            line = poll.stdout.readline()
            if not line:
                break
        elapsed = time.monotonic() - t0
        out, _ = join.communicate(timeout=120)
        if join.returncode != 0 or not line.startswith("READY"):
            raise BenchError(f"join {' '.join(argv)[:60]} failed (exit {join.returncode}): {out[-1500:]}")
        return elapsed
    finally:
        if poll.poll() is None:
            poll.kill()
        poll.wait()


def bench_join(res, args):
    reps = 2 if args.quick else 3
    sh(["docker", "rm", "-f", "-v", JOIN_NODE], check=False)
    hub_bash("gridx hub remove-peer benchjoin >/dev/null 2>&1; true", check=False)
    got = {"join.sh": [], "bare": [], "bare+restart": []}
    try:
        sh(["docker", "run", "-d", "--name", JOIN_NODE, "--hostname", "benchjoin", "--network", LAB,
            "--ip", JOIN_IP, "-v", "/var/lib/docker", *NODE_RUN_FLAGS, NODE_IMAGE])
        wait_ready(JOIN_NODE)
        path = json.loads(hub_bash("gridx hub add-peer --json benchjoin").stdout)["bundle"]
        copy = subprocess.Popen(["docker", "cp", f"{HUB}:{path}", "-"], stdout=subprocess.PIPE)
        subprocess.run(["docker", "cp", "-", f"{JOIN_NODE}:/root/"], stdin=copy.stdout, check=True)
        copy.wait()
        cpus = "1"
        for _ in range(reps):
            got["join.sh"].append(timed_join(["/root/gridx-benchjoin-bundle/join.sh", "--yes", "--cpus", cpus,
                                              "--memory", "1G"]))
            sh(["docker", "exec", JOIN_NODE, "/root/gridx-benchjoin-bundle/leave.sh", "--yes"], timeout=120)
            for variant, extra in (("bare", []), ("bare+restart", ["restart"])):
                got[variant].append(timed_join(["bash", "-c", BARE_JOIN, "bare", *extra]))
                sh(["docker", "exec", JOIN_NODE, "bash", "-c", BARE_LEAVE], timeout=120)
    finally:
        sh(["docker", "rm", "-f", "-v", JOIN_NODE], check=False)
        hub_bash("gridx hub remove-peer benchjoin >/dev/null 2>&1; "
                 "for id in $(docker node ls --format '{{.ID}} {{.Hostname}}' | awk '$2 == \"benchjoin\" {print $1}');"
                 " do docker node rm --force $id >/dev/null; done; true", check=False)
    med = {k: median(v) for k, v in got.items()}
    res.raw["join"] = {"runs_s": got, "median_s": med}
    res.row("join", f"`join.sh --yes` start → node Ready on the hub vs bare `wg-quick up` + "
            f"`docker swarm join` ({reps} each, same container)", med["join.sh"], med["bare"], "≤ 1.5×",
            target_ratio(1.5, ratio(med["join.sh"], med["bare"])))
    res.row("join-restart", "`join.sh --yes` vs the bare steps plus what it must add: the resources in "
            "daemon.json and a Docker restart (polled every 0.1 s)", med["join.sh"], med["bare+restart"],
            "(info)", None)


# ---------------------------------------------------------------------------
# 7. Users: a job through `--manager gridx@HUB` (issue 13)
# ---------------------------------------------------------------------------

USER_NODE = LAB + "-benchuser"
USER_IP = LAB_NET + ".31"
BENCH_USER = "benchuser"

USER_SETUP = bench_script("user_setup")

USER_RUN = bench_script("user_run")
HUB_RUN = 't hub gridx jobs run --wait --name "$2" python:3.11 true'


def user_container():
    """A user's machine: the node image without the docker CLI or Python,
    the static binary, set up from benchuser's bundle (USER_SETUP)."""
    if not os.path.isfile(BINARY):
        raise BenchError(f"{BINARY} is missing: make binary")
    remove_user_container()
    sh(["docker", "run", "-d", "--name", USER_NODE, "--hostname", "benchuser", "--network", LAB,
        "--ip", USER_IP, "-v", "/var/lib/docker", *NODE_RUN_FLAGS, NODE_IMAGE])
    wait_ready(USER_NODE)
    sh(["docker", "exec", USER_NODE, "rm", "-f", "/usr/bin/docker", "/usr/bin/dockerd"])
    sh(["docker", "cp", BINARY, f"{USER_NODE}:/usr/local/bin/gridx"])
    path = json.loads(hub_bash(f"gridx hub add-user {BENCH_USER} --json").stdout)["bundle"]
    copy = subprocess.Popen(["docker", "cp", f"{HUB}:{path}", "-"], stdout=subprocess.PIPE)
    subprocess.run(["docker", "cp", "-", f"{USER_NODE}:/root/"], stdin=copy.stdout, check=True)
    copy.wait()
    hub_bash(USER_SETUP, container=USER_NODE)


def remove_user_container():
    sh(["docker", "rm", "-f", "-v", USER_NODE], check=False)
    hub_bash(f"gridx hub remove-user {BENCH_USER} --stop-jobs >/dev/null 2>&1; true", check=False)


def bench_users(res, args):
    reps = 3 if args.quick else 5
    got, names = {"hub": [], "user": [], "user+limits": []}, []
    try:
        user_container()
        for variant in ("user", "user+limits"):
            if variant == "user+limits":
                hub_bash(f"gridx hub set-user {BENCH_USER} --max-cpus 100 >/dev/null")
            for i in range(2 + reps):  # 2 warm-up rounds each (the first opens the shared SSH connection)
                for label, container, script in (("hub", HUB, HUB_RUN), (variant, USER_NODE, USER_RUN)):
                    name = f"gxbench-{variant.replace('+', '-')}-{label.replace('+', '-')}{i}"
                    names.append(name)
                    out = hub_bash(script, label, name, container=container, timeout=300).stdout
                    if i >= 2:
                        got[label] += timings(out).get(label, [])
    finally:
        hub_bash("gridx jobs delete \"$@\" >/dev/null 2>&1; true", *names, check=False)
        remove_user_container()
    failed = {k: sum(1 for _, rc in v if rc != 0) for k, v in got.items()}
    med = {k: median([s for s, rc in v if rc == 0]) for k, v in got.items()}
    res.raw["users"] = {"runs": got, "median_ok_s": med, "failed": failed}
    note = "; ".join(f"{k}: {n} FAILED" for k, n in failed.items() if n)
    r = ratio(med["user"], med["hub"])
    res.row("users", f"`gridx jobs run --wait python:3.11 true --manager gridx@10.0.0.1` from a user's machine "
            f"(static binary, ssh only) vs the same as root on the hub ({reps} each, interleaved)",
            med["user"], med["hub"], "≤ 1.3×", False if failed["user"] else target_ratio(1.3, r), note=note)
    res.row("users-limits", "the same with a limit set for the user (serve counts their jobs' reservations first)",
            med["user+limits"], med["hub"], "(info)", None)


# ---------------------------------------------------------------------------
# 8. Work folders: --workdir, submit → running (issue 14)
# ---------------------------------------------------------------------------

WORKDIR_PREFIX = "gxbench-wd"  # the jobs' names; the bare side's images are REGISTRY/gxbench/work:TAG
BARE_REPOSITORY = "gxbench/work"
# Where the bare side pushes: the hub registry's writer on its loopback (the
# VPN address is read-only, 405 to a push), as gridx pushes a work folder.
REGISTRY_WRITER = "127.0.0.1:5001"  # same as gridx.py's registry_writer()

# Shared by both sections: `running NAME` / `ended NAME` poll the job's task
# every 0.1 s (as the jobs section and gridx's --wait do) until it is Running
# / Complete; a task that ends otherwise is an error, said on stderr. What
# the commands say on stderr is printed at the end as W lines (shown when a
# run failed); the bench's own findings are E lines.
POLL_TASK = bench_script("poll_task")

WORKDIR_SCRIPT = POLL_TASK + bench_script("workdir")

# What the bench left on the hub, its registry and the workers. $1 the
# registry, $2 the job prefix, $3 the bare side's repository.
WORKDIR_CLEAN_HUB = bench_script("workdir_clean_hub")

WORKDIR_CLEAN_WORKER = bench_script("workdir_clean_worker")


def hub_registry():
    return json.loads(hub_bash("gridx image ls --json").stdout)["registry"]


def side_by_side(out, reps):
    """The gridx/bare timings of a script's output: (runs, medians of those
    that passed, failures, E findings, W stderr, note for the table)."""
    got = timings(out)
    found = {kind: [line[2:].strip() for line in out.splitlines() if line.startswith(kind + " ") and line[2:].strip()]
             for kind in ("E", "W")}
    # a run that never printed its timing (the script stopped early) failed too
    failed = {k: sum(1 for _, rc in got.get(k, []) if rc != 0) + max(0, reps - len(got.get(k, [])))
              for k in ("gridx", "bare")}
    med = {k: median([s for s, rc in got.get(k, []) if rc == 0]) for k in ("gridx", "bare")}
    said = found["E"] + (found["W"] if any(failed.values()) else [])
    note = "; ".join(f"{k}: {n}/{reps} FAILED" for k, n in failed.items() if n)
    if said:
        note = (note + " — " if note else "") + "; ".join(said)[:240]
    return got, med, failed, found["E"], found["W"], note


def clean_workdir(registry):
    """The jobs, services, images (hub, registry, workers) and folders the
    workdir section made; what is still there afterwards (L lines)."""
    args = (registry, WORKDIR_PREFIX, BARE_REPOSITORY)
    cleaned = hub_bash(WORKDIR_CLEAN_HUB, *args, REGISTRY_WRITER, timeout=600, check=False)
    left = [line[2:] for line in cleaned.stdout.splitlines() if line.startswith("L ")]
    for worker in WORKERS:
        out = hub_bash(WORKDIR_CLEAN_WORKER, *args, container=f"{LAB}-{worker}", check=False).stdout
        left += [f"{worker}: {line[2:]}" for line in out.splitlines() if line.startswith("L ")]
    return left


def bench_workdir(res, args):
    reps = 3 if args.quick else 5
    size = 100_000_000
    registry = hub_registry()
    clean_workdir(registry)  # an earlier run's leftovers would take the names
    try:
        out = hub_bash(WORKDIR_SCRIPT, reps, size, registry, WORKDIR_PREFIX, BARE_REPOSITORY, REGISTRY_WRITER,
                       timeout=1800).stdout
    finally:
        left = clean_workdir(registry)
    got, med, failed, errors, said, note = side_by_side(out, reps)
    phases = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "P":
            phases.setdefault(parts[1], []).append(int(parts[2]) / 1e6)
    created = {k: median(phases.get(k, [])) for k in ("gridx", "bare")}
    steps = {}  # rep: ["MS LINE"], gridx -v's commands with the time each began at
    for line in out.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[0] == "S":
            steps.setdefault(parts[1], []).append(f"{parts[2]} ms {parts[3]}")
    res.raw["workdir"] = {"runs": got, "median_ok_s": med, "failed": failed, "errors": errors, "stderr": said,
                          "left_over": left, "bytes": size, "until_created_s": phases,
                          "until_created_median_s": created, "gridx_steps": steps}
    note = "; ".join(filter(None, [
        f"until the job was created (build, push, create): gridx {fmt_s(created['gridx'])}, bare "
        f"{fmt_s(created['bare'])}; the rest is the worker's pull and start" if None not in created.values() else "",
        note]))
    r = ratio(med["gridx"], med["bare"])
    res.row("workdir", f"`gridx jobs run --workdir DIR python:3.11 'sleep 30'` (100 MB of fresh random data), "
            f"start → task Running, vs bare `docker build` + `docker push` to the hub registry + `service create` "
            f"+ poll ({reps} each, interleaved, order alternating)", med["gridx"], med["bare"], "≤ 1.3×",
            False if any(failed.values()) or errors else target_ratio(1.3, r), note=note)
    if left:
        res.notes.append("workdir: left behind: " + "; ".join(left))


# ---------------------------------------------------------------------------
# 9. Results: --output collected and copied, vs scp (issue 14)
# ---------------------------------------------------------------------------

RESULTS_PREFIX = "gxbench-res"

RESULTS_SCRIPT = POLL_TASK + bench_script("results")

RESULTS_CLEAN = bench_script("results_clean")

# Docker 20.10 keeps a replicated-job's ended container on its worker after
# `service rm` (and so after `gridx jobs delete`), each holding its 100 MB.
RESULTS_CLEAN_WORKER = bench_script("results_clean_worker")

# test.sh's start_watch, word for word
WATCH_COMMAND = "exec gridx hub watch --interval 5 --down-after 15 >>/var/log/gridx-watch.log 2>&1"


def watch_running():
    return sh(["docker", "exec", HUB, "pgrep", "-f", "gridx hub watch"], check=False).returncode == 0


def stop_watch():
    """hub watch would collect a job's results before `jobs results` is timed."""
    sh(["docker", "exec", HUB, "pkill", "-f", "hub watch"], check=False)
    deadline = time.monotonic() + 30
    while watch_running():
        if time.monotonic() > deadline:
            raise BenchError("hub watch did not stop within 30 s of pkill")
        time.sleep(0.2)


def start_watch():
    if not watch_running():
        sh(["docker", "exec", "-d", HUB, "sh", "-c", WATCH_COMMAND])


def bench_results(res, args):
    reps = 3 if args.quick else 5
    size = 100_000_000
    # the hub's key: ssh_key_path() in gridx.py
    key = hub_bash('k=${GRIDX_CONFIG_DIR:-/etc/gridx}/ssh/id_ed25519; test -f "$k" && echo "$k"').stdout.strip()
    was_running = watch_running()
    hub_bash(RESULTS_CLEAN, RESULTS_PREFIX, check=False)
    try:
        stop_watch()
        out = hub_bash(RESULTS_SCRIPT, reps, size, key, os.path.join(os.path.dirname(key), "known_hosts"),
                       RESULTS_PREFIX, timeout=1200).stdout
    finally:
        left = [line[2:] for line in hub_bash(RESULTS_CLEAN, RESULTS_PREFIX, check=False).stdout.splitlines()
                if line.startswith("L ")]
        for worker in WORKERS:
            found = hub_bash(RESULTS_CLEAN_WORKER, RESULTS_PREFIX, container=f"{LAB}-{worker}", check=False).stdout
            left += [f"{worker}: {line[2:]}" for line in found.splitlines() if line.startswith("L ")]
        if was_running:
            start_watch()
    got, med, failed, errors, said, note = side_by_side(out, reps)
    nodes = sorted({line.split()[1] for line in out.splitlines() if line.startswith("N ")})
    res.raw["results"] = {"runs": got, "median_ok_s": med, "failed": failed, "errors": errors, "stderr": said,
                          "nodes": nodes, "left_over": left, "bytes": size, "watch_restarted": was_running}
    r = ratio(med["gridx"], med["bare"])
    res.row("results", f"`gridx jobs results JOB DEST` of a job's 100 MB --output (collected from the worker over "
            f"the VPN, then copied to DEST; hub watch stopped) vs bare `scp` of the same 100 MB from that worker "
            f"with the hub's key ({reps} each, interleaved, order alternating; workers: {', '.join(nodes)})",
            med["gridx"], med["bare"], "≤ 1.3×", False if any(failed.values()) or errors else target_ratio(1.3, r),
            note=note)
    if left:
        res.notes.append("results: left behind: " + "; ".join(left))
    if not was_running:
        res.notes.append("results: hub watch was not running before the section (left stopped)")



# ---------------------------------------------------------------------------
# 11. The owner comes first: the agent's delay and cost, checkpoints (issue 21)
# ---------------------------------------------------------------------------

CHECKPOINT_PREFIX = "gxbench-ckpt"
CHECKPOINT_SCRIPT = bench_script("checkpoint")
with open(os.path.join(SCRIPTS, "checkpoint.py")) as _script:
    CHECKPOINT_PY = _script.read()
OWNER_TESTS = ("test_owner_cpu_pauses_the_job_within_2_s_and_idle_resumes_it or "
               "test_agent_cpu_use_idle")


def owner_measures():
    """test_owner_lab's two measuring tests on this lab: what they printed."""
    env = dict(os.environ, GRIDX_LAB_NAME=LAB, GRIDX_LAB_NET=LAB_NET, GRIDX_LAB_SUITE=SUITE, GRIDX_E2E_REQUIRED="1",
               GRIDX_E2E_AGENT_CPU_S="60")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "e2e",
                           os.path.join(ROOT, "tests", "e2e", "test_owner_lab.py"), "-k", OWNER_TESTS],
                          capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    frozen = re.search(r"owner's CPU -> job frozen \(s\): p50 ([0-9.]+) p95 ([0-9.]+) max ([0-9.]+) over (\d+)",
                       proc.stdout)
    cost = re.search(r"agent CPU over 60 s idle on worker2: idle policy ([0-9.]+) % of one core, always ([0-9.]+)",
                     proc.stdout)
    if proc.returncode != 0 or not frozen or not cost:
        raise BenchError("test_owner_lab's measures did not run: " + (proc.stdout + proc.stderr).strip()[-800:])
    return {"frozen_p50": float(frozen.group(1)), "frozen_p95": float(frozen.group(2)),
            "frozen_max": float(frozen.group(3)), "tries": int(frozen.group(4)),
            "agent_idle_pct": float(cost.group(1)), "agent_always_pct": float(cost.group(2))}


def bench_owner(res, args):
    reps = 3 if args.quick else 5
    size = 100_000_000
    measured = owner_measures()
    res.raw["owner"] = dict(measured)
    res.row("owner-pause", f"the owner's CPU-bound program on worker2 → the job's cgroup FROZEN (`docker pause` by "
            f"the agent), p50 over {measured['tries']} tries (p95 {measured['frozen_p95']:.2f} s, max "
            f"{measured['frozen_max']:.2f} s)", measured["frozen_p50"], None, "p95 ≤ 2 s",
            measured["frozen_p95"] <= 2.0, shown=f"p50 {measured['frozen_p50']:.2f} s, p95 "
            f"{measured['frozen_p95']:.2f} s")
    res.row("owner-agent-cpu", "the agent's CPU (its session: it, its readers, docker events) over 60 s with "
            f"nobody at worker2 and a job running — idle policy; `always`: {measured['agent_always_pct']:.2f} %",
            measured["agent_idle_pct"], None, "≤ 0.5 % of one core", measured["agent_idle_pct"] <= 0.5,
            shown=f"{measured['agent_idle_pct']:.2f} % of one core")
    key = hub_bash('k=${GRIDX_CONFIG_DIR:-/etc/gridx}/ssh/id_ed25519; test -f "$k" && echo "$k"').stdout.strip()
    hub_bash(RESULTS_CLEAN, CHECKPOINT_PREFIX, check=False)
    try:
        out = hub_bash(CHECKPOINT_SCRIPT, reps, size, key, os.path.join(os.path.dirname(key), "known_hosts"),
                       CHECKPOINT_PREFIX, CHECKPOINT_PY, timeout=1800).stdout
    finally:
        hub_bash(RESULTS_CLEAN, CHECKPOINT_PREFIX, check=False)
    got = timings(out)
    errors = [line[2:] for line in out.splitlines() if line.startswith("E ")]
    said = [line[2:] for line in out.splitlines() if line.startswith("W ")]
    nodes = sorted({line.split()[1] for line in out.splitlines() if line.startswith("N ")})
    res.raw["owner"].update(checkpoint_runs=got, errors=errors, stderr=said, nodes=nodes, bytes=size)
    for kind, what in (("take", "taken by the hub from the running container (as hub watch does) vs bare `scp` of "
                                "the same bytes from that worker with the hub's key"),
                       ("restore", "restored: laid on the job's image as a layer and pushed to the hub's registry, "
                                   "then pulled by the worker vs bare `scp` of the bytes from the hub to it")):
        runs, bare = got.get(kind, []), got.get(kind + "_bare", [])
        failed = sum(1 for _, rc in runs + bare if rc != 0) + max(0, 2 * reps - len(runs) - len(bare))
        value, baseline = median([t for t, rc in runs if rc == 0]), median([t for t, rc in bare if rc == 0])
        note = "; ".join(([f"{failed} run(s) FAILED"] if failed else []) + errors + (said if failed else []))[:240]
        res.row("owner-checkpoint-" + kind, f"a job's 100 MB `--checkpoint` {what} ({reps} each, interleaved; "
                f"workers: {', '.join(nodes)})", value, baseline, "(info)", None if not (failed or errors) else False,
                note=note)


# ---------------------------------------------------------------------------
# 10. A member's Jupyter forwarded: 100 MB through `jobs forward` vs scp (issue 22)
# ---------------------------------------------------------------------------

FORWARD_JOB, FORWARD_PORT, FORWARD_LOCAL = "gxbench-fwd", 8897, 18897
FORWARD_PREPARE = bench_script("forward_prepare")
FORWARD_GET = bench_script("forward_get")
FORWARD_SCP = bench_script("forward_scp")
# the member's forward, left running in the user container (its URL in
# /tmp/gxbench-fwd.out), of the Jupyter image in the hub's registry (IMAGE:
# ./test.sh push-image's name for it; the lab seeds python:3.11 only)
FORWARD_START = (". /root/gridx-benchuser-user/settings.env; export GRIDX_MANAGER GRIDX_SSH_KEY; "
                 f"exec gridx jobs jupyter --image {{image}} --name {FORWARD_JOB} "
                 f"--port {FORWARD_PORT} --forward {FORWARD_LOCAL} >/tmp/gxbench-fwd.out 2>/tmp/gxbench-fwd.err")


def forward_url():
    return sh(["docker", "exec", USER_NODE, "cat", "/tmp/gxbench-fwd.out"], check=False).stdout.strip()


def bench_forward(res, args):
    reps = 3 if args.quick else 5
    size = 100_000_000
    key = hub_bash('k=${GRIDX_CONFIG_DIR:-/etc/gridx}/ssh/id_ed25519; test -f "$k" && echo "$k"').stdout.strip()
    known = os.path.join(os.path.dirname(key), "known_hosts")
    hub_bash(f"gridx jobs delete {FORWARD_JOB} >/dev/null 2>&1; true", check=False)
    got, hashes, said = {}, {"forward": [], "bare": []}, []
    try:
        image = sh([TEST_SH, "push-image", "gridx-lab-jupyter:latest"], timeout=1200).stdout.strip()
        user_container()
        sh(["docker", "exec", "-d", USER_NODE, "bash", "-c", FORWARD_START.format(image=image)])
        deadline = time.monotonic() + 600
        while not forward_url().startswith("http://"):
            if time.monotonic() > deadline:
                raise BenchError("the forward printed no URL within 600 s: " + sh(
                    ["docker", "exec", USER_NODE, "cat", "/tmp/gxbench-fwd.err"], check=False).stdout[-400:])
            time.sleep(1)
        token = forward_url().rpartition("token=")[2]
        out = hub_bash(FORWARD_PREPARE, FORWARD_JOB, size, key, known, timeout=600).stdout
        node, addr = next(line.split()[1:3] for line in out.splitlines() if line.startswith("N "))
        source = next(line.split()[1] for line in out.splitlines() if line.startswith("H "))
        for i in range(reps + 1):  # the first round warms both up (the shared SSH connection, page cache)
            sides = [("forward", USER_NODE, FORWARD_GET, (FORWARD_LOCAL, token, size)),
                     ("bare", HUB, FORWARD_SCP, (key, known, addr))]
            for label, where, script, script_args in (sides if i % 2 else sides[::-1]):
                out = hub_bash(script, *script_args, container=where, timeout=600, check=False).stdout
                if i:
                    for name, runs in timings(out).items():
                        got.setdefault(name, []).extend(runs)
                    hashes[label] += [line.split()[1] for line in out.splitlines() if line.startswith("H ")]
    finally:
        said = sh(["docker", "exec", USER_NODE, "cat", "/tmp/gxbench-fwd.err"], check=False).stdout.splitlines()
        hub_bash(f"gridx jobs delete {FORWARD_JOB} >/dev/null 2>&1; true", check=False)
        remove_user_container()
        for worker in WORKERS:
            sh(["docker", "exec", f"{LAB}-{worker}", "rm", "-f", "/tmp/gxbench-fwd.bin"], check=False)
    failed = {k: sum(1 for _, rc in got.get(k, []) if rc != 0) + max(0, reps - len(got.get(k, [])))
              for k in ("forward", "bare")}
    wrong = [k for k, found in hashes.items() if any(h != source for h in found)]
    med = {k: median([s_ for s_, rc in got.get(k, []) if rc == 0]) for k in ("forward", "bare")}
    res.raw["forward"] = {"runs": got, "median_ok_s": med, "failed": failed, "bytes": size, "node": node,
                          "hashes_differ": wrong, "stderr": said[-20:]}
    note = "; ".join([f"{k}: {n}/{reps} FAILED" for k, n in failed.items() if n] +
                     [f"{k}: the bytes differ from the job's" for k in wrong])
    r = ratio(med["forward"], med["bare"])
    res.row("forward", f"100 MB of a member's Jupyter (`/files/…` through `gridx jobs jupyter --forward` in a "
            f"user container: ssh to the hub's serve, the hub to worker {node} over the VPN) vs bare `scp` of the "
            f"same bytes from that worker to the hub with the hub's key ({reps} each, interleaved, order alternating)",
            med["forward"], med["bare"], "≤ 1.5×",
            False if any(failed.values()) or wrong else target_ratio(1.5, r), note=note)


# ---------------------------------------------------------------------------
# Machine, table, main
# ---------------------------------------------------------------------------


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    others = [n for n in sh(["docker", "ps", "--format", "{{.Names}}"], check=False).stdout.split()
              if not n.startswith(LAB + "-")]
    return {"nproc": os.cpu_count(), "cpu": model, "load": os.getloadavg(), "kernel": platform.release(),
            "docker": sh(["docker", "version", "--format", "{{.Server.Version}}"], check=False).stdout.strip(),
            "other_containers": others, "lab": LAB}


def render(res, info, total_s):
    lines = [
        f"Machine: {info['nproc']} cores ({info['cpu']}), kernel {info['kernel']}, Docker {info['docker']}; "
        f"load average at start {info['load_start'][0]:.2f}, at end {info['load_end'][0]:.2f}; "
        f"other containers running: {len(info['other_containers'])}. Lab `{LAB}`. "
        f"Interpreter: {res.raw.get('interpreter', '-')}. `make bench` took {total_s / 60:.1f} min.",
        "",
        "| Measure | Grid-X | Baseline | Ratio | Target | Result |",
        "|---|---|---|---|---|---|",
    ]
    for r in res.rows:
        value = r["shown"] if r["shown"] is not None else fmt_s(r["value"])
        base = fmt_s(r["baseline"]) if r["baseline"] is not None else "-"
        rat = f"{r['ratio']:.2f}×" if r["ratio"] is not None else "-"
        result = {True: "met", False: "**missed**", None: "-"}[r["met"]]
        what = r["what"] + (f" — {r['note']}" if r["note"] else "")
        lines.append(f"| {what} | {value} | {base} | {rat} | {r['target'] or '-'} | {result} |")
    for section, error in res.errors.items():
        lines.append(f"| {section}: did not run — {error[:200]} | - | - | - | - | **failed** |")
    for note in res.notes:
        lines.append("")
        lines.append(f"Note: {note}")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Grid-X benchmarks on the lab (make bench).")
    p.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    p.add_argument("--skip", help="comma-separated sections to leave out")
    p.add_argument("--json", default=os.path.join(ROOT, "bench-results.json"), help="where to write the results")
    p.add_argument("--python", help="interpreter to time for start-up (default: see pick_python)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (for trying the script)")
    args = p.parse_args(argv)
    chosen = list(SECTIONS)
    for flag, keep in ((args.only, True), (args.skip, False)):
        if flag:
            names = [n.strip() for n in flag.split(",") if n.strip()]
            bad = [n for n in names if n not in SECTIONS]
            if bad:
                p.error(f"unknown section(s): {', '.join(bad)} (choose from {', '.join(SECTIONS)})")
            chosen = [s for s in chosen if (s in names) == keep]
    args.sections = chosen
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if shutil.which("docker") is None or sh(["docker", "info"], check=False).returncode != 0:
        print("bench: Docker is not running here (make lab-deps, then start dockerd)", file=sys.stderr)
        return 1
    info = machine()
    info["load_start"] = info.pop("load")
    if info["other_containers"]:
        log(f"other containers are running ({len(info['other_containers'])}): figures may be noisy")
    needs_lab = [s for s in args.sections if s not in ("startup", "lab")]
    if needs_lab and "lab" not in args.sections and not container_running(HUB):
        print(f"bench: the lab {LAB} is not running: ./test.sh start && ./test.sh setup (or make demo)",
              file=sys.stderr)
        return 1
    res = Results()
    started = time.monotonic()
    section_s = {}
    for name in args.sections:
        log(f"== {name}")
        t0 = time.monotonic()
        try:
            globals()["bench_" + name](res, args)
        except (BenchError, subprocess.TimeoutExpired, subprocess.CalledProcessError) as error:
            res.errors[name] = str(error)
            log(f"{name} failed: {error}")
        section_s[name] = round(time.monotonic() - t0, 1)
        log(f"== {name}: {section_s[name]} s")
    total = time.monotonic() - started
    info["load_end"] = os.getloadavg()
    table = render(res, info, total)
    print(table)
    document = {"machine": info, "total_s": round(total, 1), "section_s": section_s, "rows": res.rows,
                "notes": res.notes, "errors": res.errors, "raw": res.raw,
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(args.json, "w") as handle:
        json.dump(document, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
    log(f"wrote {args.json}; total {total:.0f} s")
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
