"""The worker's bundle scripts on the fake machine (worker_machine.Lab), as an
attacker would try them: containment of jobs, the hub's SSH key, the bundle
as data (never code), the state's owner checks, the firewall, the hub
registry's CA, the jobs' network."""

import base64
import json
import os
import shutil
import stat
import subprocess

import pytest
from worker_machine import (
    CHANGING,
    HUB_PUBKEY,
    JOB_CHAINS,
    JOB_JUMPS4,
    JOB_JUMPS6,
    PRIVATE4,
    REJECT4,
    REJECT6,
    REPLIES,
    ROOT,
    SCRIPTS,
    assert_nothing_changed,
    job_chains4,
    job_chains6,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the scripts re-run themselves under sudo when not root")


# ------------------------------------------------------------ containment ----


def test_containment_on_by_default_and_said_at_the_confirmation(lab):
    r = lab.join()
    d = json.loads(lab.daemon_json.read_text())
    assert d["userns-remap"] == "default" and d["no-new-privileges"] is True
    assert "Docker runs with user-namespace remapping and no-new-privileges" in r.stderr
    # what the volunteer grants, before anything changed
    grant = r.stderr[r.stderr.index("What you grant the hub (10.0.0.1):"):r.stderr.index("[#]")]
    assert "within what you share" in grant
    assert "root only inside its container" in grant and "cannot change your files" in grant
    assert "your images and containers are not visible" in grant and "./leave.sh" in grant
    assert "SSH in as root, from 10.0.0.1 only" in grant and "--no-hub-ssh" in grant
    state = (lab.state / "state.env").read_text()
    assert "CONTAINMENT='1'" in state and "HUB_SSH='1'" in state
    doc = json.loads(lab.run("status.sh", "--json").stdout)
    assert doc["contained"] is True and doc["healthy"] is True


def test_no_containment_warns_what_the_hub_can_do(lab):
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text("{}")
    before = lab.snapshot()
    r = lab.join("--cpus", "1", "--memory", "1G", "--no-containment", "--yes")
    assert "--no-containment" in r.stderr and "bind-mount / and read and write every file" in r.stderr
    d = json.loads(lab.daemon_json.read_text())
    assert "userns-remap" not in d and "no-new-privileges" not in d and d["userland-proxy"] is False
    assert "CONTAINMENT='0'" in (lab.state / "state.env").read_text()
    assert lab.run("leave.sh").returncode == 0
    assert lab.snapshot() == before


def test_engine_that_does_not_remap_after_the_restart_is_rolled_back(lab):
    before = lab.snapshot()
    lab.fail("remap")
    r = lab.join(ok=False)
    assert r.returncode == 1 and "without user-namespace remapping" in r.stderr and "rolled back" in r.stderr
    assert "docker swarm join" not in " ".join(lab.log())
    assert lab.snapshot() == before


@pytest.mark.parametrize("tool", ["python3", "jq"])
def test_a_userns_remap_of_the_volunteers_is_kept(lab, tool):
    getattr(lab, "with_" + tool)()
    lab.daemon_json.parent.mkdir()
    original = b'{"userns-remap": "alice:alice", "no-new-privileges": false}\n'
    lab.daemon_json.write_bytes(original)
    r = lab.join()
    d = json.loads(lab.daemon_json.read_text())
    assert d["userns-remap"] == "alice:alice" and d["no-new-privileges"] is True
    assert "(yours: alice:alice)" in r.stderr
    assert lab.run("leave.sh").returncode == 0
    assert lab.daemon_json.read_bytes() == original


@pytest.mark.parametrize("where", ["engine", "daemon.json"])
def test_live_restore_is_refused(lab, where):
    lab.daemon_json.parent.mkdir()
    if where == "engine":
        (lab.fake / "live_restore").write_text("true\n")
        lab.daemon_json.write_text("{}")
    else:
        lab.daemon_json.write_text('{"live-restore": true}\n')
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 3 and "live-restore on, which swarm mode refuses" in r.stderr, r.stderr
    assert_nothing_changed(lab, before)


@pytest.mark.parametrize("version, refused", [
    ("20.10.24+dfsg1", False), ("23.0.1", False), ("23.0.2", True), ("24.0.7", True), ("24.0.9", True),
    ("25.0.2", True), ("25.0.3", False), ("26.1.5+dfsg1", False), ("28.5.2+dfsg4", False), ("29.1.2", False),
])
def test_engine_versions_with_the_inverted_resource_check_are_refused(lab, version, refused):
    (lab.fake / "docker_version").write_text(version + "\n")
    before = lab.snapshot()
    r = lab.join(ok=not refused)
    if refused:
        assert r.returncode == 3 and "Docker %s cannot run Grid-X jobs" % version in r.stderr
        assert "23.0.2 to 25.0.2" in r.stderr and "moby/swarmkit#3162" in r.stderr
        assert "hint: upgrade Docker to 25.0.3 or newer" in r.stderr
        assert_nothing_changed(lab, before)
    else:
        assert ("Docker    %s:" % version) in r.stderr


def test_docker_without_its_iptables_jump_is_refused(lab):
    """join.sh's PostUp creates DOCKER-USER itself: only Docker's jump counts."""
    lab.fail("no-docker-jump")
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 3 and "no jump to DOCKER-USER" in r.stderr
    assert "iptables -C FORWARD -j DOCKER-USER" in lab.log()
    assert_nothing_changed(lab, before)


# ---------------------------------------------------------------- hub SSH ----


@pytest.mark.parametrize("tool", [None, "python3", "jq"])
def test_no_hub_ssh_adds_no_key_and_labels_the_engine(lab, tool):
    if tool:
        getattr(lab, "with_" + tool)()
        lab.daemon_json.parent.mkdir()
        lab.daemon_json.write_text('{"labels": ["site=home", "gridx.hub-ssh=yes"]}\n')
    lab.auth_keys.parent.mkdir(mode=0o700)
    lab.auth_keys.write_text("ssh-rsa AAAA alice\n")
    before = lab.snapshot()
    r = lab.join("--cpus", "1", "--memory", "1G", "--no-hub-ssh", "--yes")
    assert lab.auth_keys.read_text() == "ssh-rsa AAAA alice\n"
    labels = json.loads(lab.daemon_json.read_text())["labels"]
    # same label as gridx.py's LABEL_HUB_SSH
    assert labels == (["site=home"] if tool else []) + ["gridx.hub-ssh=no"]
    assert "The hub may not SSH in" in r.stderr and "SSH       trust" not in r.stderr
    assert "HUB_SSH='0'" in (lab.state / "state.env").read_text()
    assert lab.run("leave.sh").returncode == 0
    assert lab.snapshot() == before


def test_hub_ssh_label_of_an_earlier_join_is_dropped(lab):
    lab.with_python3()
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text('{"labels": ["gridx.hub-ssh=no"]}\n')
    lab.join()
    assert json.loads(lab.daemon_json.read_text())["labels"] == []


# ------------------------------------------------ the bundle is data ----

WG_ATTACKS = [
    ("PostUp = touch {pwned}", "'PostUp' is not a key Grid-X writes"),
    ("postup = touch {pwned}", "'postup' is not a key Grid-X writes"),
    ("PreUp = touch {pwned}", "'PreUp' is not a key"),
    ("PreDown = touch {pwned}", "'PreDown' is not a key"),
    ("PostDown = touch {pwned}", "'PostDown' is not a key"),
    ("DNS = 1.1.1.1", "'DNS' is not a key"),
    ("Table = off", "'Table' is not a key"),
    ("SaveConfig = true", "'SaveConfig' is not a key"),
    ("FwMark = 51820", "'FwMark' is not a key"),
    ("Address = 10.0.0.9/24", "Address must be this bundle's VPN address 10.0.0.2/24"),
    ("MTU = 1420; touch {pwned}", "MTU '1420; touch"),
]


@pytest.mark.parametrize("line, says", WG_ATTACKS)
def test_wg_config_with_keys_grid_x_does_not_write_is_exit_2_and_nothing_runs(lab, line, says):
    pwned = lab.tmp / "pwned"
    conf = lab.bundle / "gridx0.conf"
    text = conf.read_text()
    key = line.split("=")[0].strip().lower()
    if key in ("address", "mtu"):  # replaces the bundle's own line
        text = "\n".join(x for x in text.splitlines() if not x.lower().startswith(key)) + "\n"
    conf.write_text(text.replace("[Interface]\n", "[Interface]\n" + line.format(pwned=pwned) + "\n"))
    n = conf.read_text().splitlines().index(line.format(pwned=pwned)) + 1
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: gridx0.conf line %d: " % n) and says in errors[0], r.stderr
    assert not pwned.exists()
    assert lab.log() == []  # not even docker or ip was asked anything
    assert_nothing_changed(lab, before)


@pytest.mark.parametrize("old, new, says", [
    ("AllowedIPs = 10.0.0.0/24", "AllowedIPs = 0.0.0.0/0", "AllowedIPs '0.0.0.0/0' is not inside the VPN subnet"),
    ("AllowedIPs = 10.0.0.0/24", "AllowedIPs = 10.0.0.0/24, 192.168.1.0/24", "'192.168.1.0/24' is not inside"),
    ("AllowedIPs = 10.0.0.0/24", "AllowedIPs = 10.0.0.0/16", "'10.0.0.0/16' is not inside"),
    ("Endpoint = 203.0.113.7:51820", "Endpoint = 198.51.100.1:51820", "is not the hub's"),
    ("PublicKey = ", "PresharedKey = x\nPublicKey = ", "'PresharedKey' is not a key"),
    ("[Peer]", "[Peer]\nPublicKey = %s\n[Peer]" % HUB_PUBKEY, "[Peer] must follow the one [Interface]"),
    ("PersistentKeepalive = 25", "PersistentKeepalive = 25\npersistentkeepalive = 5",
     "'persistentkeepalive' is given twice"),
    ("[Peer]", "[Wat]", "unknown section [Wat]"),
    ("[Interface]", "Address = 10.0.0.2/24\n[Interface]", "comes before [Interface]"),
    ("PersistentKeepalive = 25", "PersistentKeepalive = -1", "PersistentKeepalive '-1'"),
])
def test_wg_config_values_are_checked(lab, old, new, says):
    conf = lab.bundle / "gridx0.conf"
    conf.write_text(conf.read_text().replace(old, new, 1))
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert_nothing_changed(lab, before)


def test_wg_config_comments_and_trailing_comments_are_accepted(lab):
    conf = lab.bundle / "gridx0.conf"
    conf.write_text(conf.read_text().replace("MTU = 1420", "MTU = 1420   # the tunnel's\n\n# a note"))
    lab.join()
    assert "# a note" in lab.wg_conf.read_text()


@pytest.mark.parametrize("key, value", [
    ("GRIDX_NAME", "-rf"), ("GRIDX_NAME", "Worker_1"), ("GRIDX_INTERFACE", "-gridx0"),
    ("GRIDX_INTERFACE", "gridx0-much-too-long"), ("GRIDX_VPN_IP", "-10.0.0.2"), ("GRIDX_VPN_IP", "10.0.0.256"),
    ("GRIDX_HUB_VPN_IP", "--help"), ("GRIDX_MANAGER", "--host=tcp://evil:2375"), ("GRIDX_MANAGER", "10.0.0.1"),
    ("GRIDX_MANAGER", "hub.example:2377"), ("GRIDX_HUB_ENDPOINT", "-oProxyCommand=x:1"),
    ("GRIDX_HUB_ENDPOINT", "203.0.113.7"), ("GRIDX_SUBNET", "-10.0.0.0/24"), ("GRIDX_SUBNET", "10.0.0.1/24"),
    ("GRIDX_NEEDS_PRIVATE_KEY", "-1"), ("GRIDX_VERSION", "--version"),
])
def test_settings_values_are_validated_before_anything(lab, key, value):
    lab.settings[key] = value
    lab.write_bundle()
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: settings.env: %s '%s' is not" % (key, value)), r.stderr
    assert lab.log() == []
    assert_nothing_changed(lab, before)


def test_vpn_address_outside_the_subnet_is_refused(lab):
    lab.settings["GRIDX_SUBNET"] = "10.0.1.0/24"
    lab.write_bundle()
    r = lab.join(ok=False)
    assert r.returncode == 2 and "GRIDX_VPN_IP 10.0.0.2 is not in GRIDX_SUBNET 10.0.1.0/24" in r.stderr


@pytest.mark.parametrize("token", ["--help", "SWMTKN-1-abc def-ghi", "not-a-token"])
def test_swarm_token_is_checked(lab, token):
    (lab.bundle / "swarm-token").write_text(token + "\n")
    r = lab.join(ok=False)
    assert r.returncode == 2 and "does not hold a swarm join token" in r.stderr
    assert lab.log() == []


def test_gpu_ids_beginning_with_a_dash_are_refused(lab):
    r = lab.join("--cpus", "1", "--memory", "1G", "--gpu-ids", "-x", "--yes", ok=False)
    assert r.returncode == 2 and "'-x' is not a GPU id" in r.stderr


# -------------------------------------------------------- the state ----


def test_state_is_in_a_root_only_folder(lab):
    lab.join()
    assert stat.S_IMODE(lab.state.stat().st_mode) == 0o700
    for f in ("state.env", "worker_config.json"):
        assert stat.S_IMODE((lab.state / f).stat().st_mode) == 0o600
    assert not (lab.home / ".gridx").exists()


def test_state_is_written_new_synced_then_renamed(lab):
    """Every write of the state (and of the WireGuard config and daemon.json)
    is a new file beside it, synced, then renamed over it: nothing is left
    beside the files, and each sync named the two temporary files of a save."""
    lab.record_syncs()
    lab.join()
    synced = (lab.fake / "synced").read_text().splitlines()
    saves = [line.split() for line in synced if "/.state.env.gridx-" in line]
    assert len(saves) >= 8, synced  # a record before each step
    for paths in saves:
        names = sorted(os.path.basename(p) for p in paths)
        assert len(names) == 2 and names[0].startswith(".state.env.gridx-"), names
        assert names[1].startswith(".worker_config.json.gridx-"), names
    assert any(os.path.basename(line).startswith(".gridx0.conf.gridx-") for line in synced), synced
    assert any(os.path.basename(line).startswith(".daemon.json.gridx-") for line in synced), synced
    left = [p for d in (lab.state, lab.wg_dir, lab.daemon_json.parent) for p in os.listdir(d) if ".gridx-" in p]
    assert left == [], left


@pytest.mark.parametrize("script", ["leave.sh", "status.sh"])
@pytest.mark.parametrize("what", ["folder mode", "file owner", "backup owner", "link"])
def test_state_someone_else_could_write_is_refused(lab, script, what):
    lab.with_python3()
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text('{"debug": true}\n')
    lab.join()
    if what == "folder mode":
        lab.state.chmod(0o777)
        named = lab.state
    elif what == "file owner":
        os.chown(lab.state / "state.env", 65534, 65534)
        named = lab.state / "state.env"
    elif what == "backup owner":
        named = lab.state / "backup" / "daemon.json"
        os.chown(named, 65534, 0)
    else:
        real = lab.tmp / "elsewhere.env"
        shutil.move(lab.state / "state.env", real)
        (lab.state / "state.env").symlink_to(real)
        named = lab.state / "state.env"
    n = len(lab.log())
    r = lab.run(script)
    assert r.returncode == 3, r.stderr
    assert str(named) in r.stderr and ("someone other than root" in r.stderr or "symbolic link" in r.stderr)
    assert lab.link_up() and lab.swarm_state() == "active"  # nothing undone
    assert not [c for c in lab.log()[n:] if c.startswith(CHANGING)]


def test_leave_acts_only_on_the_paths_join_uses(lab):
    lab.join()
    victim = lab.tmp / "precious"
    victim.write_text("keep me\n")
    env = lab.state / "state.env"
    env.write_text(env.read_text().replace("WG_CONFIG='%s'" % lab.wg_conf, "WG_CONFIG='%s'" % victim))
    r = lab.run("leave.sh")
    assert r.returncode == 3 and "WG_CONFIG is '%s', not what join.sh records" % victim in r.stderr
    assert victim.read_text() == "keep me\n" and lab.link_up()


def test_leave_after_an_older_join_with_state_in_roots_home(lab):
    """A machine joined by the join.sh before 2026-12 (state in ~/.gridx)."""
    if os.path.exists("/var/lib/gridx/state.env"):
        pytest.skip("this machine is a Grid-X worker itself")
    old = {}
    for s in SCRIPTS:
        r = subprocess.run(["git", "-C", ROOT, "show", "2bb9f75:bundle_templates/" + s], capture_output=True)
        if r.returncode != 0:
            pytest.skip("the older scripts are not in this checkout's history")
        old[s] = r.stdout
    lab.auth_keys.parent.mkdir(mode=0o700)
    lab.auth_keys.write_text("ssh-rsa AAAA alice\n")
    before = lab.snapshot()
    for s, body in old.items():
        (lab.bundle / s).write_bytes(body)
    legacy = lab.home / ".gridx"
    r = lab.run("join.sh", "--cpus", "1", "--memory", "1G", "--yes", env=lab.env(GRIDX_STATE_DIR=str(legacy)))
    assert r.returncode == 0, r.stderr
    assert (legacy / "state.env").exists() and lab.link_up()
    lab.write_bundle()  # the new scripts, as a new bundle or gridx worker leave brings them
    env = lab.env(GRIDX_ROOT_HOME=str(lab.home))
    del env["GRIDX_STATE_DIR"]
    r = lab.run("join.sh", "--cpus", "1", "--memory", "1G", "--yes", env=env)
    assert r.returncode == 3 and "joined by an older join.sh" in r.stderr
    r = lab.run("status.sh", env=env)
    assert r.returncode == 0 and "older join.sh" in r.stderr, r.stderr
    r = lab.run("leave.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert "older join.sh" in r.stderr
    assert lab.snapshot() == before and not lab.link_up() and lab.swarm_state() == "inactive"
    assert lab.iptables_rules() == []


# ------------------------------------------------------------- firewall ----


def test_swarm_ports_chain_comes_with_the_link_and_goes_with_it(lab):
    lab.join()
    assert "GRIDX-WORKER" in lab.iptables_chains()
    conf = lab.wg_conf.read_text()
    assert "PostUp = iptables -N GRIDX-WORKER 2>/dev/null || iptables -F GRIDX-WORKER; " in conf
    assert "iptables -A GRIDX-WORKER -p udp --dport 4789 -j DROP" in conf
    assert "PostDown = iptables -D INPUT -j GRIDX-WORKER || true; iptables -F GRIDX-WORKER || true;" in conf
    assert "WORKER_CHAIN='GRIDX-WORKER'" in (lab.state / "state.env").read_text()
    assert lab.run("leave.sh").returncode == 0
    assert lab.iptables_rules() == [] and lab.iptables_chains() == []


def test_leave_removes_the_chain_when_the_link_went_without_postdown(lab):
    lab.join()
    (lab.fake / "links" / "gridx0").unlink()
    r = lab.run("leave.sh")
    assert r.returncode == 0, r.stderr
    assert "[#] iptables -D INPUT -j GRIDX-WORKER" in r.stderr and "[#] iptables -X GRIDX-WORKER" in r.stderr
    assert lab.iptables_rules() == [] and lab.iptables_chains() == []


def test_status_says_when_the_swarm_ports_chain_is_gone(lab):
    lab.join()
    rules = lab.fake / "iptables_rules"
    rules.write_text("".join(x + "\n" for x in lab.iptables_rules() if x != "INPUT -j GRIDX-WORKER"))
    r = lab.run("status.sh")
    assert r.returncode == 1 and "no jump to GRIDX-WORKER" in r.stderr


@pytest.mark.parametrize("route, refused", [
    ("10.0.0.0/16 dev wlan0 proto kernel scope link src 10.0.3.5", True),
    ("10.0.0.128/25 dev eth0 proto kernel scope link src 10.0.0.130", True),
    ("10.0.0.7 dev tun0 scope link", True),
    ("unreachable 10.0.0.0/24", True),
    ("192.168.1.0/24 dev eth0 proto kernel scope link src 192.168.1.20", False),
    ("10.0.1.0/24 via 192.168.1.1 dev eth0", False),
])
def test_vpn_subnet_overlapping_a_route_is_refused(lab, route, refused):
    (lab.fake / "routes").write_text("default via 192.168.1.1 dev eth0\n" + route + "\n")
    before = lab.snapshot()
    r = lab.join(ok=not refused)
    if refused:
        assert r.returncode == 3 and "overlaps this machine's route '%s'" % route in r.stderr, r.stderr
        assert "gridx hub init --subnet" in r.stderr
        assert_nothing_changed(lab, before)


def test_rotated_token_hint_names_refresh_bundle(lab):
    lab.fail("swarm-join")
    r = lab.join(ok=False)
    assert r.returncode == 1 and "gridx hub refresh-bundle worker1" in r.stderr


# ------------------------------------------------ the hub registry's CA ----

FAKE_CA = ("-----BEGIN CERTIFICATE-----\n"
           + "".join(base64.b64encode(bytes(range(i, i + 48))).decode() + "\n" for i in range(0, 192, 48))
           + "-----END CERTIFICATE-----\n")


def with_registry(lab, ca=FAKE_CA):
    """A bundle of a hub with a registry: GRIDX_REGISTRY and registry-ca.crt
    (as gridx.py's registry_bundle_settings/registry_bundle_files write
    them); the CA goes under the fake /etc. Returns the env to run with."""
    lab.settings["GRIDX_REGISTRY"] = "10.0.0.1:5000"
    lab.write_bundle()
    if ca is not None:
        (lab.bundle / "registry-ca.crt").write_text(ca)
    lab.certs = lab.etc / "docker" / "certs.d"
    return lab.env(GRIDX_DOCKER_CERTS_DIR=str(lab.certs))


def test_join_installs_the_registry_ca_records_it_and_leave_removes_it(lab):
    env = with_registry(lab)
    before = lab.snapshot()
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes", env=env)
    assert r.returncode == 0, r.stderr
    ca = lab.certs / "10.0.0.1:5000" / "ca.crt"
    assert ca.read_text() == FAKE_CA and stat.S_IMODE(ca.stat().st_mode) == 0o644
    assert "registry  trust the hub's image registry 10.0.0.1:5000" in r.stderr
    state = (lab.state / "state.env").read_text()
    assert "REGISTRY='10.0.0.1:5000'" in state and "REGISTRY_CA_BACKUP='absent'" in state
    assert "REGISTRY_DIRS_CREATED='2'" in state
    assert json.loads((lab.state / "worker_config.json").read_text())["registry_dirs_created"] == 2
    assert not [c for c in lab.log() if c.startswith("service docker restart")][1:]  # no restart for the CA
    status = lab.run("status.sh", "--json", env=env)
    assert json.loads(status.stdout)["registry_ca"] is True, status.stderr
    r = lab.run("leave.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert not lab.certs.exists()
    assert lab.snapshot() == before


def test_a_ca_already_there_is_put_back_byte_for_byte(lab):
    env = with_registry(lab)
    folder = lab.certs / "10.0.0.1:5000"
    folder.mkdir(parents=True)
    (folder / "ca.crt").write_bytes(b"the volunteer's own CA\n")
    (folder / "client.cert").write_bytes(b"theirs too\n")
    before = lab.snapshot()
    assert lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes", env=env).returncode == 0
    assert (folder / "ca.crt").read_text() == FAKE_CA
    assert "REGISTRY_DIRS_CREATED='0'" in (lab.state / "state.env").read_text()
    r = lab.run("leave.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert lab.snapshot() == before


def test_status_says_when_the_registry_ca_went_missing(lab):
    env = with_registry(lab)
    assert lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes", env=env).returncode == 0
    (lab.certs / "10.0.0.1:5000" / "ca.crt").unlink()
    r = lab.run("status.sh", env=env)
    assert r.returncode == 1
    assert "registry        10.0.0.1:5000 (CA missing)" in r.stdout
    assert "the hub registry's CA" in r.stderr and "is missing" in r.stderr
    assert lab.run("leave.sh", env=env).returncode == 0  # the file gone already: leave still finishes


@pytest.mark.parametrize("ca, says", [
    (None, "registry-ca.crt is missing"),
    ("hello\n", "line 1: not a PEM certificate"),
    (FAKE_CA.replace("CERTIFICATE", "PRIVATE KEY"), "line 1: not a PEM certificate"),
    (FAKE_CA + "PostUp = rm -rf /\n", "line 7: not a PEM certificate"),
    (FAKE_CA.replace("\n-----END CERTIFICATE-----\n", "\n"), "is not a PEM certificate"),
    (FAKE_CA.replace("AAEC", "A$(x)"), "line 2: not a PEM certificate"),
], ids=["missing", "text", "a-key", "a-line-after", "no-end", "a-command"])
def test_a_bundle_ca_that_is_not_a_pem_certificate_is_exit_2_and_nothing_changes(lab, ca, says):
    env = with_registry(lab, ca)
    before = lab.snapshot()
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes", env=env)
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], r.stderr
    assert lab.log() == []
    assert_nothing_changed(lab, before)


@pytest.mark.parametrize("value", ["-10.0.0.1:5000", "10.0.0.1", "hub.example:5000", "10.0.0.1:5000 x"])
def test_the_registry_setting_is_validated(lab, value):
    env = with_registry(lab)
    lab.settings["GRIDX_REGISTRY"] = value
    lab.write_bundle()
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes", env=env)
    assert r.returncode == 2 and "settings.env: GRIDX_REGISTRY" in r.stderr, r.stderr
    assert lab.log() == []


def test_the_registry_ca_is_trusted_only_for_the_hubs_address(lab):
    """A bundle whose GRIDX_REGISTRY is another machine's address would make
    Docker trust the hub's CA there (issue 19): exit 2, nothing changes."""
    env = with_registry(lab)
    lab.settings["GRIDX_REGISTRY"] = "10.0.0.7:5000"
    lab.write_bundle()
    (lab.bundle / "registry-ca.crt").write_text(FAKE_CA)
    before = lab.snapshot()
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes", env=env)
    assert r.returncode == 2 and "not at the hub's VPN address 10.0.0.1" in r.stderr, r.stderr
    assert lab.log() == []
    assert_nothing_changed(lab, before)


# -------------------------------------------------------- jobs' network ----
# What a job may reach (lib.sh "jobs' network", jobnet.sh). The e2e test
# test_jobnet_lab.py tries it from real jobs; here: the allow-list grammar,
# the rules rendered, and join / leave / jobnet.sh / status.sh around them.


def lib_sh(lab, code, *args):
    """bash with the bundle's lib.sh sourced and its paths set (the fake
    machine's), running CODE with ARGS as $1..."""
    head = 'GRIDX_PROG=test GRIDX_BUNDLE_DIR="$0"; . "$GRIDX_BUNDLE_DIR/lib.sh"; init_paths; '
    return subprocess.run([str(lab.bin / "bash"), "-c", head + code, str(lab.bundle), *args], env=lab.env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def allow_parse(lab, value):
    """job_allow_parse VALUE: (True, IPv4 matches, IPv6 matches) or (False, why)."""
    r = lib_sh(lab, 'if job_allow_parse "$1"; then printf "4 %s\\n" "${JOB_ALLOW4[@]}"; '
                    'printf "6 %s\\n" "${JOB_ALLOW6[@]}"; else echo "bad $REPLY"; fi', value)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    if r.stdout.startswith("bad "):
        return False, r.stdout[4:].strip()
    lines = r.stdout.splitlines()
    return True, [x[2:] for x in lines if x.startswith("4 ") and x[2:]], [x[2:] for x in lines
                                                                            if x.startswith("6 ") and x[2:]]


@pytest.mark.parametrize("value, v4, v6", [
    ("", [], []),
    ("   \n ", [], []),
    ("172.29.243.30/32 10.0.0.1/32:tcp/5000", ["-d 172.29.243.30/32", "-d 10.0.0.1/32 -p tcp --dport 5000"], []),
    ("203.0.113.7", ["-d 203.0.113.7/32"], []),
    ("192.168.5.0/24:udp/5000-5010", ["-d 192.168.5.0/24 -p udp --dport 5000:5010"], []),
    ("10.0.0.1:tcp", ["-d 10.0.0.1/32 -p tcp"], []),
    ("10.0.0.0/8", ["-d 10.0.0.0/8"], []),
    ("[fd00::5]:tcp/443 [2001:DB8::/32]", [], ["-d fd00::5/128 -p tcp --dport 443", "-d 2001:DB8::/32"]),
    ("[fd00:1:2:3:4:5:6:7]:udp/53", [], ["-d fd00:1:2:3:4:5:6:7/128 -p udp --dport 53"]),
])
def test_allow_list_grammar_accepts(lab, value, v4, v6):
    assert allow_parse(lab, value) == (True, v4, v6)


@pytest.mark.parametrize("value, says", [
    ("10.0.0.1:5000", "name the protocol before the port"),
    ("10.0.0.1/24", "bits set beyond it"),
    ("10.0.0.1/33", "not a prefix"),
    ("10.0.0.010", "not an IPv4 address"),
    ("10.0.0.256:tcp/1", "not an IPv4 address"),
    ("0.0.0.0/0", "broader than /8"),
    ("10.0.0.0/7", "broader than /8"),
    ("10.0.0.1:icmp", "tcp or udp, not 'icmp'"),
    ("10.0.0.1:TCP/80", "not ADDRESS"),
    ("10.0.0.1:tcp/0", "not a port"),
    ("10.0.0.1:tcp/0080", "not a port"),
    ("10.0.0.1:tcp/65536", "not a port"),
    ("10.0.0.1:tcp/6000-5000", "goes down"),
    ("10.0.0.1:tcp/-5", "not ADDRESS"),
    ("fd00::5", "goes in brackets"),
    ("[fd00::5%eth0]", "not ADDRESS"),
    ("[fd00::1/64]", "bits set beyond it"),
    ("[fd00::/8]", "broader than /16"),
    ("[1::2::3]", "not an IPv6 address"),
    ("[::ffff:1.2.3.4]", "not ADDRESS"),
    ("-j ACCEPT", "'-j' is not ADDRESS"),
    ("10.0.0.1;reboot", "not ADDRESS"),
    ("$(reboot)", "not ADDRESS"),
    ("hub.example:tcp/80", "not ADDRESS"),
    (" ".join(["10.0.0.%d" % i for i in range(1, 66)]), "65 entries: at most 64"),
])
def test_allow_list_grammar_refuses_with_the_reason(lab, value, says):
    parsed = allow_parse(lab, value)
    assert parsed[0] is False and says in parsed[1], parsed


def rendered(lab, family, allow="", dns=(), onlink=(), subnet="10.0.0.0/24"):
    code = ('ST[VPN_SUBNET]=$1; job_allow_parse "$2"; read -r -a JOB_DNS%s <<<"$3"; read -r -a JOB_ONLINK%s <<<"$4"; '
            'job_rules %s; printf "%%s\\n" "${JOB_RULES[@]}"' % (family, family, family))
    r = lib_sh(lab, code, subnet, allow, " ".join(dns), " ".join(onlink))
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_rules_rendered_for_iptables_restore(lab):
    got = rendered(lab, 4, allow="172.29.243.30 10.0.0.1:tcp/5000", dns=["192.168.1.1"],
                   onlink=["130.237.5.0/24"], subnet="44.1.2.0/24")
    opens = ["-d 192.168.1.1/32 -p udp --dport 53", "-d 192.168.1.1/32 -p tcp --dport 53",
             "-d 172.29.243.30/32", "-d 10.0.0.1/32 -p tcp --dport 5000"]
    # a VPN subnet outside the private ranges, and a LAN of public addresses, closed too
    want = job_chains4(opens, (*PRIVATE4, "44.1.2.0/24", "130.237.5.0/24"))
    assert got == ["*filter", ":GRIDX-JOBS - [0:0]", ":GRIDX-JOBS-HOST - [0:0]"] + [
        "-A " + r for r in want] + ["COMMIT"]
    # replies first, in both chains: a port a job publishes on the VPN still answers
    assert got[3] == "-A GRIDX-JOBS " + REPLIES
    got6 = rendered(lab, 6, allow="[fd00::5]:tcp/443 10.0.0.1", dns=["fd00::53"], onlink=["2001:db8:5::/64"])
    want6 = job_chains6(["-d fd00::53/128 -p udp --dport 53", "-d fd00::53/128 -p tcp --dport 53",
                         "-d fd00::5/128 -p tcp --dport 443"], ("fc00::/7", "fe80::/10", "2001:db8:5::/64"))
    assert got6 == ["*filter", ":GRIDX-JOBS - [0:0]", ":GRIDX-JOBS-HOST - [0:0]"] + [
        "-A " + r for r in want6] + ["COMMIT"]


def test_the_networks_the_machine_is_on_are_read_from_its_routes(lab):
    (lab.fake / "routes").write_text(
        "default via 192.168.1.1 dev wlan0 proto dhcp metric 600\n"
        "130.237.5.0/24 dev eth0 proto kernel scope link src 130.237.5.20\n"
        "192.168.1.0/24 dev wlan0 proto kernel scope link src 192.168.1.20\n"   # private: closed already
        "172.17.0.0/16 dev docker0 proto kernel scope link src 172.17.0.1 linkdown\n"
        "10.0.0.0/24 dev gridx0 proto kernel scope link src 10.0.0.2\n"
        "198.51.100.0/24 via 192.168.1.1 dev wlan0\n"                          # routed elsewhere: the internet
        "0.0.0.0/1 dev tun0 scope link\n"                                       # a full-tunnel VPN: not a LAN
        "203.0.113.9 dev ppp0 scope link\n")
    (lab.fake / "routes6").write_text(
        "2001:db8:5::/64 dev eth0 proto ra metric 100 expires 86000sec pref medium\n"
        "fd12:3456::/64 dev eth0 proto ra metric 100\n"
        "fe80::/64 dev eth0 proto kernel metric 256 pref medium\n"
        "::1 dev lo proto kernel metric 256 pref medium\n"
        "default via fe80::1 dev eth0 proto ra metric 100\n"
        "2001:db8::/16 dev eth0\n")
    r = lib_sh(lab, 'job_onlink; echo "${JOB_ONLINK4[*]}"; echo "${JOB_ONLINK6[*]}"')
    assert r.stdout.splitlines() == ["130.237.5.0/24 203.0.113.9/32", "2001:db8:5::/64"], r.stdout + r.stderr


@pytest.mark.parametrize("resolv, resolved, daemon, v4, v6", [
    ("nameserver 192.168.1.1\n", None, None, ["192.168.1.1"], []),
    ("# DHCP\nnameserver 10.1.1.1\nnameserver 1.1.1.1\nsearch lan\n", None, None, ["10.1.1.1", "1.1.1.1"], []),
    ("nameserver 127.0.0.53\noptions edns0 trust-ad\n", "nameserver 192.168.178.1\nnameserver fd00::1\n", None,
     ["192.168.178.1"], ["fd00::1"]),
    ("nameserver 127.0.0.53\n", None, None, [], []),                       # no upstream file: Docker's defaults
    ("nameserver 127.0.0.1\nnameserver ::1\n", None, None, [], []),       # a local cache: the container's own
    ("nameserver fe80::1%wlan0\nnameserver 192.168.1.1\n", None, None, ["192.168.1.1"], ["fe80::1"]),
    ("nameserver 192.168.1.1\n", None, '{"dns": ["10.9.9.9", "2001:db8::53"], "log-level": "warn"}',
     ["10.9.9.9"], ["2001:db8::53"]),
    ("nameserver 192.168.1.1\n", None, '{"log-level": "warn"}', ["192.168.1.1"], []),
    (None, None, None, [], []),
])
def test_name_servers_are_the_ones_docker_gives_containers(lab, resolv, resolved, daemon, v4, v6):
    conf = lab.etc / "resolv.conf"
    if resolv is None:
        conf.unlink()
    else:
        conf.write_text(resolv)
    if resolved is not None:
        path = lab.tmp / "run" / "systemd" / "resolve" / "resolv.conf"
        path.parent.mkdir(parents=True)
        path.write_text(resolved)
    if daemon is not None:
        lab.daemon_json.parent.mkdir(parents=True)
        lab.daemon_json.write_text(daemon)
    r = lib_sh(lab, 'job_resolvers; echo "${JOB_DNS4[*]}"; echo "${JOB_DNS6[*]}"')
    assert r.stdout.split("\n")[:2] == [" ".join(v4), " ".join(v6)], r.stdout + r.stderr


def test_join_closes_private_networks_to_jobs_opens_the_allow_list_and_says_so(lab):
    lab.settings["GRIDX_JOB_ALLOW"] = "172.29.243.30/32:tcp/8080 [fd00::5]:tcp/443"
    lab.write_bundle()
    r = lab.join()
    allow4 = "-d 172.29.243.30/32 -p tcp --dport 8080"
    dns = ["-d 192.168.1.1/32 -p udp --dport 53", "-d 192.168.1.1/32 -p tcp --dport 53"]
    assert lab.rules(only=JOB_CHAINS) == JOB_JUMPS4[::-1] + job_chains4([*dns, allow4])
    assert lab.rules("ip6tables") == JOB_JUMPS6[::-1] + job_chains6(["-d fd00::5/128 -p tcp --dport 443"])
    assert lab.chains("ip6tables") == ["DOCKER-USER", "GRIDX-JOBS", "GRIDX-JOBS-HOST"]
    # before Docker's restart and the swarm join: no job runs here without them
    log = lab.log()
    first = log.index("iptables-restore -w 10 --noflush")
    assert first < log.index("wg-quick up %s" % lab.wg_conf) < log.index("service docker restart")
    # the grant text, before anything changed
    grant = r.stderr[r.stderr.index("What you grant"):r.stderr.index("[#]")]
    assert "Jobs reach the internet and nothing private: not your networks" in grant
    assert "not this\n    machine, not the VPN (the hub, other workers), except DNS to your name servers" in grant
    assert "Name servers: 192.168.1.1." in grant
    assert "The hub's admin opened, for every job: 172.29.243.30/32:tcp/8080 [fd00::5]:tcp/443" in grant
    # recorded, and a root-only copy of the scripts for the config's PreUp
    env = (lab.state / "state.env").read_text()
    assert "JOB_ALLOW='172.29.243.30/32:tcp/8080 [fd00::5]:tcp/443'" in env and "VPN_SUBNET='10.0.0.0/24'" in env
    copy = lab.state / "jobnet"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o700
    for name in ("jobnet.sh", "lib.sh"):
        assert (copy / name).read_bytes() == (lab.bundle / name).read_bytes()
        assert stat.S_IMODE((copy / name).stat().st_mode) == 0o700
    assert "PreUp = bash '%s/jobnet.sh' apply\n" % copy in lab.wg_conf.read_text()


def test_without_name_servers_or_allow_list_the_grant_says_nothing_of_them(lab):
    (lab.etc / "resolv.conf").write_text("nameserver 127.0.0.11\n")
    r = lab.join()
    grant = r.stderr[r.stderr.index("What you grant"):r.stderr.index("[#]")]
    assert "not the VPN (the hub, other workers)." in grant
    assert "Name servers" not in grant and "admin opened" not in grant
    assert lab.rules(only=["GRIDX-JOBS"]) == [
        "DOCKER-USER -i docker_gwbridge -j GRIDX-JOBS", "DOCKER-USER -i docker0 -j GRIDX-JOBS",
        f"GRIDX-JOBS {REPLIES}"] + [f"GRIDX-JOBS -d {net} {REJECT4}" for net in (*PRIVATE4, "10.0.0.0/24")]


@pytest.mark.parametrize("value, says", [
    ("10.0.0.1:5000", "name the protocol before the port"),
    ("0.0.0.0/0", "broader than /8"),
    ("-j ACCEPT", "'-j' is not ADDRESS"),
])
def test_a_bad_allow_list_is_exit_2_and_nothing_changes(lab, value, says):
    lab.settings["GRIDX_JOB_ALLOW"] = value
    lab.write_bundle()
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: settings.env: GRIDX_JOB_ALLOW: ") and says in errors[0]
    assert lab.log() == []
    assert_nothing_changed(lab, before)


def volunteers_own_rules(lab):
    """Rules and chains of the volunteer's (and Docker's, for ip6tables)."""
    (lab.fake / "iptables_chains").write_text("MINE\n")
    (lab.fake / "iptables_rules").write_text(
        "INPUT -i eth0 -p tcp --dport 22 -j ACCEPT\nDOCKER-USER -s 192.168.9.0/24 -j DROP\nMINE -j LOG\n"
        "FORWARD -j MINE\n")
    (lab.fake / "ip6tables_chains").write_text("DOCKER-USER\n")
    (lab.fake / "ip6tables_rules").write_text("DOCKER-USER -j RETURN\nFORWARD -j DOCKER-USER\n")
    return {tool: (lab.rules(tool), lab.chains(tool)) for tool in ("iptables", "ip6tables")}


def test_leave_removes_exactly_the_rules_join_added(lab):
    before = volunteers_own_rules(lab)
    lab.join()
    # Docker's ip6tables chain was there: used, not made
    assert lab.chains("ip6tables") == ["DOCKER-USER", "GRIDX-JOBS", "GRIDX-JOBS-HOST"]
    assert "JOB_DOCKER_USER6" not in (lab.state / "state.env").read_text()
    r = lab.run("leave.sh")
    assert r.returncode == 0, r.stderr
    assert {tool: (lab.rules(tool), lab.chains(tool)) for tool in ("iptables", "ip6tables")} == before
    assert not (lab.state / "jobnet").exists()


def test_leave_removes_the_ip6tables_chain_join_made(lab):
    lab.join()
    assert "JOB_DOCKER_USER6='1'" in (lab.state / "state.env").read_text()
    assert lab.run("leave.sh").returncode == 0
    assert lab.chains("ip6tables") == [] and lab.rules("ip6tables") == []


def test_a_vpn_going_down_keeps_the_rules_and_preup_puts_them_back_after_a_reboot(lab):
    lab.join()
    rules = {tool: lab.rules(tool, only=JOB_CHAINS) for tool in ("iptables", "ip6tables")}
    env = lab.env()
    down = subprocess.run([str(lab.bin / "wg-quick"), "down", str(lab.wg_conf)], env=env, capture_output=True,
                          text=True)
    assert down.returncode == 0, down.stderr
    assert {tool: lab.rules(tool, only=JOB_CHAINS) for tool in ("iptables", "ip6tables")} == rules
    assert "GRIDX-WORKER" not in lab.iptables_chains()  # PostDown did run
    for f in ("iptables_rules", "iptables_chains", "ip6tables_rules", "ip6tables_chains"):
        (lab.fake / f).unlink()  # a reboot: no rules at all
    up = subprocess.run([str(lab.bin / "wg-quick"), "up", str(lab.wg_conf)], env=env, capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    assert {tool: lab.rules(tool, only=JOB_CHAINS) for tool in ("iptables", "ip6tables")} == rules
    log = lab.log()
    assert log.index("iptables-restore -w 10 --noflush", log.index("wg-quick up %s" % lab.wg_conf)) < len(log)
    assert lab.run("status.sh").returncode == 0


def test_preup_that_cannot_put_the_rules_back_keeps_the_vpn_down(lab):
    lab.join()
    env = lab.env()
    subprocess.run([str(lab.bin / "wg-quick"), "down", str(lab.wg_conf)], env=env, check=True, capture_output=True)
    lab.fail("iptables-restore")
    up = subprocess.run([str(lab.bin / "wg-quick"), "up", str(lab.wg_conf)], env=env, capture_output=True, text=True)
    assert up.returncode != 0 and "could not be put in place" in up.stderr, up.stderr
    assert not lab.link_up()


def test_jobnet_allow_replaces_the_list_in_one_restore_per_family(lab):
    lab.join()
    before_log = len(lab.log())
    r = lab.run("jobnet.sh", "allow", "203.0.113.7 10.0.0.1:tcp/8099")
    assert r.returncode == 0, r.stderr
    log = lab.log()[before_log:]
    assert [c for c in log if "-restore" in c] == ["iptables-restore -w 10 --noflush",
                                                    "ip6tables-restore -w 10 --noflush"]
    assert not [c for c in log if c.startswith(("iptables -I", "iptables -D", "ip6tables -I"))]  # jumps in place
    dns = ["-d 192.168.1.1/32 -p udp --dport 53", "-d 192.168.1.1/32 -p tcp --dport 53"]
    assert lab.rules(only=JOB_CHAINS) == JOB_JUMPS4[::-1] + job_chains4(
        [*dns, "-d 203.0.113.7/32", "-d 10.0.0.1/32 -p tcp --dport 8099"])
    assert "JOB_ALLOW='203.0.113.7 10.0.0.1:tcp/8099'" in (lab.state / "state.env").read_text()
    # the hub's way: the copy join.sh keeps, from anywhere
    r = subprocess.run([str(lab.bin / "bash"), str(lab.state / "jobnet" / "jobnet.sh"), "allow", ""], env=lab.env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert lab.rules(only=JOB_CHAINS) == JOB_JUMPS4[::-1] + job_chains4()
    assert "JOB_ALLOW=''" in (lab.state / "state.env").read_text()


def test_jobnet_allow_without_a_list_takes_the_bundles(lab):
    lab.join()
    lab.settings["GRIDX_JOB_ALLOW"] = "198.51.100.4:udp/9000-9009"
    lab.write_bundle()
    r = lab.run("jobnet.sh", "allow")
    assert r.returncode == 0, r.stderr
    assert "GRIDX-JOBS -d 198.51.100.4/32 -p udp --dport 9000:9009 -j RETURN" in lab.rules()


@pytest.mark.parametrize("args, code, says", [
    (["allow", "10.0.0.1:5000"], 2, "allow-list: '10.0.0.1:5000': name the protocol"),
    (["allow", "a", "b"], 2, "allow takes one argument"),
    (["apply", "x"], 2, "apply takes no argument"),
    (["open"], 2, "unknown action 'open'"),
    ([], 2, "say what to do"),
])
def test_jobnet_bad_usage_is_exit_2_and_changes_nothing(lab, args, code, says):
    lab.join()
    rules, state, n = lab.rules(), (lab.state / "state.env").read_text(), len(lab.log())
    r = lab.run("jobnet.sh", *args)
    assert r.returncode == code and says in r.stderr, r.stderr
    assert lab.rules() == rules and (lab.state / "state.env").read_text() == state and len(lab.log()) == n


def test_jobnet_on_a_machine_not_joined_or_joined_by_an_older_join(lab):
    r = lab.run("jobnet.sh", "apply")
    assert r.returncode == 3 and "has not joined" in r.stderr
    lab.join()
    env = lab.state / "state.env"
    env.write_text("".join(x + "\n" for x in env.read_text().splitlines() if not x.startswith("JOB_NET_DIR=")))
    r = lab.run("jobnet.sh", "apply")
    assert r.returncode == 3 and "kept no jobs' network" in r.stderr and "leave and join again" in r.stderr


def test_a_tampered_allow_list_in_the_state_is_refused(lab):
    lab.join()
    env = lab.state / "state.env"
    env.write_text(env.read_text().replace("JOB_ALLOW=''", "JOB_ALLOW='-j ACCEPT'"))
    n = len(lab.log())
    r = lab.run("jobnet.sh", "apply")
    assert r.returncode == 3 and "JOB_ALLOW" in r.stderr, r.stderr
    assert not [c for c in lab.log()[n:] if c.startswith(CHANGING)]


def test_a_copy_of_the_scripts_others_could_write_is_refused(lab):
    lab.join()
    (lab.state / "jobnet" / "lib.sh").chmod(0o722)
    r = lab.run("jobnet.sh", "apply")
    assert r.returncode == 3 and "can be written by someone other than root" in r.stderr, r.stderr


def test_without_ip6tables_the_ipv4_rules_still_hold(lab):
    lab.fail("ip6tables")
    lab.join()
    assert lab.rules(only=JOB_CHAINS) == JOB_JUMPS4[::-1] + job_chains4()
    assert lab.rules("ip6tables") == []
    assert lab.run("leave.sh").returncode == 0
    assert lab.rules() == [] and lab.chains() == []


def test_rules_that_cannot_be_put_in_place_roll_the_join_back(lab):
    lab.fail("iptables-restore")
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 1 and "jobs' network rules could not be put in place" in r.stderr, r.stderr
    assert "rolled back" in r.stderr
    assert lab.snapshot() == before and not lab.link_up() and lab.swarm_state() == "inactive"
    assert lab.rules() == [] and lab.chains() == [] and lab.rules("ip6tables") == []
    assert not lab.state.exists()


def test_a_custom_default_bridge_is_refused(lab):
    lab.with_python3()
    lab.daemon_json.parent.mkdir(parents=True)
    lab.daemon_json.write_text('{"bridge": "br-lan"}\n')
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 3 and '"bridge": "br-lan"' in r.stderr, r.stderr
    assert_nothing_changed(lab, before)


def test_status_says_when_the_jobs_rules_are_gone(lab):
    lab.join()
    assert lab.run("status.sh").returncode == 0
    (lab.fake / "iptables_rules").write_text("".join(
        x + "\n" for x in lab.iptables_rules() if x != "DOCKER-USER -i docker0 -j GRIDX-JOBS"))
    r = lab.run("status.sh", "--json")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert doc["jobs_network"] is False
    assert any("jobs could reach this machine's networks" in p and "jobnet.sh apply" in p for p in doc["problems"])
    assert lab.run("jobnet.sh", "apply").returncode == 0
    assert json.loads(lab.run("status.sh", "--json").stdout)["jobs_network"] is True


def test_jobnet_show_says_what_is_open(lab):
    lab.settings["GRIDX_JOB_ALLOW"] = "203.0.113.7"
    lab.write_bundle()
    lab.join()
    n = len(lab.log())
    r = lab.run("jobnet.sh", "show")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["allow-list   203.0.113.7", "name servers 192.168.1.1"], r.stdout
    assert "-A GRIDX-JOBS -d 203.0.113.7/32 -j RETURN" in lines
    assert f"-A GRIDX-JOBS-HOST {REJECT4}" in lines and f"-A GRIDX-JOBS-HOST {REJECT6}" in lines
    assert not [c for c in lab.log()[n:] if c.startswith(CHANGING)]
