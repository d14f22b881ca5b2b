"""Unit tests of gridx.py's Owner activity and checkpoints (issue 21), the
hub's side of the workers' agents: the report grammar, the listener (a real
socket), what the swarm is told, preemption recorded before the task's end
and the job run again from its checkpoint, periodic checkpoints that never
replace a whole one with half of one, and what `--wait`, `cluster` and
`jobs status` say. The agent itself: tests/test_agent.py."""

import json
import os
import socket
import time

import pytest
from fakes import api_node, api_service, fake_hub, run_main

import gridx

TASK_A, TASK_B = "a" * 25, "b" * 25
LINE = (f"gridx-agent 1 state=paused since=1765000000 reason=input policy=idle hours=- preempt_at=1765000600 "
        f"tasks={TASK_A} mem_mib=512\n")


@pytest.mark.parametrize("line, ok", [
    (LINE, True),
    (LINE.replace("state=paused", "state=preempting"), True),
    (LINE.replace("hours=-", "hours=22:00-08:00"), True),
    (LINE.rstrip("\n") + " extra_field=x\n", True),  # a later version 1 may add fields
    (LINE.replace("tasks=" + TASK_A, "tasks=-"), True),
    (LINE.replace("gridx-agent 1", "gridx-agent 2"), False),
    (LINE.replace("state=paused", "state=sleeping"), False),
    (LINE.replace("reason=input", "reason=$(id)"), False),
    (LINE.replace(TASK_A, "short"), False),
    (LINE.replace("mem_mib=512", "mem_mib=-1"), False),
    (LINE.replace("policy=idle", "policy=never"), False),
    (LINE + "another line", False),
    ("", False),
])
def test_the_report_grammar(line, ok):
    report = gridx.parse_agent_report(line)
    assert (report is not None) == ok
    if ok and "tasks=-" not in line:
        assert report["tasks"] == [TASK_A] and isinstance(report["since"], int)


def worker(node_id="w2", availability="active", owner="", address="127.0.0.1"):
    node = gridx.Node.from_docker(api_node(node_id, "worker2", address=address))
    node.availability, node.owner = availability, owner
    return node


def test_a_report_pauses_the_node_and_sharing_makes_it_active_again_only_if_gridx_paused_it():
    known = {}
    report = gridx.parse_agent_report(LINE)
    argv = gridx.owner_node_update(worker(), report, known)
    assert "--availability=pause" in argv and argv[-1] == "w2" and known["paused_by_gridx"]
    assert "--label-add=gridx.owner-state=paused input 1765000000 1765000600 -" in argv
    sharing = gridx.parse_agent_report(LINE.replace("state=paused", "state=sharing").replace(
        "reason=input", "reason=-"))
    assert "--availability=active" in gridx.owner_node_update(worker(availability="pause"), sharing, known)
    # an admin's drain (or a pause gridx did not make) stays
    assert "--availability=active" not in (gridx.owner_node_update(worker(availability="pause"), sharing, {}) or [])
    drained = gridx.owner_node_update(worker(availability="drain"), report, {})
    assert not any(a.startswith("--availability") for a in drained)
    # the same state again: nothing to tell the swarm
    assert gridx.owner_node_update(worker(availability="pause", owner=gridx.owner_label(report)), report,
                                   {"paused_by_gridx": True}) is None


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def send(port, data):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        return conn.makefile("rb").read()


def test_the_listener_answers_a_worker_and_records_a_preemption_before_the_tasks_end(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(gridx, "run", lambda argv, **kw: calls.append(argv))
    monkeypatch.setattr(gridx, "all_swarm_nodes", lambda: [worker()])
    port = free_port()
    reports = gridx.OwnerReports("127.0.0.1", port)
    preempting = LINE.replace("state=paused", "state=preempting").replace(f"tasks={TASK_A}",
                                                                          f"tasks={TASK_A},{TASK_B}")
    assert send(port, preempting.encode()) == b"ok\n"
    owners = json.loads((tmp_path / "owners.json").read_text())
    assert set(owners["preempted"]) == {TASK_A, TASK_B} and owners["preempted"][TASK_A]["node"] == "w2"
    assert owners["nodes"]["w2"]["report"]["state"] == "preempting"
    (update,) = calls
    assert "--availability=pause" in update and f"--label-add=gridx.preempted={TASK_A},{TASK_B}" in update
    # not a report, or too long: no answer, nothing changed
    for bad in (b"hello\n", b"x" * 5000 + b"\n", LINE.replace("since=1765000000", "since=soon").encode()):
        assert send(port, bad) == b""
    assert len(calls) == 1
    reports.server.close()


def test_a_report_from_an_address_that_is_no_worker_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(gridx, "run", lambda argv, **kw: calls.append(argv))
    monkeypatch.setattr(gridx, "all_swarm_nodes", lambda: [worker(address="10.0.0.9")])
    assert gridx.apply_owner_report("127.0.0.1", gridx.parse_agent_report(LINE)) is None
    assert calls == [] and not (tmp_path / "owners.json").exists()


def test_what_cluster_says_of_a_paused_node():
    now = 1765000000 + 180
    assert gridx.describe_owner("paused input 1765000000 1765000600 -", now) == \
        "paused: owner active (input) for 3m, jobs preempted in 7m"
    assert gridx.describe_owner("outside-hours hours 1765000000 0 22:00-08:00", now) == \
        "outside its hours (22:00-08:00)"
    assert gridx.describe_owner("sharing - 0 0 -", now) == "" and gridx.describe_owner("", now) == ""
    assert gridx.owner_document("paused cpu 5 6 -") == {"state": "paused", "reason": "cpu", "since": 5,
                                                        "preempt_at": 6, "hours": "-"}


# -- checkpoints and running again -------------------------------------------------------


CKPT_SERVICE = api_service("s1", "train-1", labels={gridx.LABEL_CHECKPOINT: "/work/ckpt",
                                                    gridx.LABEL_CHECKPOINT_EVERY: "600",
                                                    gridx.LABEL_RUN_IMAGE: "10.0.0.1:5000/gridx/work:t@sha256:"
                                                                           + "e" * 64})


def checkpoint_here(tmp_path, monkeypatch, outcome):
    """take_checkpoint with copy_out faked: it writes epoch.txt, then says outcome."""
    monkeypatch.setenv("GRIDX_CHECKPOINTS_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("GRIDX_USERS_HOME", str(tmp_path / "users"))
    monkeypatch.setattr(gridx, "hand_over", lambda path, recursive=True: None)

    def copy_out(node, container, output, dest, limits):
        with open(os.path.join(dest, "epoch.txt"), "w") as handle:
            handle.write(outcome + "\n")
        return {"node": node.hostname, "bytes": 6, "files": 1, "state": outcome}

    monkeypatch.setattr(gridx, "copy_out", copy_out)
    task = gridx.Task(id="t1", service="train-1", node_id="w2", node="worker2", state="running", container="c1")
    return gridx.take_checkpoint(CKPT_SERVICE, task, worker())


def test_a_half_copied_checkpoint_never_replaces_the_last_whole_one(tmp_path, monkeypatch):
    assert checkpoint_here(tmp_path, monkeypatch, "collected")["state"] == "collected"
    current = tmp_path / "ckpt" / "s1" / "current" / "epoch.txt"
    assert current.read_text() == "collected\n"
    assert gridx.checkpoint_record("s1")["task"] == "t1"
    assert checkpoint_here(tmp_path, monkeypatch, "unreachable")["state"] == "unreachable"
    assert current.read_text() == "collected\n"
    assert sorted(os.listdir(tmp_path / "ckpt" / "s1")) == ["checkpoint.json", "current"]  # no half copy left


def test_a_job_runs_again_from_its_checkpoint_laid_on_its_first_image(tmp_path, monkeypatch):
    checkpoint_here(tmp_path, monkeypatch, "collected")
    built, calls = [], []

    def build(layer, image):
        built.append((layer.into, layer.repository, image, sorted(m.name for m, _ in layer.members)))
        return "10.0.0.1:5000/gridx/checkpoint:train-1-x@sha256:" + "c" * 64

    monkeypatch.setattr(gridx.WorkLayer, "build", build)
    monkeypatch.setattr(gridx, "run", lambda argv, **kw: calls.append(argv))
    gridx.run_again_from_checkpoint([CKPT_SERVICE], ["train-1"])
    assert built == [("/work/ckpt", "gridx/checkpoint", CKPT_SERVICE["Spec"]["Labels"][gridx.LABEL_RUN_IMAGE],
                      ["epoch.txt"])]
    (update,) = calls
    assert update[:4] == ["docker", "service", "update", "--detach"] and "--force" in update
    assert "--image=10.0.0.1:5000/gridx/checkpoint:train-1-x@sha256:" + "c" * 64 in update


def test_a_job_without_a_checkpoint_runs_again_from_its_start(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_CHECKPOINTS_DIR", str(tmp_path / "ckpt"))
    again = []
    monkeypatch.setattr(gridx, "run_again", lambda ids: again.extend(ids))
    gridx.run_again_from_checkpoint([CKPT_SERVICE, api_service("s2", "plain")], ["train-1", "plain"])
    assert again == ["train-1", "plain"]


def test_a_preempted_task_that_ended_gives_its_checkpoint_then_its_job_runs_again(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(tmp_path))
    gridx.save_owners({"nodes": {}, "preempted": {TASK_A: {"node": "w2", "at": 1}, "gone" * 6 + "x": {}}})
    taken, again = [], []
    monkeypatch.setattr(gridx, "take_checkpoint", lambda service, task, node: taken.append(task.id))
    monkeypatch.setattr(gridx, "run_again_from_checkpoint", lambda services, ids: again.extend(ids))
    ended = gridx.Task(id=TASK_A, name="train-1.1", service="train-1", node_id="w2", state="complete",
                       desired="shutdown", container="c1")
    running = gridx.Task(id=TASK_A, name="train-1.1", service="train-1", node_id="w2", state="running",
                         desired="running", container="c1")
    assert gridx.rerun_preempted([CKPT_SERVICE], [running], [worker()]) == []  # still stopping
    assert TASK_A in gridx.load_owners()["preempted"] and taken == []
    assert gridx.rerun_preempted([CKPT_SERVICE], [ended], [worker()]) == ["train-1"]
    assert taken == [TASK_A] and again == ["train-1"]
    # done (kept for the notifications while the task is in the swarm); the entry of a task gone went
    assert gridx.load_owners()["preempted"] == {TASK_A: {"node": "w2", "at": 1, "ran_again": True}}
    assert gridx.rerun_preempted([CKPT_SERVICE], [ended], [worker()]) == [] and again == ["train-1"]  # once
    assert gridx.rerun_preempted([CKPT_SERVICE], [], [worker()]) == []
    assert gridx.load_owners()["preempted"] == {}  # its task gone from the swarm's history


def test_periodic_checkpoints_of_running_tasks_when_due(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_CHECKPOINTS_DIR", str(tmp_path / "ckpt"))
    taken = []
    monkeypatch.setattr(gridx, "take_checkpoint", lambda service, task, node: taken.append(task.id) or
                        {"state": "collected"})
    old = time.strftime("%Y-%m-%dT%H:%M:%S.0Z", time.gmtime(time.time() - 3600))
    fresh = time.strftime("%Y-%m-%dT%H:%M:%S.0Z", time.gmtime(time.time() - 30))
    tasks = [gridx.Task(id="t-old", service="train-1", node_id="w2", state="running", container="c", created=old),
             gridx.Task(id="t-new", service="train-1", node_id="w2", state="running", container="c", created=fresh)]
    assert gridx.due_checkpoints([CKPT_SERVICE], tasks, [worker()]) == ["train-1"]
    assert taken == ["t-old"]


def test_wait_holds_on_a_preempted_task(monkeypatch):
    node = worker()
    node.preempted = [TASK_A]
    monkeypatch.setattr(gridx, "all_swarm_nodes", lambda: [node])
    ended = gridx.Task(id=TASK_A, name="train-1.1", service="train-1", node_id="w2", node="worker2",
                       state="failed", desired="shutdown")
    assert gridx.PreemptedWait("train-1").holds([ended])
    node.preempted = []
    assert not gridx.PreemptedWait("train-1").holds([ended])


def test_a_job_with_a_checkpoint_carries_its_path_labels_and_the_hub_ssh_constraint(tmp_path, monkeypatch):
    tools = fake_hub(tmp_path, monkeypatch)
    assert run_main(["jobs", "run", "--name", "ck1", "--checkpoint", "/data/ckpt", "--checkpoint-every", "5m",
                     "python:3.11", "true"]) == 0
    create = next(c for c in tools.calls if c[1:3] == ["service", "create"])
    assert "--env=GRIDX_CHECKPOINT_DIR=/data/ckpt" in create
    assert "--label=gridx.checkpoint=/data/ckpt" in create and "--label=gridx.checkpoint-every=300" in create
    assert "--label=gridx.run-image=python:3.11" in create
    assert "--constraint=engine.labels.gridx.hub-ssh!=no" in create
    for bad in (["--checkpoint", "relative"], ["--checkpoint", "/x", "--checkpoint-every", "1s"],
                ["--checkpoint-every", "soon", "--checkpoint", "/x"]):
        assert run_main(["jobs", "run", *bad, "python:3.11", "true"]) == 2
