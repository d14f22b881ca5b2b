"""Unit tests of Grid-X users (gridx.py's Accounts and Remote sections, and
owners in Jobs): serve's allow-list, the client's forwarded command line and
ssh argv, limits arithmetic, the authorized_keys line, the user bundle's
files and modes, the hub config's users (no root, no Docker needed)."""

import base64
import hashlib
import json
import os
import shlex
import stat
import subprocess
import sys

import pytest
from fakes import GRIDX, KEY_A, KEY_B, KEY_C, W1, fake_hub, gridx_argv, make_config, run_main, serve, ssh_key, tree

import gridx

# -- serve: the allow-list -------------------------------------------------------

HOSTILE = [
    None,                                           # plain `ssh gridx@hub`: a shell
    "",
    "sh",
    "bash -i",
    "/bin/sh -c id",
    "scp -t /tmp",
    "internal-sftp",
    "hub add-peer x",
    "hub remove-user bob",
    "worker leave --yes",
    "serve bob",
    "-v jobs list",
    "--manager root@10.0.0.1 jobs list",
    "jobs run --manager x python:3.11 true",
    "jobs list --manager=root@10.0.0.1",
    "jobs list --man=root@10.0.0.1",
    "cluster --manager x",
    "jobs run -- '--mount=type=bind,src=/,dst=/host' python:3.11",
    "jobs run --name=-x python:3.11 true",
    "jobs run 'python:3.11",                        # an unbalanced quote
    "jobs list\nsh",                                # a newline
    "jobs list; sh",
    "jobs list && sh",
    "jobs list | sh",
    "jobs list `sh`",
    "jobs list $(sh)",
    "jobs train /etc/passwd --framework pytorch",   # a file of the hub
    "jobs train ../../etc/gridx/hub_config.json --framework pytorch",
    "jobs",
    "jobs nosuch",
]


@pytest.mark.parametrize("command", HOSTILE, ids=[repr(c) for c in HOSTILE])
def test_serve_refuses_with_exit_2_and_runs_nothing(command, serve_env, monkeypatch, capsys):
    code = serve(monkeypatch, command)
    assert code == 2, capsys.readouterr()
    assert serve_env == []  # refused by serve, or by gridx's own checks of the values: nothing ran
    err = capsys.readouterr().err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["sh", "bash -i", "hub add-peer x", "jobs run --manager x python:3.11 true"])
def test_serve_refusal_is_one_error_line_and_a_hint(command, serve_env, monkeypatch, capsys):
    assert serve(monkeypatch, command) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), lines


@pytest.mark.parametrize("command", ["jobs list", "gridx jobs list", "cluster", "jobs cluster --json",
                                     "jobs list --mine", "jobs status job-1 --json"])
def test_serve_runs_allowed_commands_as_the_user(command, monkeypatch, serve_env):
    ran = []

    def handler(args):
        ran.append((args.group, gridx.OWNER, gridx.SERVE_LIMITS))
        return 0

    for name in ("list", "status", "cluster"):
        entry = gridx.COMMANDS["jobs"][2][name]
        monkeypatch.setitem(gridx.COMMANDS["jobs"][2], name, (handler, *entry[1:]))
    monkeypatch.setattr(gridx, "CLUSTER_SHORTCUT", (handler, *gridx.CLUSTER_SHORTCUT[1:]))
    assert serve(monkeypatch, command) == 0
    assert ran == [(command.split()[0] if command.split()[0] != "gridx" else "jobs", "alice",
                    {"cpus": 8, "memory_mib": None, "gpus": 2, "jobs": None})]


def test_serve_of_someone_not_a_user_is_exit_3(serve_env, monkeypatch):
    monkeypatch.setenv("SSH_ORIGINAL_COMMAND", "jobs list")
    assert gridx.main(["serve", "mallory"]) == 3
    assert serve_env == []


def test_serve_is_not_in_help():
    result = subprocess.run([sys.executable, GRIDX, "--help"], capture_output=True, text=True)
    import re

    assert result.returncode == 0 and not re.search(r"\bserve\b", result.stdout)


# -- the client's side -------------------------------------------------------------

@pytest.mark.parametrize("argv,expected", [
    (["jobs", "list", "--manager", "gridx@10.0.0.1"], ["jobs", "list"]),
    (["jobs", "list", "--manager=gridx@10.0.0.1", "--json"], ["jobs", "list", "--json"]),
    (["jobs", "list", "--man", "gridx@10.0.0.1"], ["jobs", "list"]),
    (["-v", "jobs", "list"], ["jobs", "list"]),
    (["--verbose", "cluster", "--manager", "gridx@h"], ["cluster"]),
    (["jobs", "run", "python:3.11", "--manager", "gridx@h", "--", "echo", "--manager", "x"],
     ["jobs", "run", "python:3.11", "--", "echo", "--manager", "x"]),
    (["jobs", "run", "python:3.11", "echo hi; exit 3", "--wait"], ["jobs", "run", "python:3.11", "echo hi; exit 3",
                                                                   "--wait"]),
    (["jobs", "run", "--memory", "1G", "python:3.11"], ["jobs", "run", "--memory", "1G", "python:3.11"]),
])
def test_forwarded_words_drop_manager_and_verbose(argv, expected):
    assert gridx.forwarded_words(argv) == expected


def test_forwarded_command_reads_back_the_same_on_the_hub():
    import shlex

    words = ["jobs", "run", "python:3.11", "echo 'a b'; printf '%s\\n' \"$HOME\"", "--env", "X=a b"]
    argv = gridx.serve_ssh_argv("ssh://gridx@10.0.0.1", words)
    assert shlex.split(argv[-1]) == words


def test_serve_ssh_argv(monkeypatch, tmp_path):
    monkeypatch.setenv("GRIDX_SSH_KEY", "~/.ssh/gridx-alice")
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = gridx.serve_ssh_argv("ssh://gridx@10.0.0.1:2222", ["jobs", "list"], control=str(tmp_path / "cm"))
    who = hashlib.sha256(str(tmp_path / ".ssh" / "gridx-alice").encode()).hexdigest()[:12]
    assert argv == [
        "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
        "-i", str(tmp_path / ".ssh" / "gridx-alice"), "-o", "IdentitiesOnly=yes",
        "-o", "ControlMaster=auto", "-o", f"ControlPath={tmp_path / 'cm'}/%C-{who}", "-o", "ControlPersist=60",
        "-p", "2222", "--", "gridx@10.0.0.1", "jobs list",
    ]
    # no value there begins with '-' unless gridx put it (the host is after --)
    assert all(not w.startswith("-") or w in ("-o", "-i", "-p", "--") for w in argv[1::2])
    # another member's key on the same machine never shares her connection
    monkeypatch.setenv("GRIDX_SSH_KEY", "~/.ssh/gridx-bob")
    other = gridx.serve_ssh_argv("ssh://gridx@10.0.0.1:2222", ["jobs", "list"], control=str(tmp_path / "cm"))
    assert [w for w in other if w.startswith("ControlPath=")] != [w for w in argv if w.startswith("ControlPath=")]


def test_ssh_control_dir_is_private(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = gridx.ssh_control_dir()
    assert folder == str(tmp_path / ".gridx" / "ssh")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    monkeypatch.setenv("HOME", str(tmp_path / "with space"))
    assert gridx.ssh_control_dir() is None


def test_root_keeps_docker_over_ssh(monkeypatch):
    monkeypatch.setattr(gridx, "start", lambda *a, **kw: pytest.fail("ssh to serve for root"))
    assert gridx.forward_to_serve("ssh://root@10.0.0.1") is None
    assert gridx.forward_to_serve("ssh://10.0.0.1") is None


def test_a_user_forwards_and_passes_the_exit_status(monkeypatch):
    started = []

    class Process:
        class stdin:  # noqa: N801 - stands in for a pipe
            written = []

            @classmethod
            def write(cls, data):
                cls.written.append(data)

            @staticmethod
            def flush():
                pass

        @staticmethod
        def wait():
            return 3

    monkeypatch.setattr(gridx, "check_manager_reachable", lambda host: None)
    monkeypatch.setattr(gridx, "need", lambda *tools: None)
    monkeypatch.setattr(gridx, "start", lambda argv, **kw: started.append((argv, kw)) or Process())
    monkeypatch.setattr(gridx, "INVOCATION", ["jobs", "run", "python:3.11", "exit 3", "--manager", "gridx@h"])
    with pytest.raises(gridx.ForwardedExit) as done:
        gridx.forward_to_serve("ssh://gridx@10.0.0.1")
    assert done.value.code == 3
    assert started[0][0][-2:] == ["gridx@10.0.0.1", "jobs run python:3.11 'exit 3'"]
    assert started[0][1]["stdin"] == subprocess.PIPE
    assert Process.stdin.written == [gridx.SESSION_HELLO]


def test_ssh_failure_is_exit_3(monkeypatch):
    class Process:
        class stdin:  # noqa: N801
            write = flush = staticmethod(lambda *a: None)

        wait = staticmethod(lambda: 255)

    monkeypatch.setattr(gridx, "check_manager_reachable", lambda host: None)
    monkeypatch.setattr(gridx, "need", lambda *tools: None)
    monkeypatch.setattr(gridx, "start", lambda argv, **kw: Process())
    with pytest.raises(gridx.GridxError) as error:
        gridx.forward_to_serve("ssh://gridx@10.0.0.1")
    assert error.value.code == 3


def test_client_validates_before_it_connects(tmp_path):
    """Bad input is exit 2 on the user's machine: nothing is sent."""
    env = dict(os.environ, GRIDX_MANAGER="gridx@192.0.2.1", PATH=str(tmp_path))  # no ssh on PATH
    for args in (["jobs", "run", "UPPER/Case"], ["jobs", "run", "--cpus", "0", "python:3.11"],
                 ["jobs", "list", "--user", "-x"], ["jobs", "delete", "a/b"]):
        result = subprocess.run(gridx_argv(*args), capture_output=True, text=True, env=env)
        assert result.returncode == 2, (args, result.stderr)


# -- limits and owners -------------------------------------------------------------

def service(name, owner, cpu=1, mem=1024, gpu=0, replicas=1, batch=True):
    mode = {"ReplicatedJob": {"TotalCompletions": replicas}} if batch else {"Replicated": {"Replicas": replicas}}
    generic = [{"DiscreteResourceSpec": {"Kind": kind, "Value": value}}
               for kind, value in (("gridx_cpu", cpu), ("gridx_mem", mem), ("NVIDIA-GPU", gpu)) if value]
    labels = {"gridx.job": name}
    if owner:
        labels["gridx.owner"] = owner
    return {"Spec": {"Name": name, "Labels": labels, "Mode": mode,
                     "TaskTemplate": {"Resources": {"Reservations": {"GenericResources": generic}}}}}


def task(service_name, state, desired="running"):
    return gridx.Task(service=service_name, state=state, desired=desired)


def test_use_counts_running_and_pending_tasks_not_finished_ones():
    services = [service("a1", "alice", cpu=2, gpu=1), service("a2", "alice", cpu=4, replicas=2),
                service("a3", "alice", cpu=8), service("b1", "bob", cpu=1), service("old", None, cpu=1),
                service("new", "alice", cpu=1, replicas=3)]
    tasks = [task("a1", "running"), task("a2", "running"), task("a2", "pending"), task("a3", "complete", "shutdown"),
             task("b1", "failed", "shutdown"), task("old", "running")]
    use = gridx.use_by_owner(services, tasks)
    # a1 2 CPUs + a2 two tasks of 4 + "new" (no tasks yet: all 3 replicas)
    assert use["alice"] == {"cpus": 2 + 8 + 3, "memory_mib": 1024 * 6, "gpus": 1, "jobs": 3}
    assert "bob" not in use
    assert use["root"]["jobs"] == 1  # a job made before owners is the admin's


@pytest.mark.parametrize("use,limits,asks,expected", [
    ({"cpus": 6, "memory_mib": 0, "gpus": 0, "jobs": 2}, {"cpus": 8}, {"cpus": 4, "memory_mib": 1024, "gpus": 0,
                                                                     "jobs": 1},
     "alice uses 6 of 8 CPUs; this job asks 4"),
    ({"cpus": 6, "memory_mib": 0, "gpus": 0, "jobs": 2}, {"cpus": 8}, {"cpus": 2, "memory_mib": 1024, "gpus": 0,
                                                                     "jobs": 1}, None),
    ({"cpus": 0, "memory_mib": 0, "gpus": 1, "jobs": 1}, {"gpus": 1}, {"cpus": 1, "memory_mib": 1024, "gpus": 1,
                                                                     "jobs": 1},
     "alice uses 1 of 1 GPUs; this job asks 1"),
    ({"cpus": 0, "memory_mib": 0, "gpus": 0, "jobs": 0}, {"gpus": 1}, {"cpus": 1, "memory_mib": 1024, "gpus": 2,
                                                                     "jobs": 1},
     "alice uses 0 of 1 GPUs; this job asks 2"),
    ({"cpus": 0, "memory_mib": 6144, "gpus": 0, "jobs": 1}, {"memory_mib": 8192},
     {"cpus": 1, "memory_mib": 4096, "gpus": 0, "jobs": 1}, "alice uses 6G of 8G memory; this job asks 4G"),
    ({"cpus": 0, "memory_mib": 0, "gpus": 0, "jobs": 3}, {"jobs": 3}, {"cpus": 1, "memory_mib": 1, "gpus": 0,
                                                                     "jobs": 1},
     "alice has 3 of 3 jobs unfinished; this job would be one more"),
    ({"cpus": 100, "memory_mib": 0, "gpus": 9, "jobs": 50}, {"cpus": None, "gpus": None},
     {"cpus": 1, "memory_mib": 1, "gpus": 1, "jobs": 1}, None),
    ({"cpus": 0, "memory_mib": 0, "gpus": 0, "jobs": 0}, {"gpus": 0}, {"cpus": 1, "memory_mib": 1, "gpus": 0,
                                                                     "jobs": 1}, None),
])
def test_limit_arithmetic(use, limits, asks, expected):
    assert gridx.limit_refusal("alice", use, limits, asks) == expected


def test_submit_past_a_limit_is_exit_2_before_docker_creates_anything(tmp_path, monkeypatch):
    home = tmp_path / "users"
    home.mkdir()
    (home / "users.json").write_text("{}")
    (home / "users.lock").write_text("")
    monkeypatch.setenv("GRIDX_USERS_HOME", str(home))
    monkeypatch.setattr(gridx, "OWNER", "alice")
    monkeypatch.setattr(gridx, "SERVE_LIMITS", {"cpus": None, "memory_mib": None, "gpus": 1, "jobs": None})
    monkeypatch.setattr(gridx, "jobs_overview", lambda: ([service("a1", "alice", gpu=1)], [task("a1", "running")],
                                                          [], []))
    created = []
    monkeypatch.setattr(gridx, "run_naming", lambda argv, job_id, input=None: created.append(argv))
    with pytest.raises(gridx.GridxError) as error:
        gridx.create_job("job-x", "python:3.11", gridx.JobRequest("1", "1G", "1"), kind="run", command_argv=[],
                         command_text="", mode="replicated-job", replicas=1)
    assert error.value.code == 2 and error.value.message == "alice uses 1 of 1 GPUs; this job asks 1"
    assert created == []
    gridx.create_job("job-y", "python:3.11", gridx.JobRequest("1", "1G", "0"), kind="run", command_argv=[],
                     command_text="", mode="replicated-job", replicas=1)
    assert "--label=gridx.owner=alice" in created[0]


def test_jobs_carry_their_owner(monkeypatch):
    monkeypatch.setattr(gridx, "OWNER", None)
    monkeypatch.setattr(gridx, "DOCKER_HOST", None)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert "--label=gridx.owner=root" in gridx.job_labels("j", "run", "")
    monkeypatch.setattr(gridx, "OWNER", "alice")
    assert "--label=gridx.owner=alice" in gridx.job_labels("j", "run", "")


def test_a_user_acts_only_on_their_own_jobs(monkeypatch):
    monkeypatch.setattr(gridx, "OWNER", "alice")
    gridx.check_owner([service("a1", "alice")], "delete")
    with pytest.raises(gridx.GridxError) as error:
        gridx.check_owner([service("a1", "alice"), service("b1", "bob")], "delete")
    assert error.value.code == 2 and error.value.message == "job b1 is bob's: alice can delete only their own jobs"
    with pytest.raises(gridx.GridxError):
        gridx.check_owner([service("old", None)], "read the logs of")
    monkeypatch.setattr(gridx, "OWNER", None)  # root on the hub: the admin
    gridx.check_owner([service("b1", "bob")], "delete")


def test_list_filters(monkeypatch):
    import argparse

    jobs = [{"id": "a", "owner": "alice"}, {"id": "b", "owner": "bob"}, {"id": "r", "owner": "root"}]
    monkeypatch.setattr(gridx, "OWNER", "bob")
    assert [j["id"] for j in gridx.filter_jobs(jobs, argparse.Namespace(mine=True, user=None))] == ["b"]
    assert [j["id"] for j in gridx.filter_jobs(jobs, argparse.Namespace(mine=False, user="alice"))] == ["a"]
    assert [j["id"] for j in gridx.filter_jobs(jobs, argparse.Namespace(mine=False, user=None))] == ["a", "b", "r"]


@pytest.mark.parametrize("value,key,expected", [
    ("8", "cpus", 8), ("0", "gpus", 0), ("none", "gpus", None), ("None", "jobs", None), ("default", "cpus", ...),
    ("16G", "memory_mib", 16384), ("512M", "memory_mib", 512),
])
def test_parse_limit(value, key, expected):
    assert gridx.parse_limit(value, key) is expected if expected in (None, ...) else \
        gridx.parse_limit(value, key) == expected


@pytest.mark.parametrize("value,key", [("-1", "cpus"), ("1.5", "gpus"), ("8X", "memory_mib"), ("", "jobs"),
                                       ("-x", "cpus")])
def test_bad_limit_is_exit_2(value, key):
    with pytest.raises(gridx.GridxError) as error:
        gridx.parse_limit(value, key)
    assert error.value.code == 2


# -- keys and authorized_keys ------------------------------------------------------

def test_authorized_keys_line_forces_serve_and_restricts():
    line = gridx.authorized_keys_line("alice", ssh_key(), "/usr/bin/python3 /opt/gridx/gridx.py")
    assert line == (f'command="/usr/bin/python3 /opt/gridx/gridx.py serve alice",restrict {ssh_key()} '
                    "gridx-user-alice")
    assert ",pty" not in line


@pytest.mark.parametrize("program", ['/opt/a"b/gridx', "/opt/a\\b/gridx", "/opt/a\nb"])
def test_authorized_keys_refuses_a_program_path_it_cannot_quote(program):
    with pytest.raises(gridx.GridxError):
        gridx.authorized_keys_line("alice", ssh_key(), program)


def test_user_ssh_key_keeps_type_and_key_only():
    assert gridx.valid_user_ssh_key(ssh_key() + " alice@laptop\n") == ssh_key()
    assert gridx.valid_user_ssh_key(ssh_key(kind="ssh-rsa")) == ssh_key(kind="ssh-rsa")


@pytest.mark.parametrize("value", [
    'command="sh" ' + ssh_key(),                      # an option before the key
    ssh_key() + "\ncommand=\"sh\" " + ssh_key(2),     # a second line
    "ssh-ed25519 " + base64.b64encode(b"junk" * 10).decode(),
    "ssh-rsa " + ssh_key().split()[1],                 # the blob says ed25519
    "-oProxyCommand=sh",
    KEY_A,                                             # a WireGuard key
    "",
])
def test_bad_ssh_keys_are_exit_2(value):
    with pytest.raises(gridx.GridxError) as error:
        gridx.valid_user_ssh_key(value)
    assert error.value.code == 2


def test_own_program_is_the_installed_command_that_imported_gridx(tmp_path, monkeypatch):
    """serve and hub watch run as the command that imported gridx (its
    bytecode cached), else as python3 and gridx.py (compiled at each start)."""
    launcher = tmp_path / "bin" / "gridx"
    launcher.parent.mkdir()
    launcher.write_text("#!/usr/bin/python3\nimport gridx\n")
    launcher.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(launcher), "hub", "add-user", "alice"])
    assert gridx.own_program() == str(launcher)
    script = f"{shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(gridx.__file__))}"
    for argv0 in (str(tmp_path / "gridx.py"), "-c", "", str(tmp_path / "bin" / "gridx-other")):
        monkeypatch.setattr(sys, "argv", [argv0])
        assert gridx.own_program() == script, argv0
    launcher.chmod(0o644)  # a file named gridx that cannot run is not the command
    monkeypatch.setattr(sys, "argv", [str(launcher)])
    assert gridx.own_program() == script


def test_authorized_keys_and_limits_files(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_USERS_HOME", str(tmp_path / "lib" / "users"))
    monkeypatch.setattr(gridx, "own_program", lambda: "/usr/local/bin/gridx")
    config = make_config(peers=W1, users=[("alice", {"gpus": 1}), ("bob", {})])
    config.user_defaults = {"cpus": 4}
    gridx.write_user_access(config)
    keys = (tmp_path / "lib" / "users" / ".ssh" / "authorized_keys").read_text().splitlines()
    assert [line for line in keys if not line.startswith("#")] == [
        f'command="/usr/local/bin/gridx serve alice",restrict {ssh_key(1)} gridx-user-alice',
        f'command="/usr/local/bin/gridx serve bob",restrict {ssh_key(2)} gridx-user-bob',
    ]
    for path, mode in ((".ssh/authorized_keys", 0o644), ("users.json", 0o644), (".ssh", 0o755), ("", 0o755)):
        assert stat.S_IMODE(os.stat(tmp_path / "lib" / "users" / path).st_mode) == mode, path
    limits = json.loads((tmp_path / "lib" / "users" / "users.json").read_text())["users"]
    stored = {key: gridx.STORE_DEFAULTS[key] for key in gridx.STORE_LIMITS}  # what jobs put on the hub: bounded
    assert limits == {"alice": {"cpus": 4, "memory_mib": None, "gpus": 1, "jobs": None, **stored},
                      "bob": {"cpus": 4, "memory_mib": None, "gpus": None, "jobs": None, **stored}}


# -- the hub config, addresses, the VPN and the firewall ---------------------------------

def test_config_round_trip_with_users(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(tmp_path))
    config = make_config(peers=W1, users=[("alice", {"gpus": 1, "cpus": None})])
    config.user_defaults = {"jobs": 3}
    gridx.save_hub_config(config)
    loaded = gridx.load_hub_config()
    assert loaded.to_dict() == config.to_dict()
    assert loaded.users["alice"].limits == {"gpus": 1, "cpus": None}


@pytest.mark.parametrize("damage", [
    lambda d: d["users"]["alice"].update(ip="10.0.0.2"),           # a peer's address
    lambda d: d["users"]["alice"].update(ssh_key='command="sh" x'),
    lambda d: d["users"]["alice"].update(limits={"cpus": -1}),
    lambda d: d["users"]["alice"].update(name="bob"),
    lambda d: d.update(users=[]),
    lambda d: d.update(user_defaults={"nope": 1}),
])
def test_damaged_users_are_one_clear_error(damage, tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(tmp_path))
    document = make_config(peers=W1, users=[("alice", {})]).to_dict()
    damage(document)
    (tmp_path / "hub_config.json").write_text(json.dumps(document))
    with pytest.raises(gridx.GridxError) as error:
        gridx.load_hub_config()
    assert error.value.code == 1 and "is damaged" in error.value.message


def test_peers_and_users_share_the_subnet():
    config = make_config(peers=W1, users=[("alice", {})])  # w1 .2, alice .10
    assert gridx.allocate_ip(config) == "10.0.0.3"
    config.users["bob"] = gridx.User("bob", "10.0.0.3", KEY_B, ssh_key(3))
    assert gridx.allocate_ip(config) == "10.0.0.4"
    with pytest.raises(gridx.GridxError) as error:
        gridx.allocate_ip(config, "10.0.0.10")
    assert "alice" in error.value.message


def test_names_and_keys_are_not_shared_by_peers_and_users():
    config = make_config(peers=W1, users=[("alice", {})])
    for name, key in (("alice", None), ("w1", None), ("carol", KEY_B), ("carol", KEY_C)):
        with pytest.raises(gridx.GridxError) as error:
            gridx.refuse_taken_name(config, name, key)
        assert error.value.code == 2
    gridx.refuse_taken_name(config, "carol", KEY_A[:-2] + "Q=")


def test_hub_wg_conf_has_users_and_user_conf_routes_the_hub_only():
    config = make_config(peers=W1, users=[("alice", {})])
    hub_conf = gridx.render_hub_wg_conf(config, KEY_A)
    assert f"# user alice\n[Peer]\nPublicKey = {KEY_C}\nAllowedIPs = 10.0.0.10/32" in hub_conf
    user_conf = gridx.render_user_wg_conf(config, config.users["alice"], None)
    assert "Address = 10.0.0.10/32" in user_conf and "AllowedIPs = 10.0.0.1/32" in user_conf
    assert gridx.PRIVATE_KEY_PLACEHOLDER in user_conf


def test_firewall_lets_a_user_reach_the_hubs_ssh_only():
    rules = gridx.firewall_rules(make_config(peers=W1, users=[("alice", {})])).splitlines()
    mine = [r for r in rules if "GRIDX-USERS" in r]
    assert mine == [
        ":GRIDX-USERS - [0:0]",
        "-A GRIDX-USERS -s 10.0.0.10/32 -d 10.0.0.1/32 -p tcp --dport 22 -j RETURN",
        "-A GRIDX-USERS -s 10.0.0.10/32 -d 10.0.0.1/32 -p icmp -j RETURN",
        "-A GRIDX-USERS -s 10.0.0.10/32 -j DROP",
        "-A GRIDX-INPUT -j GRIDX-USERS",
    ]
    # the users' chain comes before the rule that lets the VPN in
    assert rules.index("-A GRIDX-INPUT -j GRIDX-USERS") < rules.index("-A GRIDX-INPUT -i gridx0 -j RETURN")
    assert "iptables -I FORWARD 1 -j GRIDX-USERS" in gridx.firewall_postup(make_config(peers=W1))


# -- the user bundle -----------------------------------------------------------------

def test_user_bundle_files_and_modes(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(tmp_path / "cfg"))
    config = make_config(peers=W1, users=[("alice", {"gpus": 1})])
    user = config.users["alice"]
    files = gridx.user_bundle_files(config, user, KEY_B, "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n",
                                    "10.0.0.1 ssh-ed25519 AAAAhost")
    folder = gridx.user_bundle_path("alice")
    gridx.write_bundle(folder, files)
    assert folder.endswith("/gridx-alice-user")
    modes = {name: stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) for name in os.listdir(folder)}
    assert modes == {"gridx-user.conf": 0o600, "id_ed25519": 0o600, "id_ed25519.pub": 0o644,
                     "known_hosts": 0o644, "settings.env": 0o644, "README.txt": 0o644}
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert os.path.isfile(folder + ".tar.gz")
    settings = open(os.path.join(folder, "settings.env")).read()
    assert "GRIDX_MANAGER='gridx@10.0.0.1'" in settings and "GRIDX_SSH_KEY='~/.ssh/gridx-alice'" in settings
    assert "join.sh" not in settings
    readme = open(os.path.join(folder, "README.txt")).read()
    assert "wg-quick up gridx-user" in readme and "--manager gridx@10.0.0.1" in readme
    assert "gpus 1" in readme
    assert open(os.path.join(folder, "known_hosts")).read() == "10.0.0.1 ssh-ed25519 AAAAhost\n"
    assert f"PrivateKey = {KEY_B}" in open(os.path.join(folder, "gridx-user.conf")).read()


def test_user_bundle_with_the_users_own_keys_holds_no_private_key(tmp_path):
    config = make_config(peers=W1, users=[("alice", {})])
    files = gridx.user_bundle_files(config, config.users["alice"], None, None, "10.0.0.1 ssh-ed25519 AAAA")
    assert "id_ed25519" not in files and "GRIDX_SSH_KEY" not in files["settings.env"][0]
    assert gridx.PRIVATE_KEY_PLACEHOLDER in files["gridx-user.conf"][0]


# -- the CLI: bad input first ------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["hub", "add-user", "Alice"],
    ["hub", "add-user", "a/b"],
    ["hub", "add-user", "alice\n"],
    *[["hub", "add-user", name] for name in ("root", "gridx", "hub", "admin", "docker")],
    ["hub", "add-user", "alice", "--pubkey", "nope"],
    ["hub", "add-user", "alice", "--pubkey", 'command="sh" ' + ssh_key()],
    ["hub", "add-user", "alice", "--wg-pubkey", "short"],
    ["hub", "add-user", "alice", "--max-cpus", "-1"],
    ["hub", "add-user", "alice", "--max-memory", "8X"],
    ["hub", "set-user", "alice"],
    ["hub", "set-user", "alice", "--max-gpus", "two"],
    ["hub", "set-defaults"],
    ["hub", "set-defaults", "--max-jobs", "default"],
    ["hub", "remove-user", "--", "-x"],
])
def test_bad_input_is_exit_2_before_root_or_config(args, tmp_path):
    """As a user that is not root would run them, on a machine with no hub:
    exit 2 (not 3), nothing written."""
    env = dict(os.environ, GRIDX_CONFIG_DIR=str(tmp_path / "cfg"), GRIDX_USERS_HOME=str(tmp_path / "home"))
    result = subprocess.run(gridx_argv(*args), capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "cfg").exists() and not (tmp_path / "home").exists()


# -- names: a member never reads as the admin, the hub or its accounts (issue 19) ----------


def test_a_user_named_like_an_account_of_the_hub_is_refused_and_nothing_changes(tmp_path, monkeypatch, capsys):
    tools = fake_hub(tmp_path, monkeypatch)
    before = tree(tmp_path / "cfg")
    assert run_main(["hub", "add-user", "bin"]) == 2  # an account on this machine (Debian has bin)
    assert "an account on the hub" in capsys.readouterr().err
    assert tree(tmp_path / "cfg") == before
    assert not [argv for argv in tools.calls if argv[:2] in (["wg", "set"], ["useradd", "--system"])]


def test_a_reserved_name_never_logs_in(monkeypatch, serve_env, capsys):
    """An older hub's user named root: serve refuses it, its key leaves authorized_keys."""
    monkeypatch.setenv("SSH_ORIGINAL_COMMAND", "jobs delete adminjob")
    assert run_main(["serve", "root"]) == 2 and serve_env == []
    assert "reserved" in capsys.readouterr().err
    config = make_config(peers=W1, users=[("root", {}), ("alice", {})])
    keys = gridx.render_authorized_keys(config, "/usr/local/bin/gridx")
    assert "serve alice" in keys and "serve root" not in keys


def test_the_limit_check_locks_a_file_that_is_never_replaced(tmp_path, monkeypatch):
    """users.json is replaced atomically by every add-user/set-user: two
    submissions at once must lock the same file, users.lock (issue 19)."""
    monkeypatch.setenv("GRIDX_USERS_HOME", str(tmp_path / "users"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # no chown to root here
    config = make_config(peers=W1, users=[("alice", {"gpus": 1})])
    gridx.write_user_access(config)
    lock = tmp_path / "users" / "users.lock"
    inode = lock.stat().st_ino
    gridx.write_user_access(config)
    assert lock.stat().st_ino == inode and stat.S_IMODE(lock.stat().st_mode) == 0o644
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **kw: opened.append(path) or real_open(path, *a, **kw))
    monkeypatch.setattr(gridx, "OWNER", "alice")
    monkeypatch.setattr(gridx, "SERVE_LIMITS", {"cpus": None, "memory_mib": None, "gpus": 1, "jobs": None})
    monkeypatch.setattr(gridx, "jobs_overview", lambda: ([], [], [], []))
    with gridx.user_limits_checked(gridx.JobRequest("1", "1G", "1"), 1):
        pass
    assert opened == [str(lock)]
