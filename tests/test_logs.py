"""Unit tests of a job's logs: a node that is down, and progress before output.

A fake `docker` first on PATH answers as Docker does and records its argv;
gridx.py runs as a process, as a user runs it.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIDX = os.path.join(ROOT, "gridx.py")

SERVICE = {"Spec": {"Name": "job-1", "Labels": {"gridx.job": "job-1"},
                    "Mode": {"ReplicatedJob": {"TotalCompletions": 2}},
                    "TaskTemplate": {"ContainerSpec": {"Image": "python:3.11"}}}}
TASKS = [{"ID": "task-up", "NodeID": "node-up", "Slot": 1, "CreatedAt": "2026-12-01T00:00:01Z"},
         {"ID": "task-down", "NodeID": "node-down", "Slot": 2, "CreatedAt": "2026-12-01T00:00:02Z"}]

# $NODES: `docker node ls` lines; `service logs` of the job itself fails the
# way Docker 26.1 does when a node of it is down, or hangs when asked to.
FAKE_DOCKER = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE/calls"
case "$1 $2" in
  "service inspect") cat "$FAKE/service.json" ;;
  "node ls") printf "$NODES" ;;
  "service ps")
      case "$*" in
        *-q*) printf 'task-up\\ntask-down\\n' ;;
        *) cat "$FAKE/ps.json" ;;
      esac ;;
  "inspect --type") cat "$FAKE/tasks.json" ;;
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


def fake_docker(tmp_path, nodes, ps_rows=()):
    (tmp_path / "docker").write_text(FAKE_DOCKER)
    (tmp_path / "docker").chmod(0o755)
    (tmp_path / "service.json").write_text(json.dumps([SERVICE]))
    (tmp_path / "tasks.json").write_text(json.dumps(TASKS))
    (tmp_path / "ps.json").write_text("".join(json.dumps(row) + "\n" for row in ps_rows))
    return {"PATH": f"{tmp_path}:{os.environ['PATH']}", "FAKE": str(tmp_path), "NODES": nodes}


def gridx(*args, env, timeout=20):
    return subprocess.run([sys.executable, GRIDX, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **env))


def calls(tmp_path):
    return (tmp_path / "calls").read_text().splitlines()


def test_logs_of_a_job_with_a_task_on_a_down_node(tmp_path):
    """What can be read is printed, one line names the node, exit 0, and
    the down node's stream is never asked for (20.10 would wait forever)."""
    env = fake_docker(tmp_path, "node-up\\tworker1\\tReady\\nnode-down\\tworker2\\tDown\\n")
    result = gridx("jobs", "logs", "job-1", env=dict(env, HANG_ON_JOB="1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "output of task-up\n"
    warnings = [line for line in result.stderr.splitlines() if "worker2" in line]
    assert len(warnings) == 1 and "down" in warnings[0]
    logs_calls = [c for c in calls(tmp_path) if c.startswith("service logs")]
    assert logs_calls == ["service logs --raw -- task-up"]


def test_logs_with_every_node_ready_is_one_stream(tmp_path):
    env = fake_docker(tmp_path, "node-up\\tworker1\\tReady\\nnode-down\\tworker2\\tReady\\n")
    result = gridx("jobs", "logs", "job-1", "--tail", "5", env=env)
    # the fake fails the job's own stream: gridx asked for it, once
    assert result.returncode == 1
    assert [c for c in calls(tmp_path) if c.startswith(("service logs", "service ps", "inspect"))] == [
        "service logs --raw --tail=5 -- job-1"]


def test_a_down_node_that_ran_none_of_the_job_changes_nothing(tmp_path):
    env = fake_docker(tmp_path, "node-up\\tworker1\\tReady\\nnode-other\\tworker3\\tDown\\n")
    gridx("jobs", "logs", "job-1", env=env)
    assert [c for c in calls(tmp_path) if c.startswith("service logs")] == ["service logs --raw -- job-1"]


def test_follow_of_a_job_with_a_task_on_a_down_node_ends_with_the_job(tmp_path):
    rows = [{"ID": "task-up", "Name": "job-1.1", "Node": "worker1", "DesiredState": "Complete",
             "CurrentState": "Complete 1 second ago", "Error": ""},
            {"ID": "task-down", "Name": "job-1.2", "Node": "worker2", "DesiredState": "Complete",
             "CurrentState": "Complete 1 second ago", "Error": ""}]
    env = fake_docker(tmp_path, "node-up\\tworker1\\tReady\\nnode-down\\tworker2\\tDown\\n", rows)
    result = gridx("jobs", "logs", "job-1", "-f", env=dict(env, HANG_ON_JOB="1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "output of task-up\n"
    assert "worker2" in result.stderr
    assert [c for c in calls(tmp_path) if c.startswith("service logs")] == [
        "service logs --raw --follow -- task-up"]


def test_wait_prints_where_the_job_runs_before_its_output(tmp_path):
    """The follower starts at once, but what it reads is shown only after the
    line saying where the job runs (`make demo` once showed it after)."""
    script = tmp_path / "docker"
    script.write_text("""#!/bin/sh
case "$1 $2" in
  "service logs") echo "the job's output"; exec sleep 30 ;;
  "service ps")
      n=$(cat "$FAKE/polls" 2>/dev/null || echo 0); echo $((n + 1)) > "$FAKE/polls"
      if [ "$n" -lt 4 ]; then state="Pending 1 second ago"; desired=Running
      elif [ "$n" -lt 8 ]; then state="Running 1 second ago"; desired=Running
      else state="Complete 1 second ago"; desired=Complete; fi
      printf '{"ID":"t1","Name":"job-1.1","Node":"worker1","DesiredState":"%s",' "$desired"
      printf '"CurrentState":"%s","Error":""}\n' "$state" ;;
esac
""")
    script.chmod(0o755)
    code = "import sys, gridx\nsys.exit(gridx.wait_for_job('job-1', 1, poll_s=0.05))\n"
    result = subprocess.run([sys.executable, "-u", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=20, cwd=ROOT, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", FAKE=str(tmp_path),
                                     PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines.index("info: job job-1: running on worker1") < lines.index("the job's output"), lines


def test_a_follower_that_has_not_caught_up_with_a_finished_job_loses_nothing(tmp_path):
    """`logs -f` of a job that is already over: the follower may show nothing
    before the job's end is seen (a loaded machine); its output is read whole."""
    script = tmp_path / "docker"
    script.write_text("""#!/bin/sh
case "$1 $2" in
  "service logs")
      case "$*" in
        *--follow*) exec sleep 30 ;;
        *) echo "the job's output" ;;
      esac ;;
  "service ps")
      printf '{"ID":"t1","Name":"job-1.1","Node":"worker1","DesiredState":"Complete",'
      printf '"CurrentState":"Complete 1 second ago","Error":""}\\n' ;;
esac
""")
    script.chmod(0o755)
    code = "import sys, gridx\nsys.exit(gridx.wait_for_job('job-1', 1, poll_s=0.05))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20, cwd=ROOT,
                            stdin=subprocess.DEVNULL,
                            env=dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "the job's output\n"
