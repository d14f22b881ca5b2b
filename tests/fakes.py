"""Fakes the unit tests share: the keys, one hub configuration, Docker's
output and every program gridx runs (FakeTools, fake_hub), and the ways to
run gridx (main in-process, or gridx.py as a process). Fixtures built on
them are in conftest.py; pytest advises against importing conftest, so
tests import from here."""

import atexit
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import gridx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIDX = os.path.join(ROOT, "gridx.py")
KEY_A = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
KEY_B = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
KEY_C = "kP3vHlO8VtG6zc5J2m2x0pW0cP2yU7ZkQ0m6n0bX0ls="
W1 = [("w1", "10.0.0.2")]  # one worker peer


def ssh_key(seed=1, kind="ssh-ed25519"):
    """A well-formed OpenSSH public key line (the blob names its type)."""
    raw = len(kind).to_bytes(4, "big") + kind.encode() + (32).to_bytes(4, "big") + bytes([seed]) * 32
    return f"{kind} {base64.b64encode(raw).decode()}"


def make_config(subnet="10.0.0.0/24", peers=(), users=()):
    """A hub's configuration: peers [(name, ip)] with KEY_B, users [(name,
    limits)] at .10, .11, … with their own keys."""
    config = gridx.HubConfig("gridx0", "203.0.113.7", 51820, subnet, gridx.hub_ip_of(subnet), KEY_A,
                             "10.96.0.0/12", "2026-01-01T00:00:00Z", {})
    for name, ip in peers:
        config.peers[name] = gridx.Peer(name, ip, KEY_B, True, "")
    for i, (name, limits) in enumerate(users):
        config.users[name] = gridx.User(name, f"10.0.0.{10 + i}", KEY_C if i == 0 else KEY_A[:-2] + "A=",
                                        ssh_key(i + 1), limits, "")
    return config


# `python3 gridx.py ARGS`, as users run it, compiles its 10,000 lines at
# every start (about 85 ms of CPU) where no bytecode is written
# (PYTHONDONTWRITEBYTECODE=1, set here and maybe in CI), and the unit tests
# start it about a hundred times. gridx_argv runs the same file the same way
# (as __main__, its folder first on sys.path, sys.argv[0] the file) from
# bytecode cached in PYCACHE, a folder of the test session (conftest.py sets
# it). Some tests still run `python3 gridx.py` itself: test_users' --help,
# test_daily's jobs --help, test_binary's --version, test_gridx's as other users.
PYCACHE = None
LAUNCH = """\
import os, sys
sys.pycache_prefix, sys.dont_write_bytecode = sys.argv[1], False
sys.argv[:] = sys.argv[2:]
sys.path[0] = os.path.dirname(os.path.realpath(sys.argv[0]))
__file__ = sys.argv[0]
del os, sys
exec(__import__("importlib.machinery", fromlist=["_"]).SourceFileLoader("__main__", __file__).get_code("__main__"),
     globals())
"""


def gridx_argv(*args, path=GRIDX):
    """The argv that runs gridx.py ARGS (from cached bytecode, see PYCACHE)."""
    if PYCACHE is None:
        return [sys.executable, path, *args]
    return [sys.executable, "-c", LAUNCH, PYCACHE, path, *args]


def cli(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(gridx_argv(*args), capture_output=True, text=True, env=full_env)


# -- fakes: Docker's output, and every program gridx runs --------------------------

NODE = {
    "ID": "n1", "UpdatedAt": "x",
    "Spec": {"Role": "worker", "Availability": "active"},
    "Description": {"Hostname": "worker3", "Resources": {"GenericResources": [
        {"DiscreteResourceSpec": {"Kind": "gridx_cpu", "Value": 4}},
        {"DiscreteResourceSpec": {"Kind": "gridx_mem", "Value": 4096}},
        {"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": "GPU-b"}},
        {"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": "GPU-a"}},
    ]}},
    "Status": {"State": "ready", "Addr": "10.0.0.4"},
}


# -- a fake Engine API: Docker's answers on a unix socket ---------------------------


class FakeEngine:
    """Docker's Engine API on a unix socket of its own: GET /_ping, and
    /vX.Y/services, /tasks, /nodes answered from the lists it holds with
    Docker's filters applied (a service's label or name prefix; a task's
    service by ID or name, or its service's label), every request recorded
    (requests: [(path, {filter: values})], connections: how many were
    opened). fail = (status, message) answers every other request so.
    Stopped by the autouse fixture in conftest.py (stop_fake_engines)."""

    started = []

    def __init__(self, services=(), tasks=(), nodes=(), version="1.41"):
        import tempfile

        self.services, self.tasks, self.nodes = list(services), list(tasks), list(nodes)
        self.version, self.fail = version, None
        self.chunked = False  # bodies in chunks, as Docker sends its bigger answers
        self.drop = 0  # this many of the next requests: the connection closes without an answer
        self.logs = {}  # service name or task ID: [(stream, bytes)], what GET …/logs answers
        self.requests, self.connections = [], 0
        self.folder = tempfile.mkdtemp(prefix="gx-engine-")  # short: a socket path has 108 bytes at most
        self.path = os.path.join(self.folder, "docker.sock")
        self.server = None

    @property
    def host(self):
        return "unix://" + self.path

    def start(self):
        import socketserver
        import threading

        engine = self

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

        self.server = Server(self.path, engine.handler())
        # shutdown() waits for serve_forever's next poll: 0.5 s by default, at
        # the end of each of the 700 tests that start an engine
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        FakeEngine.started.append(self)
        return self

    def stop(self):
        import shutil

        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def handler(self):
        import http.server

        engine = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # kept open, as Docker does

            def setup(self):
                super().setup()
                engine.connections += 1

            def do_GET(self):
                if engine.drop:
                    engine.drop -= 1
                    self.close_connection = True
                    return
                status, body = engine.answer(self.path)
                data = json.dumps(body).encode() if not isinstance(body, bytes) else body
                self.send_response(status)
                self.send_header("Api-Version", engine.version)
                self.send_header("Content-Type", "application/json")
                if not engine.chunked:
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for start in range(0, len(data), 1000):
                    piece = data[start:start + 1000]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *args):
                pass

        return Handler

    def answer(self, target):
        import urllib.parse

        path, _, query = target.partition("?")
        filters = json.loads(urllib.parse.parse_qs(query).get("filters", ["{}"])[0])
        self.requests.append((path, filters))
        if path == "/_ping":
            return 200, b"OK"
        if self.fail:
            return self.fail[0], {"message": self.fail[1]}
        match = re.match(r"/v(\d+)\.(\d+)/(\w+)(?:/([^/]+)/logs)?$", path)
        if not match:
            return 400, {"message": f"gridx asked for an unversioned path: {path}"}
        asked, what = (int(match.group(1)), int(match.group(2))), match.group(3)
        if asked > tuple(int(part) for part in self.version.split(".")):
            return 400, {"message": f"client version {asked} is too new. Maximum supported API version is "
                                    f"{self.version}"}
        if match.group(4):
            return self.answer_logs(what, match.group(4))
        if what == "services":
            return 200, [s for s in self.services if self.service_matches(s, filters)]
        if what == "tasks":
            return self.answer_tasks(filters)
        if what == "nodes":
            return 200, self.nodes
        return 404, {"message": f"page not found: {path}"}

    def answer_logs(self, what, name):
        known = [s["Spec"]["Name"] for s in self.services] if what == "services" else [t["ID"] for t in self.tasks]
        if name not in known and name not in self.logs:
            return 404, {"message": f"{what[:-1]} {name} not found"}
        return 200, b"".join(bytes([stream, 0, 0, 0]) + len(data).to_bytes(4, "big") + data
                             for stream, data in self.logs.get(name, []))

    def service_matches(self, service, filters):
        spec = service["Spec"]
        return (all(label_matches(spec.get("Labels") or {}, f) for f in filters.get("label", []))
                and (not filters.get("name") or any(spec["Name"].startswith(n) for n in filters["name"])))

    def answer_tasks(self, filters):
        ids = None
        if "service" in filters:
            ids = set()
            for wanted in filters["service"]:
                found = [s for s in self.services if wanted in (s["ID"], s["Spec"]["Name"])]
                if not found:
                    return 404, {"message": f"service {wanted} not found"}
                ids.add(found[0]["ID"])
        labels = {s["ID"]: s["Spec"].get("Labels") or {} for s in self.services}
        return 200, [t for t in self.tasks if (ids is None or t["ServiceID"] in ids)
                     and all(label_matches(labels.get(t["ServiceID"], {}), f) for f in filters.get("label", []))]

    def paths(self):
        """The requests' paths, without the version."""
        return [re.sub(r"^/v[0-9.]+", "", path) for path, _ in self.requests]


def label_matches(labels, wanted):
    key, equals, value = wanted.partition("=")
    return key in labels and (not equals or labels[key] == value)


def api_task(task_id, service_id, node_id="", state="complete", desired="complete", slot=1, error="",
             exit_code=None, container="", ago_s=1, gpus=()):
    """A task as the Engine API gives it (what `docker inspect TASK` prints)."""
    import time

    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - ago_s)) + ".123456789Z"
    status = {"State": state, "Timestamp": stamp, "Message": state}
    if error:
        status["Err"] = error
    if container or exit_code is not None:
        status["ContainerStatus"] = {"ContainerID": container or f"c-{task_id}", "ExitCode": exit_code or 0}
    task = {"ID": task_id, "ServiceID": service_id, "DesiredState": desired, "Status": status,
            "CreatedAt": stamp, "Version": {"Index": 1}}
    if node_id:
        task["NodeID"] = node_id
    if slot:
        task["Slot"] = slot
    if gpus:
        task["GenericResources"] = [{"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": g}} for g in gpus]
    return task


def api_node(node_id, hostname, state="ready", address="10.0.0.2", cpus=2, created="2026-01-01T00:00:00Z",
             manager=False, hub_ssh=True):
    """A node as the Engine API gives it (what `docker node inspect` prints)."""
    node = {"ID": node_id, "CreatedAt": created, "UpdatedAt": created,
            "Spec": {"Role": "manager" if manager else "worker", "Availability": "active"},
            "Description": {"Hostname": hostname, "Engine": {"Labels": {} if hub_ssh else {"gridx.hub-ssh": "no"}},
                            "Resources": {"GenericResources": [
                                {"DiscreteResourceSpec": {"Kind": "gridx_cpu", "Value": cpus}},
                                {"DiscreteResourceSpec": {"Kind": "gridx_mem", "Value": 4096}}] if cpus else []}},
            "Status": {"State": state, "Addr": address}}
    if manager:
        node["ManagerStatus"] = {"Leader": True, "Reachability": "reachable", "Addr": address + ":2377"}
    return node


def api_service(service_id, name, labels=None, replicas=1, cpus=1):
    """A job's service as the Engine API gives it (what `docker service inspect` prints)."""
    return {"ID": service_id, "Spec": {
        "Name": name, "Labels": dict({"gridx.job": name, "gridx.kind": "run"}, **(labels or {})),
        "Mode": {"ReplicatedJob": {"MaxConcurrent": replicas, "TotalCompletions": replicas}},
        "TaskTemplate": {"ContainerSpec": {"Image": "python:3.11"}, "Resources": {"Reservations": {
            "GenericResources": [{"DiscreteResourceSpec": {"Kind": "gridx_cpu", "Value": cpus}},
                                 {"DiscreteResourceSpec": {"Kind": "gridx_mem", "Value": 1024}}]}}}}}


def use_engine(monkeypatch, engine):
    """gridx reads this FakeEngine (started here) from now on."""
    if engine.server is None:
        engine.start()
    monkeypatch.setattr(gridx, "DOCKER_HOST", None)  # --manager of an earlier test: not this engine
    monkeypatch.setenv("DOCKER_HOST", engine.host)
    monkeypatch.setattr(gridx, "ENGINES", {})
    return engine


SSH_PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICmwf0hkKPWsAKHOZlONiuLivpLMmETcR1c6ZH+eRq0t test"


HUB_NODE = {"ID": "n0", "CreatedAt": "2026-01-01T00:00:00Z", "ManagerStatus": {"Leader": True},
            "Spec": {"Role": "manager", "Availability": "active"},
            "Description": {"Hostname": "hub", "Resources": {}}, "Status": {"State": "ready", "Addr": "10.0.0.1"}}


WORKER_NODE = dict(NODE, CreatedAt="2026-01-01T00:00:00Z", Status={"State": "ready", "Addr": "10.0.0.2"})


JOB_SERVICE = {"ID": "s1", "Spec": {
    "Name": "job-1", "Labels": {gridx.LABEL_JOB: "job-1", gridx.LABEL_KIND: "run"},
    "Mode": {"ReplicatedJob": {"TotalCompletions": 1}},
    "TaskTemplate": {"ContainerSpec": {"Image": "python:3.11"}, "Resources": {}}}}


# a job with --output (see Work folders and results)
JOB_OUT_SERVICE = {"ID": "s2", "Spec": dict(JOB_SERVICE["Spec"], Name="job-out", Labels=dict(
    JOB_SERVICE["Spec"]["Labels"], **{gridx.LABEL_JOB: "job-out", gridx.LABEL_OUTPUT: "/work/out"}))}


# a Jupyter job (jobs jupyter): a service publishing its port
JUPYTER_SERVICE = {"ID": "s3", "Spec": {
    "Name": "jupyter-1", "Labels": {gridx.LABEL_JOB: "jupyter-1", gridx.LABEL_KIND: "jupyter",
                                    gridx.LABEL_PORT: "8888", gridx.LABEL_TOKEN: "ab" * 16},
    "Mode": {"Replicated": {"Replicas": 1}},
    "TaskTemplate": {"ContainerSpec": {"Image": "jupyter:1"}, "Resources": {}}}}


JOB_TASK = {"ID": "t1", "Name": "job-1.1", "Node": "worker3", "DesiredState": "Complete",
            "CurrentState": "Complete 1 second ago", "Error": ""}


class HubEngine(FakeEngine):
    """The Engine API of the hub FakeTools plays: job-1 (its task t1
    complete on worker3, node n1) and job-out; a Jupyter job that FakeTools
    created has one running task."""

    def __init__(self):
        super().__init__(services=[JOB_SERVICE, JOB_OUT_SERVICE], nodes=[HUB_NODE, WORKER_NODE],
                         tasks=[api_task("t1", "s1", "n1", exit_code=0)])

    def answer_tasks(self, filters):
        jupyter = [name for name in filters.get("service", []) if name.startswith("jupyter-") or name == "s3"]
        if jupyter:
            return 200, [dict(api_task("tj", "sj", "n1", state="running", desired="running", exit_code=0),
                              ServiceID=jupyter[0])]
        return super().answer_tasks(filters)


REGISTRY_DIGEST = "sha256:" + "ab" * 32


REGISTRY_ANSWERS = {  # URL part -> curl --include's output
    "/manifests/": f"HTTP/1.1 200 OK\r\nDocker-Content-Digest: {REGISTRY_DIGEST}\r\n\r\n"
                   + json.dumps({"schemaVersion": 2, "config": {"digest": "sha256:c", "size": 10},
                                 "layers": [{"digest": "sha256:l", "size": 90}]}),
    "/tags/list": "HTTP/1.1 200 OK\r\n\r\n" + json.dumps({"name": "team/app", "tags": ["1"]}),
    "/_catalog": "HTTP/1.1 200 OK\r\n\r\n" + json.dumps({"repositories": ["team/app"]}),
    "/v2/": "HTTP/1.1 200 OK\r\n\r\n{}",
}


class FakeTools:
    """Stands in for every program gridx runs (subprocess.run, call and
    Popen): records each argv and answers as a hub with one worker would."""

    def __init__(self, declined=()):
        self.calls = []
        self.declined = list(declined)  # node IDs with gridx.hub-ssh=no
        self.token = "SWMTKN-1-old"
        self.kept = {}  # kept-results marker -> its labels

    def answer(self, argv):
        words = [w for w in argv if not w.startswith("--host=")]
        tool, rest = words[0], words[1:]
        out, code = "", 0
        if tool == "wg" and rest[:1] == ["genkey"]:
            out = KEY_A
        elif tool == "wg" and rest[:1] == ["pubkey"]:
            out = KEY_B
        elif tool == "wg" and rest[-1:] == ["dump"]:
            code = 1
        elif tool == "ip":
            out = "[]"
        elif tool == "ssh-keygen" and "-f" in rest:
            key = rest[rest.index("-f") + 1]
            with open(key, "w") as private, open(key + ".pub", "w") as public:
                private.write("private\n")
                public.write(SSH_PUBLIC_KEY + "\n")
        elif tool == "docker":
            out = self.answer_docker(rest)
        elif tool == "curl":  # the hub's registry API (see Registry): one image, team/app:1
            out = REGISTRY_ANSWERS[next(k for k in REGISTRY_ANSWERS if k in argv[-1])]
            if "--request" in rest and rest[rest.index("--request") + 1] == "DELETE":
                out = "HTTP/1.1 202 Accepted\r\n\r\n"
        return out, code

    def answer_docker(self, rest):
        """What the hub's docker prints: the swarm's part, else the jobs'."""
        joined = " ".join(rest)
        if rest[:1] == ["info"] and "{{.Swarm.NodeAddr}}" in rest:
            return "10.0.0.1"
        if rest[:1] == ["info"]:
            return json.dumps({"LocalNodeState": "active", "NodeAddr": "10.0.0.1", "ControlAvailable": True})
        if rest[:2] == ["swarm", "join-token"]:
            if "--rotate" in rest:
                self.token = "SWMTKN-1-new"
            return self.token
        if rest[:2] == ["node", "ls"] and "label=gridx.hub-ssh=no" in joined:
            return "\n".join(self.declined)
        if rest[:2] == ["node", "ls"]:
            return "n0\nn1"
        if rest[:2] == ["node", "inspect"] and "--format" in rest:
            return "10.0.0.2 ready"
        if rest[:2] == ["node", "inspect"]:
            return json.dumps([HUB_NODE, WORKER_NODE])
        return self.answer_docker_jobs(rest)

    @staticmethod
    def answer_docker_jobs(rest):
        if rest[:2] == ["service", "ls"]:
            return "job-1"
        if rest[:2] == ["service", "inspect"]:
            return json.dumps([JOB_OUT_SERVICE if rest[-1] == "job-out" else
                               JUPYTER_SERVICE if rest[-1].startswith("jupyter-") else JOB_SERVICE])
        if rest[:2] == ["service", "ps"] and "-q" in rest:
            return "t1"
        if rest[:2] == ["service", "ps"] and rest[-1].startswith("jupyter-"):
            return json.dumps(dict(JOB_TASK, Name=rest[-1] + ".1", DesiredState="Running",
                                   CurrentState="Running 1 second ago"))
        if rest[:2] == ["service", "ps"]:
            return json.dumps(JOB_TASK)
        if rest[:1] == ["inspect"]:
            return json.dumps([{"ID": "t1", "Status": {"ContainerStatus": {"ExitCode": 0}}}])
        if rest[:2] in (["service", "create"], ["config", "create"]):
            return "id1"
        return ""

    def run(self, argv, input=None, capture_output=False, text=False, timeout=None, env=None, **kw):
        self.calls.append(list(argv))
        words = [w for w in argv if not w.startswith("--host=")]
        if words[1:3] == ["config", "inspect"]:  # kept results' markers (see Work folders and results)
            name = words[-1]
            if name in self.kept:
                return subprocess.CompletedProcess(argv, 0, json.dumps(self.kept[name]) + "\n", "")
            return subprocess.CompletedProcess(argv, 1, "", f"Error: no such config: {name}\n")
        out, code = self.answer(argv)
        return subprocess.CompletedProcess(argv, code, out + "\n" if out else "", "")

    def call(self, argv, **kw):
        self.calls.append(list(argv))
        return 0

    def popen(self, argv, **kw):
        self.calls.append(list(argv))
        read_end, write_end = os.pipe()
        os.close(write_end)

        class Process:
            stdin = open(os.devnull, "wb")  # what gridx streams (docker cp -, ssh) goes nowhere
            stdout = os.fdopen(read_end, "rb")
            stderr = io.BytesIO()
            returncode = 0
            pid = 0

            def wait(self, timeout=None):
                return 0

            def poll(self):
                return 0

            def terminate(self):
                pass

            kill = terminate

        return Process()


def make_hub_files(config_dir):
    """fake_hub's configuration folder (GRIDX_CONFIG_DIR), written by gridx."""
    config = make_config(peers=[("w1", "10.0.0.2")])
    config.peers["w2"] = gridx.Peer("w2", "10.0.0.3", KEY_A, True, "")
    gridx.save_hub_config(config)
    (config_dir / "server.key").write_text(KEY_A + "\n")
    gridx.ensure_dir(str(config_dir / "ssh"))
    (config_dir / "ssh" / "id_ed25519").write_text("private\n")
    (config_dir / "ssh" / "id_ed25519.pub").write_text("ssh-ed25519 AAAAC3Nza gridx-hub\n")
    gridx.ensure_dir(str(config_dir / "clients"))
    for name in ("w1", "w2"):
        conf = gridx.render_worker_wg_conf(config, config.peers[name], KEY_A, "ssh-ed25519 AAAAC3Nza gridx-hub")
        (config_dir / "clients" / f"{name}.conf").write_text(conf)
    gridx.write_bundle(gridx.bundle_path("w2"), gridx.bundle_files(
        config, config.peers["w2"], (config_dir / "clients" / "w2.conf").read_text(), "SWMTKN-1-old",
        "ssh-ed25519 AAAAC3Nza gridx-hub", True))


# make_hub_files' folder, made once a process (a .tar.gz, fsyncs: about 20 ms
# of the 300-odd tests that start from fake_hub) and copied for each test.
HUB_TEMPLATE = []


def copy_tree(src, dst):
    """SRC's folders and files at DST, modes and hard links kept (a bundle's
    swarm-token is the hub's token file: gridx rewrites that in place)."""
    inodes = {}
    os.mkdir(dst)
    os.chmod(dst, os.stat(src).st_mode & 0o7777)
    for root, dirs, files in os.walk(src):
        there = os.path.join(dst, os.path.relpath(root, src))
        for name in dirs:
            os.mkdir(os.path.join(there, name))
            os.chmod(os.path.join(there, name), os.stat(os.path.join(root, name)).st_mode & 0o7777)
        for name in files:
            source, target = os.path.join(root, name), os.path.join(there, name)
            st = os.lstat(source)
            if st.st_nlink > 1 and st.st_ino in inodes:
                os.link(inodes[st.st_ino], target)
                continue
            shutil.copyfile(source, target, follow_symlinks=False)
            os.chmod(target, st.st_mode & 0o7777)
            inodes[st.st_ino] = target


def fake_hub(tmp_path, monkeypatch, declined=()):
    """A hub in tmp_path (peers w1 at 10.0.0.2 and w2 with a bundle on the
    hub), every program faked; returns the FakeTools."""
    config_dir = tmp_path / "cfg"
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(config_dir))
    monkeypatch.setenv("GRIDX_WG_DIR", str(tmp_path / "wg"))
    monkeypatch.setenv("GRIDX_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.delenv("GRIDX_MANAGER", raising=False)
    monkeypatch.chdir(tmp_path)
    if HUB_TEMPLATE:
        copy_tree(HUB_TEMPLATE[0], str(config_dir))
    else:
        make_hub_files(config_dir)
        HUB_TEMPLATE.append(tempfile.mkdtemp(prefix="gridx-fake-hub-"))
        atexit.register(shutil.rmtree, HUB_TEMPLATE[0], True)
        copy_tree(str(config_dir), os.path.join(HUB_TEMPLATE[0], "cfg"))
        HUB_TEMPLATE[0] = os.path.join(HUB_TEMPLATE[0], "cfg")
    (tmp_path / "train.py").write_text("print(1)\n")
    (tmp_path / "w.conf").write_text((config_dir / "clients" / "w1.conf").read_text())
    tools = FakeTools(declined)
    tools.engine = use_engine(monkeypatch, HubEngine())
    monkeypatch.setattr(subprocess, "run", tools.run)
    monkeypatch.setattr(subprocess, "call", tools.call)
    monkeypatch.setattr(subprocess, "Popen", tools.popen)
    monkeypatch.setattr(gridx, "require_root", lambda: None)
    monkeypatch.setattr(gridx, "need", lambda *tools: None)
    monkeypatch.setattr(gridx, "systemd_running", lambda: False)
    monkeypatch.setattr(gridx, "check_manager_reachable", lambda host: None)
    monkeypatch.setattr(gridx, "DOCKER_HOST", None)
    # the registry (see Registry): its CA where Docker reads it, its storage
    monkeypatch.setenv("GRIDX_DOCKER_CERTS_DIR", str(tmp_path / "certs.d"))
    monkeypatch.setenv("GRIDX_REGISTRY_STORAGE", str(tmp_path / "registry"))
    (tmp_path / "certs.d" / "10.0.0.1:5000").mkdir(parents=True)
    (tmp_path / "certs.d" / "10.0.0.1:5000" / "ca.crt").write_text("CA\n")
    # users (issue 14): their account's home and the hub's host key, here
    monkeypatch.setenv("GRIDX_USERS_HOME", str(tmp_path / "users"))
    (tmp_path / "host_key.pub").write_text(SSH_PUBLIC_KEY + "\n")
    monkeypatch.setattr(gridx, "HOST_KEY_PATH", str(tmp_path / "host_key.pub"), raising=False)

    class Answer:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **kw: Answer())
    return tools


def tree(path):
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(path.rglob("*"))}


def run_main(argv):
    try:
        return gridx.main(argv)
    except SystemExit as exited:  # argparse's own refusals
        return exited.code


def serve(monkeypatch, command):
    if command is None:
        monkeypatch.delenv("SSH_ORIGINAL_COMMAND", raising=False)
    else:
        monkeypatch.setenv("SSH_ORIGINAL_COMMAND", command)
    try:
        return gridx.main(["serve", "alice"])
    except SystemExit as exited:
        return exited.code
