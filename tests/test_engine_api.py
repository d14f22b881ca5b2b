"""The Engine API's answers, recorded from real engines, read as gridx reads them.

tests/engine_api/VERSION/ holds what one Docker version answered to gridx's
requests (tests/engine_api/capture.sh, run on a lab's hub with four jobs),
beside what `docker service ps` and `docker inspect TASK` showed of the same
tasks, the way gridx read them before. Each test holds the types made from
the API's JSON (Task, Node, the job summary) against the CLI's view, for
every version recorded. 20.10 and 26.1 come from the lab (bookworm, trixie:
a hub and three workers, worker3 sharing two made-up GPUs); 28.5 from a
one-node swarm of the forky hub image (the manager sharing 2 CPUs and two
made-up GPUs).
"""

import email.utils
import json
import os

import pytest
from fakes import FakeEngine, cli

import gridx

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine_api")
VERSIONS = sorted(name for name in os.listdir(HERE) if os.path.isdir(os.path.join(HERE, name)))


class Recorded:
    """One version's recording."""

    def __init__(self, version):
        self.folder = os.path.join(HERE, version)
        self.services = self.load("services.json")
        self.tasks = self.load("tasks.json")
        self.nodes = self.load("nodes.json")
        self.inspect = {task["ID"]: task for task in self.load("inspect.json")}
        with open(os.path.join(self.folder, "service-ps.jsonl")) as rows:
            self.rows = {row["ID"]: row for row in map(json.loads, rows)}
        headers = {}
        with open(os.path.join(self.folder, "ping.headers")) as ping:
            for line in ping:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        self.api_version = headers["api-version"]
        self.at = email.utils.parsedate_to_datetime(headers["date"]).timestamp()  # when it was recorded

    def load(self, name):
        with open(os.path.join(self.folder, name)) as handle:
            return json.load(handle)

    def made(self):
        """(services, Tasks, Nodes) as gridx makes them from the API's JSON."""
        nodes = [gridx.Node.from_docker(node) for node in self.nodes]
        names = {s["ID"]: s["Spec"]["Name"] for s in self.services}
        tasks = gridx.tasks_from_api(self.tasks, names, {n.id: n.hostname for n in nodes})
        return self.services, tasks, nodes


@pytest.fixture(params=VERSIONS)
def recorded(request):
    return Recorded(request.param)


def test_every_engine_generation_is_recorded():
    """Docker 20.10 (API 1.41), 26.1 (1.45) and 28.5 (1.51)."""
    assert {version: Recorded(version).api_version for version in VERSIONS} == {
        "20.10": "1.41", "26.1": "1.45", "28.5": "1.51"}


def test_tasks_read_as_docker_service_ps_showed_them(recorded):
    _, tasks, _ = recorded.made()
    assert {t.id for t in tasks} == set(recorded.rows)
    for task in tasks:
        row = recorded.rows[task.id]
        state, _, since = row["CurrentState"].partition(" ")
        assert (task.name, task.node, task.state, task.desired, task.error) == (
            row["Name"], row["Node"], state.lower(), row["DesiredState"].lower(), row["Error"].strip('"'))
        # `docker service ps` ran within a few seconds of GET /_ping
        stamp = recorded.inspect[task.id]["Status"]["Timestamp"]
        assert since in {gridx.docker_ago(stamp, recorded.at + delay) for delay in range(0, 4)}, (since, stamp)


def test_tasks_in_docker_service_ps_order(recorded):
    _, tasks, _ = recorded.made()
    by_job = {}
    for task in tasks:
        by_job.setdefault(task.service, []).append(task.id)
    ordered = {}
    for task_id, row in recorded.rows.items():  # the CLI prints each job's tasks in its order
        ordered.setdefault(row["Name"].split(".")[0], []).append(task_id)
    assert by_job == ordered


def test_exit_codes_and_gpus_as_docker_inspect_gave_them(recorded):
    _, tasks, _ = recorded.made()
    for task in tasks:
        inspected = recorded.inspect[task.id]
        container = inspected["Status"].get("ContainerStatus") or {}
        assert task.container_exit == container.get("ExitCode")
        assert task.container == container.get("ContainerID", "")
        assert task.gpus == gridx.generic_resources(inspected.get("GenericResources"))[1]
        assert task.node_id == inspected.get("NodeID", "")


def test_jobs_and_nodes_from_the_recorded_engine(recorded):
    services, tasks, nodes = recorded.made()
    by_service = gridx.tasks_by_service(tasks)
    jobs = {s["Spec"]["Name"]: gridx.job_summary(s, by_service.get(s["Spec"]["Name"], [])) for s in services}
    assert (jobs["cap-ok"]["state"], jobs["cap-ok"]["exit_code"]) == ("complete", 0)
    assert (jobs["cap-fail"]["state"], jobs["cap-fail"]["exit_code"]) == ("failed", 3)
    many = jobs["cap-many"]
    assert many["state"] == "running" and many["replicas"] == len(many["tasks"])
    assert sorted(t["state"] for t in many["tasks"]) == ["pending"] + ["running"] * (many["replicas"] - 1)
    workers = [n for n in nodes if not n.manager]
    reserved = gridx.reserved_by_node(services, tasks)
    assert all(reserved[n.id].cpus == n.shared.cpus for n in workers if n.shared.cpus == max(
        w.shared.cpus for w in workers))  # the running replicas fill the biggest workers
    if any(n.gpu_ids for n in nodes):  # a GPU job, where a node shares one
        gpu_task = next(t for t in tasks if t.service == "cap-gpu")
        assert jobs["cap-gpu"]["gpus"] == 1 and gpu_task.gpus and set(gpu_task.gpus) <= {
            g for n in nodes for g in n.gpu_ids}
    assert all(n.id and n.address and n.state == "ready" for n in nodes)
    assert [n.manager for n in nodes].count(True) == 1


def test_gridx_reads_the_recorded_answers_through_its_client(recorded):
    """The recorded JSON, served in chunks at the recorded API version:
    jobs list and cluster as a process."""
    engine = FakeEngine(recorded.services, recorded.tasks, recorded.nodes, version=recorded.api_version)
    engine.chunked = True
    engine.start()
    listed = cli("jobs", "list", "--json", env={"DOCKER_HOST": engine.host})
    assert listed.returncode == 0, listed.stderr
    states = {job["id"]: job["state"] for job in json.loads(listed.stdout)["jobs"]}
    assert states["cap-ok"] == "complete" and states["cap-fail"] == "failed" and states["cap-many"] == "running"
    cluster = cli("cluster", "--json", env={"DOCKER_HOST": engine.host})
    assert cluster.returncode == 0, cluster.stderr
    assert {n["id"] for n in json.loads(cluster.stdout)["nodes"]} == {n["ID"] for n in recorded.nodes}
    spoken = min(recorded.api_version, "1.51", key=lambda v: tuple(map(int, v.split("."))))
    assert {path.split("/")[1] for path, _ in engine.requests if path != "/_ping"} == {f"v{spoken}"}
