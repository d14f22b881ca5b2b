"""The owner comes first: the hub's side (issue 21), on the real lab.

worker2's agent (joined by setup, with the bundle's agent.sh) reports to the
hub's `gridx hub watch`, which listens on 10.0.0.1:5002:

- while its owner runs a CPU-bound program (outside Docker) the hub pauses
  worker2 in the swarm within 15 s, `gridx cluster` says why, and jobs
  submitted meanwhile go to the other workers; after the idle time it takes
  jobs again;
- a training stand-in (it counts epochs in a checkpoint file it writes and
  renames, in GRIDX_CHECKPOINT_DIR) on worker2, its owner busy past the
  preemption time: the job runs again on another worker from its
  checkpoint (the epoch goes on, not from 0), and was never counted as a
  failure;
- the same job on a worker that is SIGKILLed: it runs again from the last
  periodic checkpoint the hub took (every 10 s here).
"""

import json
import re
import subprocess
import time

import pytest
from e2e_helpers import ROOT, container, hub, node_exec, ok, start_stopped_worker, wait_until

AGENT = "/var/lib/gridx/agent/agent.sh"
TRAIN = """import json, os, signal, sys, time
folder = os.environ["GRIDX_CHECKPOINT_DIR"]
os.makedirs(folder, exist_ok=True)
state = os.path.join(folder, "state.json")
epoch = json.load(open(state))["epoch"] if os.path.exists(state) else 0
print("start", epoch, flush=True)
signal.signal(signal.SIGTERM, lambda *_: (print("sigterm at", epoch, flush=True), sys.exit(0)))
while epoch < 100000:
    time.sleep(1)
    epoch += 1
    with open(state + ".tmp", "w") as handle:  # the model, the optimizer, the epoch: written whole, then renamed
        json.dump({"epoch": epoch}, handle)
    os.replace(state + ".tmp", state)
    print("epoch", epoch, flush=True)
"""


def hub_sh(cmd, timeout=120):
    return node_exec("hub", ["sh", "-c", cmd], timeout=timeout)


def node_id(name):
    return ok(hub_sh(f"docker node ls --filter name={name} --format '{{{{.ID}}}} {{{{.Hostname}}}} "
                     f"{{{{.Status}}}}' | awk '$2 == \"{name}\" && $3 == \"Ready\" {{print $1}}'"), "node").split()[0]


def availability(name):
    out = ok(hub_sh(f"docker node inspect --format '{{{{.Spec.Availability}}}}' {node_id(name)}"), "inspect")
    return out.strip()


def set_availability(names, value):
    for name in names:
        ok(hub_sh(f"docker node update --availability {value} {node_id(name)} >/dev/null"), f"{value} {name}")


def policy(*args):
    ok(node_exec("worker2", [AGENT, "policy", *args]), "agent.sh policy")


def burner(node):
    ok(node_exec(node, "nohup bash -c 'while :; do :; done' >/dev/null 2>&1 & echo $! > /tmp/owner.pid"), "burner")


def stop_burner(node):
    node_exec(node, "kill $(cat /tmp/owner.pid) 2>/dev/null; rm -f /tmp/owner.pid")


def task_node(job):
    status = json.loads(ok(hub("jobs", "status", job, "--json"), "status"))
    running = [t for t in status["tasks"] if t["state"] == "running"]
    return running[0]["node"] if running else None


def starts(job):
    """The epochs each run of the job started from ("start N" lines)."""
    out = hub("jobs", "logs", job, timeout=120).stdout
    return [int(n) for n in re.findall(r"^start (\d+)$", out, re.M)]


@pytest.fixture(scope="module")
def owner_hub(lab):
    """hub watch of this checkout listening; worker2's agent reporting to it."""
    listening = hub_sh("ss -ltn 2>/dev/null | grep -q '10.0.0.1:5002 ' && echo yes").stdout.strip()
    if listening != "yes":
        hub_sh("pkill -f 'gridx hub watch'")
        ok(subprocess.run(["./test.sh", "setup"], capture_output=True, text=True, timeout=900,
                          cwd=str(ROOT)), "./test.sh setup (hub watch)")
        wait_until(lambda: hub_sh("ss -ltn | grep -q '10.0.0.1:5002 '").returncode == 0, 30, "the hub listening")
    if node_exec("worker2", ["test", "-x", AGENT]).returncode != 0:
        pytest.fail("worker2 has no agent: setup joins with the bundle's agent.sh", pytrace=False)
    ok(node_exec("worker2", [AGENT, "start"], timeout=60), "agent.sh start")
    policy("--share", "idle", "--idle-time", "3", "--preempt-time", "600", "--grace", "20")
    made = []
    ok(hub_sh("rm -rf /root/e2e-train && mkdir /root/e2e-train"), "folder")
    ok(node_exec("hub", "cat > /root/e2e-train/train.py", input=TRAIN), "train.py")
    yield made
    stop_burner("worker2")
    set_availability(["worker1", "worker3"], "active")
    policy("--share", "always", "--idle-time", "300", "--preempt-time", "600", "--grace", "60")
    if made:
        hub("jobs", "delete", *made, timeout=180)
    wait_until(lambda: availability("worker2") == "active", 60, "worker2 active again")


def test_a_busy_owner_pauses_the_node_and_new_jobs_go_elsewhere(owner_hub):
    started = time.monotonic()
    burner("worker2")
    try:
        wait_until(lambda: availability("worker2") == "pause", 15, "the hub to pause worker2", interval=0.5)
        print(f"\nowner busy -> worker2 paused in the swarm in {time.monotonic() - started:.1f} s")
        cluster = ok(hub("cluster"), "cluster")
        line = next(row for row in cluster.splitlines() if row.startswith("worker2"))
        assert "paused: owner active (cpu)" in line, line
        nodes = json.loads(ok(hub("cluster", "--json"), "cluster --json"))["nodes"]
        said = next(n for n in nodes if n["hostname"] == "worker2")["owner"]
        assert (said["state"], said["reason"], said["hours"]) == ("paused", "cpu", "-"), said
        jobs = [f"e2e-elsewhere-{i}" for i in range(3)]
        owner_hub.extend(jobs)
        for job in jobs:
            ok(hub("jobs", "run", "--name", job, "python:3.11", "sleep 30"), job)
        wait_until(lambda: all(task_node(job) for job in jobs), 120, "the jobs running")
        assert "worker2" not in {task_node(job) for job in jobs}
    finally:
        stop_burner("worker2")
    wait_until(lambda: availability("worker2") == "active", 30, "worker2 taking jobs again after the idle time")


def test_a_preempted_job_runs_again_elsewhere_from_its_checkpoint(owner_hub):
    job = "e2e-preempted"
    owner_hub.append(job)
    set_availability(["worker1", "worker3"], "drain")  # it starts on worker2
    try:
        ok(hub_sh(f"cd /root && gridx jobs run --workdir e2e-train --checkpoint-every 10s --name {job} "
                  "python:3.11 'python -u train.py'"), "the training job")
        wait_until(lambda: task_node(job) == "worker2", 180, "the job on worker2")
        time.sleep(6)  # a few epochs
    finally:
        set_availability(["worker1", "worker3"], "active")
    policy("--preempt-time", "5", "--grace", "20")
    burner("worker2")
    try:
        wait_until(lambda: task_node(job) not in (None, "worker2"), 180, "the job running again elsewhere")
    finally:
        stop_burner("worker2")
        policy("--preempt-time", "600")
    wait_until(lambda: len(starts(job)) >= 2, 60, "its second start in the logs")
    runs = sorted(starts(job))  # the logs of two tasks come in no set order
    assert runs[0] == 0 and runs[1] >= 4, runs  # the epoch goes on from the checkpoint
    status = json.loads(ok(hub("jobs", "status", job, "--json"), "status"))
    assert status["state"] == "running" and status["checkpoint"]["bytes"] > 0, status
    hub("jobs", "delete", job)


def test_a_killed_workers_job_runs_again_from_its_last_periodic_checkpoint(owner_hub):
    job = "e2e-killed"
    owner_hub.append(job)
    set_availability(["worker1", "worker2"], "drain")  # it starts on worker3
    try:
        ok(hub_sh(f"cd /root && gridx jobs run --workdir e2e-train --checkpoint-every 10s --name {job} "
                  "python:3.11 'python -u train.py'"), "the training job")
        wait_until(lambda: task_node(job) == "worker3", 180, "the job on worker3")

        def checkpointed():
            kept = json.loads(ok(hub("jobs", "status", job, "--json"), "status")).get("checkpoint")
            return kept if kept and kept["bytes"] else None
        wait_until(checkpointed, 60, "a periodic checkpoint on the hub", interval=2)
    finally:
        set_availability(["worker1", "worker2"], "active")
    ok(subprocess.run(["docker", "kill", container("worker3")], capture_output=True, text=True), "SIGKILL worker3")
    try:
        wait_until(lambda: task_node(job) not in (None, "worker3"), 180, "the job running again elsewhere")
        wait_until(lambda: len(starts(job)) >= 1 and max(starts(job)) > 0, 60, "its new start in the logs")
        assert max(starts(job)) >= 1, starts(job)  # from the checkpoint, not from 0
    finally:
        start_stopped_worker("worker3")
        hub("jobs", "delete", job)
