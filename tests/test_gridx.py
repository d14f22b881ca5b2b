"""Black-box tests of gridx.py run as a process (exit codes, help, bad input
before anything runs), and every command's values kept out of other
programs' options."""

import functools
import os
import subprocess
import sys

import pytest
from fakes import (
    JUPYTER_SERVICE,
    FakeEngine,
    cli,
    fake_hub,
    gridx_argv,
    run_main,
    tree,
)

import gridx

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
    """No socket, or a socket nobody listens on: what the docker CLI's
    "Cannot connect to the Docker daemon" gives (exit 3, one line)."""
    import socket

    dead = tmp_path / "dead.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(dead))
    listener.close()  # the file stays, nothing listens: refused
    for path in (tmp_path / "none.sock", dead):
        result = cli("jobs", "list", env={"DOCKER_HOST": f"unix://{path}"})
        assert result.returncode == 3 and "Docker is not running" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_no_access_to_the_docker_socket_is_exit_3(gridx_for_others):
    if os.geteuid() != 0:
        pytest.skip("drops to another user: needs root")
    engine = FakeEngine().start()
    os.chmod(engine.folder, 0o755)
    os.chmod(engine.path, 0o600)  # root's, as /var/run/docker.sock is root:docker 0660
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             sys.executable, gridx_for_others, "jobs", "list"],
                            capture_output=True, text=True, env=dict(os.environ, DOCKER_HOST=engine.host))
    assert result.returncode == 3 and "Docker socket" in result.stderr and "hint: " in result.stderr, result.stderr
    assert engine.requests == []


def test_an_engine_that_is_not_a_swarm_manager_is_exit_3():
    engine = FakeEngine().start()
    engine.fail = (503, 'This node is not a swarm manager. Use "docker swarm init" or "docker swarm join" to '
                        "connect this node to swarm and try again.")
    for argv in (["jobs", "list"], ["cluster"], ["jobs", "status", "job-1"]):
        result = cli(*argv, env={"DOCKER_HOST": engine.host})
        assert result.returncode == 3 and "not a swarm manager" in result.stderr and "GRIDX_MANAGER" in result.stderr


def test_an_engine_older_than_docker_20_10_is_exit_3():
    engine = FakeEngine(version="1.40").start()
    result = cli("jobs", "list", env={"DOCKER_HOST": engine.host})
    assert result.returncode == 3 and "1.40" in result.stderr and "1.41" in result.stderr
    assert engine.paths() == ["/_ping"]


def test_docker_host_other_than_a_unix_socket_or_ssh_is_exit_3():
    result = cli("jobs", "list", env={"DOCKER_HOST": "tcp://127.0.0.1:2375"})
    assert result.returncode == 3 and "DOCKER_HOST=tcp://127.0.0.1:2375" in result.stderr


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
    ("hub", "allow-jobs"): ([], {"entries": ["10.0.0.9:tcp/80"]}),
    ("hub", "reset"): (["--yes"], {}),
    ("worker", "join"): (["--wg-config=w.conf", "--token=SWMTKN-1-abc123-def456"], {}),
    ("jobs", "run"): ([], {"image": ["python:3.11"], "command": ["true"]}),
    ("jobs", "jupyter"): (["--timeout=5"], {}),
    ("jobs", "train"): (["--framework=pytorch"], {"script": ["train.py"]}),
    ("jobs", "status"): ([], {"job_id": ["job-1"]}),
    ("jobs", "logs"): ([], {"job_id": ["job-1"]}),
    ("jobs", "delete"): ([], {"job_ids": ["job-1"]}),
    ("jobs", "results"): (["--json"], {"job_id": ["job-out"]}),
    ("jobs", "forward"): ([], {"job_id": ["jupyter-1"], "local": ["127.0.0.1:0"]}),
    ("jobs", "connect"): (["--probe"], {"job_id": ["jupyter-1"]}),
    ("hub", "add-user"): ([], {"name": ["u2"]}),
    ("hub", "set-user"): (["--max-cpus=4"], {"name": ["u1"]}),
    ("hub", "set-defaults"): (["--max-cpus=4"], {}),
    ("hub", "remove-user"): ([], {"name": ["u1"]}),
    ("image", "push"): ([], {"image": ["team/app:1"]}),
    ("image", "rm"): ([], {"name": ["team/app:1"]}),
}


# A command run first (its calls forgotten) for the state a command needs.
ARGV_SETUP = {("hub", "set-user"): ["hub", "add-user", "u1"], ("hub", "remove-user"): ["hub", "add-user", "u1"]}


def prepare(group, name, tools, monkeypatch):
    if (group, name) in ARGV_SETUP:
        assert run_main(ARGV_SETUP[(group, name)]) == 0
        tools.calls.clear()
    if (group, name) in (("jobs", "forward"), ("jobs", "connect")):
        tools.engine.services.append(JUPYTER_SERVICE)  # a job that publishes a port
    if (group, name) == ("jobs", "forward"):
        monkeypatch.setattr(gridx.Forward, "run", lambda self: self.listener.close())  # it would relay until Ctrl-C


@functools.lru_cache(maxsize=None)
def subcommand_parsers():
    """(group, command, its argparse parser) for every command of COMMANDS
    and the cluster shortcut. Built once: the tests only read them, and
    each of the 200 option cases looks one up."""
    import argparse

    found = []
    shortcuts = [(group, (None, None, {None: None})) for group in ("cluster", "usage")]
    for group, (_, _, commands) in list(gridx.COMMANDS.items()) + shortcuts:
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
    prepare(group, name, tools, monkeypatch)
    code = run_main(argv_for(group, name, sub))
    if (group, name) == ("worker", "setup"):
        assert code == 2  # needs a terminal: refused before anything runs
        return
    # hub status: exit 1, its peers never shook hands
    assert code == (1 if (group, name) == ("hub", "status") else 0), \
        f"gridx {group} {name} exits {code}: give it valid values in ARGV_BASE (or ARGV_SETUP)"
    assert tools.calls or tools.engine.requests or (group, name) in (
        ("hub", "ssh-pubkey"), ("hub", "set-defaults"), ("hub", "set-user"), ("jobs", "usage"), ("usage", None)), \
        (group, name)  # those run no other program (list, status, cluster read the Engine API only; usage the ledger)


@pytest.mark.parametrize("group,name,dest,bad", value_actions())
def test_no_user_value_reaches_an_argv_as_an_option(group, name, dest, bad, tmp_path, monkeypatch, capsys):
    """Each option and positional of each command, given a value that begins
    with '-': exit 2 with nothing run and nothing changed, or every argv
    element gridx built that begins with '-' (before a `--`) is its own."""
    tools = fake_hub(tmp_path, monkeypatch)
    sub = next(s for g, n, s in subcommand_parsers() if (g, n) == (group, name))
    action = next(a for a in sub._actions if a.dest == dest)
    prepare(group, name, tools, monkeypatch)
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
    result = subprocess.run(gridx_argv(*argv), capture_output=True, text=True, cwd=tmp_path,
                            env=dict(os.environ, PATH=str(tmp_path), GRIDX_CONFIG_DIR=str(tmp_path / "cfg")))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: invalid") and result.stderr.count("\n") == 2, result.stderr
