"""Unit tests of gridx.py's Jobs section: what a job asks for, reading the swarm, job state, running again, waiting."""

import subprocess
import time

import pytest
from fakes import (
    NODE,
    api_task,
)

import gridx

# -- Jobs: what a job asks for -----------------------------------------------------

@pytest.mark.parametrize("value,expected", [("8G", 8 * 1024**3), ("512M", 512 * 1024**2), ("1.5g", int(1.5 * 1024**3)),
                                            ("2GiB", 2 * 1024**3), ("64m", 64 * 1024**2)])
def test_memory(value, expected):
    assert gridx.parse_memory(value) == expected


@pytest.mark.parametrize("value", ["8X", "8", "", "G", "-1G", "1M", "abc"])
def test_bad_memory(value):
    with pytest.raises(gridx.GridxError) as error:
        gridx.parse_memory(value)
    assert error.value.code == 2


@pytest.mark.parametrize("value", ["0", "abc", "-1", "nan", "", "0.0"])
def test_bad_cpus(value):
    with pytest.raises(gridx.GridxError):
        gridx.parse_cpus(value)


def test_env_pairs():
    assert gridx.parse_env(["A=1", "B_2=x=y", "C="]) == ["A=1", "B_2=x=y", "C="]
    for bad in (["FOO"], ["=1"], ["1A=2"], ["A B=1"]):
        with pytest.raises(gridx.GridxError):
            gridx.parse_env(bad)


def test_user_env_cannot_choose_the_gpus():
    for item in ("NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_VISIBLE_DEVICES="):
        with pytest.raises(gridx.GridxError) as error:
            gridx.parse_env([item])
        assert error.value.code == 2 and "--gpus" in error.value.hint


def test_job_request_reserves_whole_units_and_limits_exactly():
    request = gridx.JobRequest("1.5", "1G", "1")
    args = request.service_args()
    assert "gridx_cpu=2" in args and "gridx_mem=1024" in args and "NVIDIA-GPU=1" in args
    assert args[args.index("--limit-cpu") + 1] == "1.5"
    assert args[args.index("--limit-memory") + 1] == str(1024**3)


def test_job_command_forms():
    assert gridx.job_command(["python -c 'print(1)'"]) == (["sh", "-c", "python -c 'print(1)'"], "python -c 'print(1)'")
    argv, text = gridx.job_command(["python", "-c", "print(1)"])
    assert argv == ["python", "-c", "print(1)"] and text == "python -c 'print(1)'"
    assert gridx.job_command([]) == ([], "")


def test_check_fits_names_the_biggest_worker():
    with pytest.raises(gridx.GridxError) as error:
        gridx.check_fits(gridx.JobRequest("1", "1G", "3"), [gridx.Node.from_docker(NODE)])
    assert error.value.code == 2 and "worker3" in error.value.message and "3 GPU" in error.value.message
    gridx.check_fits(gridx.JobRequest("4", "4G", "2"), [gridx.Node.from_docker(NODE)])
    with pytest.raises(gridx.GridxError):
        gridx.check_fits(gridx.JobRequest("5", "1G", "0"), [gridx.Node.from_docker(NODE)])


def test_name_taken_is_exit_2(monkeypatch):
    taken = subprocess.CompletedProcess([], 1, "", "Error response from daemon: rpc error: code = AlreadyExists "
                                                  "desc = name conflicts with an existing object: service x")
    monkeypatch.setattr(gridx, "run", lambda argv, **kw: taken)
    with pytest.raises(gridx.GridxError) as raised:
        gridx.run_naming(["docker", "service", "create"], "x")
    assert raised.value.code == gridx.EXIT_USAGE and "exists" in raised.value.message


def test_service_create_argv_puts_values_after_flags_and_the_image_after_dashdash(monkeypatch):
    calls = []
    monkeypatch.setattr(gridx, "run", lambda argv, **kw: calls.append(argv) or subprocess.CompletedProcess(
        argv, 0, "", ""))
    gridx.create_job("j1", "python:3.11", gridx.JobRequest("1", "1G", "0"), kind="run",
                     command_argv=["sh", "-c", "-x"], command_text="-x", mode="replicated-job", replicas=1,
                     env=["A=--mount=x"])
    argv = calls[0]
    image = argv.index("--") + 1
    assert argv[image:] == ["python:3.11", "sh", "-c", "-x"]
    assert "--env=A=--mount=x" in argv and "--label=gridx.command=-x" in argv and "--name=j1" in argv


def test_no_gpu_job_gets_no_visible_devices(monkeypatch):
    calls = []
    monkeypatch.setattr(gridx, "run", lambda argv, **kw: calls.append(argv) or subprocess.CompletedProcess(
        argv, 0, "", ""))
    for gpus in ("0", "2"):
        gridx.create_job(f"j{gpus}", "pytorch/pytorch:latest", gridx.JobRequest("1", "1G", gpus), kind="run",
                         command_argv=[], command_text="", mode="replicated-job", replicas=1, env=["A=1"])
    no_gpu, with_gpus = calls
    options = no_gpu[:no_gpu.index("--")]
    assert "--env=NVIDIA_VISIBLE_DEVICES=void" in options
    assert not [w for w in with_gpus if "NVIDIA_VISIBLE_DEVICES" in w]
    assert "NVIDIA-GPU=2" in with_gpus


# -- Jobs: reading the swarm -------------------------------------------------------

def task(state, desired="shutdown", error="", service="job1", node="worker1", task_id=None, node_id=None):
    return gridx.Task(id=task_id or f"{service}-{state}-{node}", name=f"{service}.1", node_id=node_id or f"id-{node}",
                      node=node, state=state, desired=desired, error=error, service=service)


def test_exit_code_parsing():
    assert gridx.exit_code_from("failed", "task: non-zero exit (3)") == 3
    assert gridx.exit_code_from("complete", "") == 0
    assert gridx.exit_code_from("running", "") is None


def test_task_from_the_engine_api_as_docker_service_ps_shows_it():
    now = time.time()
    found = api_task("t9", "s2", "n1", state="failed", desired="shutdown", slot=3,
                     error="task: non-zero exit (7)", exit_code=7, ago_s=200, gpus=["GPU-b", "GPU-a"])
    t = gridx.Task.from_api(found, "job-2", {"n1": "w1"}, now)
    assert (t.id, t.name, t.service, t.node_id, t.node, t.state, t.since, t.desired) == (
        "t9", "job-2.3", "job-2", "n1", "w1", "failed", "3 minutes ago", "shutdown")
    assert t.error == "task: non-zero exit (7)" and t.exit_code == 7 and not t.active and not t.placed
    assert (t.container, t.container_exit, t.gpus) == ("c-t9", 7, ["GPU-a", "GPU-b"])
    assert t.to_dict() == {"id": "t9", "name": "job-2.3", "node": "w1", "node_id": "n1", "state": "failed",
                           "since": "3 minutes ago", "error": "task: non-zero exit (7)", "exit_code": 7}
    # slot 0 (left out of the JSON): named by its node, as `docker service ps` names it
    first = gridx.Task.from_api(api_task("t1", "s2", "n1", slot=0), "job-2", {"n1": "w1"}, now)
    assert first.name == "job-2.n1" and first.exit_code == 0
    # a node no longer in the swarm shows its ID, as docker does
    assert gridx.Task.from_api(api_task("t1", "s2", "gone"), "job-2", {}, now).node == "gone"
    pending = gridx.Task.from_api(api_task("t2", "s2", state="pending", desired="complete"), "job-2", {}, now)
    assert pending.active and not pending.placed and pending.exit_code is None and pending.node_id == ""
    assert gridx.Task(state="running").placed


@pytest.mark.parametrize("seconds,said", [
    (0.5, "less than a second ago"), (1.2, "1 second ago"), (59, "59 seconds ago"), (61, "about a minute ago"),
    (3599, "59 minutes ago"), (3600, "about an hour ago"), (5 * 3600, "5 hours ago"), (3 * 86400, "3 days ago"),
    (20 * 86400, "2 weeks ago"), (90 * 86400, "3 months ago"), (800 * 86400, "2 years ago"),
])
def test_since_reads_as_docker_service_ps_says_it(seconds, said):
    now = 1_800_000_000.25
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(now - seconds))) + \
        ".%09dZ" % round((now - seconds) % 1 * 1e9)
    assert gridx.docker_ago(stamp, now) == said
    assert gridx.unix_time("2026-12-07T19:20:10.5+01:00") == gridx.unix_time("2026-12-07T18:20:10.5Z")
    assert gridx.docker_ago("", now) == "" and gridx.unix_time("yesterday") is None


def test_resources_add_subtract_and_fit():
    node, used = gridx.Resources(4, 4096, 2), gridx.Resources(1, 1024, 1)
    assert node - used == gridx.Resources(3, 3072, 1) and used + used == gridx.Resources(2, 2048, 2)
    assert used * 3 == gridx.Resources(3, 3072, 3) and (node - used).memory_mib == 3072
    assert used.fits(node) and not gridx.Resources(1, 1024, 3).fits(node) and not gridx.Resources(5).fits(node)
    assert gridx.Resources() == gridx.Resources(0, 0, 0)
    assert used.to_dict() == {"cpus": 1, "memory_mib": 1024, "gpus": 1}
    assert (node - used).show() == "3/3G/1"
    counts, names = gridx.generic_resources(NODE["Description"]["Resources"]["GenericResources"])
    assert counts == gridx.Resources(4, 4096, 0) and names == ["GPU-a", "GPU-b"]


# -- Jobs: job state ---------------------------------------------------------------

def test_pending_reason_in_users_terms():
    service = {"Spec": {"TaskTemplate": {"Resources": {"Reservations": {"GenericResources": [
        {"DiscreteResourceSpec": {"Kind": "gridx_cpu", "Value": 1}},
        {"DiscreteResourceSpec": {"Kind": "gridx_mem", "Value": 1024}},
        {"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 2}}]}}}}}
    box = gridx.Node.from_docker(dict(NODE, Description=dict(NODE["Description"], Hostname="gpu-box")))
    reason = gridx.pending_reason({"tasks": []}, service, [box], {"n1": gridx.Resources(1, 1024, 1)})
    assert reason == "waiting: 2 GPUs requested, 1 free on gpu-box"
    # a node that is down has no room to offer
    down = gridx.Node.from_docker(dict(NODE, ID="n9", Status={"State": "down", "Addr": "10.0.0.9"}))
    assert gridx.pending_reason({"tasks": []}, service, [down], {}) == "waiting: no worker is Ready and available"


def test_a_job_that_runs_again_is_pending_not_failed():
    service = {"Spec": {"Name": "job1", "Labels": {gridx.LABEL_JOB: "job1"}, "Mode": {"ReplicatedJob": {}},
                        "TaskTemplate": {"ContainerSpec": {"Image": "python:3.11"}, "Resources": {}}}}
    rejected = [task("rejected", error=gridx.ENFORCER_REJECTION, task_id=f"r{i}")
                for i in range(gridx.ENFORCER_RERUNS + 1)]
    # hub watch / --wait run it again: not failed
    assert gridx.job_summary(service, rejected[:1])["state"] == "pending"
    # rejected once too often: Grid-X stops running it again
    assert gridx.job_summary(service, rejected)["state"] == "failed"
    assert gridx.job_summary(service, [task("failed", error="task: non-zero exit (3)")])["state"] == "failed"


def test_reserved_by_node_counts_placed_current_tasks():
    service = {"Spec": {"Name": "job1", "TaskTemplate": {"Resources": {"Reservations": {"GenericResources": [
        {"DiscreteResourceSpec": {"Kind": "gridx_cpu", "Value": 2}},
        {"DiscreteResourceSpec": {"Kind": "gridx_mem", "Value": 512}}]}}}}}
    tasks = [task("running", desired="running"), task("starting", desired="running", task_id="s"),
             task("pending", desired="running", task_id="p"), task("running", desired="remove", task_id="old"),
             task("complete", desired="complete", task_id="c")]
    assert gridx.reserved_by_node([service], tasks) == {"id-worker1": gridx.Resources(4, 1024, 0)}
    # by node ID: another node that reports the same hostname holds its own
    tasks.append(task("running", desired="running", task_id="twin", node_id="id-twin"))
    assert gridx.reserved_by_node([service], tasks) == {"id-worker1": gridx.Resources(4, 1024, 0),
                                                        "id-twin": gridx.Resources(2, 512, 0)}


# -- Jobs: running again -----------------------------------------------------------

def test_rejected_by_enforcer_only_when_no_task_ran():
    rejected = task("rejected", error=gridx.ENFORCER_REJECTION)
    assert gridx.rejected_by_enforcer([rejected])
    # the job ran again and finished: the old rejection is history
    assert not gridx.rejected_by_enforcer([rejected, task("complete", desired="complete")])
    assert not gridx.rejected_by_enforcer([task("rejected", error="no such image")])
    assert not gridx.rejected_by_enforcer([rejected, task("running", desired="running")])
    assert not gridx.rejected_by_enforcer([])


def test_jobs_that_run_again_are_bounded():
    services = [{"Spec": {"Name": "once"}}, {"Spec": {"Name": "often"}}, {"Spec": {"Name": "fine"}}]
    tasks = [task("rejected", error=gridx.ENFORCER_REJECTION, service="once")]
    tasks += [task("rejected", error=gridx.ENFORCER_REJECTION, service="often", task_id=f"o{i}")
              for i in range(gridx.ENFORCER_RERUNS + 1)]
    tasks += [task("complete", desired="complete", service="fine")]
    assert gridx.jobs_that_run_again(services, tasks) == {"once": frozenset({"once-rejected-worker1"})}


def test_wait_runs_a_job_again_by_the_same_rule(monkeypatch):
    """--wait's run again is runs_again's: bounded by the task history, so
    what hub watch ran again counts too."""
    ran = []
    monkeypatch.setattr(gridx, "info", lambda message: None)
    monkeypatch.setattr(gridx, "run_again", lambda ids: ran.append(list(ids)))
    waiting = gridx.RunAgainWait("job1")
    once = [task("rejected", error=gridx.ENFORCER_REJECTION, task_id="r0")]
    assert waiting.started(once) and waiting.now(once) and ran == [["job1"]]
    assert not waiting.started(once)  # the rejected task is not yet the job's end again
    assert waiting.started(once + [task("pending", desired="running", task_id="new")])
    too_often = [task("rejected", error=gridx.ENFORCER_REJECTION, task_id=f"r{i}")
                 for i in range(gridx.ENFORCER_RERUNS + 1)]
    assert not waiting.now(too_often) and ran == [["job1"]]
    assert not waiting.now([task("failed", error="task: non-zero exit (3)")])


# -- Jobs: waiting -----------------------------------------------------------------

def test_job_progress_says_what_a_waiting_job_does():
    def job(state, nodes=()):
        return {"state": state, "tasks": [{"node": n} for n in nodes]}
    assert gridx.job_progress("j", job("pending"), 0.2) is None  # placed in a moment: nothing to say
    assert "waiting for a worker with room" in gridx.job_progress("j", job("pending"), 1.5)
    assert gridx.job_progress("j", job("starting", ["w2"]), 0).startswith("job j: starting on w2")
    assert gridx.job_progress("j", job("running", ["w2", "w1"]), 0) == "job j: running on w1, w2"
    assert gridx.job_progress("j", job("complete", ["w1"]), 0) is None
