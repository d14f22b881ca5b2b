"""Unit and black-box CLI tests of gridx.py (no root, no Docker needed)."""

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


# -- validators ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["a", "worker1", "laptop-anna", "x" * 63, "0day"])
def test_valid_names(name):
    assert gridx.valid_name(name) == name


@pytest.mark.parametrize("name", ["../x", "a b", "A", "x" * 64, "", "-a", "a-", "a/b", "a.b", "é"])
def test_invalid_names(name):
    with pytest.raises(gridx.GridxError) as error:
        gridx.valid_name(name)
    assert error.value.code == 2


@pytest.mark.parametrize("value,ok", [("51820", True), ("1", True), ("65535", True), ("0", False),
                                      ("65536", False), ("abc", False), ("-1", False), ("1.5", False)])
def test_port(value, ok):
    if ok:
        assert gridx.valid_port(value) == int(value)
    else:
        with pytest.raises(gridx.GridxError):
            gridx.valid_port(value)


@pytest.mark.parametrize("value,ok", [("10.0.0.0/24", True), ("192.168.5.0/28", True), ("10.0.0.1/24", False),
                                      ("10.0.0.0/31", False), ("fd00::/64", False), ("nonsense", False),
                                      ("10.0.0.0/33", False)])
def test_subnet(value, ok):
    if ok:
        assert gridx.valid_subnet(value) == value
    else:
        with pytest.raises(gridx.GridxError) as error:
            gridx.valid_subnet(value)
        assert error.value.code == 2


@pytest.mark.parametrize("value,ok", [("203.0.113.7", True), ("2001:db8::1", True), ("0.0.0.0", False),
                                      ("127.0.0.1", False), ("1.2.3", False), ("hub.example", False)])
def test_public_ip(value, ok):
    if ok:
        assert gridx.valid_public_ip(value)
    else:
        with pytest.raises(gridx.GridxError):
            gridx.valid_public_ip(value)


@pytest.mark.parametrize("value,ok", [(KEY_A, True), ("short", False), (KEY_A[:-2] + "!=", False),
                                      ("A" * 44, False), ("", False)])
def test_wg_key(value, ok):
    if ok:
        assert gridx.valid_wg_key(value) == value
    else:
        with pytest.raises(gridx.GridxError):
            gridx.valid_wg_key(value)


@pytest.mark.parametrize("name,ok", [("gridx0", True), ("wg-0", True), ("a" * 15, True), ("a" * 16, False),
                                     ("a b", False), ("..", False), ("", False)])
def test_interface(name, ok):
    if ok:
        assert gridx.valid_interface(name) == name
    else:
        with pytest.raises(gridx.GridxError):
            gridx.valid_interface(name)


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


# -- IP allocation ---------------------------------------------------------------

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


def test_address_pool_never_overlaps_vpn():
    assert gridx.choose_address_pool("10.0.0.0/24") == "10.96.0.0/12"
    assert gridx.choose_address_pool("10.100.0.0/16") == "10.208.0.0/12"
    assert gridx.choose_address_pool("10.0.0.0/8") == "172.80.0.0/12"
    assert gridx.choose_address_pool("10.0.0.0/24", ["10.97.3.4/24"]) == "10.208.0.0/12"


# -- config round trips and rendering ---------------------------------------------

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


def test_atomic_write_mode_and_content(tmp_path):
    path = tmp_path / "f"
    gridx.atomic_write(str(path), "one", 0o600)
    gridx.atomic_write(str(path), "two", 0o600)
    assert path.read_text() == "two" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_hub_conf_lists_every_peer():
    config = make_config(peers=[("w2", "10.0.0.10"), ("w1", "10.0.0.2")])
    text = gridx.render_hub_wg_conf(config, KEY_A)
    assert "ListenPort = 51820" in text and "Address = 10.0.0.1/24" in text
    assert text.index("AllowedIPs = 10.0.0.2/32") < text.index("AllowedIPs = 10.0.0.10/32")
    assert gridx.CONFIG_MARKER in text


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


def test_firewall_rules_only_open_wireguard_publicly():
    rules = gridx.firewall_rules(make_config())
    assert "-A GRIDX-INPUT -i gridx0 -j RETURN" in rules
    for proto, port in gridx.SWARM_PORTS:
        assert f"-p {proto} --dport {port} -j DROP" in rules
    assert "-p udp --dport 51820 -j ACCEPT" in rules


# -- swarm parsing ------------------------------------------------------------------

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


def test_node_summary():
    summary = gridx.node_summary(NODE)
    assert summary["shared"] == {"cpus": 4, "memory_mib": 4096, "gpus": ["GPU-a", "GPU-b"]}
    assert summary["address"] == "10.0.0.4" and summary["state"] == "ready" and not summary["manager"]


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
    monkeypatch.setattr(gridx, "all_swarm_nodes", lambda: nodes)
    assert sorted(n["ID"] for n in gridx.swarm_nodes()) == ["alone", "down-b", "new"]


def test_check_fits_names_the_biggest_worker():
    with pytest.raises(gridx.GridxError) as error:
        gridx.check_fits(gridx.JobRequest("1", "1G", "3"), [NODE])
    assert error.value.code == 2 and "worker3" in error.value.message and "3 GPU" in error.value.message
    gridx.check_fits(gridx.JobRequest("4", "4G", "2"), [NODE])
    with pytest.raises(gridx.GridxError):
        gridx.check_fits(gridx.JobRequest("5", "1G", "0"), [NODE])


def test_exit_code_parsing():
    assert gridx.exit_code_from({"state": "failed", "Error": "task: non-zero exit (3)"}) == 3
    assert gridx.exit_code_from({"state": "complete", "Error": ""}) == 0
    assert gridx.exit_code_from({"state": "running", "Error": ""}) is None


def test_pending_reason_in_users_terms():
    service = {"Spec": {"TaskTemplate": {"Resources": {"Reservations": {"GenericResources": [
        {"DiscreteResourceSpec": {"Kind": "gridx_cpu", "Value": 1}},
        {"DiscreteResourceSpec": {"Kind": "gridx_mem", "Value": 1024}},
        {"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 2}}]}}}}}
    nodes = {"gpu-box": gridx.node_summary(NODE)}
    reason = gridx.pending_reason({"tasks": []}, service, nodes, {"gpu-box": (1, 1024, 1)})
    assert reason == "waiting: 2 GPUs requested, 1 free on gpu-box"


# -- the run() helper --------------------------------------------------------------

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


# -- black-box CLI ------------------------------------------------------------------

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


def test_train_script_over_config_limit(tmp_path):
    script = tmp_path / "big.py"
    script.write_bytes(b"#" * (gridx.CONFIG_MAX_BYTES + 1))
    result = cli("jobs", "train", str(script), "--framework", "pytorch")
    assert result.returncode == 2 and "limit" in result.stderr


def test_not_initialised_is_exit_3(tmp_path):
    result = cli("hub", "list-peers", env={"GRIDX_CONFIG_DIR": str(tmp_path)})
    assert result.returncode == 3
    assert "not initialised" in result.stderr and "hint: run: gridx hub init" in result.stderr


def test_not_root_is_exit_3(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             sys.executable, GRIDX, "hub", "add-peer", "ok"],
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


def task(state, desired="shutdown", error="", service="job1", node="worker1", task_id=None):
    return {"ID": task_id or f"{service}-{state}-{node}", "Name": f"{service}.1", "Node": node, "state": state,
            "since": "", "DesiredState": desired, "Error": error, "service": service, "exit_code": None}


def test_rejected_by_enforcer_only_when_no_task_ran():
    rejected = task("rejected", error=gridx.ENFORCER_REJECTION)
    assert gridx.rejected_by_enforcer([rejected])
    # the job ran again and finished: the old rejection is history
    assert not gridx.rejected_by_enforcer([rejected, task("complete", desired="complete")])
    assert not gridx.rejected_by_enforcer([task("rejected", error="no such image")])
    assert not gridx.rejected_by_enforcer([rejected, task("running", desired="running")])
    assert not gridx.rejected_by_enforcer([])


def test_rejected_jobs_are_bounded():
    services = [{"Spec": {"Name": "once"}}, {"Spec": {"Name": "often"}}, {"Spec": {"Name": "fine"}}]
    tasks = [task("rejected", error=gridx.ENFORCER_REJECTION, service="once")]
    tasks += [task("rejected", error=gridx.ENFORCER_REJECTION, service="often", task_id=f"o{i}")
              for i in range(gridx.ENFORCER_RERUNS + 1)]
    tasks += [task("complete", desired="complete", service="fine")]
    assert gridx.rejected_jobs(services, tasks) == {"once": frozenset({"once-rejected-worker1"})}


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


def test_name_taken_is_exit_2(monkeypatch):
    taken = subprocess.CompletedProcess([], 1, "", "Error response from daemon: rpc error: code = AlreadyExists "
                                                  "desc = name conflicts with an existing object: service x")
    monkeypatch.setattr(gridx, "run", lambda argv, **kw: taken)
    with pytest.raises(gridx.GridxError) as raised:
        gridx.run_naming(["docker", "service", "create"], "x")
    assert raised.value.code == gridx.EXIT_USAGE and "exists" in raised.value.message


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


def test_ssh_failure_of_docker_is_exit_3():
    result = subprocess.CompletedProcess([], 1, "", 'error during connect: Get "http://docker.example.com/v1.24/x":'
                                         " command [ssh -l root -- hub docker system dial-stdio] has exited with"
                                         " exit status 255, please make sure the URL is valid, and Docker 18.09"
                                         " or later is installed on the remote host: stderr=root@hub: Permission"
                                         " denied (publickey).")
    error = gridx.command_error(["docker", "-H", "ssh://root@hub", "service", "ls"], result)
    assert error.code == gridx.EXIT_PRECONDITION
    assert error.message == "cannot reach the manager over SSH: root@hub: Permission denied (publickey)."


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


def test_job_progress_says_what_a_waiting_job_does():
    def job(state, nodes=()):
        return {"state": state, "tasks": [{"node": n} for n in nodes]}
    assert gridx.job_progress("j", job("pending"), 0.2) is None  # placed in a moment: nothing to say
    assert "waiting for a worker with room" in gridx.job_progress("j", job("pending"), 1.5)
    assert gridx.job_progress("j", job("starting", ["w2"]), 0).startswith("job j: starting on w2")
    assert gridx.job_progress("j", job("running", ["w2", "w1"]), 0) == "job j: running on w1, w2"
    assert gridx.job_progress("j", job("complete", ["w1"]), 0) is None
