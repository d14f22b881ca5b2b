"""Users (issue 13) end to end: a person who submits jobs from their own
machine without being root anywhere.

A user container (the lab's node image, like the fresh node: not a worker,
no Python, and here no docker CLI either) is set up only from its user
bundle (copied in, its README's steps) and the static binary dist/gridx
(copied in; `make binary` builds it: the test fails, not skips, without it).
It runs `gridx jobs run --wait … --manager gridx@10.0.0.1` and sees the
output and the exit status; a shell, a port forward and an agent forward
through the gridx account are refused; it cannot delete another user's job;
a job past its GPU limit (worker3's made-up GPUs) is refused with one line;
Ctrl-C stops the command on the hub; after remove-user a new SSH connection
is refused and the VPN peer is gone within a second.
"""

import json
import re
import shlex
import subprocess
import time

import pytest
from e2e_helpers import (
    ALICE,
    BOB,
    MANAGER,
    USER_NODE,
    as_user,
    container,
    hub,
    hub_sh,
    node_exec,
    ok,
    serve_pids,
    settings,
    ssh_as,
    wait_until,
)


def test_user_bundle_holds_what_the_readme_says(user_node):
    listing = ok(node_exec(USER_NODE, f"cd /root/gridx-{ALICE}-user && stat -c '%a %n' . * | sort -k2"), "ls")
    assert listing.split("\n")[0] == "700 ."
    modes = dict(reversed(line.split()) for line in listing.strip().splitlines()[1:])
    assert modes == {"README.txt": "644", "gridx-user.conf": "600", "id_ed25519": "600", "id_ed25519.pub": "644",
                     "known_hosts": "644", "settings.env": "644"}
    assert ok(node_exec(USER_NODE, f"cat /root/gridx-{ALICE}-user/known_hosts"), "known_hosts").startswith(
        "10.0.0.1 ssh-ed25519 ")
    bob = ok(node_exec(USER_NODE, f"ls /root/gridx-{BOB}-user"), "bob's bundle").split()
    assert "id_ed25519" not in bob  # --pubkey: no private key on the hub
    assert hub_sh(f"grep -rl 'PRIVATE KEY' /etc/gridx/bundles/gridx-{BOB}-user || true").stdout.strip() == ""
    keys = ok(hub_sh("stat -c '%U %a' /var/lib/gridx/users /var/lib/gridx/users/.ssh "
                     "/var/lib/gridx/users/.ssh/authorized_keys"), "stat")
    assert keys.split("\n")[:3] == ["root 755", "root 755", "root 644"]


def test_a_user_runs_a_job_and_sees_its_output_and_exit_status(user_node):
    proc = as_user(f"gridx jobs run --wait python:3.11 'sleep 1; echo from-the-user; exit 3' --manager {MANAGER}")
    assert proc.returncode == 3, proc.stderr
    assert "from-the-user" in proc.stdout
    # gridx's progress comes through on stderr (the job sleeps: a poll sees it run)
    assert "running on" in proc.stderr
    listed = json.loads(ok(as_user("gridx jobs list --mine --json"), "jobs list --mine (settings.env)"))
    mine = [job for job in listed["jobs"] if job["command"] == "sleep 1; echo from-the-user; exit 3"]
    assert mine and mine[0]["owner"] == ALICE and mine[0]["exit_code"] == 3
    table = ok(as_user("gridx jobs list"), "jobs list")
    assert re.search(rf"^{mine[0]['id']}\s+{ALICE}\s", table, re.M), table
    # --json passes through as it is; a bad value is exit 2 on the user's side
    assert json.loads(ok(as_user("gridx cluster --json"), "cluster --json"))["nodes"]
    bad = as_user("gridx jobs run UPPER/Case true")
    assert bad.returncode == 2 and "invalid image" in bad.stderr


def test_logs_follow_streams_through_serve(user_node):
    job = ok(as_user("gridx jobs run python:3.11 'for i in 1 2 3; do echo line$i; sleep 1; done'"), "job").strip()
    follow = subprocess.Popen(["docker", "exec", container(USER_NODE), "bash", "-c",
                               settings(ALICE) + f"gridx jobs logs -f {job}"], stdout=subprocess.PIPE, text=True)
    try:
        first = follow.stdout.readline()
        seen_first = time.monotonic()
        rest = follow.stdout.read()
        follow.wait(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
        hub("jobs", "delete", job)
    assert follow.returncode == 0
    assert (first + rest).split() == ["line1", "line2", "line3"]
    assert time.monotonic() - seen_first > 1.0  # the first line came while the job still ran


@pytest.mark.parametrize("command", ["sh", "bash -i", "/bin/sh -c id", "hub add-peer x", "jobs list; sh",
                                     "jobs run --manager root@10.0.0.1 python:3.11 true"])
def test_no_shell_nor_other_commands_through_the_gridx_account(user_node, command):
    proc = ssh_as(ALICE, *shlex.split(command) if command in ("sh", "bash -i") else [command])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "not allowed" in proc.stderr or "invalid choice" in proc.stderr
    assert proc.stdout == ""


def test_no_port_forward_and_no_agent_forward(user_node):
    # -L to the hub's own SSH port: the forward is refused (no banner comes)
    forward = ("ssh -o BatchMode=yes -i /root/.ssh/gridx-e2e-alice -N -L 127.0.0.1:12222:127.0.0.1:22 "
               f"{MANAGER} 2>/tmp/fw.err & sleep 2; "
               "timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/12222; head -c 7 <&3'; kill %1; cat /tmp/fw.err")
    proc = node_exec(USER_NODE, ["bash", "-c", forward])
    assert "SSH-2.0" not in proc.stdout
    assert "prohibited" in proc.stdout + proc.stderr
    # -A with an agent holding the key: the serve process on the hub has no agent socket
    agent = ("eval $(ssh-agent) >/dev/null; ssh-add -q /root/.ssh/gridx-e2e-alice; "
             f"ssh -A -o BatchMode=yes {MANAGER} \"jobs run --wait python:3.11 'sleep 6'\" >/dev/null 2>&1 & "
             "sleep 8; kill $SSH_AGENT_PID")
    runner = subprocess.Popen(["docker", "exec", container(USER_NODE), "bash", "-c", agent])
    try:
        pids = wait_until(lambda: serve_pids(ALICE), 10, "serve of the -A session")
        environ = ok(hub_sh(f"tr '\\0' '\\n' < /proc/{pids[-1]}/environ"), "serve's environment")
        assert "SSH_CONNECTION=" in environ  # it is the SSH session's process
        assert "SSH_AUTH_SOCK" not in environ
        assert hub_sh("find /tmp -maxdepth 1 -name 'ssh-*' -user gridx").stdout.strip() == ""
    finally:
        runner.wait(timeout=60)


def test_a_users_work_folder_goes_in_and_the_result_comes_back(user_node):
    """Issue 14 through the gridx account: a 50 MB folder goes in on serve's
    stdin (the hub's Docker builds the layer), the job's result comes back
    into ./JOB on the user's machine with the right checksum; bob cannot
    fetch it, and serve never writes into a folder of the hub's."""
    job = "e2e-alice-work"
    make = ("rm -rf /root/uw /root/us && mkdir -p /root/uw/data /root/us && "
            "head -c 50000000 /dev/urandom > /root/uw/data/in.bin && sha256sum < /root/uw/data/in.bin")
    expected = ok(node_exec(USER_NODE, ["bash", "-c", make]), "the user's folder").split()[0]
    try:
        proc = as_user(f"cd /root/us && gridx jobs run --workdir /root/uw --wait --name {job} python:3.11 "
                       "'mkdir -p out && sha256sum < data/in.bin > out/sum.txt && gzip -1 -c data/in.bin > out/in.gz'",
                       timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert "work folder: 47.7 MiB sent" in proc.stderr, proc.stderr
        check = f"cd /root/us/{job} && cat sum.txt && gunzip -c in.gz | sha256sum"
        back = ok(node_exec(USER_NODE, ["bash", "-c", check]), "the result on the user's machine").split()
        assert back[0] == expected and back[2] == expected, (back, expected)
        theirs = ssh_as(BOB, f"jobs results --tar -- {job}")
        assert theirs.returncode == 2 and f"is {ALICE}'s" in theirs.stderr, theirs.stderr
        into_hub = ssh_as(ALICE, f"jobs results {job} /root/gridx-pwned")
        assert into_hub.returncode == 2 and hub_sh("test -e /root/gridx-pwned").returncode != 0
        # her delete (serve, as the gridx account) takes the results on the hub too (filed by service ID)
        key = ok(hub_sh(f"docker service inspect --format '{{{{.ID}}}}' {job}"), "service ID").strip()
        assert hub_sh(f"test -e /var/lib/gridx/results/{key}.json").returncode == 0
        ok(as_user(f"gridx jobs delete {job}"), "alice deletes her job")
        assert hub_sh(f"ls -A /var/lib/gridx/results | grep -c {key} || true").stdout.strip() == "0"
    finally:
        hub("jobs", "delete", job)


def test_a_user_cannot_touch_another_users_job(user_node):
    job = ok(ssh_as(ALICE, "jobs run python:3.11 'sleep 60'"), "alice's job").strip()
    try:
        for action in (f"jobs delete {job}", f"jobs logs {job}"):
            proc = ssh_as(BOB, action)
            assert proc.returncode == 2, proc.stderr
            assert f"job {job} is {ALICE}'s" in proc.stderr, proc.stderr
        assert ok(ssh_as(BOB, f"jobs status {job} --json"), "bob sees it") and \
            json.loads(ok(hub("jobs", "status", job, "--json"), "status"))["owner"] == ALICE
        root_job = ok(hub("jobs", "run", "python:3.11", "sleep 60"), "root's job").strip()
        proc = as_user(f"gridx jobs delete {root_job}")
        assert proc.returncode == 2 and "is root's" in proc.stderr
        ok(hub("jobs", "delete", root_job), "root deletes its own")
        assert "deleted" in ok(as_user(f"gridx jobs delete {job}"), "alice deletes hers")
    finally:
        hub("jobs", "delete", job)


def test_a_job_past_the_gpu_limit_is_refused_with_one_line(user_node):
    first = ok(as_user(f"gridx jobs run --gpus 1 --name e2e-gpu1 python:3.11 'sleep 60' --manager {MANAGER}"),
               "a job with 1 GPU").strip()
    try:
        proc = as_user("gridx jobs run --gpus 1 python:3.11 true")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines()[0] == f"error: {ALICE} uses 1 of 1 GPUs; this job asks 1"
        assert [j["id"] for j in json.loads(ok(as_user("gridx jobs list --mine --json"), "list"))["jobs"]
                if j["state"] in ("pending", "starting", "running")] == [first]
        users = json.loads(ok(hub("hub", "list-users", "--json"), "list-users"))["users"]
        alice = next(u for u in users if u["name"] == ALICE)
        assert alice["limits"]["gpus"] == 1 and alice["use"]["gpus"] == 1 and alice["use"]["jobs"] == 1
        assert json.loads(ok(hub("cluster", "--json"), "cluster"))["users"][ALICE]["gpus"] == 1
    finally:
        hub("jobs", "delete", first)


def test_ctrl_c_stops_the_command_on_the_hub(user_node):
    assert serve_pids(ALICE) == []
    # the client in its own process group, as a terminal's foreground job
    script = (settings(ALICE) + "set -m; gridx jobs run --wait python:3.11 'sleep 60' >/tmp/cc.out 2>&1 & pid=$!; "
              "for i in $(seq 100); do grep -q 'running on' /tmp/cc.out && break; sleep 0.2; done; "
              "kill -INT -- -$pid; wait $pid; echo rc=$?")
    proc = node_exec(USER_NODE, ["bash", "-c", script], timeout=120)
    assert "rc=130" in proc.stdout, proc.stdout + proc.stderr
    ended = time.monotonic()
    wait_until(lambda: serve_pids(ALICE) == [], 5, "serve on the hub to stop after Ctrl-C", interval=0.1)
    print(f"serve on the hub gone {time.monotonic() - ended:.2f} s after the client ended")
    assert hub_sh("pgrep -u gridx -f 'service logs' || true").stdout.strip() == ""
    for job in json.loads(ok(hub("jobs", "list", "--user", ALICE, "--json"), "list"))["jobs"]:
        hub("jobs", "delete", job["id"])


def test_remove_user_takes_the_ssh_key_and_the_vpn_peer_away_at_once(user_node):
    # bob's SSH line: he reaches the hub through alice's tunnel (the VPN
    # address does not say who is who; the SSH key does)
    bobs = ok(ssh_as(BOB, "jobs run python:3.11 'sleep 60'"), "bob's job").strip()
    ok(hub("hub", "remove-user", BOB, "--stop-jobs"), "remove-user bob --stop-jobs")
    proc = ssh_as(BOB, "jobs list")
    assert proc.returncode == 255 and "Permission denied" in proc.stderr, proc.stderr
    assert hub("jobs", "status", bobs).returncode == 2  # --stop-jobs: gone
    # alice's VPN peer and SSH line
    key = user_node["alice"]["user"]["public_key"]
    assert key in ok(hub_sh("wg show gridx0 peers"), "wg peers")
    alices = ok(ssh_as(ALICE, "jobs run python:3.11 'sleep 60'"), "alice's job").strip()
    ok(hub("hub", "remove-user", ALICE), "remove-user alice")
    removed = time.monotonic()
    assert key not in ok(hub_sh("wg show gridx0 peers"), "wg peers")
    assert time.monotonic() - removed < 1
    assert hub_sh("grep -c gridx-user- /var/lib/gridx/users/.ssh/authorized_keys || true").stdout.strip() == "0"
    proc = ssh_as(ALICE, "jobs list", options=["-o", "ConnectTimeout=3"])
    assert proc.returncode == 255, proc.stderr
    # without --stop-jobs her job runs on, still hers
    assert json.loads(ok(hub("jobs", "status", alices, "--json"), "alice's job after"))["owner"] == ALICE
    hub("jobs", "delete", alices)
