"""Unit tests of a job's logs: a node that is down, and progress before output.

A fake Engine API (fakes.FakeEngine) holds the job, its tasks and the nodes;
a fake `docker` first on PATH answers `service logs` as Docker does and
records its argv; gridx.py runs as a process, as a user runs it.
"""

import os
import subprocess
import sys

from fakes import FakeEngine, api_node, api_service, api_task, gridx_argv

import gridx as gridx_module  # in-process (gridx() below runs it as a program)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIDX = os.path.join(ROOT, "gridx.py")

SERVICE = api_service("s1", "job-1", replicas=2)
TASKS = [api_task("task-up", "s1", "node-up", slot=1, exit_code=0, ago_s=2),
         api_task("task-down", "s1", "node-down", slot=2, exit_code=0, ago_s=1)]

# `service logs` of the job itself fails the way Docker 26.1 does when a
# node of it is down, or hangs when asked to (20.10).
FAKE_DOCKER = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE/calls"
case "$1 $2" in
  "service logs")
      for last; do :; done
      case "$last" in
        job-1) [ -z "$HANG_ON_JOB" ] || sleep 30
               echo "error from daemon: incomplete log stream" >&2; exit 1 ;;
        task-up) echo "output of task-up" ;;
        *) echo "logs of $last asked" >&2; exit 1 ;;
      esac ;;
esac
"""


def fake_docker(tmp_path, nodes, tasks=TASKS, engine=None):
    """The fake docker, and an engine holding the job with these nodes."""
    (tmp_path / "docker").write_text(FAKE_DOCKER)
    (tmp_path / "docker").chmod(0o755)
    engine = engine or FakeEngine([SERVICE], tasks, nodes)
    # what a follower that had not caught up reads whole (as the fake docker's task-up)
    engine.logs["task-up"] = [(1, b"output of task-up\n")]
    engine.start()
    return engine, {"PATH": f"{tmp_path}:{os.environ['PATH']}", "FAKE": str(tmp_path), "DOCKER_HOST": engine.host}


def gridx(*args, env, timeout=20):
    return subprocess.run(gridx_argv(*args), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **env))


def calls(tmp_path):
    return (tmp_path / "calls").read_text().splitlines()


UP, DOWN = api_node("node-up", "worker1"), api_node("node-down", "worker2", "down", "10.0.0.3")


def test_logs_of_a_job_with_a_task_on_a_down_node(tmp_path):
    """What can be read is printed, one line names the node, exit 0, and
    the down node's stream is never asked for (20.10 would wait forever)."""
    engine, env = fake_docker(tmp_path, [UP, DOWN])
    result = gridx("jobs", "logs", "job-1", env=dict(env, HANG_ON_JOB="1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "output of task-up\n"
    warnings = [line for line in result.stderr.splitlines() if "worker2" in line]
    assert len(warnings) == 1 and "down" in warnings[0]
    logs_calls = [c for c in calls(tmp_path) if c.startswith("service logs")]
    assert logs_calls == ["service logs --raw -- task-up"]
    assert engine.paths() == ["/_ping", "/services", "/nodes", "/tasks"]


def test_logs_with_every_node_ready_is_one_stream(tmp_path):
    engine, env = fake_docker(tmp_path, [UP, dict(DOWN, Status={"State": "ready", "Addr": "10.0.0.3"})])
    result = gridx("jobs", "logs", "job-1", "--tail", "5", env=env)
    # the fake fails the job's own stream: gridx asked for it, once
    assert result.returncode == 1
    assert calls(tmp_path) == ["service logs --raw --tail=5 -- job-1"]
    assert engine.paths() == ["/_ping", "/services", "/nodes"]  # no task read


def test_a_down_node_that_ran_none_of_the_job_changes_nothing(tmp_path):
    _, env = fake_docker(tmp_path, [UP, dict(DOWN, ID="node-other"), dict(DOWN, Status={"State": "ready"})])
    gridx("jobs", "logs", "job-1", env=env)
    assert [c for c in calls(tmp_path) if c.startswith("service logs")] == ["service logs --raw -- job-1"]


def test_two_nodes_of_one_hostname_one_down_are_told_apart(tmp_path):
    """Two laptops called ubuntu: the Ready one's task is read, the Down
    one's is not, and the line names which ubuntu (its node ID)."""
    twins = [api_node("node-up", "ubuntu"), api_node("node-down", "ubuntu", "down", "10.0.0.3")]
    _, env = fake_docker(tmp_path, twins)
    result = gridx("jobs", "logs", "job-1", env=dict(env, HANG_ON_JOB="1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "output of task-up\n"
    assert "on ubuntu (node-down) cannot be read" in result.stderr
    assert [c for c in calls(tmp_path) if c.startswith("service logs")] == ["service logs --raw -- task-up"]


def test_follow_of_a_job_with_a_task_on_a_down_node_ends_with_the_job(tmp_path):
    _, env = fake_docker(tmp_path, [UP, DOWN])
    result = gridx("jobs", "logs", "job-1", "-f", env=dict(env, HANG_ON_JOB="1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "output of task-up\n"
    assert "worker2" in result.stderr
    # the down node's task is never followed (the up one's follower may have
    # been stopped before its fake docker wrote its call: the job had ended,
    # and its output came whole from the Engine API)
    assert set(c for c in calls(tmp_path) if c.startswith("service logs")) <= {
        "service logs --raw --follow -- task-up"}


class ProgressingEngine(FakeEngine):
    """job-1's one task: pending for 4 polls, running for 4, then complete."""

    def __init__(self):
        super().__init__([api_service("s1", "job-1")], [], [UP])
        self.polls = 0

    def answer_tasks(self, filters):
        self.polls += 1
        state = "pending" if self.polls <= 4 else "running" if self.polls <= 8 else "complete"
        node = "" if state == "pending" else "node-up"
        self.tasks = [api_task("t1", "s1", node, state=state, desired="complete" if state == "complete" else "running",
                               exit_code=0 if node else None)]
        return super().answer_tasks(filters)


def wait_for_job_here(tmp_path, script, engine, unbuffered=False):
    (tmp_path / "docker").write_text(script)
    (tmp_path / "docker").chmod(0o755)
    engine.start()
    code = "import sys, gridx\nsys.exit(gridx.wait_for_job('job-1', 1, poll_s=0.05))\n"
    return subprocess.run([sys.executable, *(["-u"] if unbuffered else []), "-c", code], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if unbuffered else subprocess.PIPE, text=True, timeout=20,
                          cwd=ROOT, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", PYTHONPATH=ROOT,
                                   DOCKER_HOST=engine.host))


def test_wait_prints_where_the_job_runs_before_its_output(tmp_path):
    """The follower starts at once, but what it reads is shown only after the
    line saying where the job runs (`make demo` once showed it after)."""
    engine = ProgressingEngine()
    result = wait_for_job_here(tmp_path, """#!/bin/sh
case "$1 $2" in
  "service logs") echo "the job's output"; exec sleep 30 ;;
esac
""", engine, unbuffered=True)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines.index("info: job job-1: running on worker1") < lines.index("the job's output"), lines
    # each poll one request; the nodes read when the task was placed, and once at its end (was it preempted?)
    paths = engine.paths()
    assert paths[0] == "/_ping" and paths.count("/nodes") == 2 and paths.count("/tasks") == engine.polls >= 9
    assert engine.connections == 1


def test_a_follower_that_has_not_caught_up_with_a_finished_job_loses_nothing(tmp_path):
    """`logs -f` of a job that is already over: the follower may show nothing
    before the job's end is seen (a loaded machine); its output is read whole."""
    engine = FakeEngine([api_service("s1", "job-1")], [api_task("t1", "s1", "node-up", exit_code=0)], [UP])
    engine.logs["job-1"] = [(1, b"the job's output\n"), (2, b"and its errors\n"), (1, b"more output\n")]
    result = wait_for_job_here(tmp_path, """#!/bin/sh
case "$1 $2" in
  "service logs")
      case "$*" in
        *--follow*) exec sleep 30 ;;
        *) echo "a plain service logs ran" ;;
      esac ;;
esac
""", engine)
    assert result.returncode == 0, result.stderr
    # read whole through the Engine API, its streams apart, as the docker CLI writes them
    assert result.stdout == "the job's output\nmore output\n" and result.stderr == "and its errors\n"
    assert "/services/job-1/logs" in engine.paths()


# -- the swarm's log broker loses a node that is up (issue 20) -------------------------------
# Docker prints this when its manager's log broker lost a node's log
# publisher (moby#35011, #37336); the node stays Ready.
BROKER_LOST = ("error from daemon in stream: Error grabbing logs: rpc error: code = Unknown desc = warning: "
               "incomplete log stream. some logs could not be retrieved for the following reasons: "
               "node node-lost is not available")

BROKEN_DOCKER = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE/calls"
case "$1 $2" in
  "service logs") echo "output of task-up"; echo "$BROKER_LOST" >&2; exit 1 ;;
esac
"""

# the hub's SSH to a worker: `docker logs` of the task's container there
FAKE_SSH = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE/ssh.calls"
echo "output of task-lost, from its container"
"""


def broken_broker(tmp_path, hub_ssh=True):
    for name, text in (("docker", BROKEN_DOCKER), ("ssh", FAKE_SSH)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    nodes = [UP, api_node("node-lost", "worker2", address="10.0.0.3", hub_ssh=hub_ssh)]
    tasks = [api_task("task-up", "s1", "node-up", slot=1, exit_code=0, ago_s=2),
             api_task("task-lost", "s1", "node-lost", slot=2, exit_code=0, container="c-lost", ago_s=1)]
    engine = FakeEngine([SERVICE], tasks, nodes).start()
    # the Engine API's answer for the job (read whole when the followers had
    # nothing yet): the same output, and the broker's error as the daemon's
    # own frame (stream 3), as Docker 26.1 sends it
    engine.logs["job-1"] = [(1, b"output of task-up\n"), (3, BROKER_LOST.split(": ", 1)[1].encode() + b"\n")]
    return {"PATH": f"{tmp_path}:{os.environ['PATH']}", "FAKE": str(tmp_path), "DOCKER_HOST": engine.host,
            "BROKER_LOST": BROKER_LOST, "GRIDX_CONFIG_DIR": str(tmp_path / "cfg")}


def test_a_node_the_broker_lost_is_read_from_its_container(tmp_path):
    """What the broker gives, then the lost node's task from its container
    over the hub's SSH; exit 0, and no broker error on the terminal."""
    assert os.geteuid() == 0  # the hub's SSH is root's
    env = broken_broker(tmp_path)
    result = gridx("jobs", "logs", "job-1", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "output of task-up\noutput of task-lost, from its container\n"
    assert "incomplete log stream" not in result.stderr
    ssh = (tmp_path / "ssh.calls").read_text()
    assert "root@10.0.0.3 docker logs -- c-lost" in ssh


def test_follow_reads_the_lost_node_from_its_container_at_the_jobs_end(tmp_path):
    env = broken_broker(tmp_path)
    result = gridx("jobs", "logs", "-f", "job-1", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "output of task-up\noutput of task-lost, from its container\n"
    assert "incomplete log stream" not in result.stderr


def test_a_job_read_whole_from_the_engine_api_falls_back_for_the_node_the_broker_lost(tmp_path, monkeypatch,
                                                                                      capfdbinary):
    """The follower had nothing yet when the job ended (a loaded machine):
    the Engine API's whole log carries the broker's error as a stream-3
    frame; the lost node's task is read from its container, nothing raw is
    printed."""
    env = broken_broker(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(gridx_module, "ENGINES", {})
    follower = gridx_module.LogFollower([], job_id="job-1")
    follower.read_whole("job-1")
    out, err = capfdbinary.readouterr()
    assert out == b"output of task-up\noutput of task-lost, from its container\n", (out, err)
    assert b"\x03" not in out + err and b"incomplete log stream" not in err


def test_a_lost_node_that_declined_the_hubs_ssh_is_said_in_one_line(tmp_path):
    env = broken_broker(tmp_path, hub_ssh=False)
    result = gridx("jobs", "logs", "job-1", env=env)
    assert result.returncode == 1
    assert result.stdout == "output of task-up\n"
    said = [line for line in result.stderr.splitlines() if "task-lost" in line or "job-1.2" in line]
    assert len(said) == 1 and "worker2 declined the hub's SSH" in said[0], result.stderr
    assert not (tmp_path / "ssh.calls").exists()
