"""Nodes are known by their swarm node ID (issue 19 item 7), on the real lab.

Two volunteers' machines may report the same hostname (laptops called
ubuntu). Here worker2 takes worker1's hostname (`hostname worker1`, then its
Docker restarted: the node keeps its ID and reports the new name), and:
- a --output job that ended on each twin is collected (by hub watch or
  `jobs status`, whichever comes first) from the machine that ran it: gridx
  once looked the address up by hostname, and the real worker1's job came
  back "missing" (docker cp on worker2; tried with the code before this);
- with worker2 stopped, hub watch runs again the job that ran there, and
  leaves the one on the real worker1 alone (the watch before this ran both
  again: tried);
- `jobs logs` names the twin that is down by hostname and node ID.
worker2 gets its name back afterwards (`docker start` restores it) and its VPN.
"""

import json
import subprocess
import time

import pytest
from e2e_helpers import container, hub, hub_json, node_exec, ok, start_stopped_worker, wait_until


def node_ids():
    """{worker: its node ID}, by the VPN address each worker joined with."""
    found = {}
    for node in hub_json("cluster")["nodes"]:
        if not node["manager"]:
            found[node["hostname"]] = node["id"]
    return found


def rename(worker, hostname):
    ok(node_exec(worker, f"hostname {hostname} && service docker restart >/dev/null", timeout=120),
       f"rename {worker} to {hostname}")


def job_node(job):
    tasks = [t for t in hub_json("jobs", "status", job)["tasks"] if t["state"] in ("running", "complete")]
    return tasks[0]["node_id"] if tasks else None


def force_count(job):
    return int(ok(node_exec("hub", "docker service inspect --format '{{.Spec.TaskTemplate.ForceUpdate}}' " + job),
                  "inspect").strip())


@pytest.fixture
def twins(lab):
    """worker2 calling itself worker1: {"worker1": ID, "worker2": ID}, and
    the names of the jobs the test makes (deleted afterwards)."""
    ids = node_ids()
    assert {"worker1", "worker2"} <= set(ids), ids
    share = next(n for n in hub_json("cluster")["nodes"] if n["id"] == ids["worker1"])["shared"]["cpus"]
    made = []
    rename("worker2", "worker1")
    try:
        def renamed():
            nodes = {n["id"]: n for n in hub_json("cluster")["nodes"]}
            return nodes[ids["worker2"]]["hostname"] == "worker1" and nodes[ids["worker2"]]["state"] == "ready"
        wait_until(renamed, 90, "worker2's node to report the hostname worker1")
        yield {"ids": ids, "share": share, "jobs": made}
    finally:
        if made:
            hub("jobs", "delete", *made, timeout=300)
        running = node_exec("worker2", "true").returncode == 0
        if running:
            rename("worker2", "worker2")
        else:
            start_stopped_worker("worker2")  # docker start gives it its own hostname back
        wait_until(lambda: node_ids().get("worker2") == ids["worker2"], 120, "worker2 back under its name")


def one_job_per_worker(twins, prefix, command, *extra):
    """Three jobs each asking a whole worker, so that each runs on its own:
    {node ID: job}."""
    names = [f"{prefix}{i}" for i in range(3)]
    twins["jobs"].extend(names)
    for name in names:
        ok(hub("jobs", "run", "--name", name, "--cpus", str(twins["share"]), *extra, "python:3.11", command),
           f"jobs run {name}")
    placed = wait_until(lambda: (lambda found: found if all(found.values()) else None)(
        {name: job_node(name) for name in names}), 120, f"{prefix} jobs placed")
    by_node = {node: name for name, node in placed.items()}
    assert len(by_node) == 3, placed  # one per worker
    return by_node


def test_twins_results_come_from_the_machine_that_ran_each(twins):
    by_node = one_job_per_worker(twins, "twin-out", "mkdir -p /tmp/out && echo $HOSTNAME > /tmp/out/host && sleep 5",
                                 "--output", "/tmp/out")

    def tried():  # each job's copy tried once (from a wrong address: "missing" or "gone")
        records = {job: hub_json("jobs", "status", job).get("results") or {} for job in by_node.values()}
        return records if all(r.get("tasks") for r in records.values()) else None
    records = wait_until(tried, 120, "hub watch to collect the three jobs' results")
    for node_id, job in by_node.items():
        assert [t["state"] for t in records[job]["tasks"].values()] == ["collected"], (job, node_id, records[job])


def test_watch_runs_again_only_the_stopped_twins_job(twins):
    by_node = one_job_per_worker(twins, "twin-run", "sleep 600")
    on_real, on_twin = by_node[twins["ids"]["worker1"]], by_node[twins["ids"]["worker2"]]
    before = {t["id"] for t in hub_json("jobs", "status", on_real)["tasks"]}
    assert force_count(on_real) == force_count(on_twin) == 0
    ok(node_exec("hub", "echo '--- twins test' >> /var/log/gridx-watch.log"), "mark the watch log")
    stopped = time.monotonic()
    ok(subprocess.run(["docker", "stop", "-t", "2", container("worker2")], capture_output=True, text=True,
                      timeout=120), "docker stop worker2")
    wait_until(lambda: force_count(on_twin) > 0, 120, f"hub watch to run {on_twin} again")
    took = time.monotonic() - stopped
    time.sleep(12)  # two more passes of watch (--interval 5): it must not touch the other worker1's job
    assert force_count(on_real) == 0
    after = hub_json("jobs", "status", on_real)
    assert {t["id"] for t in after["tasks"]} == before and after["state"] == "running", after
    said = ok(node_exec("hub", "sed -n '/--- twins test/,$p' /var/log/gridx-watch.log"), "watch log")
    ran_again = [line for line in said.splitlines() if "ran again" in line]
    assert ran_again and all(on_real not in line for line in ran_again), said
    # the stopped twin named by its ID, or (Docker 20.10, now and then) Docker
    # rejected its task first and watch ran it again for that: only it either way
    assert (f"worker1 ({twins['ids']['worker2'][:12]})" in ran_again[0]
            or f"ran again {on_twin}: Docker rejected them" in ran_again[0]), said
    logs = hub("jobs", "logs", on_twin, timeout=60)
    assert logs.returncode == 0 and f"worker1 ({twins['ids']['worker2'][:12]})" in logs.stderr, logs.stderr
    print(f"ran again {took:.0f} s after worker2 stopped; watch said: {json.dumps(ran_again)}")
