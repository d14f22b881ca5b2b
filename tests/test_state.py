"""Unit tests of gridx.py's Running commands and State on disk: run() and
its errors, the validators, files, the hub configuration, IP allocation."""

import json
import os
import stat
import subprocess
import sys

import pytest
from fakes import (
    KEY_A,
    FakeEngine,
    api_node,
    api_service,
    make_config,
    use_engine,
)

import gridx

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


@pytest.mark.parametrize("said,expected", [
    ("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?",
     "Docker is not running"),
    ('Got permission denied while trying to connect to the Docker daemon socket at unix:///var/run/docker.sock: '
     'Get "http://%2Fvar%2Frun%2Fdocker.sock/v1.24/services": dial unix /var/run/docker.sock: connect: '
     "permission denied", "no access to the Docker socket (permission denied)"),
    ("Error response from daemon: This node is not a swarm manager. Use \"docker swarm init\"",
     "this machine's Docker is not a swarm manager"),
])
def test_docker_cli_errors_are_the_preconditions_the_api_gives(said, expected):
    """What the docker CLI says (service create, update, rm) is the same
    exit-3 line as the Engine API's socket gives (see test_gridx.py)."""
    error = gridx.command_error(["docker", "service", "create"], subprocess.CompletedProcess([], 1, "", said))
    assert error.code == gridx.EXIT_PRECONDITION and error.message == expected and error.hint


# -- Running commands: the Engine API ----------------------------------------------

@pytest.mark.parametrize("answer,body", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nApi-Version: 1.41\r\n\r\n[{}]", b"[{}]"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\n[{}\r\nA\r\n, {\"a\": 1}\r\n1\r\n]\r\n"
     b"0\r\nTrailer: x\r\n\r\n", b'[{}, {"a": 1}]'),
    (b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n\r\nto the end", b"to the end"),
])
def test_an_http_answer_is_read_by_length_by_chunks_or_to_the_end(answer, body):
    import io

    reader = io.BytesIO(answer + (b"HTTP/1.1 next answer" if answer.startswith(b"HTTP/1.1") else b""))
    status, headers, got = gridx.read_http_response(reader)
    assert got == body and status in (200, 404)
    assert headers.get("connection") == ("close" if status == 404 else None)
    if status == 200:
        assert reader.read() == b"HTTP/1.1 next answer"  # the connection stays usable


@pytest.mark.parametrize("answer,error", [
    (b"", ConnectionError), (b"SSH-2.0-OpenSSH\r\n", ValueError),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", ConnectionError),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", ValueError),
    (b"HTTP/1.1 200 OK\r\nContent-Le", ConnectionError),
])
def test_a_broken_http_answer_is_an_error_not_a_wrong_body(answer, error):
    import io

    with pytest.raises(error):
        gridx.read_http_response(io.BytesIO(answer))


def test_the_api_version_is_asked_once_and_every_path_carries_it(monkeypatch):
    for engine_version, spoken in (("1.41", "1.41"), ("1.45", "1.45"), ("1.51", "1.51"), ("1.53", "1.51")):
        engine = use_engine(monkeypatch, FakeEngine([api_service("s1", "job-1")], version=engine_version))
        engine.chunked = engine_version == "1.45"
        assert [s["ID"] for s in gridx.engine_get("/services", {"label": ["gridx.job"]})] == ["s1"]
        assert gridx.engine_get("/nodes") == []
        assert [path for path, _ in engine.requests] == ["/_ping", f"/v{spoken}/services", f"/v{spoken}/nodes"]
        assert engine.requests[1][1] == {"label": ["gridx.job"]} and engine.connections == 1


def test_a_connection_the_engine_closed_is_opened_again_once(monkeypatch):
    engine = use_engine(monkeypatch, FakeEngine(nodes=[api_node("n1", "w1")]))
    assert len(gridx.engine_get("/nodes")) == 1
    engine.drop = 1  # e.g. dockerd restarted between two polls of --wait
    assert len(gridx.engine_get("/nodes")) == 1 and engine.connections == 2
    engine.drop = 2  # and again at once: an error, no loop
    with pytest.raises(gridx.GridxError) as error:
        gridx.engine_get("/nodes")
    assert error.value.code == 1 and "connection" in error.value.message


def test_an_engine_error_says_what_docker_said(monkeypatch):
    engine = use_engine(monkeypatch, FakeEngine())
    with pytest.raises(gridx.EngineError) as error:
        gridx.engine_get("/tasks", {"service": ["job-9"]})
    assert error.value.status == 404 and error.value.message == "Docker's API: GET /tasks: service job-9 not found"
    engine.fail = (500, "rpc error: code = DeadlineExceeded")
    with pytest.raises(gridx.EngineError) as error:
        gridx.engine_get("/nodes")
    assert error.value.code == 1 and "DeadlineExceeded" in error.value.message


def test_a_log_stream_goes_to_stdout_and_stderr_as_docker_writes_it(capfdbinary):
    frames = b"\x01\0\0\0\0\0\0\x03out\x02\0\0\0\0\0\0\x04err\n\x01\0\0\0\0\0\0\x02!\n"
    gridx.write_log_stream(frames)
    assert capfdbinary.readouterr() == (b"out!\n", b"err\n")
    gridx.write_log_stream(b"a TTY's stream has no frames\n")
    assert capfdbinary.readouterr() == (b"a TTY's stream has no frames\n", b"")
    # the daemon's own error (stream 3, Docker 26.1 when its log broker lost a
    # node) is returned for the caller to say, never written as bytes
    said = b"Error grabbing logs: warning: incomplete log stream. node w34b is not available\n"
    frames = b"\x01\0\0\0\0\0\0\x03out" + b"\x03\0\0\0" + len(said).to_bytes(4, "big") + said
    assert gridx.write_log_stream(frames) == [said.decode().strip()]
    assert capfdbinary.readouterr() == (b"out", b"")


# A stand-in for ssh: checks the argv the docker CLI would give it for
# ssh://root@hub:2222, then carries stdin and stdout to FAKE_ENGINE's socket,
# as `docker system dial-stdio` does; FAKE_SSH_FAIL: ssh's own failure.
FAKE_SSH = """#!/usr/bin/env python3
import os, socket, sys, threading
with open(os.environ["FAKE_SSH_ARGV"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_SSH_FAIL"):
    sys.stderr.write("Warning: Permanently added 'hub' (ED25519) to the list of known hosts.\\n")
    sys.stderr.write(os.environ["FAKE_SSH_FAIL"] + "\\n")
    sys.exit(255)
engine = socket.socket(socket.AF_UNIX)
engine.connect(os.environ["FAKE_ENGINE"])
def up():
    while True:
        data = os.read(0, 65536)
        if not data:
            break
        engine.sendall(data)
    engine.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while True:
    data = engine.recv(65536)
    if not data:
        break
    os.write(1, data)
"""


def fake_ssh(tmp_path, monkeypatch, engine):
    (tmp_path / "ssh").write_text(FAKE_SSH)
    (tmp_path / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ENGINE", engine.path)
    monkeypatch.setenv("FAKE_SSH_ARGV", str(tmp_path / "argv"))
    monkeypatch.setattr(gridx, "DOCKER_HOST", "ssh://root@hub:2222")
    monkeypatch.setattr(gridx, "ENGINES", {})


def test_manager_over_ssh_reads_through_docker_system_dial_stdio(tmp_path, monkeypatch):
    """--manager root@HUB: one ssh for every request, argv as the docker CLI's."""
    engine = FakeEngine(nodes=[api_node("n1", "w1")]).start()
    fake_ssh(tmp_path, monkeypatch, engine)
    assert [n.hostname for n in gridx.all_swarm_nodes()] == ["w1"]
    assert gridx.list_job_services() == []
    assert (tmp_path / "argv").read_text().splitlines() == [
        "-o ConnectTimeout=30 -T -l root -p 2222 -- hub docker system dial-stdio"]
    assert engine.paths() == ["/_ping", "/nodes", "/services"] and engine.connections == 1


def test_manager_unreachable_over_ssh_is_exit_3_with_what_ssh_said(tmp_path, monkeypatch):
    engine = FakeEngine().start()
    fake_ssh(tmp_path, monkeypatch, engine)
    monkeypatch.setenv("FAKE_SSH_FAIL", "root@hub: Permission denied (publickey).")
    with pytest.raises(gridx.GridxError) as error:
        gridx.all_swarm_nodes()
    assert error.value.code == gridx.EXIT_PRECONDITION
    assert error.value.message == "cannot reach the manager over SSH: root@hub: Permission denied (publickey)."
    assert engine.requests == []


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
