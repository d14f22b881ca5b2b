"""The worker's bundle scripts on the fake machine (worker_machine.Lab):
their lint, input validation and refusals, join, the daemon.json merge,
rollback, leave, status, the private key, settings and prerequisites."""

import json
import os
import stat
import time

import pytest
from worker_machine import (
    CONTAINED,
    EXISTING,
    JOB_CHAINS,
    JOB_JUMPS4,
    KEY_LINE,
    MACHINE_MIB,
    PRIVATE_KEY,
    SCRIPTS,
    TEMPLATES,
    TOKEN,
    WORKER_CHAIN_RULES,
    answer_prompts,
    assert_nothing_changed,
    job_chains4,
    sha,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the scripts re-run themselves under sudo when not root")


# ---------------------------------------------------------------- lint ----


# shellcheck -S style of every script (bundle_templates/*.sh, sourced files
# followed: .shellcheckrc) is `make lint`'s, which CI runs before the tests.


def test_scripts_are_strict_and_documented():
    for s in SCRIPTS:
        text = open(os.path.join(TEMPLATES, s)).read()
        assert text.split("\n")[2].startswith("# %s - " % s), s
        if s != "lib.sh":
            assert "set -euo pipefail" in text and "export LC_ALL=C" in text, s
            assert text.rstrip().endswith('main "$@"'), s
            assert os.access(os.path.join(TEMPLATES, s), os.X_OK), s


@pytest.mark.parametrize("script", ["join.sh", "leave.sh", "status.sh", "jobnet.sh"])
def test_help(lab, script):
    r = lab.run(script, "--help")
    assert r.returncode == 0
    assert "Usage:" in r.stdout and "Exit status" in r.stdout
    assert lab.log() == []


# ------------------------------------------------------ input validation ----


@pytest.mark.parametrize(
    "args, says",
    [
        (["--cpus", "0"], "--cpus 0"),
        (["--cpus", "8X"], "--cpus '8X'"),
        (["--cpus", "5"], "only 4 CPUs"),
        (["--cpus", "-1"], "--cpus '-1'"),
        (["--memory", "8X"], "--memory '8X'"),
        (["--memory", "8"], "needs a unit"),
        (["--memory", "0G"], "more than 0"),
        (["--memory", "9G"], "only %d MiB" % MACHINE_MIB),
        (["--gpus", "two"], "--gpus 'two'"),
        (["--gpus", "1"], "no GPU found"),
        (["--gpu-ids", "GPU-a,,GPU-b"], "--gpu-ids"),
        (["--handshake-timeout", "0"], "--handshake-timeout"),
        (["--frobnicate"], "unknown option '--frobnicate'"),
        (["--cpus"], "--cpus needs a value"),
    ],
)
def test_bad_input_exits_2_and_changes_nothing(lab, args, says):
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text('{"log-level": "warn"}\n')
    before = lab.snapshot()
    full = {"--cpus": "2", "--memory": "1G"}
    for i, a in enumerate(args):
        if a in full and i + 1 < len(args):
            full.pop(a)
    rest = [x for kv in full.items() for x in kv]
    r = lab.run("join.sh", *rest, *args, "--yes")
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], r.stderr
    assert_nothing_changed(lab, before)


@pytest.mark.parametrize(
    "args, flag",
    [
        ([], "--cpus"),
        (["--cpus", "2"], "--memory"),
        (["--cpus", "2", "--memory", "1G"], "--yes"),
    ],
)
def test_no_terminal_missing_answer_names_the_flag(lab, args, flag):
    before = lab.snapshot()
    r = lab.run("join.sh", *args)
    assert r.returncode == 2
    assert "no terminal" in r.stderr and "pass " + flag in r.stderr, r.stderr
    assert_nothing_changed(lab, before)


def test_no_terminal_gpus_asked_when_machine_has_gpus(lab):
    lab.with_gpus("GPU-1111", "GPU-2222")
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes")
    assert r.returncode == 2 and "pass --gpus" in r.stderr, r.stderr


def test_missing_prerequisites_listed_at_once_with_install_commands(lab):
    for tool in ("wg", "wg-quick", "docker", "iptables"):
        (lab.bin / tool).unlink()
    before = lab.snapshot()
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes")
    assert r.returncode == 3
    assert "missing: wg/wg-quick docker iptables" in r.stderr
    assert "apt-get install -y wireguard-tools docker.io iptables" in r.stderr
    assert "pacman -S --needed wireguard-tools docker iptables" in r.stderr
    assert "dnf install -y wireguard-tools moby-engine iptables" in r.stderr
    assert "--install-deps" in r.stderr
    assert "sshd is not installed" in r.stderr  # optional: a warning only
    assert lab.snapshot() == before


def test_install_deps_installs_what_is_missing(lab):
    stash = lab.tmp / "stash"
    stash.mkdir()
    for tool in ("wg", "wg-quick"):
        (lab.bin / tool).rename(stash / tool)
    lab.stub(
        "apt-get",
        'echo "apt-get $*" >>"$FAKE/log"\n'
        '[[ $1 == install ]] && mv %s/wg %s/wg-quick "$(dirname "$0")"/\nexit 0\n' % (stash, stash),
    )
    lab.link("dirname")
    r = lab.join("--cpus", "1", "--memory", "1G", "--install-deps", "--yes")
    assert "[#] apt-get update" in r.stderr
    assert "[#] env DEBIAN_FRONTEND=noninteractive apt-get install -y wireguard-tools" in r.stderr
    assert lab.link_up()


def test_docker_not_running_is_a_precondition(lab):
    lab.fail("docker-info")
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes")
    assert r.returncode == 3 and "Docker is installed but not running" in r.stderr


# ----------------------------------------------------------- refusals ----


def test_refuses_when_already_joined(lab):
    lab.join()
    r = lab.join(ok=False)
    assert r.returncode == 3 and "leave.sh" in r.stderr


def test_refuses_when_interface_exists(lab):
    (lab.fake / "links" / "gridx0").touch()
    r = lab.join(ok=False)
    assert r.returncode == 3 and "interface named gridx0 already exists" in r.stderr
    assert not lab.state.exists()


def test_refuses_when_docker_already_in_a_swarm(lab):
    (lab.fake / "swarm_state").write_text("active\n")
    r = lab.join(ok=False)
    assert r.returncode == 3 and "docker swarm leave" in r.stderr
    assert not lab.state.exists()


def test_refuses_other_wireguard_config_and_leaves_it_alone(lab):
    lab.wg_dir.mkdir(mode=0o700)
    lab.wg_conf.write_text("[Interface]\nPrivateKey = someone-elses\n")
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 3 and "already exists with other content" in r.stderr
    assert_nothing_changed(lab, before)


# ----------------------------------------------------------------- join ----


def test_join_with_flags(lab):
    (lab.wg_dir).mkdir(mode=0o700)
    other = lab.wg_dir / "wg0.conf"
    other.write_text("[Interface]\n# someone else's VPN\n")
    r = lab.join("--cpus", "2", "--memory", "1536M", "--yes")
    # WireGuard config: 0600, the bundle's with the firewall hooks; wg0 untouched
    conf = lab.wg_conf.read_text()
    assert stat.S_IMODE(lab.wg_conf.stat().st_mode) == 0o600
    assert "PrivateKey = " + PRIVATE_KEY in conf and "Endpoint = 203.0.113.7:51820" in conf
    assert "PostUp = iptables -N DOCKER-USER 2>/dev/null || true; iptables -I DOCKER-USER" in conf
    assert other.read_text() == "[Interface]\n# someone else's VPN\n"
    # daemon.json advertises what is shared
    assert json.loads(lab.daemon_json.read_text()) == {"node-generic-resources": ["gridx_cpu=2", "gridx_mem=1536"],
                                                       **CONTAINED}
    log = lab.log()
    assert "wg-quick up %s" % lab.wg_conf in log
    # a userspace wireguard-go must outlive the terminal: SIGHUP (bit 0) ignored
    assert int((lab.fake / "wg-quick-up.sigign").read_text().split()[1], 16) & 1
    assert "service docker restart" in log
    assert (
        "docker swarm join --token %s --advertise-addr 10.0.0.2 --listen-addr 10.0.0.2:2377 "
        "--data-path-addr 10.0.0.2 -- 10.0.0.1:2377" % TOKEN
    ) in log
    assert TOKEN not in r.stderr + r.stdout  # echoed as <hidden>
    assert "[#] docker swarm join --token <hidden>" in r.stderr
    # restart before join: the swarm must see the resources
    assert log.index("service docker restart") < [i for i, c in enumerate(log) if "swarm join" in c][0]
    # the hub's key, from its VPN address only; ~/.ssh 0700, file 0600
    assert lab.auth_keys.read_text() == KEY_LINE + "\n"
    assert stat.S_IMODE(lab.auth_keys.stat().st_mode) == 0o600
    assert stat.S_IMODE(lab.auth_keys.parent.stat().st_mode) == 0o700
    # published ports answer over the VPN only, and so do the swarm's ports
    assert lab.rules(but=JOB_CHAINS) == [
        "INPUT -j GRIDX-WORKER",
        "DOCKER-USER -m conntrack --ctstate DNAT --ctdir ORIGINAL ! -i gridx0 -m comment --comment gridx -j DROP",
    ] + WORKER_CHAIN_RULES[:-1]
    # jobs reach nothing private (test_job_network_* for the rules)
    assert lab.rules(only=JOB_CHAINS) == JOB_JUMPS4[::-1] + job_chains4()
    assert lab.iptables_chains() == ["GRIDX-JOBS", "GRIDX-JOBS-HOST", "GRIDX-WORKER"]
    # state, as shell values and as JSON
    assert stat.S_IMODE(lab.state.stat().st_mode) == 0o700
    env = (lab.state / "state.env").read_text()
    assert "SHARED_CPUS='2'" in env and "COMPLETE='1'" in env
    cfg = json.loads((lab.state / "worker_config.json").read_text())
    assert cfg["name"] == "worker1" and cfg["vpn_ip"] == "10.0.0.2" and cfg["manager"] == "10.0.0.1:2377"
    assert cfg["shared_cpus"] == 2 and cfg["shared_memory_mib"] == 1536 and cfg["shared_gpu_ids"] == []
    assert cfg["complete"] is True and cfg["swarm_joined"] is True
    assert cfg["daemon_json_backup"] == "absent"
    # the Done block says what is shared and what to run next
    assert "Done." in r.stdout and "status.sh" in r.stdout and "leave.sh" in r.stdout
    assert "1536 MiB" in r.stdout
    assert "no systemd here" in r.stderr


def test_join_under_systemd_uses_systemctl_and_enables_boot_unit(lab):
    (lab.tmp / "systemd").mkdir()
    env = lab.env(GRIDX_SYSTEMD_RUN_DIR=str(lab.tmp / "systemd"))
    r = lab.run("join.sh", "--cpus", "1", "--memory", "1G", "--yes", env=env)
    assert r.returncode == 0, r.stderr
    log = lab.log()
    assert "systemctl restart docker" in log and "systemctl enable wg-quick@gridx0" in log
    assert not [c for c in log if c.startswith("service")]
    r = lab.run("leave.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert "systemctl disable wg-quick@gridx0" in lab.log()


def test_join_waits_for_handshake_then_says_what_to_check(lab):
    (lab.fake / "handshake").unlink()
    # a VPN on loopback addresses: the nudge packet stays here
    lab.settings.update(GRIDX_HUB_VPN_IP="127.0.0.1", GRIDX_VPN_IP="127.0.0.2", GRIDX_SUBNET="127.0.0.0/24",
                        GRIDX_MANAGER="127.0.0.1:2377")
    lab.write_bundle()
    before = lab.snapshot()
    t = time.time()
    r = lab.join("--cpus", "1", "--memory", "1G", "--yes", "--handshake-timeout", "1", ok=False)
    assert r.returncode == 1
    assert time.time() - t < 15
    assert "no handshake with the hub within 1 s" in r.stderr
    assert "Endpoint = 203.0.113.7:51820" in r.stderr and "UDP port 51820" in r.stderr
    assert "firewall" in r.stderr
    assert "rolled back" in r.stderr
    assert "wg-quick down %s" % lab.wg_conf in lab.log()
    assert lab.snapshot() == before
    assert not lab.link_up() and lab.iptables_rules() == []


def test_prompts_on_a_terminal(lab):
    """Answers typed at the prompts; a wrong answer is asked again."""
    answers = [
        (b"How many CPUs", b"0\n"),
        (b"share at least 1 CPU", b"3\n"),
        (b"How much memory", b"2G\n"),
        (b"Continue", b"\n"),
    ]
    code, text = answer_prompts([str(lab.bundle / "join.sh")], lab.env(), answers, timeout=30)
    assert code == 0, text
    assert not answers, text
    assert "[4]" in text  # the machine's CPUs offered as the default
    assert json.loads(lab.daemon_json.read_text())["node-generic-resources"] == ["gridx_cpu=3", "gridx_mem=2048"]


# ------------------------------------------------------- daemon.json merge ----

@pytest.mark.parametrize("tool", ["python3", "jq"])
def test_merge_keeps_existing_keys_and_leave_restores_bytes(lab, tool):
    getattr(lab, "with_" + tool)()
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_bytes(EXISTING)
    lab.daemon_json.chmod(0o640)
    before = lab.snapshot()
    lab.join("--cpus", "3", "--memory", "2G", "--yes")
    merged = json.loads(lab.daemon_json.read_text())
    assert merged == {
        "log-driver": "json-file",
        "node-generic-resources": ["other=1", "gridx_cpu=3", "gridx_mem=2048"],
        "runtimes": {"crun": {"path": "/usr/bin/crun"}},
        **CONTAINED,
    }
    assert stat.S_IMODE(lab.daemon_json.stat().st_mode) == 0o640
    assert (lab.state / "backup" / "daemon.json").read_bytes() == EXISTING
    r = lab.run("leave.sh")
    assert r.returncode == 0, r.stderr
    assert lab.daemon_json.read_bytes() == EXISTING
    assert lab.snapshot() == before
    assert lab.log().count("service docker restart") == 2


@pytest.mark.parametrize("tool", ["python3", "jq"])
def test_merge_already_there_means_no_restart(lab, tool):
    getattr(lab, "with_" + tool)()
    lab.daemon_json.parent.mkdir()
    original = (b'{"node-generic-resources": ["gridx_cpu=2", "gridx_mem=1024"], "debug": false,'
                b' "userns-remap": "default", "no-new-privileges": true, "userland-proxy": false}')
    lab.daemon_json.write_bytes(original)
    r = lab.join()
    assert "Docker is not restarted" in r.stderr
    assert lab.daemon_json.read_bytes() == original
    assert not [c for c in lab.log() if "restart" in c]


@pytest.mark.parametrize("tool", ["python3", "jq"])
def test_merge_refuses_invalid_json_before_changing_anything(lab, tool):
    getattr(lab, "with_" + tool)()
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text('{"log-driver": ')
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 3 and "daemon.json" in r.stderr
    assert_nothing_changed(lab, before)


def test_no_python_no_jq_and_a_nonempty_file_stops_and_explains(lab):
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text('{"log-level": "warn"}\n')
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 3
    assert "neither python3 nor jq" in r.stderr
    assert '"node-generic-resources": ["gridx_cpu=2", "gridx_mem=1024"]' in r.stderr
    assert_nothing_changed(lab, before)


def test_no_python_no_jq_keys_added_by_hand_are_accepted(lab):
    lab.daemon_json.parent.mkdir()
    text = ('{"log-level": "warn",\n "node-generic-resources": ["gridx_cpu=2", "gridx_mem=1024"],\n'
            ' "userns-remap": "default", "no-new-privileges": true, "userland-proxy": false}\n')
    lab.daemon_json.write_text(text)
    lab.join()
    assert lab.daemon_json.read_text() == text
    assert not [c for c in lab.log() if "restart" in c]


def test_no_python_no_jq_empty_object_is_written(lab):
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text("{ }\n")
    lab.join()
    assert json.loads(lab.daemon_json.read_text()) == {"node-generic-resources": ["gridx_cpu=2", "gridx_mem=1024"],
                                                       **CONTAINED}
    assert lab.run("leave.sh").returncode == 0
    assert lab.daemon_json.read_text() == "{ }\n"


# --------------------------------------------------------------- rollback ----


def test_rollback_when_swarm_join_fails(lab):
    lab.with_python3()
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_bytes(EXISTING)
    lab.auth_keys.parent.mkdir(mode=0o700)
    lab.auth_keys.write_bytes(b"ssh-rsa AAAAB3Nza... alice@laptop\nssh-ed25519 AAAAC3... bob")  # no final newline
    lab.auth_keys.chmod(0o600)
    sums = (sha(lab.daemon_json), sha(lab.auth_keys))
    before = lab.snapshot()
    lab.fail("swarm-join")
    r = lab.join(ok=False)
    assert r.returncode == 1
    assert "could not join the swarm" in r.stderr and "rolled back" in r.stderr
    assert (sha(lab.daemon_json), sha(lab.auth_keys)) == sums
    assert not lab.wg_conf.exists() and not lab.state.exists()
    log = lab.log()
    assert "wg-quick down %s" % lab.wg_conf in log
    assert log.count("service docker restart") == 2  # the change, and its undo
    assert lab.snapshot() == before
    assert not lab.link_up() and lab.iptables_rules() == []


def test_rollback_when_docker_does_not_come_back(lab):
    """The files go back at once; the restart that would apply them stays
    pending in the record until leave.sh manages it."""
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text("{}")
    before = lab.snapshot()
    lab.fail("docker-restart")
    r = lab.join(ok=False)
    assert r.returncode == 1 and "leave.sh" in r.stderr
    assert lab.daemon_json.read_text() == "{}" and not lab.wg_conf.exists() and not lab.link_up()
    assert "DOCKER_RESTART_PENDING='1'" in (lab.state / "state.env").read_text()
    lab.unfail("docker-restart")
    r = lab.run("leave.sh")
    assert r.returncode == 0, r.stderr
    assert lab.log().count("service docker restart") == 3  # join's, the rollback's, leave's
    assert lab.snapshot() == before


def test_failed_rollback_is_finished_by_leave(lab):
    """A join whose rollback fails too keeps its record; leave.sh finishes it."""
    lab.auth_keys.parent.mkdir(mode=0o700)
    lab.auth_keys.write_text("ssh-rsa AAAA alice\n")
    before = lab.snapshot()
    lab.fail("swarm-join")
    lab.fail("wg-quick-down")
    r = lab.join(ok=False)
    assert r.returncode == 1 and "leave.sh" in r.stderr
    assert lab.link_up() and (lab.state / "state.env").exists()
    again = lab.join(ok=False)
    assert again.returncode == 3 and "stopped midway" in again.stderr
    lab.unfail("wg-quick-down")
    r = lab.run("leave.sh")
    assert r.returncode == 0, r.stderr
    assert "stopped midway" in r.stderr
    assert lab.snapshot() == before and not lab.link_up()


# ------------------------------------------------------------------ leave ----


def test_leave_restores_everything_byte_for_byte(lab):
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text("")  # present but empty: restored as such
    lab.auth_keys.parent.mkdir(mode=0o755)
    lab.auth_keys.write_bytes(b"# keys\nssh-rsa AAAA alice\n")
    lab.auth_keys.chmod(0o644)
    before = lab.snapshot()
    lab.join()
    assert lab.auth_keys.read_bytes() == b"# keys\nssh-rsa AAAA alice\n" + KEY_LINE.encode() + b"\n"
    r = lab.run("leave.sh")
    assert r.returncode == 0, r.stderr
    assert "Done." in r.stdout
    assert lab.snapshot() == before
    log = lab.log()
    assert "docker swarm leave --force" in log and "wg-quick down %s" % lab.wg_conf in log
    assert lab.swarm_state() == "inactive" and not lab.link_up() and lab.iptables_rules() == []


def test_leave_removes_what_join_created(lab):
    before = lab.snapshot()  # no ~/.ssh, no /etc/docker, no /etc/wireguard
    lab.join()
    assert lab.auth_keys.exists() and lab.daemon_json.exists() and lab.wg_conf.exists()
    assert lab.run("leave.sh").returncode == 0
    assert lab.snapshot() == before


def test_leave_keeps_lines_added_after_join(lab):
    lab.auth_keys.parent.mkdir(mode=0o700)
    lab.auth_keys.write_text("ssh-rsa AAAA alice\n")
    lab.join()
    with open(lab.auth_keys, "a") as f:
        f.write("ssh-ed25519 BBBB carol\n")
    assert lab.run("leave.sh").returncode == 0
    assert lab.auth_keys.read_text() == "ssh-rsa AAAA alice\nssh-ed25519 BBBB carol\n"


def test_leave_twice_and_without_join_exit_0(lab):
    r = lab.run("leave.sh")
    assert r.returncode == 0 and "not joined, nothing to do" in r.stderr
    lab.join()
    assert lab.run("leave.sh", "--yes").returncode == 0  # gridx worker leave --yes passes it on
    n = len(lab.log())
    r = lab.run("leave.sh")
    assert r.returncode == 0 and "not joined, nothing to do" in r.stderr
    assert len(lab.log()) == n


def test_leave_tolerates_steps_already_undone(lab):
    lab.join()
    # someone already took the link down and left the swarm by hand
    (lab.fake / "links" / "gridx0").unlink()
    (lab.fake / "swarm_state").write_text("inactive\n")
    r = lab.run("leave.sh")
    assert r.returncode == 0, r.stderr
    assert not lab.wg_conf.exists() and not lab.state.exists()
    assert lab.iptables_rules() == []  # removed even though PostDown never ran
    assert "docker swarm leave --force" not in lab.log()


def test_join_leave_join_again(lab):
    lab.join()
    assert lab.run("leave.sh").returncode == 0
    lab.join("--cpus", "4", "--memory", "2G", "--yes")
    assert json.loads(lab.daemon_json.read_text())["node-generic-resources"] == ["gridx_cpu=4", "gridx_mem=2048"]


# ---------------------------------------------------------------- status ----


def test_status_healthy_and_json(lab):
    lab.join()
    r = lab.run("status.sh")
    assert r.returncode == 0, r.stderr
    assert "healthy" in r.stdout and "active" in r.stdout and "2 CPUs" in r.stdout
    assert "\x1b[" not in r.stdout + r.stderr
    r = lab.run("status.sh", "--json")
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert doc["healthy"] is True and doc["joined"] is True and doc["link_up"] is True
    assert doc["swarm_state"] == "active" and doc["problems"] == []
    assert 0 <= doc["handshake_age_s"] < 5
    assert doc["shared"] == {"cpus": 2, "memory_mib": 1024, "gpu_ids": []}
    assert doc["vpn_ip"] == "10.0.0.2" and doc["manager"] == "10.0.0.1:2377"


def test_status_unhealthy_reasons(lab):
    lab.join()
    (lab.fake / "handshake").write_text(str(int(time.time()) - 300))
    (lab.fake / "swarm_state").write_text("pending\n")
    r = lab.run("status.sh", "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["healthy"] is False and doc["handshake_age_s"] >= 300 and doc["swarm_state"] == "pending"
    assert "more than 180 s" in r.stderr and "swarm state is pending" in r.stderr
    (lab.fake / "links" / "gridx0").unlink()
    r = lab.run("status.sh")
    assert r.returncode == 1 and "link gridx0 is down" in r.stderr


def test_status_not_joined(lab):
    r = lab.run("status.sh", "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["joined"] is False and doc["healthy"] is False


# ----------------------------------------------------------- private key ----


def test_bundle_made_with_pubkey_needs_private_key(lab):
    lab.settings["GRIDX_NEEDS_PRIVATE_KEY"] = "1"
    lab.write_bundle(private_key="GRIDX_PRIVATE_KEY_PLACEHOLDER")
    r = lab.join(ok=False)
    assert r.returncode == 2 and "pass --private-key FILE" in r.stderr
    keyfile = lab.tmp / "private.key"
    keyfile.write_text("not a key\n")
    r = lab.join("--cpus", "1", "--memory", "1G", "--private-key", str(keyfile), "--yes", ok=False)
    assert r.returncode == 2 and "does not hold a WireGuard private key" in r.stderr
    keyfile.write_text(PRIVATE_KEY + "\n")
    keyfile.chmod(0o600)
    lab.join("--cpus", "1", "--memory", "1G", "--private-key", str(keyfile), "--yes")
    conf = lab.wg_conf.read_text()
    assert "PrivateKey = " + PRIVATE_KEY in conf and "PLACEHOLDER" not in conf


def test_private_key_refused_for_a_bundle_that_has_one(lab):
    keyfile = lab.tmp / "private.key"
    keyfile.write_text(PRIVATE_KEY + "\n")
    r = lab.join("--cpus", "1", "--memory", "1G", "--private-key", str(keyfile), "--yes", ok=False)
    assert r.returncode == 2 and "already holds its WireGuard key" in r.stderr


# ------------------------------------------------------------- settings ----


def test_settings_are_read_as_data_never_run(lab):
    (lab.bundle / "settings.env").write_text("GRIDX_NAME=$(touch %s/pwned)\n" % lab.tmp)
    r = lab.join(ok=False)
    assert r.returncode == 2 and "is not a KEY='value' line" in r.stderr
    assert not (lab.tmp / "pwned").exists()


# ------------------------------------------------------ prerequisites ----


def test_dockerd_without_the_docker_command_asks_for_docker_cli(lab):
    (lab.bin / "docker").unlink()
    lab.stub("dockerd", "exit 0\n")
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes")
    assert r.returncode == 3
    assert "missing: docker (the command; dockerd is installed)" in r.stderr
    assert "apt-get install -y docker-cli" in r.stderr


@pytest.mark.parametrize("apt_knows, packages", [(True, "docker.io docker-cli"), (False, "docker.io")])
def test_no_docker_at_all_asks_for_docker_cli_where_apt_has_it(lab, apt_knows, packages):
    (lab.bin / "docker").unlink()
    lab.stub("apt-cache", 'echo "apt-cache $*" >>"$FAKE/log"\n[[ $3 == docker-cli ]] && exit %d\nexit 100\n'
             % (0 if apt_knows else 100))
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes")
    assert r.returncode == 3
    assert "Debian/Ubuntu: sudo apt-get install -y %s\n" % packages in r.stderr, r.stderr
