"""Unit tests of issue 22's daily tools: a job's port forwarded (Remote), the
usage ledger (Usage), notifications (Notifications) and `jobs train FILE`
through serve. Real sockets on loopback, real HTTP receivers and curl for
the relays and deliveries; FakeTools for Docker."""

import base64
import hashlib
import hmac
import http.server
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from fakes import GRIDX, JUPYTER_SERVICE, ROOT, fake_hub, run_main, serve

import gridx

# -- forwarding a job's port -------------------------------------------------------


@pytest.mark.parametrize("value,expected", [
    (None, ("127.0.0.1", None)), ("", ("127.0.0.1", None)), ("8888", ("127.0.0.1", 8888)),
    ("0", ("127.0.0.1", 0)), ("localhost:9000", ("127.0.0.1", 9000)), ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("[::1]:8888", ("::1", 8888)),
])
def test_parse_listen(value, expected):
    assert gridx.parse_listen(value) == expected


@pytest.mark.parametrize("value", ["-x", "99999", "host.example:80", "::1:80", "1.2.3.4:", "a:b", "[::1]"])
def test_a_bad_listen_address_is_exit_2(value):
    with pytest.raises(gridx.GridxError) as error:
        gridx.parse_listen(value)
    assert error.value.code == 2


class Echo:
    """A TCP server on loopback standing in for a job's port: it answers each
    connection with what it read, upper-cased, and closes once the client
    half-closed (or after `once` bytes)."""

    def __init__(self, once=None):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.once, self.connections = once, 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            conn, _ = self.server.accept()
            self.connections += 1
            threading.Thread(target=self.one, args=(conn,), daemon=True).start()

    def one(self, conn):
        got = b""
        while self.once is None or len(got) < self.once:
            data = conn.recv(65536)
            if not data:
                break
            got += data
        conn.sendall(got.upper())
        conn.close()


def ask(port, data, half_close=True):
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(data)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return answer
            answer += chunk


def test_relay_stdio_carries_both_ways_and_ends_with_the_jobs_side():
    echo = Echo()
    code = f"import socket, sys; sys.path.insert(0, {ROOT!r}); import gridx; " \
           f"gridx.relay_stdio(socket.create_connection(('127.0.0.1', {echo.port})))"
    data = os.urandom(3_000_000)
    result = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=60)
    assert result.returncode == 0 and result.stdout == data.upper() and result.stderr == b""


def run_forward(way, job_id="nb"):
    forward = gridx.Forward(way, job_id, ("127.0.0.1", 0))
    thread = threading.Thread(target=forward.run, daemon=True)
    thread.start()
    return forward, forward.listener.getsockname()[1], thread


def endpoint(port, state="running"):
    return {"id": "nb", "owner": "alice", "kind": "jupyter", "state": state, "port": port, "token": "t0k",
            "address": "127.0.0.1"}


def test_a_forward_on_the_hub_relays_many_connections_at_once_and_ends_with_the_job(monkeypatch):
    echo = Echo()
    there = {"job": True}

    def job_endpoint(job_id):
        if not there["job"]:
            raise gridx.usage_error(f"no job {job_id!r}")
        return endpoint(echo.port)

    monkeypatch.setattr(gridx, "job_endpoint", job_endpoint)
    monkeypatch.setattr(gridx, "FORWARD_CHECK_S", 0.2)
    forward, port, thread = run_forward(gridx.HubWay())
    answers = {}
    askers = [threading.Thread(target=lambda i=i: answers.__setitem__(i, ask(port, b"x%d" % i * 20000)))
              for i in range(8)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join(30)
    assert answers == {i: b"X%d" % i * 20000 for i in range(8)}
    there["job"] = False
    thread.join(5)
    assert not thread.is_alive() and forward.ended == "job nb is gone"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_a_forward_ends_when_its_batch_job_is_over(monkeypatch):
    monkeypatch.setattr(gridx, "job_endpoint", lambda job_id: endpoint(1, "complete"))
    monkeypatch.setattr(gridx, "FORWARD_CHECK_S", 0.1)
    forward, _, thread = run_forward(gridx.HubWay())
    thread.join(5)
    assert forward.ended == "job nb is complete"


FAKE_HUB_SIDE = """
import json, socket, sys
words = sys.argv[1:]
if "--probe" in words:
    print(json.dumps({{"id": "nb", "owner": "alice", "kind": "jupyter", "state": "running", "port": 8888,
                       "token": "t0k", "address": "10.0.0.3"}}))
    sys.exit(0)
sys.path.insert(0, {root!r})
import gridx
gridx.relay_stdio(socket.create_connection(("127.0.0.1", {port})))
"""


def test_a_forward_through_the_hubs_ssh_gives_each_connection_its_session(monkeypatch, capsys):
    """What ssh would run on the hub stands in for it: the connection itself
    is its input and output, one process per connection."""
    echo = Echo()
    started = []

    def argv(docker_host, words, control=None):
        started.append(words)
        return [sys.executable, "-c", FAKE_HUB_SIDE.format(root=ROOT, port=echo.port), *words]

    monkeypatch.setattr(gridx, "hub_gridx_argv", argv)
    monkeypatch.setattr(gridx, "ssh_control_dir", lambda: None)
    way = gridx.SSHWay("ssh://gridx@10.0.0.1")
    assert way.probe("nb")["token"] == "t0k"
    forward, port, thread = run_forward(way)
    answers = {}
    askers = [threading.Thread(target=lambda i=i: answers.__setitem__(i, ask(port, b"q%d" % i * 5000)))
              for i in range(4)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join(30)
    assert answers == {i: b"Q%d" % i * 5000 for i in range(4)}
    assert started.count(["jobs", "connect", "--", "nb"]) == 4
    forward.ended = "stopped by the test"
    thread.join(5)
    assert not thread.is_alive()


def test_a_forward_through_ssh_stops_when_the_hub_says_the_job_is_gone(monkeypatch):
    monkeypatch.setattr(gridx, "hub_gridx_argv", lambda host, words, control=None: [
        sys.executable, "-c", "import sys; print('error: no job', file=sys.stderr); sys.exit(2)"])
    monkeypatch.setattr(gridx, "ssh_control_dir", lambda: None)
    way = gridx.SSHWay("ssh://gridx@10.0.0.1")
    with pytest.raises(gridx.ForwardedExit) as exited:
        way.probe("nb")
    assert exited.value.code == 2
    assert way.still_there("nb") is None


def test_forward_prints_the_local_url_with_jupyters_token(monkeypatch, capsys):
    monkeypatch.setattr(gridx, "job_endpoint", lambda job_id: endpoint(8888))
    monkeypatch.setattr(gridx.Forward, "run", lambda self: self.listener.close())
    monkeypatch.setattr(gridx, "need", lambda *tools: None)
    monkeypatch.delenv("GRIDX_MANAGER", raising=False)
    assert run_main(["jobs", "forward", "nb", "127.0.0.1:0", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    port = int(shown["local"].rpartition(":")[2])
    assert port > 0 and shown["url"] == f"http://127.0.0.1:{port}/?token=t0k"


def test_a_taken_local_port_is_exit_2(monkeypatch, capsys):
    taken = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setattr(gridx, "job_endpoint", lambda job_id: endpoint(8888))
    monkeypatch.setattr(gridx, "need", lambda *tools: None)
    monkeypatch.delenv("GRIDX_MANAGER", raising=False)
    assert run_main(["jobs", "forward", "nb", str(taken.getsockname()[1])]) == 2
    assert "is in use here" in capsys.readouterr().err
    taken.close()


def test_the_hub_side_checks_the_owner_and_the_port(tmp_path, monkeypatch):
    fake_hub(tmp_path, monkeypatch).engine.services.append(JUPYTER_SERVICE)
    found = gridx.job_endpoint("jupyter-1")
    assert found["port"] == 8888 and found["address"] == "10.0.0.2" and found["token"] == "ab" * 16
    monkeypatch.setattr(gridx, "OWNER", "alice")  # through serve: the job is root's
    with pytest.raises(gridx.GridxError) as error:
        gridx.job_endpoint("jupyter-1")
    assert error.value.code == 2 and "root's" in error.value.message
    monkeypatch.setattr(gridx, "OWNER", None)
    with pytest.raises(gridx.GridxError) as error:
        gridx.job_endpoint("job-1")  # a batch job publishes nothing
    assert error.value.code == 2 and "publishes no port" in error.value.message


@pytest.mark.parametrize("port", ["22", "80", "2377", "7946", "5000", "5001", "5002"])
def test_a_forward_never_reaches_a_workers_own_service_port(port, tmp_path, monkeypatch):
    fake_hub(tmp_path, monkeypatch)
    labels = dict(JUPYTER_SERVICE["Spec"]["Labels"], **{gridx.LABEL_PORT: port})
    service = dict(JUPYTER_SERVICE, Spec=dict(JUPYTER_SERVICE["Spec"], Labels=labels))
    monkeypatch.setattr(gridx, "list_job_services", lambda ids=None, missing_ok=False: [service])
    with pytest.raises(gridx.GridxError) as error:
        gridx.job_endpoint("jupyter-1")
    assert error.value.code == 2 and "own services' ports" in error.value.message


def test_the_hub_side_follows_its_job_to_the_node_it_runs_on():
    nodes = [gridx.Node(id=i, hostname=h, address=a, state="ready", availability="active", role="worker",
                        manager=False, shared=gridx.Resources(), gpu_ids=[], created="", updated="", hub_ssh=True,
                        owner="", preempted=[])
             for i, h, a in (("n1", "w", "10.0.0.2"), ("n2", "w", "10.0.0.3"), ("n3", "x", "10.0.0.4"))]
    assert gridx.task_node(gridx.Task(node="x"), nodes).address == "10.0.0.4"
    assert gridx.task_node(gridx.Task(node="w"), nodes) is None  # two nodes of that hostname
    from types import SimpleNamespace

    assert gridx.task_node(SimpleNamespace(node="w", node_id="n2"), nodes).address == "10.0.0.3"  # by its node ID


@pytest.mark.parametrize("command", ["jobs forward jupyter-1", "jobs jupyter --forward",
                                     "jobs jupyter --forward 9999", "jobs jupyter --forward=127.0.0.1:80"])
def test_serve_never_listens_on_the_hub(command, serve_env, monkeypatch, capsys):
    assert serve(monkeypatch, command) == 2 and serve_env == []
    assert "not allowed here" in capsys.readouterr().err


def test_serve_runs_connect_without_watching_its_input(serve_env, monkeypatch):
    ran = []
    entry = gridx.COMMANDS["jobs"][2]["connect"]
    monkeypatch.setitem(gridx.COMMANDS["jobs"][2], "connect", (lambda args: ran.append(args.job_id) or 0,
                                                                *entry[1:]))
    monkeypatch.setattr(gridx, "watch_session_end", lambda armed=False: pytest.fail("it would eat the data"))
    assert serve(monkeypatch, "jobs connect jupyter-1") == 0 and ran == ["jupyter-1"]


def test_connect_is_not_in_help():
    result = subprocess.run([sys.executable, GRIDX, "jobs", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "forward" in result.stdout and "connect" not in result.stdout


# -- jobs train FILE through serve ------------------------------------------------------


def test_a_script_travels_on_the_session_and_reads_back_whole():
    pipe = io.BytesIO()
    gridx.send_script(pipe, "train.py", b"print(42)\n" * 1000)
    pipe.seek(0)
    upload = gridx.read_upload(pipe, gridx.CONFIG_MAX_BYTES, "the training script")
    assert upload.header == {"script": "train.py"} and upload.spool.read() == b"print(42)\n" * 1000


def test_serve_trains_the_file_it_was_sent_never_a_file_of_the_hubs(tmp_path, monkeypatch):
    tools = fake_hub(tmp_path, monkeypatch)
    monkeypatch.setattr(gridx, "OWNER", None)  # serve sets them: put back after the test
    monkeypatch.setattr(gridx, "SERVE_LIMITS", None)
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "users.json").write_text(json.dumps({"users": {"alice": {}}}))
    monkeypatch.setattr(gridx, "watch_session_end", lambda armed=False: None)
    pipe = io.BytesIO()
    gridx.send_script(pipe, "train.py", b"print('from alice')\n")
    monkeypatch.setattr(sys, "stdin", type("In", (), {"buffer": io.BytesIO(pipe.getvalue())})())
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **kw: opened.append(str(path)) or real_open(path, *a, **kw))
    assert serve(monkeypatch, "jobs train /etc/shadow --framework pytorch --image python:3.11 --name t1") == 0
    configs = [argv for argv in tools.calls if argv[1:3] == ["config", "create"]]
    assert len(configs) == 1 and "/etc/shadow" not in opened


def test_serve_without_the_script_on_its_input_is_exit_2(serve_env, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", type("In", (), {"buffer": io.BytesIO(b"")})())
    assert serve(monkeypatch, "jobs train /etc/passwd --framework pytorch") == 2 and serve_env == []
    assert "the training script did not arrive" in capsys.readouterr().err


def test_the_client_sends_the_file_it_read(tmp_path, monkeypatch):
    monkeypatch.setattr(gridx, "DOCKER_HOST", None)  # set_manager sets it: put back after the test
    (tmp_path / "t.py").write_text("print(1)\n")
    monkeypatch.chdir(tmp_path)
    sent = []

    class Process:
        def __init__(self):
            self.stdin = io.BytesIO()
            self.stdin.close = lambda: None

        def wait(self):
            sent.append(self.stdin.getvalue())
            return 0

    monkeypatch.setattr(gridx, "start", lambda argv, **kw: Process())
    monkeypatch.setattr(gridx, "check_manager_reachable", lambda host: None)
    monkeypatch.setattr(gridx, "need", lambda *tools: None)
    monkeypatch.setattr(gridx, "ssh_control_dir", lambda: None)
    assert run_main(["jobs", "train", "t.py", "--framework", "pytorch", "--manager", "gridx@10.0.0.1"]) == 0
    upload = gridx.read_upload(io.BytesIO(sent[0]), gridx.CONFIG_MAX_BYTES)
    assert upload.header == {"script": "t.py"} and upload.spool.read() == b"print(1)\n"


# -- usage: the ledger --------------------------------------------------------------


def job_service(name="job-1", sid="s1", owner="alice", kind="run", cpus=2, mem=2048, gpus=0, labels=None,
                batch=True):
    resources = [{"DiscreteResourceSpec": {"Kind": "gridx_cpu", "Value": cpus}},
                 {"DiscreteResourceSpec": {"Kind": "gridx_mem", "Value": mem}}]
    if gpus:
        resources.append({"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": gpus}})
    all_labels = {gridx.LABEL_JOB: name, gridx.LABEL_KIND: kind, gridx.LABEL_OWNER: owner,
                  gridx.LABEL_CREATED: str(int(time.time()))}
    all_labels.update(labels or {})
    return {"ID": sid, "Spec": {
        "Name": name, "Labels": all_labels,
        "Mode": {"ReplicatedJob": {"TotalCompletions": 1}} if batch else {"Replicated": {"Replicas": 1}},
        "TaskTemplate": {"ContainerSpec": {"Image": "python:3.11"},
                         "Resources": {"Reservations": {"GenericResources": resources}}}}}


def node(node_id="n1", hostname="worker1", state="ready"):
    return gridx.Node(id=node_id, hostname=hostname, address="10.0.0.2", state=state, availability="active",
                      role="worker", manager=False, shared=gridx.Resources(4, 4096, 0), gpu_ids=[], created="",
                      updated="", hub_ssh=True, owner="", preempted=[])


class Times:
    """task_times' answers: {task: (node ID, state, entered, created)}."""

    def __init__(self, monkeypatch):
        self.answers, self.asked = {}, []
        monkeypatch.setattr(gridx, "task_times", self.times)

    def times(self, ids):
        self.asked.append(list(ids))
        return {i: self.answers[i] for i in ids if i in self.answers}


@pytest.fixture
def ledger_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_USAGE_DIR", str(tmp_path / "usage"))
    return tmp_path / "usage"


def lines(ledger_dir):
    return [json.loads(line) for line in (ledger_dir / "ledger.jsonl").read_text().splitlines()]


def test_a_task_is_counted_from_its_start_to_its_end_once_across_restarts(ledger_dir, monkeypatch):
    times = Times(monkeypatch)
    service, nodes = job_service(), [node()]
    running = gridx.Task(id="t1", name="job-1.1", service="job-1", node="worker1", state="running", desired="running")
    times.answers["t1"] = ("n1", "running", 1000.0, 990.0)
    recorder = gridx.UsageRecorder()
    assert recorder.record([service], [running], nodes, now=1005) == []
    assert times.asked == [["t1"]]
    assert recorder.record([service], [running], nodes, now=1010) == []
    assert times.asked[-1] == []  # nothing changed: no docker call
    recorder = gridx.UsageRecorder()  # hub watch starts again: the open span survives
    done = gridx.Task(id="t1", name="job-1.1", service="job-1", node="worker1", state="complete", desired="shutdown")
    times.answers["t1"] = ("n1", "complete", 4600.0, 990.0)
    written = recorder.record([service], [done], nodes, now=4605)
    assert [(s["task"], s["started"], s["ended"], s["node_id"], s["node"], s["owner"], s["cpus"]) for s in written] \
        == [("t1", 1000.0, 4600.0, "n1", "worker1", "alice", 2)]
    for again in (recorder, gridx.UsageRecorder(), gridx.UsageRecorder()):
        again.record([service], [done], nodes, now=4700)
        again.record([service], [done], nodes, now=4800)
    assert len(lines(ledger_dir)) == 1
    assert stat.S_IMODE(os.stat(ledger_dir / "ledger.jsonl").st_mode) == 0o644


def test_a_deleted_job_ends_where_watch_last_saw_it_and_stays_counted(ledger_dir, monkeypatch):
    times = Times(monkeypatch)
    service, nodes = job_service(kind="jupyter", batch=False), [node()]
    task = gridx.Task(id="t1", service="job-1", node="worker1", state="running", desired="running")
    times.answers["t1"] = ("n1", "running", 100.0, 90.0)
    recorder = gridx.UsageRecorder()
    recorder.record([service], [task], nodes, now=110)
    recorder.record([service], [task], nodes, now=3700)
    written = recorder.record([], [], nodes, now=3710)  # gone with its job
    assert [(s["started"], s["ended"], s["how"]) for s in written] == [(100.0, 3700, "gone")]
    report = gridx.usage_report(gridx.read_ledger()[0], [], 0, 4000)
    assert report["users"][0]["kinds"]["jupyter"]["cpu_hours"] == 2.0


def test_a_task_on_a_node_gone_down_stops_counting_and_starts_again_when_it_returns(ledger_dir, monkeypatch):
    times = Times(monkeypatch)
    service = job_service()
    task = gridx.Task(id="t1", service="job-1", node="worker1", state="running", desired="running")
    times.answers["t1"] = ("n1", "running", 100.0, 90.0)
    recorder = gridx.UsageRecorder()
    recorder.record([service], [task], [node()], now=110)
    written = recorder.record([service], [task], [node(state="down")], now=200)  # Docker 20.10: still "running"
    assert [(s["started"], s["ended"], s["how"]) for s in written] == [(100.0, 200, "node-down")]
    assert recorder.record([service], [task], [node(state="down")], now=300) == []
    recorder.record([service], [task], [node()], now=400)  # back: counted again from now, not from 100
    times.answers["t1"] = ("n1", "complete", 460.0, 90.0)
    done = gridx.Task(id="t1", service="job-1", node="worker1", state="complete", desired="shutdown")
    written = recorder.record([service], [done], [node()], now=470)
    assert [(s["started"], s["ended"]) for s in written] == [(400, 460.0)]


def test_a_task_shorter_than_a_pass_counts_from_the_pass_before(ledger_dir, monkeypatch):
    times = Times(monkeypatch)
    service, nodes = job_service(), [node()]
    old = gridx.Task(id="t0", service="job-1", node="worker1", state="complete", desired="shutdown")
    times.answers["t0"] = ("n1", "complete", 50.0, 40.0)
    recorder = gridx.UsageRecorder()
    assert recorder.record([service], [old], nodes, now=100) == []  # ended before watch: not counted
    short = gridx.Task(id="t2", service="job-1", node="worker1", state="complete", desired="shutdown")
    times.answers["t2"] = ("n1", "complete", 104.0, 102.0)
    written = recorder.record([service], [old, short], nodes, now=110)
    assert [(s["task"], s["started"], s["ended"]) for s in written] == [("t2", 102.0, 104.0)]
    assert recorder.record([service], [old, short], nodes, now=120) == []
    assert times.asked[-1] == []  # what it took note of is not asked about again


def test_the_ledger_skips_a_line_a_crash_cut_short_and_never_writes_a_span_twice(ledger_dir):
    span = {"task": "t1", "service": "s1", "started": 1.0, "ended": 2.0, "owner": "alice"}
    first, second = gridx.Ledger(), gridx.Ledger()
    assert first.append([span]) == [span]
    with open(ledger_dir / "ledger.jsonl", "a") as handle:
        handle.write('{"task": "t9", "sta')  # the power went
    assert second.append([span]) == []  # another writer's line is read first
    other = dict(span, task="t2")
    assert second.append([other]) == [other]
    assert [s["task"] for s in gridx.read_ledger()[0]] == ["t1", "t2"]


def test_usage_counts_what_falls_inside_the_window_by_member_kind_and_node():
    spans = [
        {"task": "a", "owner": "alice", "kind": "run", "node_id": "n1", "node": "w1", "cpus": 2, "memory_mib": 1024,
         "gpus": 0, "started": 0, "ended": 7200},
        {"task": "b", "owner": "alice", "kind": "train", "node_id": "n2", "node": "w2", "cpus": 1, "memory_mib": 2048,
         "gpus": 1, "started": 3600, "ended": 10800},
        {"task": "c", "owner": "bob", "kind": "run", "node_id": "n1", "node": "w1", "cpus": 4, "memory_mib": 0,
         "gpus": 0, "started": 0, "ended": 1800},
    ]
    running = [{"task": "d", "owner": "bob", "kind": "jupyter", "node_id": "n2", "node": "w2", "cpus": 1,
                "memory_mib": 1024, "gpus": 0, "started": 9000}]
    report = gridx.usage_report(spans, running, since=3600, now=10800)
    alice = next(u for u in report["users"] if u["name"] == "alice")
    assert alice["kinds"]["run"]["cpu_hours"] == 2.0  # its second hour only
    assert alice["kinds"]["train"] == {"cpu_hours": 2.0, "gpu_hours": 2.0, "memory_gib_hours": 4.0, "tasks": 1}
    assert alice["cpu_hours"] == 4.0
    bob = next(u for u in report["users"] if u["name"] == "bob")
    assert list(bob["kinds"]) == ["jupyter"] and bob["kinds"]["jupyter"]["cpu_hours"] == 0.5  # c ended before
    given = {n["node_id"]: n for n in report["nodes"]}
    assert given["n1"]["cpu_hours"] == 2.0 and given["n2"]["gpu_hours"] == 2.0 and given["n2"]["hostname"] == "w2"
    assert report["running"] == 1
    only = gridx.usage_report(spans, running, since=0, now=10800, user="bob")
    assert [u["name"] for u in only["users"]] == ["bob"] and only["users"][0]["cpu_hours"] == 2.5


@pytest.mark.parametrize("value,ago", [("7d", 7 * 86400), ("12h", 43200), ("30m", 1800)])
def test_since(value, ago):
    assert gridx.parse_since(value, now=1_000_000) == 1_000_000 - ago


@pytest.mark.parametrize("value", ["-x", "7w", "yesterday", "2026-13-01", ""])
def test_a_bad_since_is_exit_2(value, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRIDX_USAGE_DIR", str(tmp_path))
    assert run_main(["usage", f"--since={value}"]) == 2
    assert "invalid --since" in capsys.readouterr().err


def test_usage_and_list_users_read_the_ledger(tmp_path, monkeypatch, capsys):
    fake_hub(tmp_path, monkeypatch)
    monkeypatch.setenv("GRIDX_USAGE_DIR", str(tmp_path / "usage"))
    now = time.time()
    gridx.Ledger().append([{"task": "t1", "service": "s1", "job": "job-1", "owner": "u1", "kind": "run",
                            "node_id": "n1", "node": "worker3", "cpus": 2, "memory_mib": 1024, "gpus": 0,
                            "started": now - 7200, "ended": now - 3600},
                           {"task": "t2", "service": "s2", "job": "old", "owner": "u1", "kind": "run",
                            "node_id": "n1", "node": "worker3", "cpus": 8, "memory_mib": 0, "gpus": 0,
                            "started": now - 30 * 86400, "ended": now - 29 * 86400}])
    assert run_main(["usage", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(u["name"], u["cpu_hours"]) for u in report["users"]] == [("u1", 2.0)]
    assert run_main(["usage"]) == 0
    table = capsys.readouterr().out
    assert "u1" in table and "worker3" in table and "2.00" in table
    assert run_main(["hub", "add-user", "u1"]) == 0
    capsys.readouterr()
    assert run_main(["hub", "list-users", "--json"]) == 0
    users = json.loads(capsys.readouterr().out)["users"]
    assert users[0]["usage_7d"] == {"cpu_hours": 2.0, "gpu_hours": 0.0, "memory_gib_hours": 1.0}
    assert run_main(["hub", "list-users"]) == 0
    assert "2.0/0.0/1.0" in capsys.readouterr().out


def test_members_read_usage_through_serve(serve_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("GRIDX_USAGE_DIR", str(tmp_path / "usage"))
    assert serve(monkeypatch, "usage --json --since 1d") == 0 and serve_env == []
    assert json.loads(capsys.readouterr().out)["users"] == []
    assert serve(monkeypatch, "jobs usage --user bob") == 0


# -- notifications ---------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [
    ("https://example.org/hook", ("json", "https://example.org/hook")),
    ("http://example.org:8080/h?x=1", ("json", "http://example.org:8080/h?x=1")),
    ("text+https://ntfy.sh/topic", ("text", "https://ntfy.sh/topic")),
    ("https://hooks.slack.com/services/T/B/x", ("slack", "https://hooks.slack.com/services/T/B/x")),
    ("https://discord.com/api/webhooks/1/x", ("discord", "https://discord.com/api/webhooks/1/x")),
    ("json+https://hooks.slack.com/services/T", ("json", "https://hooks.slack.com/services/T")),
])
def test_targets(value, expected):
    assert gridx.parse_target(value) == expected


@pytest.mark.parametrize("value", ["-x", "ftp://example.org/", "file:///etc/passwd", "https://", "example.org",
                                   "https://user:pw@example.org/", "https://example.org/a b", "gopher+https://x/",
                                   "https://example.org:0/", "https://example.org:99999/"])
def test_a_bad_target_is_exit_2(value):
    with pytest.raises(gridx.GridxError) as error:
        gridx.parse_target(value)
    assert error.value.code == 2


def interfaces(*items):
    import ipaddress

    return [ipaddress.ip_interface(item) for item in items]


@pytest.mark.parametrize("address,refused", [
    ("93.184.216.34", None), ("2606:4700::1", None),
    ("127.0.0.1", "not a public address"), ("::1", "not a public address"), ("10.9.9.9", "not a public address"),
    ("192.168.1.1", "not a public address"), ("169.254.169.254", "not a public address"),
    ("100.64.0.1", "not a public address"), ("fe80::1", "not a public address"),
    ("::ffff:10.0.0.9", "network of the hub's"), ("::ffff:10.0.0.1", "the hub itself"),
    ("0.0.0.0", "not a public address"),
    ("203.0.113.7", "the hub itself"), ("10.0.0.5", "network of the hub's"), ("198.51.100.9", "network of the hub's"),
])
def test_a_members_target_never_reaches_the_hub_the_vpn_or_a_private_address(address, refused):
    local = interfaces("203.0.113.7/32", "10.0.0.1/24", "198.51.100.1/24")
    why = gridx.address_refusal(address, (), local)
    assert (why is None) if refused is None else (refused in why), why


def test_the_admin_allows_an_address_for_members():
    assert gridx.address_refusal("172.29.246.30", ["172.29.246.30/32"], interfaces("10.0.0.1/24")) is None
    assert gridx.address_refusal("172.29.246.31", ["172.29.246.30/32"], []) is not None


def test_a_members_private_target_is_refused_at_submit(serve_env, monkeypatch, capsys):
    monkeypatch.setattr(gridx, "hub_networks", lambda: interfaces("10.0.0.1/24"))
    for target in ("http://127.0.0.1:8080/x", "http://10.0.0.1/", "http://[::1]/", "http://172.29.246.30/hook"):
        assert serve(monkeypatch, f"jobs run python:3.11 true --notify {target}") == 2 and serve_env == []
        assert "is refused" in capsys.readouterr().err


def test_the_standard_webhooks_test_vector():
    assert gridx.webhook_signature("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek",
                                   1614265330, b'{"test": 2432232314}') \
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


class Receiver:
    """An HTTP receiver on loopback: answers each POST with the next status
    of `answers` (then 200), after `delay` s; keeps what it got."""

    def __init__(self, answers=(), delay=0.0):
        got, queue = [], list(answers)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(delay)
                got.append((dict(self.headers), body))
                self.send_response(queue.pop(0) if queue else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.got = got
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def verified(headers, body, key):
    secret = base64.b64decode(key[len("whsec_"):])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()
    return headers["webhook-signature"] == "v1," + expected


@pytest.fixture
def notify_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("GRIDX_NOTIFY_DIR", str(tmp_path / "notify"))
    monkeypatch.setenv("GRIDX_USERS_HOME", str(tmp_path / "users"))
    monkeypatch.setenv("GRIDX_RESULTS_DIR", str(tmp_path / "results"))
    return tmp_path


def ended(name="job-1", code=0):
    state = "complete" if code == 0 else "failed"
    return [gridx.Task(id=f"{name}-t", name=f"{name}.1", service=name, node="worker1", state=state,
                       desired="shutdown", error="" if code == 0 else f"task: non-zero exit ({code})")]


def test_one_event_per_end_signed_with_the_key_of_whoever_chose_the_target(notify_dirs):
    receiver = Receiver()
    service = job_service(labels={gridx.LABEL_NOTIFY: "json+" + receiver.url}, owner="root")
    notifier = gridx.Notifier(background=False)
    assert notifier.notice([service], ended(code=3), [node()]) == ["s1/ended"]
    notifier.drain()
    for again in (notifier, gridx.Notifier(background=False), gridx.Notifier(background=False)):  # restarts
        assert again.notice([service], ended(code=3), [node()]) == []
        again.drain()
    assert len(receiver.got) == 1
    headers, body = receiver.got[0]
    key = (notify_dirs / "cfg" / "notify" / "keys" / "hub.key").read_text().strip()
    assert verified(headers, body, key)
    event = json.loads(body)
    assert event["type"] == "job.ended" and event["data"]["state"] == "failed" and event["data"]["exit_code"] == 3
    assert event["data"]["where"] == [{"hostname": "worker1", "node_id": "n1"}] and event["data"]["owner"] == "root"
    assert stat.S_IMODE(os.stat(notify_dirs / "cfg" / "notify" / "keys" / "hub.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(notify_dirs / "cfg" / "notify" / "keys").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(notify_dirs / "notify" / "outbox.json").st_mode) == 0o600
    assert gridx.notify_status("s1") == {"job": "job-1", "delivered": 1, "pending": 0, "undelivered": []}


def test_a_members_own_target_is_signed_with_their_key_and_checked_again_when_sent(notify_dirs, monkeypatch):
    receiver = Receiver()
    service = job_service(labels={gridx.LABEL_NOTIFY: "json+" + receiver.url})  # alice's, on loopback
    notifier = gridx.Notifier(background=False)
    notifier.notice([service], ended(), [node()])
    notifier.drain()
    assert receiver.got == []  # loopback is private: refused, never tried again
    status = gridx.notify_status("s1")
    assert status["undelivered"][0]["error"].startswith("refused") and status["undelivered"][0]["tries"] == 1
    gridx.save_notify_settings({"default": None, "users": {}, "allow": ["127.0.0.1/32"]})
    service2 = job_service("job-2", "s2", labels={gridx.LABEL_NOTIFY: "json+" + receiver.url})
    notifier.notice([service2], ended("job-2"), [node()])
    notifier.drain()
    headers, body = receiver.got[0]
    assert verified(headers, body, (notify_dirs / "cfg" / "notify" / "keys" / "alice.key").read_text().strip())


def test_retries_with_backoff_then_delivered(notify_dirs, monkeypatch):
    receiver = Receiver(answers=[500, 503])
    monkeypatch.setattr(gridx, "NOTIFY_RETRY_S", (0.2, 0.2, 0.2))
    service = job_service(owner="root", labels={gridx.LABEL_NOTIFY: "text+" + receiver.url})
    notifier = gridx.Notifier()
    notifier.notice([service], ended(), [node()])
    deadline = time.monotonic() + 20
    while len(receiver.got) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    assert len(receiver.got) == 3 and len({h["webhook-id"] for h, _ in receiver.got}) == 1  # one event, 3 tries
    assert receiver.got[0][1].decode().startswith("Grid-X: job job-1 (root) complete")
    assert gridx.notify_status("s1")["delivered"] == 1


def test_given_up_after_the_last_try_and_said_in_jobs_status(notify_dirs, monkeypatch):
    receiver = Receiver(answers=[500] * 10)
    monkeypatch.setattr(gridx, "NOTIFY_RETRY_S", (0, 0))
    service = job_service(owner="root", labels={gridx.LABEL_NOTIFY: receiver.url})
    notifier = gridx.Notifier(background=False)
    notifier.notice([service], ended(), [node()])
    for _ in range(4):
        notifier.drain()
    assert len(receiver.got) == 3
    line = gridx.notify_summary(gridx.notify_status("s1"))
    assert "NOT delivered: job.ended to http://127.0.0.1:" in line and "HTTP 500, 3 tries" in line


def test_a_slow_receiver_never_holds_up_hub_watch(notify_dirs):
    receiver = Receiver(delay=1)
    services = [job_service(f"job-{i}", f"s{i}", owner="root", labels={gridx.LABEL_NOTIFY: receiver.url})
                for i in range(3)]
    tasks = [t for i in range(3) for t in ended(f"job-{i}")]
    notifier = gridx.Notifier()
    began = time.monotonic()
    assert len(notifier.notice(services, tasks, [node()])) == 3
    assert time.monotonic() - began < 1.5
    assert notifier.notice(services, tasks, [node()]) == []  # while the thread waits on the receiver
    assert time.monotonic() - began < 1
    deadline = time.monotonic() + 20
    while len(receiver.got) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(receiver.got) == 3


def test_defaults_apply_to_jobs_made_after_they_were_set_and_none_opts_out(notify_dirs):
    settings = {"default": {"url": "json+https://hub.example/h", "set_at": 100}, "users": {
        "alice": {"url": "text+https://ntfy.sh/alice", "set_at": 200}}, "allow": []}
    made = {gridx.LABEL_CREATED: "150"}
    assert gridx.job_target(job_service(labels=made), settings) == ("json+https://hub.example/h", "hub", False)
    made = {gridx.LABEL_CREATED: "250"}
    assert gridx.job_target(job_service(labels=made), settings) == ("text+https://ntfy.sh/alice", "alice", False)
    assert gridx.job_target(job_service(labels={gridx.LABEL_CREATED: "50"}), settings) is None
    assert gridx.job_target(job_service(labels={gridx.LABEL_NOTIFY: "none"}), settings) is None
    assert gridx.job_target(job_service(owner="root", labels={gridx.LABEL_NOTIFY: "json+https://x.example/"}),
                            settings) == ("json+https://x.example/", "hub", False)


def test_a_job_lost_its_worker_ran_again_and_ended_gives_three_events(notify_dirs):
    service = job_service(owner="root", labels={gridx.LABEL_NOTIFY: "https://x.example/"})
    lost = gridx.Task(id="t-old", service="job-1", node="worker1", state="running", desired="remove")
    again = gridx.Task(id="t-new", service="job-1", node="", state="pending", desired="complete")
    notifier = gridx.Notifier(background=False)
    assert notifier.notice([service], [lost, again], [node()]) == ["s1/waiting/t-old"]
    done = gridx.Task(id="t-new", service="job-1", node="worker2", state="complete", desired="complete")
    assert notifier.notice([service], [lost, done], [node()]) == ["s1/ended"]
    out = job_service(owner="root", labels={gridx.LABEL_NOTIFY: "https://x.example/", gridx.LABEL_OUTPUT: "/o"})
    os.makedirs(notify_dirs / "results")
    (notify_dirs / "results" / "s1.json").write_text(json.dumps({"tasks": {"t-new": {
        "state": "collected", "bytes": 2048, "files": 2}}, "bytes": 2048}))
    made = notifier.notice([out], [lost, done], [node()])
    assert made == ["s1/results"]
    assert notifier.outbox["events"]["s1/results"]["data"]["results"]["bytes"] == 2048


def test_a_preempted_task_is_a_wait_not_an_end_until_its_job_ran_again(notify_dirs):
    service = job_service(owner="root", labels={gridx.LABEL_NOTIFY: "https://x.example/"})
    stopped = gridx.Task(id="t-old", service="job-1", node="worker1", state="complete", desired="shutdown")
    gridx.save_owners({"nodes": {}, "preempted": {"t-old": {"node": "n1", "at": 1}}})
    notifier = gridx.Notifier(background=False)
    # its exit 0 after the checkpoint is no end: the job waits to run again
    assert notifier.notice([service], [stopped], [node()]) == ["s1/preempted/t-old"]
    event = notifier.outbox["events"]["s1/preempted/t-old"]
    assert event["type"] == "job.waiting" and event["data"]["state"] == "preempted"
    assert "volunteer on worker1 needed the machine" in event["data"]["reason"]
    gridx.save_owners({"nodes": {}, "preempted": {"t-old": {"node": "n1", "at": 1, "ran_again": True}}})
    again = gridx.Task(id="t-new", service="job-1", node="", state="pending", desired="complete")
    assert notifier.notice([service], [stopped, again], [node()]) == []
    done = gridx.Task(id="t-new", service="job-1", node="worker2", state="complete", desired="complete")
    assert notifier.notice([service], [stopped, done], [node()]) == ["s1/ended"]


def test_a_job_deleted_before_it_ended_says_so_once(notify_dirs):
    service = job_service(kind="jupyter", batch=False, owner="root", labels={gridx.LABEL_NOTIFY: "https://x.e/"})
    running = [gridx.Task(id="t1", service="job-1", node="worker1", state="running", desired="running")]
    notifier = gridx.Notifier(background=False)
    assert notifier.notice([service], running, [node()]) == []
    assert gridx.Notifier(background=False).notice([], [], [node()]) == ["s1/deleted"]
    assert gridx.Notifier(background=False).notice([], [], [node()]) == []


def test_set_defaults_and_set_user_keep_targets_private_and_never_print_keys(tmp_path, monkeypatch, capsys):
    fake_hub(tmp_path, monkeypatch)
    monkeypatch.setenv("GRIDX_NOTIFY_DIR", str(tmp_path / "notify"))
    assert run_main(["hub", "add-user", "u1"]) == 0
    assert run_main(["hub", "set-user", "u1", "--notify", "https://ntfy.sh/secret-topic"]) == 0
    assert run_main(["hub", "set-defaults", "--notify", "https://hub.example/h", "--notify-allow", "192.168.1.20"]) == 0
    out = capsys.readouterr()
    assert "secret-topic" not in out.out + out.err
    settings = tmp_path / "cfg" / "notify" / "settings.json"
    assert stat.S_IMODE(os.stat(settings).st_mode) == 0o600
    assert json.loads(settings.read_text())["users"]["u1"]["url"] == "json+https://ntfy.sh/secret-topic"
    assert json.loads((tmp_path / "users" / "notify.json").read_text()) == {"allow": ["192.168.1.20/32"]}
    key = tmp_path / "cfg" / "notify" / "keys" / "u1.key"
    assert key.read_text().startswith("whsec_") and stat.S_IMODE(os.stat(key).st_mode) == 0o600  # made at add-user
    assert run_main(["hub", "list-users", "--json"]) == 0
    assert "whsec_" not in capsys.readouterr().out
    assert run_main(["hub", "set-defaults", "--notify-allow", "10.0.0.0/33"]) == 2
    assert run_main(["hub", "remove-user", "u1"]) == 0 and not key.exists()


def test_jobs_status_says_what_was_not_delivered(tmp_path, monkeypatch, capsys):
    fake_hub(tmp_path, monkeypatch)
    monkeypatch.setenv("GRIDX_NOTIFY_DIR", str(tmp_path / "notify"))
    os.makedirs(tmp_path / "notify")
    (tmp_path / "notify" / "status.json").write_text(json.dumps({"s1": {"job": "job-1", "delivered": 0, "pending": 0,
                                                                        "undelivered": [{
                                                                            "type": "job.ended",
                                                                            "to": "https://x.example",
                                                                            "tries": 8, "error": "HTTP 500"}]}}))
    assert run_main(["jobs", "status", "job-1"]) == 0
    assert "Notify:   0 delivered; NOT delivered: job.ended to https://x.example (HTTP 500, 8 tries)" \
        in capsys.readouterr().out
    assert run_main(["jobs", "status", "job-1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notify"]["undelivered"][0]["tries"] == 8


def test_notify_reaches_the_job_as_a_label(tmp_path, monkeypatch):
    tools = fake_hub(tmp_path, monkeypatch)
    assert run_main(["jobs", "run", "python:3.11", "true", "--notify", "text+https://ntfy.sh/t"]) == 0
    create = next(argv for argv in tools.calls if argv[1:3] == ["service", "create"])
    assert f"--label={gridx.LABEL_NOTIFY}=text+https://ntfy.sh/t" in create
    tools.calls.clear()
    assert run_main(["jobs", "jupyter", "--timeout=5", "--notify", "https://x.example/"]) == 0
    create = next(argv for argv in tools.calls if argv[1:3] == ["service", "create"])
    assert f"--label={gridx.LABEL_NOTIFY}=json+https://x.example/" in create


def test_jupyter_service_fixture_publishes_a_port():
    assert JUPYTER_SERVICE["Spec"]["Labels"][gridx.LABEL_PORT] == "8888"
