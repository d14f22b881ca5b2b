"""Unit tests of gridx.py's Firewall, SSH, WireGuard, Swarm and Bundles sections."""

import os
import stat
import subprocess

import pytest
from fakes import (
    KEY_A,
    KEY_B,
    NODE,
    make_config,
)

import gridx

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
