"""Unit tests of gridx.py's Commands: hub, worker and jobs, with every program gridx runs faked (fakes.FakeTools)."""

import json
import os
import stat
import subprocess

import pytest
from fakes import (
    HUB_NODE,
    JOB_SERVICE,
    KEY_A,
    KEY_B,
    WORKER_NODE,
    FakeEngine,
    api_node,
    api_service,
    api_task,
    cli,
    fake_hub,
    make_config,
    run_main,
    tree,
)

import gridx

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
    """The bundles on the hub share one token file: the new token is in
    their folders at once, and no archive keeps the dead one."""
    fake_hub(tmp_path, monkeypatch)
    w2 = gridx.bundle_path("w2")
    assert bundle_token(w2) == ("SWMTKN-1-old", "SWMTKN-1-old")
    assert gridx.linked_to_hub_token(w2)
    assert gridx.main(["hub", "remove-peer", "w1"]) == 0
    with open(os.path.join(w2, "swarm-token")) as handle:
        assert handle.read().strip() == "SWMTKN-1-new"
    assert not os.path.exists(w2 + ".tar.gz")  # it held the old one
    assert stat.S_IMODE(os.stat(w2).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(w2, "gridx0.conf")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.join(w2, "swarm-token")).st_mode) == 0o600
    assert sorted(os.listdir(gridx.bundles_dir())) == [".swarm-token", "gridx-w2-bundle"]
    assert "refresh-bundle" in capsys.readouterr().err
    assert gridx.main(["hub", "refresh-bundle", "w2"]) == 0  # the archive again, with the live token
    assert bundle_token(w2) == ("SWMTKN-1-new", "SWMTKN-1-new")


def test_remove_peer_costs_the_same_with_many_bundles_on_the_hub(tmp_path, monkeypatch):
    """No bundle is written again at a rotation, however many there are
    (issue 20: the 250th remove-peer cost 14x the first)."""
    fake_hub(tmp_path, monkeypatch)
    config = gridx.load_hub_config()
    for i in range(40):
        name = f"p{i}"
        config.peers[name] = gridx.Peer(name, f"10.0.0.{10 + i}", KEY_A, True, "")
        gridx.atomic_write(gridx.client_conf_path(name), "conf\n")
        gridx.write_bundle(gridx.bundle_path(name), gridx.bundle_files(
            config, config.peers[name], "conf\n", "SWMTKN-1-old", "ssh-ed25519 AAAA", True))
    gridx.save_hub_config(config)
    written = []
    real = gridx.write_bundle
    monkeypatch.setattr(gridx, "write_bundle", lambda *a, **kw: written.append(a[0]) or real(*a, **kw))
    assert gridx.main(["hub", "remove-peer", "p0"]) == 0
    assert written == []
    with open(os.path.join(gridx.bundle_path("p39"), "swarm-token")) as handle:
        assert handle.read().strip() == "SWMTKN-1-new"


def test_a_bundle_older_than_the_shared_token_is_written_once(tmp_path, monkeypatch):
    fake_hub(tmp_path, monkeypatch)
    w2 = gridx.bundle_path("w2")
    token = os.path.join(w2, "swarm-token")
    os.unlink(token)
    with open(token, "w") as handle:  # as an older gridx wrote it: a copy
        handle.write("SWMTKN-1-old\n")
    assert gridx.main(["hub", "remove-peer", "w1"]) == 0
    assert gridx.linked_to_hub_token(w2) and bundle_token(w2) == ("SWMTKN-1-new", "SWMTKN-1-new")


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


def twin_laptops(tools):
    """Two workers that both call themselves ubuntu: n-up (Ready, 10.0.0.2)
    and n-down (Down, 10.0.0.3); a running job and a finished --output job
    on each."""
    out = {gridx.LABEL_OUTPUT: "/work/out"}
    tools.engine.nodes = [HUB_NODE, api_node("n-up", "ubuntu", "ready", "10.0.0.2"),
                          api_node("n-down", "ubuntu", "down", "10.0.0.3")]
    tools.engine.services = [api_service("s-a", "job-up"), api_service("s-b", "job-down"),
                             api_service("s-c", "out-up", out), api_service("s-d", "out-down", out)]
    tools.engine.tasks = [
        api_task("t-a", "s-a", "n-up", state="running", desired="complete", exit_code=0),
        api_task("t-b", "s-b", "n-down", state="running", desired="complete", exit_code=0),
        api_task("t-c", "s-c", "n-up", exit_code=0, container="container-on-up"),
        api_task("t-d", "s-d", "n-down", exit_code=0, container="container-on-down"),
    ]


def test_watch_runs_again_only_the_down_twins_jobs_and_collects_from_each_twin(tmp_path, monkeypatch):
    """Nodes are known by ID (issue 19): the Ready ubuntu's job is left
    alone, the Down one's runs again, and each job's results are copied
    from the address of the node that ran it."""
    tools = fake_hub(tmp_path, monkeypatch)
    twin_laptops(tools)
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # the collector is root on the hub
    assert gridx.main(["hub", "watch", "--once", "--down-after", "0"]) == 0
    updates = [argv for argv in tools.calls if argv[1:3] == ["service", "update"]]
    assert updates == [["docker", "service", "update", "--detach", "--force", "--no-resolve-image", "--", "job-down"]]
    copies = {argv[-1].split()[-2]: argv[-2] for argv in tools.calls if argv[0] == "ssh"}
    assert copies == {"container-on-up:/work/out": "root@10.0.0.2", "container-on-down:/work/out": "root@10.0.0.3"}


def test_delete_removes_a_twins_containers_from_the_node_that_ran_them(tmp_path, monkeypatch):
    tools = fake_hub(tmp_path, monkeypatch)
    twin_laptops(tools)
    tools.engine.nodes[2]["Status"]["State"] = "ready"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert gridx.main(["jobs", "delete", "--keep-results", "out-up", "out-down"]) == 0
    removals = [argv for argv in tools.calls if argv[0] == "ssh" and "rm" in argv[-1]]
    assert {argv[-1].split()[-1]: argv[-2] for argv in removals} == {
        "container-on-up": "root@10.0.0.2", "container-on-down": "root@10.0.0.3"}


def test_cluster_keeps_twins_apart(tmp_path, monkeypatch, capsys):
    tools = fake_hub(tmp_path, monkeypatch)
    twin_laptops(tools)
    assert gridx.main(["cluster", "--json"]) == 0
    nodes = {n["id"]: n for n in json.loads(capsys.readouterr().out)["nodes"]}
    assert nodes["n-up"]["reserved"]["cpus"] == 1 and nodes["n-down"]["reserved"]["cpus"] == 1
    assert nodes["n-up"]["hostname"] == nodes["n-down"]["hostname"] == "ubuntu"


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

def test_json_outputs_parse():
    engine = FakeEngine().start()
    result = cli("jobs", "list", "--json", env={"DOCKER_HOST": engine.host})
    assert result.returncode == 0 and json.loads(result.stdout) == {"jobs": []}


def many_jobs(n):
    """An engine holding n jobs, each with a task on one of two nodes."""
    services = [{"ID": f"s{i}", "Spec": {"Name": f"job-{i}", "Labels": {"gridx.job": f"job-{i}"},
                                         "Mode": {"ReplicatedJob": {"TotalCompletions": 1}},
                                         "TaskTemplate": {"ContainerSpec": {"Image": "x"}}}} for i in range(n)]
    tasks = [api_task(f"t{i}", f"s{i}", ("n0", "n1")[i % 2], exit_code=0) for i in range(n)]
    return FakeEngine(services, tasks, [HUB_NODE, WORKER_NODE]).start()


@pytest.mark.parametrize("argv", [["jobs", "list", "--json"], ["cluster", "--json"],
                                  ["jobs", "status", "job-1", "--json"]])
def test_reading_the_swarm_is_a_fixed_number_of_requests(argv):
    """2 jobs or 200: the same requests to the Engine API, over one
    connection, each to a versioned path."""
    def requests_for(n):
        engine = many_jobs(n)
        result = cli(*argv, env={"DOCKER_HOST": engine.host})
        assert result.returncode == 0, result.stderr
        if argv[1] == "list":
            assert len(json.loads(result.stdout)["jobs"]) == n
        assert engine.connections == 1
        assert all(path == "/_ping" or path.startswith("/v1.41/") for path, _ in engine.requests)
        return engine.paths()

    assert requests_for(2) == requests_for(200) == ["/_ping", "/services", "/nodes", "/tasks"]


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


# -- what members and volunteers wrote reaches others' terminals escaped (issue 19) ----------

HOSTILE_TEXT = "evil\x1b]0;owned\x07\x1b[2J\r\u202eexe.txt"


def test_control_characters_from_members_and_workers_are_escaped(tmp_path, monkeypatch, capsys):
    """A command (a member's), a hostname (a volunteer's) and a task error
    (Docker's, quoting them) in list, status and cluster: no raw control
    character reaches stdout or stderr; JSON keeps the value exact."""
    service = json.loads(json.dumps(JOB_SERVICE))
    service["Spec"]["Labels"][gridx.LABEL_CMD] = HOSTILE_TEXT
    task = api_task("t1", "s1", "n1", state="failed", desired="shutdown", error=HOSTILE_TEXT, exit_code=3)
    node = json.loads(json.dumps(WORKER_NODE))
    node["Description"]["Hostname"] = "w\x1b[31mrker"
    tools = fake_hub(tmp_path, monkeypatch)
    tools.engine.services[0] = service
    tools.engine.tasks = [task]
    tools.engine.nodes = [HUB_NODE, node]
    for argv in (["jobs", "list"], ["jobs", "status", "job-1"], ["cluster"]):
        assert run_main(argv) == 0
        out, err = capsys.readouterr()
        for text in (out, err):
            assert not any(ord(c) < 0x20 and c != "\n" or 0x7f <= ord(c) <= 0x9f or c == "\u202e" for c in text), \
                (argv, text)
    assert "\\x1b]0;owned\\x07" in gridx.printable(HOSTILE_TEXT) and "\\u202e" in gridx.printable(HOSTILE_TEXT)
    assert run_main(["jobs", "status", "job-1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["command"] == HOSTILE_TEXT


# -- hub allow-jobs (issue 19): what every job may reach on private networks ---------------


def test_allow_jobs_saves_the_list_writes_it_into_bundles_and_applies_it_over_ssh(tmp_path, monkeypatch, capsys):
    tools = fake_hub(tmp_path, monkeypatch)
    assert run_main(["hub", "allow-jobs", "10.0.0.9:tcp/80", "192.168.1.20/32:udp/2049"]) == 0
    assert gridx.load_hub_config().job_allow == ["10.0.0.9:tcp/80", "192.168.1.20/32:udp/2049"]
    settings = (tmp_path / "cfg" / "bundles" / "gridx-w2-bundle" / "settings.env").read_text()
    assert "GRIDX_JOB_ALLOW='10.0.0.9:tcp/80 192.168.1.20/32:udp/2049'" in settings
    ssh = [c for c in tools.calls if c[0] == "ssh"]
    assert ssh and ssh[0][-2:] == ["root@10.0.0.2", "/var/lib/gridx/jobnet/jobnet.sh allow "
                                                     "'10.0.0.9:tcp/80 192.168.1.20/32:udp/2049'"]
    assert "applied on w1" in capsys.readouterr().err
    assert run_main(["hub", "allow-jobs"]) == 0
    assert capsys.readouterr().out.strip() == "10.0.0.9:tcp/80 192.168.1.20/32:udp/2049"
    assert run_main(["hub", "allow-jobs", "--none"]) == 0
    assert gridx.load_hub_config().job_allow == [] and "job_allow" not in gridx.load_hub_config().to_dict()


@pytest.mark.parametrize("entry", ["10.0.0.9:80", "0.0.0.0/0", "10.0.0.9:tcp/-1", "--none=x", "a b"])
def test_a_bad_allow_list_is_exit_2_and_nothing_changes(entry, tmp_path, monkeypatch):
    tools = fake_hub(tmp_path, monkeypatch)
    before = tree(tmp_path / "cfg")
    assert run_main(["hub", "allow-jobs", "--", entry]) == 2
    assert tree(tmp_path / "cfg") == before and tools.calls == []


def test_a_worker_that_declined_the_hubs_ssh_is_told_how(tmp_path, monkeypatch, capsys):
    tools = fake_hub(tmp_path, monkeypatch, declined=["n1"])
    assert run_main(["hub", "allow-jobs", "10.0.0.9:tcp/80"]) == 0
    assert not [c for c in tools.calls if c[0] == "ssh"]
    assert "w1 declined the hub's SSH: its volunteer runs sudo ./jobnet.sh allow" in capsys.readouterr().err
