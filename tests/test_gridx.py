"""Unit and black-box CLI tests of gridx.py (no root, no Docker needed)."""

import functools
import json
import os
import stat
import subprocess
import sys

import pytest

import gridx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIDX = os.path.join(ROOT, "gridx.py")
KEY_A = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
KEY_B = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="


def cli(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, GRIDX, *args], capture_output=True, text=True, env=full_env)


def make_config(subnet="10.0.0.0/24", peers=()):
    config = gridx.HubConfig("gridx0", "203.0.113.7", 51820, subnet, gridx.hub_ip_of(subnet), KEY_A,
                             "10.96.0.0/12", "2026-01-01T00:00:00Z", {})
    for name, ip in peers:
        config.peers[name] = gridx.Peer(name, ip, KEY_B, True, "")
    return config


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


JOB_TASK = {"ID": "t1", "Name": "job-1.1", "Node": "worker3", "DesiredState": "Complete",
            "CurrentState": "Complete 1 second ago", "Error": ""}


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
            return json.dumps([JOB_OUT_SERVICE if rest[-1] == "job-out" else JOB_SERVICE])
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
            stdout = os.fdopen(read_end, "rb")
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


def fake_hub(tmp_path, monkeypatch, declined=()):
    """A hub in tmp_path (peers w1 at 10.0.0.2 and w2 with a bundle on the
    hub), every program faked; returns the FakeTools."""
    config_dir = tmp_path / "cfg"
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(config_dir))
    monkeypatch.setenv("GRIDX_WG_DIR", str(tmp_path / "wg"))
    monkeypatch.setenv("GRIDX_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.delenv("GRIDX_MANAGER", raising=False)
    monkeypatch.chdir(tmp_path)
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
    (tmp_path / "train.py").write_text("print(1)\n")
    (tmp_path / "w.conf").write_text((config_dir / "clients" / "w1.conf").read_text())
    tools = FakeTools(declined)
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


# -- Running commands: run() and its errors ----------------------------------------

def test_run_missing_tool_is_exit_3():
    with pytest.raises(gridx.GridxError) as error:
        gridx.run(["gridx-no-such-tool"])
    assert error.value.code == 3


def test_run_failure_names_command_and_stderr():
    with pytest.raises(gridx.GridxError) as error:
        gridx.run(["sh", "-c", "echo boom >&2; exit 4"])
    assert "exit 4" in error.value.message and "boom" in error.value.message


def test_child_env_drops_frozen_library_path(monkeypatch):
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/tmp/_MEI123")
    monkeypatch.setenv("LD_LIBRARY_PATH_ORIG", "/opt/lib")
    monkeypatch.setenv("_PYI_ARCHIVE_FILE", "x")
    env = gridx.host_env()
    assert env["LD_LIBRARY_PATH"] == "/opt/lib" and "_PYI_ARCHIVE_FILE" not in env


def test_ssh_failure_of_docker_is_exit_3():
    result = subprocess.CompletedProcess([], 1, "", 'error during connect: Get "http://docker.example.com/v1.24/x":'
                                         " command [ssh -l root -- hub docker system dial-stdio] has exited with"
                                         " exit status 255, please make sure the URL is valid, and Docker 18.09"
                                         " or later is installed on the remote host: stderr=root@hub: Permission"
                                         " denied (publickey).")
    error = gridx.command_error(["docker", "-H", "ssh://root@hub", "service", "ls"], result)
    assert error.code == gridx.EXIT_PRECONDITION
    assert error.message == "cannot reach the manager over SSH: root@hub: Permission denied (publickey)."


# -- State on disk: validators -----------------------------------------------------

def check_validator(validate, value, expected):
    """A validator returns the value it accepts (normalised: expected) and
    refuses any other (expected None) with exit 2."""
    if expected is not None:
        assert validate(value) == expected
        return
    with pytest.raises(gridx.GridxError) as error:
        validate(value)
    assert error.value.code == 2


@pytest.mark.parametrize("name", ["a", "worker1", "laptop-anna", "x" * 63, "0day"])
def test_valid_names(name):
    check_validator(gridx.valid_name, name, name)


@pytest.mark.parametrize("name", ["../x", "a b", "A", "x" * 64, "", "-a", "a-", "a/b", "a.b", "é"])
def test_invalid_names(name):
    check_validator(gridx.valid_name, name, None)


@pytest.mark.parametrize("value,ok", [("51820", True), ("1", True), ("65535", True), ("0", False),
                                      ("65536", False), ("abc", False), ("-1", False), ("1.5", False)])
def test_port(value, ok):
    check_validator(gridx.valid_port, value, int(value) if ok else None)


@pytest.mark.parametrize("value,ok", [("10.0.0.0/24", True), ("192.168.5.0/28", True), ("10.0.0.1/24", False),
                                      ("10.0.0.0/31", False), ("fd00::/64", False), ("nonsense", False),
                                      ("10.0.0.0/33", False)])
def test_subnet(value, ok):
    check_validator(gridx.valid_subnet, value, value if ok else None)


@pytest.mark.parametrize("value,ok", [("203.0.113.7", True), ("2001:db8::1", True), ("0.0.0.0", False),
                                      ("127.0.0.1", False), ("1.2.3", False), ("hub.example", False)])
def test_public_ip(value, ok):
    check_validator(gridx.valid_public_ip, value, value if ok else None)


@pytest.mark.parametrize("value,ok", [(KEY_A, True), ("short", False), (KEY_A[:-2] + "!=", False),
                                      ("A" * 44, False), ("", False)])
def test_wg_key(value, ok):
    check_validator(gridx.valid_wg_key, value, value if ok else None)


@pytest.mark.parametrize("name,ok", [("gridx0", True), ("wg-0", True), ("a" * 15, True), ("a" * 16, False),
                                     ("a b", False), ("..", False), ("", False)])
def test_interface(name, ok):
    check_validator(gridx.valid_interface, name, name if ok else None)


@pytest.mark.parametrize("image,ok", [
    ("python:3.11", True), ("pytorch/pytorch:latest", True), ("quay.io/jupyter/base-notebook:latest", True),
    ("localhost:5000/team/app:1.0", True), ("10.0.0.1:5000/a", True), ("a__b/c-d.e", True), ("a__b.c/d", False),
    ("a@sha256:" + "0" * 64, True), ("Reg.Example/x:Tag_1", True),
    ("UPPER/Case:tag", False), ("Python", False), ("UPPER/lower", False), ("-x", False), ("a:", False),
    ("a@sha256:123", False), ("a b", False), ("a.-b", False), ("a___b", False), ("a:" + "t" * 129, False),
    ("", False), ("a/", False), ("/a", False), ("--mount=type=bind,src=/,dst=/host", False),
])
def test_image_reference_grammar(image, ok):
    check_validator(gridx.valid_image, image, image if ok else None)


@pytest.mark.parametrize("value,expected", [
    ("root@10.0.0.1", "ssh://root@10.0.0.1"), ("ssh://gridx@hub.example:2222", "ssh://gridx@hub.example:2222"),
    ("hub", "ssh://hub"), ("-oProxyCommand=x", None), ("root@-x", None), ("-l@hub", None),
    ("root@10.0.0.300", None), ("root@hub:0", None), ("root@hub/path", None), ("root@hub:22 x", None),
    ("tcp://10.0.0.1:2375", None), ("root@.hub", None),
])
def test_manager_validation(value, expected):
    check_validator(gridx.valid_manager, value, expected)


# -- State on disk: files, the hub configuration, IP allocation --------------------

def test_atomic_write_mode_and_content(tmp_path):
    path = tmp_path / "f"
    gridx.atomic_write(str(path), "one", 0o600)
    gridx.atomic_write(str(path), "two", 0o600)
    assert path.read_text() == "two" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_write_if_changed(tmp_path):
    path = tmp_path / "unit"
    assert gridx.write_if_changed(str(path), "a\n", 0o644) is True
    assert path.read_text() == "a\n" and stat.S_IMODE(path.stat().st_mode) == 0o644
    before = path.stat().st_ino
    assert gridx.write_if_changed(str(path), "a\n", 0o644) is False
    assert path.stat().st_ino == before  # not written again
    assert gridx.write_if_changed(str(path), "b\n", 0o600) is True and path.read_text() == "b\n"


def test_config_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(tmp_path / "gridx"))
    config = make_config(peers=[("w1", "10.0.0.2")])
    gridx.save_hub_config(config)
    path = tmp_path / "gridx" / "hub_config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "gridx").stat().st_mode) == 0o700
    loaded = gridx.load_hub_config()
    assert loaded.to_dict() == config.to_dict()


def test_damaged_config_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(tmp_path))
    (tmp_path / "hub_config.json").write_text('{"interface": "gridx0"}')
    with pytest.raises(gridx.GridxError) as error:
        gridx.load_hub_config()
    assert "damaged" in error.value.message


def damaged_documents():
    """hub_config.json texts that are not a hub's: every field given a wrong
    type or a value its validator refuses."""
    good = make_config(peers=[("w1", "10.0.0.2")]).to_dict()
    yield from ("[]", "null", "1", '"text"', "{not json", "[" * 100000, "{}")
    wrong_types = (None, 1, True, 1.5, "x", [], {})
    refused = {
        "interface": ["-x", "a b"], "public_ip": ["-x", "0.0.0.0"], "port": [0, 70000, "51820"],
        "subnet": ["-x", "10.0.0.1/24"], "hub_ip": ["-x", "10.9.9.9"], "public_key": ["-x"],
        "address_pool": ["-x"], "peers": [[], "x"],
        "peers.w1.name": ["w2", "-x"], "peers.w1.ip": ["-x", "10.0.0.1", "10.9.9.9"],
        "peers.w1.public_key": ["-x"], "peers.w1.key_on_hub": ["yes", 1], "peers.w1.added": [1],
    }
    for field, bad_values in refused.items():
        kind = type(good[field] if "." not in field else good["peers"]["w1"][field[9:]])
        for wrong in list(bad_values) + [w for w in wrong_types if type(w) is not kind]:
            document = json.loads(json.dumps(good))
            where, key = (document["peers"]["w1"], field[9:]) if "." in field else (document, field)
            where[key] = wrong
            yield json.dumps(document)
    for wrong in (None, 1, "x", [], ["w1"]):
        document = json.loads(json.dumps(good))
        document["peers"]["w1"] = wrong
        yield json.dumps(document)
    for field in ("interface", "public_ip", "port", "subnet", "hub_ip", "public_key"):
        document = json.loads(json.dumps(good))
        del document[field]
        yield json.dumps(document)


@pytest.mark.parametrize("text", list(damaged_documents()))
def test_damaged_hub_config_is_one_clear_error(text, tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(tmp_path))
    (tmp_path / "hub_config.json").write_text(text)
    with pytest.raises(gridx.GridxError) as error:
        gridx.load_hub_config()
    assert error.value.code == 1 and ("damaged" in error.value.message or "JSON" in error.value.message)


def test_allocate_lowest_free():
    config = make_config(peers=[("a", "10.0.0.2"), ("b", "10.0.0.4")])
    assert gridx.allocate_ip(config) == "10.0.0.3"


def test_allocate_requested_checks():
    config = make_config(peers=[("a", "10.0.0.2")])
    assert gridx.allocate_ip(config, "10.0.0.9") == "10.0.0.9"
    for bad in ("10.0.0.1", "10.0.0.2", "10.0.1.5", "10.0.0.0", "10.0.0.255", "x"):
        with pytest.raises(gridx.GridxError) as error:
            gridx.allocate_ip(config, bad)
        assert error.value.code == 2, bad


def test_allocate_full_subnet():
    config = make_config("10.9.0.0/30", peers=[("a", "10.9.0.2")])
    with pytest.raises(gridx.GridxError) as error:
        gridx.allocate_ip(config)
    assert error.value.code == 2 and "full" in error.value.message


# -- WireGuard ---------------------------------------------------------------------

def test_hub_conf_lists_every_peer():
    config = make_config(peers=[("w2", "10.0.0.10"), ("w1", "10.0.0.2")])
    text = gridx.render_hub_wg_conf(config, KEY_A)
    assert "ListenPort = 51820" in text and "Address = 10.0.0.1/24" in text
    assert text.index("AllowedIPs = 10.0.0.2/32") < text.index("AllowedIPs = 10.0.0.10/32")
    assert gridx.CONFIG_MARKER in text


# -- Swarm -------------------------------------------------------------------------

def test_address_pool_never_overlaps_vpn():
    assert gridx.choose_address_pool("10.0.0.0/24") == "10.96.0.0/12"
    assert gridx.choose_address_pool("10.100.0.0/16") == "10.208.0.0/12"
    assert gridx.choose_address_pool("10.0.0.0/8") == "172.80.0.0/12"
    assert gridx.choose_address_pool("10.0.0.0/24", ["10.97.3.4/24"]) == "10.208.0.0/12"


def test_node_from_docker():
    node = gridx.Node.from_docker(NODE)
    assert node.shared_dict() == {"cpus": 4, "memory_mib": 4096, "gpus": ["GPU-a", "GPU-b"]}
    assert node.shared == gridx.Resources(4, 4096, 2) and node.gpu_ids == ["GPU-a", "GPU-b"]
    assert node.address == "10.0.0.4" and node.state == "ready" and not node.manager


def test_swarm_nodes_hide_identities_replaced_by_a_rejoin(monkeypatch):
    def node(node_id, address, state, created):
        return {"ID": node_id, "CreatedAt": created, "Status": {"State": state, "Addr": address}}

    nodes = [
        node("old-ready", "10.0.0.5", "ready", "2026-01-01T10:00:00.5Z"),  # left, heartbeats not yet timed out
        node("new", "10.0.0.5", "ready", "2026-01-01T10:00:09.25Z"),
        node("older-down", "10.0.0.5", "down", "2026-01-01T09:00:00Z"),
        node("down-a", "10.0.0.6", "down", "2026-01-01T10:00:01.9Z"),
        node("down-b", "10.0.0.6", "down", "2026-01-01T10:00:01.95Z"),
        node("alone", "10.0.0.7", "down", "2026-01-01T08:00:00Z"),
    ]
    monkeypatch.setattr(gridx, "all_swarm_nodes", lambda: [gridx.Node.from_docker(n) for n in nodes])
    assert sorted(n.id for n in gridx.swarm_nodes()) == ["alone", "down-b", "new"]


@pytest.mark.parametrize("version,refused", [
    ("20.10.24+dfsg1", False), ("23.0.1", False), ("23.0.2", True), ("23.0.18", True), ("24.0.0", True),
    ("24.0.9", True), ("25.0.0", True), ("25.0.2", True), ("25.0.3", False), ("26.1.5+dfsg1", False),
    ("27.5.1", False), ("28.5.2+dfsg4", False), ("29.0.0", False), ("", False), ("dev", False)])
def test_engines_that_mis_schedule_generic_resources_are_refused(version, refused):
    assert gridx.engine_refused(version) is refused


# -- Firewall ----------------------------------------------------------------------

def test_firewall_rules_only_open_wireguard_publicly():
    rules = gridx.firewall_rules(make_config())
    assert "-A GRIDX-INPUT -i gridx0 -j RETURN" in rules
    for proto, port in gridx.SWARM_PORTS:
        assert f"-p {proto} --dport {port} -j DROP" in rules
    assert "-p udp --dport 51820 -j ACCEPT" in rules


def test_postup_quotes_the_config_folder(tmp_path, monkeypatch):
    """wg-quick runs PostUp through bash: a folder with spaces stays one word."""
    folder = tmp_path / "my gridx"
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(folder))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("iptables-restore", "iptables"):
        (bin_dir / tool).write_text(f'#!/bin/sh\nfor a in "$@"; do echo "{tool}:$a"; done >> {tmp_path}/args\n')
        (bin_dir / tool).chmod(0o755)
    postup = gridx.firewall_postup(make_config())
    subprocess.run(["bash", "-c", postup], env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"), check=True)
    assert f"iptables-restore:{folder}/firewall.rules" in (tmp_path / "args").read_text().splitlines()
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(tmp_path / "a#b"))
    with pytest.raises(gridx.GridxError):
        gridx.firewall_postup(make_config())


# -- SSH ---------------------------------------------------------------------------

def test_ssh_stops_reading_options_at_the_host():
    argv = gridx.ssh_argv("10.0.0.2", ["-oProxyCommand=x"])
    assert argv[-3:] == ["--", "root@10.0.0.2", "-oProxyCommand=x"]


# -- Bundles -----------------------------------------------------------------------

def test_settings_are_shell_quoted(tmp_path):
    text = gridx.render_settings({"A": "it's", "B": "$(reboot)"})
    script = tmp_path / "s.sh"
    script.write_text(text + 'printf "%s|%s" "$A" "$B"\n')
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True).stdout
    assert out == "it's|$(reboot)"


def test_bundle_files_and_modes(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(tmp_path))
    config = make_config()
    peer = gridx.Peer("w1", "10.0.0.2", KEY_B, True, "")
    conf = gridx.render_worker_wg_conf(config, peer, KEY_A)
    folder = gridx.bundle_path("w1")
    gridx.write_bundle(folder, gridx.bundle_files(config, peer, conf, "SWMTKN-1-x", "ssh-ed25519 AAAA", True))
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    for name in ("gridx0.conf", "swarm-token", "settings.env"):
        assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == 0o600
    assert os.access(os.path.join(folder, "join.sh"), os.X_OK)
    assert os.path.exists(folder + ".tar.gz")
    import tarfile

    with tarfile.open(folder + ".tar.gz") as tar:
        names = tar.getnames()
        assert "gridx-w1-bundle/swarm-token" in names
        assert tar.getmember("gridx-w1-bundle/swarm-token").mode & 0o077 == 0


def test_worker_bundle_is_the_hubs_bundle_but_its_readme():
    """One definition of a bundle: what `gridx worker join` runs join.sh in
    is what the hub writes for the peer, less the README."""
    import shutil

    config = make_config(peers=[("laptop", "10.0.0.2")])
    peer = config.peers["laptop"]
    conf = gridx.render_worker_wg_conf(config, peer, KEY_B, "ssh-ed25519 AAAA")
    hub = gridx.bundle_files(config, peer, conf, "SWMTKN-1-x", "ssh-ed25519 AAAA", True)
    settings, ssh_key = gridx.parse_worker_conf(conf)
    folder = gridx.materialise_bundle(settings, conf, "SWMTKN-1-x", ssh_key)
    try:
        written = {}
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                written[name] = (handle.read(), stat.S_IMODE(os.stat(path).st_mode))
    finally:
        shutil.rmtree(folder)
    expected = {name: (content if isinstance(content, bytes) else content.encode(), mode)
                for name, (content, mode) in hub.items() if name != "README.txt"}
    assert written == expected


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

def task(state, desired="shutdown", error="", service="job1", node="worker1", task_id=None):
    return gridx.Task(id=task_id or f"{service}-{state}-{node}", name=f"{service}.1", node=node, state=state,
                      desired=desired, error=error, service=service)


def test_exit_code_parsing():
    assert gridx.exit_code_from("failed", "task: non-zero exit (3)") == 3
    assert gridx.exit_code_from("complete", "") == 0
    assert gridx.exit_code_from("running", "") is None


def test_task_from_a_service_ps_row():
    row = {"ID": "t9", "Name": "job-2.3", "Node": "w1", "DesiredState": "Shutdown",
           "CurrentState": "Failed 3 minutes ago", "Error": '"task: non-zero exit (7)"'}
    t = gridx.Task.from_docker(row)
    assert (t.id, t.name, t.service, t.node, t.state, t.since, t.desired) == (
        "t9", "job-2.3", "job-2", "w1", "failed", "3 minutes ago", "shutdown")
    assert t.error == "task: non-zero exit (7)" and t.exit_code == 7 and not t.active and not t.placed
    assert t.to_dict() == {"id": "t9", "name": "job-2.3", "node": "w1", "state": "failed", "since": "3 minutes ago",
                           "error": "task: non-zero exit (7)", "exit_code": 7}
    pending = gridx.Task.from_docker({"Name": "job-2.1", "CurrentState": "Pending 1 second ago"})
    assert pending.active and not pending.placed and pending.exit_code is None
    assert gridx.Task(state="running").placed


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
    nodes = {"gpu-box": gridx.Node.from_docker(NODE)}
    reason = gridx.pending_reason({"tasks": []}, service, nodes, {"gpu-box": gridx.Resources(1, 1024, 1)})
    assert reason == "waiting: 2 GPUs requested, 1 free on gpu-box"


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
    assert gridx.reserved_by_node([service], tasks) == {"worker1": gridx.Resources(4, 1024, 0)}


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


# -- Commands: hub -----------------------------------------------------------------

def test_docker_starts_after_the_vpn_at_boot(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gridx, "DOCKER_DROPIN", str(tmp_path / "docker.service.d" / "gridx-vpn.conf"))
    monkeypatch.setattr(gridx, "run", lambda argv, **kw: calls.append(argv))
    assert gridx.install_docker_ordering("gridx0") is True
    text = (tmp_path / "docker.service.d" / "gridx-vpn.conf").read_text()
    assert "After=wg-quick@gridx0.service" in text and "Wants=wg-quick@gridx0.service" in text
    assert calls == [["systemctl", "daemon-reload"]]
    assert gridx.install_docker_ordering("gridx0") is False  # unchanged: nothing to do
    assert len(calls) == 1


def test_hub_init_twice_changes_nothing_the_second_time(tmp_path, monkeypatch, capsys):
    """init_hub's ensure_* steps: on a hub that is as wanted, each one finds
    nothing to do."""
    fake_hub(tmp_path, monkeypatch)
    assert gridx.main(["hub", "init", "--ip=203.0.113.7"]) == 0
    first = capsys.readouterr().err
    assert "wrote " in first and "firewall: swarm ports" in first
    assert gridx.main(["hub", "init", "--ip=203.0.113.7"]) == 0
    assert "the hub is already initialised: nothing changed" in capsys.readouterr().err


def test_hub_init_refuses_a_broken_engine_before_changing_anything(monkeypatch, tmp_path):
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(tmp_path / "gridx"))
    calls = []

    def fake_run(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "24.0.7\n", "")

    monkeypatch.setattr(gridx, "run", fake_run)
    monkeypatch.setattr(gridx, "require_root", lambda: None)
    monkeypatch.setattr(gridx, "need", lambda *tools: None)
    with pytest.raises(gridx.GridxError) as error:
        gridx.cmd_hub_init(gridx.build_parser(["hub", "init"])[0].parse_args(["hub", "init", "--ip", "203.0.113.7"]))
    assert error.value.code == 3 and "24.0.7" in error.value.message
    assert calls == [["docker", "version", "--format", "{{.Server.Version}}"]]
    assert not (tmp_path / "gridx").exists()


def test_hub_ssh_to_a_worker_that_declined_is_exit_3_without_trying(tmp_path, monkeypatch, capsys):
    tools = fake_hub(tmp_path, monkeypatch, declined=["n1"])
    assert gridx.main(["hub", "ssh", "w1", "--", "true"]) == 3
    assert "declined the hub's SSH" in capsys.readouterr().err
    assert not [argv for argv in tools.calls if argv[0] == "ssh"]
    docker_calls = [argv for argv in tools.calls if argv[0] == "docker"]
    assert docker_calls[0][:4] == ["docker", "node", "ls", "-q"] and len(docker_calls) == 2


def test_hub_ssh_when_nobody_declined_is_one_docker_call(tmp_path, monkeypatch):
    tools = fake_hub(tmp_path, monkeypatch)
    assert gridx.main(["hub", "ssh", "w1", "--", "true"]) == 0
    assert [argv[0] for argv in tools.calls] == ["docker", "ssh"]


def test_list_peers_shows_who_declined_hub_ssh(tmp_path, monkeypatch, capsys):
    fake_hub(tmp_path, monkeypatch)
    declined = json.loads(json.dumps(WORKER_NODE))
    declined["Description"]["Engine"] = {"Labels": {gridx.LABEL_HUB_SSH: "no"}}
    monkeypatch.setattr(gridx, "all_swarm_nodes", lambda: [gridx.Node.from_docker(n) for n in (HUB_NODE, declined)])
    assert gridx.main(["hub", "list-peers", "--json"]) == 0
    peers = {p["name"]: p for p in json.loads(capsys.readouterr().out)["peers"]}
    assert peers["w1"]["hub_ssh"] is False and peers["w2"]["hub_ssh"] is None
    monkeypatch.setattr(gridx, "all_swarm_nodes", lambda: [gridx.Node.from_docker(n) for n in (HUB_NODE, WORKER_NODE)])
    assert gridx.main(["hub", "list-peers"]) == 0
    table = capsys.readouterr().out
    assert "HUB SSH" in table.splitlines()[0] and table.splitlines()[1].endswith("yes")


def bundle_token(folder):
    import tarfile

    with open(os.path.join(folder, "swarm-token")) as handle:
        in_folder = handle.read().strip()
    with tarfile.open(folder + ".tar.gz") as tar:
        member = tar.extractfile(f"{os.path.basename(folder)}/swarm-token")
        in_archive = member.read().decode().strip()
    return in_folder, in_archive


def test_remove_peer_gives_the_unused_bundles_the_new_token(tmp_path, monkeypatch, capsys):
    fake_hub(tmp_path, monkeypatch)
    w2 = gridx.bundle_path("w2")
    assert bundle_token(w2) == ("SWMTKN-1-old", "SWMTKN-1-old")
    assert gridx.main(["hub", "remove-peer", "w1"]) == 0
    assert bundle_token(w2) == ("SWMTKN-1-new", "SWMTKN-1-new")
    assert stat.S_IMODE(os.stat(w2).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(w2, "gridx0.conf")).st_mode) == 0o600
    assert sorted(os.listdir(gridx.bundles_dir())) == ["gridx-w2-bundle", "gridx-w2-bundle.tar.gz"]
    assert "refresh-bundle" in capsys.readouterr().err


def test_refresh_bundle_rewrites_one_bundle_with_the_current_token(tmp_path, monkeypatch, capsys):
    tools = fake_hub(tmp_path, monkeypatch)
    tools.token = "SWMTKN-1-now"
    assert gridx.main(["hub", "refresh-bundle", "w1", "--out", "given"]) == 0
    assert bundle_token(gridx.bundle_path("w1")) == ("SWMTKN-1-now", "SWMTKN-1-now")
    assert bundle_token(str(tmp_path / "given" / "gridx-w1-bundle")) == ("SWMTKN-1-now", "SWMTKN-1-now")
    assert gridx.main(["hub", "refresh-bundle", "nobody"]) == 2


def test_remove_peer_forgets_the_peers_host_key(tmp_path, monkeypatch):
    import base64
    import hashlib
    import hmac

    fake_hub(tmp_path, monkeypatch)
    salt = b"0123456789abcdefghij"
    hashed = "|1|{}|{}".format(base64.b64encode(salt).decode(), base64.b64encode(
        hmac.new(salt, b"10.0.0.2", hashlib.sha1).digest()).decode())
    lines = ["10.0.0.2 ssh-ed25519 AAAAold\n", f"{hashed} ecdsa-sha2-nistp256 AAAAold\n",
             "10.0.0.3 ssh-ed25519 AAAAkept\n", "10.0.0.20 ssh-ed25519 AAAAkept\n"]
    path = gridx.known_hosts_path()
    with open(path, "w") as handle:
        handle.writelines(lines)
    os.chmod(path, 0o644)
    assert gridx.main(["hub", "remove-peer", "w1"]) == 0
    with open(path) as handle:
        assert handle.readlines() == lines[2:]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert gridx.forget_host_key("10.0.0.9") is False


@pytest.mark.parametrize("make", ["out-is-symlink", "bundle-is-symlink", "archive-is-symlink", "out-is-file",
                                  "parent-is-file"])
def test_add_peer_out_refuses_symlinks_before_anything_is_saved(make, tmp_path, monkeypatch):
    tools = fake_hub(tmp_path, monkeypatch)
    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "out"
    if make == "out-is-symlink":
        out.symlink_to(victim)
    elif make == "out-is-file":
        out.write_text("x")
    elif make == "parent-is-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "sub"
    else:
        out.mkdir()
        name = "gridx-new1-bundle" + (".tar.gz" if make == "archive-is-symlink" else "")
        (out / name).symlink_to(victim / name)
    before = tree(tmp_path)
    assert gridx.main(["hub", "add-peer", "new1", "--out", str(out)]) == 2
    assert tools.calls == [] and tree(tmp_path) == before
    assert "new1" not in gridx.load_hub_config().peers


def test_add_peer_out_makes_the_folder_and_leaves_an_existing_ones_mode(tmp_path, monkeypatch):
    fake_hub(tmp_path, monkeypatch)
    assert gridx.main(["hub", "add-peer", "new1", "--out", "made/here"]) == 0
    copied = tmp_path / "made" / "here" / "gridx-new1-bundle"
    assert (copied / "swarm-token").read_text() == "SWMTKN-1-old\n"
    assert stat.S_IMODE(copied.stat().st_mode) == 0o700 and (copied.parent / "gridx-new1-bundle.tar.gz").is_file()
    own = tmp_path / "own"
    own.mkdir(mode=0o755)
    os.chmod(own, 0o755)
    assert gridx.main(["hub", "add-peer", "new2", "--out", str(own)]) == 0
    assert stat.S_IMODE(own.stat().st_mode) == 0o755
    assert sorted(os.listdir(own)) == ["gridx-new2-bundle", "gridx-new2-bundle.tar.gz"]


# -- Commands: worker --------------------------------------------------------------

def test_worker_conf_and_parse_round_trip():
    config = make_config()
    peer = gridx.Peer("w1", "10.0.0.2", KEY_B, True, "")
    text = gridx.render_worker_wg_conf(config, peer, KEY_A, "ssh-ed25519 AAAA gridx-hub")
    assert "PersistentKeepalive = 25" in text and "Endpoint = 203.0.113.7:51820" in text
    settings, ssh_key = gridx.parse_worker_conf(text)
    assert settings["GRIDX_NAME"] == "w1" and settings["GRIDX_VPN_IP"] == "10.0.0.2"
    assert settings["GRIDX_HUB_VPN_IP"] == "10.0.0.1" and settings["GRIDX_MANAGER"] == "10.0.0.1:2377"
    assert settings["GRIDX_NEEDS_PRIVATE_KEY"] == "0" and ssh_key == "ssh-ed25519 AAAA gridx-hub"
    without_key = gridx.render_worker_wg_conf(config, peer, None)
    assert gridx.parse_worker_conf(without_key)[0]["GRIDX_NEEDS_PRIVATE_KEY"] == "1"


def test_worker_conf_hub_address_as_join_sh_finds_it():
    """Same rule as join.sh check_bundle: the manager's host, else the
    subnet's first host."""
    config = make_config()
    peer = gridx.Peer("w1", "10.0.0.2", KEY_B, True, "")
    text = gridx.render_worker_wg_conf(config, peer, KEY_A)
    moved = text.replace("# gridx-manager = 10.0.0.1:2377", "# gridx-manager = 10.0.0.9:2377")
    assert gridx.parse_worker_conf(moved)[0]["GRIDX_HUB_VPN_IP"] == "10.0.0.9"
    bare = text.replace("# gridx-manager = 10.0.0.1:2377\n", "")
    settings = gridx.parse_worker_conf(bare)[0]
    assert settings["GRIDX_HUB_VPN_IP"] == "10.0.0.1" and settings["GRIDX_MANAGER"] == "10.0.0.1:2377"


@pytest.mark.parametrize("old,new", [
    ("# gridx-manager = 10.0.0.1:2377", "# gridx-manager = -x:2377"),
    ("# gridx-manager = 10.0.0.1:2377", "# gridx-manager = 10.0.0.1"),
    ("# gridx-name = w1", "# gridx-name = -x"),
    ("Endpoint = 203.0.113.7:51820", "Endpoint = -x"),
    ("# gridx-name = w1", "# gridx-name = w1\n# gridx-hub-ssh-key = command=\"sh\" ssh-ed25519 AAAA"),
])
def test_worker_conf_values_are_checked(old, new):
    text = gridx.render_worker_wg_conf(make_config(), gridx.Peer("w1", "10.0.0.2", KEY_B, True, ""), KEY_A)
    assert old in text
    with pytest.raises(gridx.GridxError) as error:
        gridx.parse_worker_conf(text.replace(old, new))
    assert error.value.code == 2


# -- Commands: jobs ----------------------------------------------------------------

def test_json_outputs_parse(tmp_path):
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    result = cli("jobs", "list", "--json", env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert result.returncode == 0 and json.loads(result.stdout) == {"jobs": []}


def test_list_makes_a_fixed_number_of_docker_calls(tmp_path):
    """2 jobs or 200: the same three docker calls."""
    def calls_for(n):
        log = tmp_path / f"calls-{n}"
        names = " ".join(f"job-{i}" for i in range(n))
        services = json.dumps([{"Spec": {"Name": f"job-{i}", "Labels": {"gridx.job": f"job-{i}"},
                                         "Mode": {"ReplicatedJob": {"TotalCompletions": 1}},
                                         "TaskTemplate": {"ContainerSpec": {"Image": "x"}}}} for i in range(n)])
        (tmp_path / "services.json").write_text(services)
        fake = tmp_path / "docker"
        fake.write_text(f"""#!/bin/sh
echo "$*" >> {log}
case "$1 $2" in
  "service ls") echo "{names}" | tr ' ' '\\n' ;;
  "service inspect") cat {tmp_path}/services.json ;;
  "service ps") for s in {names}; do
      echo '{{"ID":"t","Name":"'$s'.1","Node":"w1","DesiredState":"Complete",'\
'"CurrentState":"Complete 1 second ago","Error":""}}'; done ;;
esac
""")
        fake.chmod(0o755)
        result = cli("jobs", "list", "--json", env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
        assert result.returncode == 0, result.stderr
        assert len(json.loads(result.stdout)["jobs"]) == n
        return len(log.read_text().splitlines())

    assert calls_for(2) == calls_for(200) == 3


def test_train_script_over_config_limit(tmp_path):
    script = tmp_path / "big.py"
    script.write_bytes(b"#" * (gridx.CONFIG_MAX_BYTES + 1))
    result = cli("jobs", "train", str(script), "--framework", "pytorch")
    assert result.returncode == 2 and "limit" in result.stderr


def test_unreachable_manager_is_exit_3_within_seconds(monkeypatch):
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now: refused at once
    started = time.monotonic()
    with pytest.raises(gridx.GridxError) as raised:
        gridx.check_manager_reachable(f"ssh://root@127.0.0.1:{port}")
    assert raised.value.code == gridx.EXIT_PRECONDITION and f"127.0.0.1:{port}" in raised.value.message
    assert time.monotonic() - started < gridx.MANAGER_CONNECT_TIMEOUT_S


# -- Argument parser and main: gridx.py run as a process ---------------------------

def test_help_has_examples_everywhere():
    for args in ([], ["hub"], ["hub", "init"], ["hub", "add-peer"], ["jobs", "run"], ["worker", "join"], ["cluster"]):
        result = cli(*args, "--help")
        assert result.returncode == 0, args
        assert "example" in result.stdout, args


def test_version():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"gridx {gridx.VERSION}"


@pytest.mark.parametrize("args", [
    ["hub", "add-peer", "../x"], ["hub", "add-peer", "a b"], ["hub", "add-peer", "A"],
    ["hub", "add-peer", "x" * 64], ["hub", "add-peer", "ok", "--pubkey", "nope"],
    ["hub", "add-peer", "ok", "--ip", "10.0.0.300"], ["hub", "init", "--ip", "1.2.3"],
    ["hub", "init", "--ip", "203.0.113.7", "--port", "70000"],
    ["hub", "init", "--ip", "203.0.113.7", "--subnet", "10.0.0.1/24"],
    ["hub", "remove-peer", "a/b"], ["jobs", "run", "python:3.11", "true", "--memory", "8X"],
    ["jobs", "run", "python:3.11", "--cpus", "0"], ["jobs", "run", "python:3.11", "--cpus", "abc"],
    ["jobs", "run", "python:3.11", "--env", "FOO"], ["jobs", "run", "python:3.11", "--replicas", "0"],
    ["jobs", "run", ""], ["jobs", "status", "../x"],
    ["jobs", "train", "/nonexistent/train.py", "--framework", "pytorch"],
])
def test_bad_input_is_exit_2_before_anything_else(args, tmp_path):
    # An empty config dir: a hub that is not initialised. Validation comes first.
    result = cli(*args, env={"GRIDX_CONFIG_DIR": str(tmp_path / "cfg")})
    assert result.returncode == 2, (args, result.stderr)
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cfg").exists()


@pytest.mark.parametrize("args", [
    ["jobs", "jupyter", "--timeout", "-1"], ["jobs", "jupyter", "--timeout", "0"],
    ["jobs", "jupyter", "--timeout", "x"], ["hub", "watch", "--interval", str(10**30)],
    ["hub", "watch", "--down-after", str(10**30)],
    ["worker", "join", "--wg-config", "/bin/bash", "--token", "SWMTKN-1-abc123-def456"],
    ["worker", "join", "--wg-config", "/", "--token", "SWMTKN-1-abc123-def456"],
    ["worker", "join", "--wg-config", "/dev/zero", "--token", "SWMTKN-1-abc123-def456"],
    ["jobs", "run", "python:3.11", "--env", "NVIDIA_VISIBLE_DEVICES=all"],
])
def test_more_bad_input_is_exit_2(args, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("docker", "bash", "ssh"):  # anything run would leave a trace
        (fake / tool).write_text(f"#!/bin/sh\ntouch {tmp_path}/ran\n")
        (fake / tool).chmod(0o755)
    result = cli(*args, env={"GRIDX_CONFIG_DIR": str(tmp_path / "cfg"), "PATH": f"{fake}:{os.environ['PATH']}"})
    assert result.returncode == 2, (args, result.stderr)
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "ran").exists() and not (tmp_path / "cfg").exists()


def test_not_initialised_is_exit_3(tmp_path):
    result = cli("hub", "list-peers", env={"GRIDX_CONFIG_DIR": str(tmp_path)})
    assert result.returncode == 3
    assert "not initialised" in result.stderr and "hint: run: gridx hub init" in result.stderr


@pytest.fixture
def gridx_for_others():
    """gridx.py and bundle_templates/ copied where any user can read them, for
    tests that drop to another user: the checkout may sit in a private folder
    (root's home, a 0700 temp folder), and pytest's tmp_path is 0700 too."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="gridx-readable-")
    try:
        shutil.copy(GRIDX, folder)
        shutil.copytree(os.path.join(ROOT, "bundle_templates"), os.path.join(folder, "bundle_templates"))
        for dirpath, _, filenames in os.walk(folder):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)
        yield os.path.join(folder, "gridx.py")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_not_root_is_exit_3(tmp_path, gridx_for_others):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             sys.executable, gridx_for_others, "hub", "add-peer", "ok"],
                            capture_output=True, text=True, env=dict(os.environ, GRIDX_CONFIG_DIR=str(tmp_path)))
    assert result.returncode == 3 and "root" in result.stderr and "Traceback" not in result.stderr


def test_missing_tool_is_exit_3(tmp_path):
    result = cli("hub", "init", "--ip", "203.0.113.7", env={"PATH": str(tmp_path), "GRIDX_CONFIG_DIR": str(tmp_path)})
    if os.geteuid() != 0:
        pytest.skip("init checks root first")
    assert result.returncode == 3 and "not found on PATH" in result.stderr and "apt install" in result.stderr


def test_docker_not_running_is_exit_3(tmp_path):
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
                    "Is the docker daemon running?' >&2\nexit 1\n")
    fake.chmod(0o755)
    result = cli("jobs", "list", env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert result.returncode == 3 and "Docker is not running" in result.stderr


def test_no_access_to_the_docker_socket_is_exit_3(tmp_path):
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho 'Got permission denied while trying to connect to the Docker daemon socket at "
                    "unix:///var/run/docker.sock: Get \"http://%2Fvar%2Frun%2Fdocker.sock/v1.24/services\": dial "
                    "unix /var/run/docker.sock: connect: permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    result = cli("jobs", "list", env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert result.returncode == 3 and "Docker socket" in result.stderr and "hint: " in result.stderr


def test_ssh_pubkey_as_non_root_is_exit_3(tmp_path, gridx_for_others):
    if os.geteuid() != 0:
        result = cli("hub", "ssh-pubkey", env={"GRIDX_CONFIG_DIR": str(tmp_path)})
    else:
        result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 sys.executable, gridx_for_others, "hub", "ssh-pubkey"],
                                capture_output=True, text=True, env=dict(os.environ, GRIDX_CONFIG_DIR=str(tmp_path)))
    assert result.returncode == 3 and "root" in result.stderr and "Traceback" not in result.stderr


def test_damaged_hub_config_on_the_command_line(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("hub commands check root first")
    for content in (b'{"peers": {"w1": 3}}', b"\xff\xfe binary"):
        (tmp_path / "hub_config.json").write_bytes(content)
        result = cli("hub", "list-peers", env={"GRIDX_CONFIG_DIR": str(tmp_path)})
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: ") and "damaged" in result.stderr


# -- every command: no value a user gives reaches another program's argv as an option (issue 12) ----

BAD_VALUES = ("-x", "--mount=type=bind,src=/,dst=/host")


# Valid options and positionals that get every command to run to its end
# with FakeTools: (options, {positional dest: words}).
ARGV_BASE = {
    ("hub", "init"): (["--ip=203.0.113.7"], {}),
    ("hub", "add-peer"): ([], {"name": ["new1"]}),
    ("hub", "remove-peer"): ([], {"name": ["w1"]}),
    ("hub", "refresh-bundle"): ([], {"name": ["w2"]}),
    ("hub", "join-info"): (["--name=w1"], {}),
    ("hub", "ssh"): ([], {"name": ["w1"], "command": ["true"]}),
    ("hub", "watch"): (["--once"], {}),
    ("hub", "reset"): (["--yes"], {}),
    ("worker", "join"): (["--wg-config=w.conf", "--token=SWMTKN-1-abc123-def456"], {}),
    ("jobs", "run"): ([], {"image": ["python:3.11"], "command": ["true"]}),
    ("jobs", "jupyter"): (["--timeout=5"], {}),
    ("jobs", "train"): (["--framework=pytorch"], {"script": ["train.py"]}),
    ("jobs", "status"): ([], {"job_id": ["job-1"]}),
    ("jobs", "logs"): ([], {"job_id": ["job-1"]}),
    ("jobs", "delete"): ([], {"job_ids": ["job-1"]}),
    ("jobs", "results"): (["--json"], {"job_id": ["job-out"]}),
    ("hub", "add-user"): ([], {"name": ["u2"]}),
    ("hub", "set-user"): (["--max-cpus=4"], {"name": ["u1"]}),
    ("hub", "set-defaults"): (["--max-cpus=4"], {}),
    ("hub", "remove-user"): ([], {"name": ["u1"]}),
    ("image", "push"): ([], {"image": ["team/app:1"]}),
    ("image", "rm"): ([], {"name": ["team/app:1"]}),
}


# A command run first (its calls forgotten) for the state a command needs.
ARGV_SETUP = {("hub", "set-user"): ["hub", "add-user", "u1"], ("hub", "remove-user"): ["hub", "add-user", "u1"]}


def prepare(group, name, tools):
    if (group, name) in ARGV_SETUP:
        assert run_main(ARGV_SETUP[(group, name)]) == 0
        tools.calls.clear()


@functools.lru_cache(maxsize=None)
def subcommand_parsers():
    """(group, command, its argparse parser) for every command of COMMANDS
    and the cluster shortcut. Built once (34 parsers): the tests only read
    them, and 200 of them look one up."""
    import argparse

    found = []
    for group, (_, _, commands) in list(gridx.COMMANDS.items()) + [("cluster", (None, None, {None: None}))]:
        for name in commands:
            words = [group] + ([name] if name else [])
            sub, _ = gridx.build_parser(words)
            for word in words:
                action = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
                sub = action.choices[word]
            found.append((group, name, sub))
    return tuple(found)


def argv_for(group, name, sub, inject=None, bad=None):
    """The command line: the base values, with one action's value bad."""
    options, positionals = ARGV_BASE.get((group, name), ([], {}))
    options, positionals = list(options), dict(positionals)
    if inject is not None and inject.option_strings:
        flag = max(inject.option_strings, key=len)
        options = [o for o in options if not o.startswith(flag + "=")] + [f"{flag}={bad}"]
    elif inject is not None:
        positionals[inject.dest] = [bad]
    words = [p for a in sub._actions if not a.option_strings for p in positionals.get(a.dest, [])]
    return [group] + ([name] if name else []) + options + (["--"] + words if words else [])


def value_actions():
    cases = []
    for group, name, sub in subcommand_parsers():
        for action in sub._actions:
            if action.nargs == 0:  # --help, --json, --yes: no value to give
                continue
            for bad in BAD_VALUES:
                label = action.option_strings[-1] if action.option_strings else action.dest
                value = "mount" if bad.startswith("--mount") else "dash-x"
                cases.append(pytest.param(group, name, action.dest, bad, id=f"{group}-{name}-{label}-{value}"))
    return cases


@pytest.mark.parametrize("group,name,sub", [pytest.param(*s, id=f"{s[0]}-{s[1]}") for s in subcommand_parsers()])
def test_argv_base_runs_every_command(group, name, sub, tmp_path, monkeypatch):
    """The fake answers enough that every command runs (so the test below
    sees the argv each one builds, not an early failure)."""
    tools = fake_hub(tmp_path, monkeypatch)
    prepare(group, name, tools)
    code = run_main(argv_for(group, name, sub))
    if (group, name) == ("worker", "setup"):
        assert code == 2  # needs a terminal: refused before anything runs
        return
    # hub status: exit 1, its peers never shook hands
    assert code == (1 if (group, name) == ("hub", "status") else 0), \
        f"gridx {group} {name} exits {code}: give it valid values in ARGV_BASE (or ARGV_SETUP)"
    assert tools.calls or (group, name) in (("hub", "ssh-pubkey"), ("hub", "set-defaults"), ("hub", "set-user")), \
        (group, name)  # those run no other program


@pytest.mark.parametrize("group,name,dest,bad", value_actions())
def test_no_user_value_reaches_an_argv_as_an_option(group, name, dest, bad, tmp_path, monkeypatch, capsys):
    """Each option and positional of each command, given a value that begins
    with '-': exit 2 with nothing run and nothing changed, or every argv
    element gridx built that begins with '-' (before a `--`) is its own."""
    tools = fake_hub(tmp_path, monkeypatch)
    sub = next(s for g, n, s in subcommand_parsers() if (g, n) == (group, name))
    action = next(a for a in sub._actions if a.dest == dest)
    prepare(group, name, tools)
    before = tree(tmp_path)
    code = run_main(argv_for(group, name, sub, action, bad))
    if code == 2:
        assert tools.calls == [], tools.calls
        assert tree(tmp_path) == before
        return
    for argv in tools.calls:
        options = argv[:argv.index("--")] if "--" in argv else argv
        assert not [word for word in options if word.startswith(bad)], argv


@pytest.mark.parametrize("bad", BAD_VALUES + ("UPPER/Case",))
def test_gridx_manager_from_the_environment_is_validated_first(bad, tmp_path, monkeypatch):
    tools = fake_hub(tmp_path, monkeypatch)
    monkeypatch.setenv("GRIDX_MANAGER", bad)
    assert run_main(["jobs", "list"]) == 2
    assert tools.calls == []


@pytest.mark.parametrize("argv", [
    ["jobs", "run", "--", "--mount=type=bind,src=/,dst=/host", "python:3.11", "true"],
    ["jobs", "run", "UPPER/Case:tag", "true"],
    ["jobs", "train", "t.py", "--framework", "pytorch", "--image=--network=host"],
    ["jobs", "jupyter", "--image=-x"],
])
def test_image_injection_is_exit_2_before_docker(argv, tmp_path):
    """Not a manager, no docker at all on PATH: still exit 2, not 3."""
    (tmp_path / "t.py").write_text("print(1)\n")
    result = subprocess.run([sys.executable, GRIDX, *argv], capture_output=True, text=True, cwd=tmp_path,
                            env=dict(os.environ, PATH=str(tmp_path), GRIDX_CONFIG_DIR=str(tmp_path / "cfg")))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: invalid") and result.stderr.count("\n") == 2, result.stderr
