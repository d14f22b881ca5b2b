"""The hub on the real lab (issue 2): init, peers, live removal, status, the
firewall, concurrent add-peer, bad input, --json and ssh.

Tests that change the lab put it back; the one that stops a worker runs last.
"""

import json
import re
import subprocess
import time

import pytest
from e2e_helpers import (
    HUB,
    HUB_IP,
    HUB_VPN_IP,
    WORKER_BRIDGE_IPS,
    WORKERS,
    add_peer,
    copy_bundle,
    hub,
    hub_json,
    machine_state,
    node_exec,
    ok,
    peer_row,
    remove_peer_quietly,
    start_stopped_worker,
    unjoined,
    wait_hub_healthy,
    wait_peer_ready,
    wait_until,
)

HUB_FILES = [
    "/etc/gridx/hub_config.json",
    "/etc/gridx/server.key",
    "/etc/gridx/firewall.rules",
    "/etc/gridx/ssh/id_ed25519",
    "/etc/gridx/ssh/id_ed25519.pub",
    "/etc/wireguard/gridx0.conf",
]
JOIN_FLAGS = ["--yes", "--cpus", "1", "--memory", "512M"]


def hub_sh(cmd, timeout=300):
    return node_exec("hub", cmd, timeout=timeout)


def hub_snapshot():
    """Everything on the hub that a command that changes nothing must leave alone."""
    script = (
        "sha256sum " + " ".join(HUB_FILES) + "; "
        "echo; wg show gridx0 public-key; wg show gridx0 listen-port; wg show gridx0 allowed-ips | sort; "
        "echo; ls -la --time-style=+ /etc/gridx/bundles /etc/gridx/clients | awk '{print $1, $5, $NF}'; "
        "echo; docker swarm join-token -q worker; docker node ls -q | sort; "
        "docker network ls -q --filter name=gridx-jobs; "
        "echo; iptables -S GRIDX-INPUT; iptables -S INPUT"
    )
    return ok(hub_sh(script), "hub snapshot")


def wg_peers():
    """{public key: {handshake, rx, tx, allowed}} from `wg show gridx0 dump` on the hub."""
    out = ok(hub_sh("wg show gridx0 dump"), "wg show gridx0 dump")
    peers = {}
    for line in out.splitlines()[1:]:
        key, _psk, _endpoint, allowed, handshake, rx, tx, _keepalive = line.split("\t")
        peers[key] = {"allowed": allowed, "handshake": int(handshake), "rx": int(rx), "tx": int(tx)}
    return peers


def hub_config():
    return json.loads(ok(hub_sh("cat /etc/gridx/hub_config.json"), "cat hub_config.json"))


def config_peers():
    """{name: {ip, public_key}} from hub_config.json (whatever its layout)."""
    peers = hub_config()["peers"]
    if isinstance(peers, list):
        peers = {p["name"]: p for p in peers}
    return {name: {"ip": p["ip"], "public_key": p["public_key"]} for name, p in peers.items()}


def wg_conf_peers():
    """The public keys of the [Peer] sections of /etc/wireguard/gridx0.conf, as wg-quick reads it."""
    out = ok(hub_sh("wg-quick strip gridx0"), "wg-quick strip gridx0")
    keys = re.findall(r"^PublicKey\s*=\s*(\S+)", out, re.M)
    assert out.count("[Peer]") == len(keys), out
    return keys


def worker_vpn_ips():
    peers = config_peers()
    return {w: peers[w]["ip"] for w in WORKERS}


# ---------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------

def test_init_twice_changes_nothing(lab):
    before = hub_snapshot()
    node_id = ok(hub_sh("docker info --format '{{.Swarm.NodeID}}'"), "node id")
    proc = hub("hub", "init", "--ip", HUB_IP)
    ok(proc, "second gridx hub init")
    assert "nothing changed" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert hub_snapshot() == before
    assert ok(hub_sh("docker info --format '{{.Swarm.NodeID}}'"), "node id") == node_id


@pytest.mark.parametrize("other", [
    ["--port", "51821"],
    ["--subnet", "10.9.0.0/24"],
    ["--interface", "gridx9"],
])
def test_init_with_other_settings_is_refused(lab, other):
    before = hub_snapshot()
    proc = hub("hub", "init", "--ip", HUB_IP, *other)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "already initialised" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert hub_snapshot() == before


# ---------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------

def test_three_workers_shook_hands_and_are_ready(lab):
    rows = {r["name"]: r for r in hub_json("hub", "list-peers")["peers"]}
    assert set(WORKERS) <= set(rows), rows
    live = wg_peers()
    for worker in WORKERS:
        row = rows[worker]
        assert row["live"] and row["public_key"] in live, row
        assert row["handshake_age"] is not None and 0 <= row["handshake_age"] < 180, row
        assert live[row["public_key"]]["handshake"] > 0
        assert row["node"] == worker and row["node_state"] == "ready", row
        assert row["ip"].startswith("10.0.0.") and row["ip"] != HUB_VPN_IP, row
        # the worker side agrees: its link has a handshake with the hub
        ok(node_exec(worker, f"ping -c 1 -W 5 {HUB_VPN_IP}"), f"ping the hub from {worker} over the VPN")
    assert len({rows[w]["ip"] for w in WORKERS}) == 3


def test_json_outputs_parse(lab):
    peers = hub_json("hub", "list-peers")
    assert {"name", "ip", "public_key", "endpoint", "handshake_age", "node_state", "shared"} <= set(peers["peers"][0])
    status = hub_json("hub", "status")
    assert status["healthy"] is True and status["interface"]["address"] == HUB_VPN_IP, status
    assert status["swarm"]["state"] == "active" and status["problems"] == [], status
    info = hub_json("hub", "join-info", "--name", "worker1")
    assert info["token"].startswith("SWMTKN-") and info["manager"] == f"{HUB_VPN_IP}:2377", info
    assert "[Interface]" in info["wg_config"] and info["ip"] == worker_vpn_ips()["worker1"]
    cluster = hub_json("cluster")
    assert {n["hostname"] for n in cluster["nodes"]} >= {"hub", *WORKERS}
    assert cluster["totals"]["cpus"] >= 3
    jobs = json.loads(ok(hub("jobs", "list", "--json"), "gridx jobs list --json"))
    assert isinstance(jobs, (dict, list))
    worker = json.loads(ok(node_exec("worker1", "/root/gridx-worker1-bundle/status.sh --json"), "status.sh --json"))
    assert worker["healthy"] is True and worker["vpn_ip"] == worker_vpn_ips()["worker1"], worker
    assert worker["swarm_state"] == "active" and worker["link_up"] is True, worker


def test_hub_ssh_runs_commands_and_passes_the_exit_status(lab):
    proc = hub("hub", "ssh", "worker1", "--", "hostname", timeout=60)
    assert ok(proc, "gridx hub ssh worker1 -- hostname").strip() == "worker1"
    proc = hub("hub", "ssh", "worker1", "--", "sh", "-c", "exit 7", timeout=60)
    assert proc.returncode == 7, proc.stdout + proc.stderr
    proc = hub("hub", "ssh", "worker2", "--", "sh", "-c", "echo $(hostname) says hi", timeout=60)
    assert ok(proc, "hub ssh worker2").strip() == "worker2 says hi"


BAD_INPUTS = [
    ["hub", "add-peer", "../x"],
    ["hub", "add-peer", "a b"],
    ["hub", "add-peer", "A"],
    ["hub", "add-peer", "a" * 64],
    ["hub", "add-peer", "worker1"],  # duplicate name
    ["hub", "add-peer", "newpeer", "--ip", "10.0.0.1"],  # the hub's own address
    ["hub", "add-peer", "newpeer", "--ip", "@worker1"],  # a duplicate address (filled in below)
    ["hub", "add-peer", "newpeer", "--ip", "10.9.9.9"],  # outside the subnet
    ["hub", "add-peer", "newpeer", "--ip", "10.0.0.255"],  # the broadcast address
    ["hub", "add-peer", "newpeer", "--ip", "not-an-ip"],
    ["hub", "add-peer", "newpeer", "--pubkey", "not-a-key"],
    ["hub", "add-peer", "newpeer", "--pubkey", "@worker1-key"],  # another peer's key
    ["hub", "remove-peer", "nosuchpeer"],
    ["hub", "remove-peer", "../etc"],
    ["hub", "join-info", "--name", "nosuchpeer"],
    ["hub", "ssh", "nosuchpeer", "--", "true"],
    ["hub", "init", "--ip", HUB_IP, "--port", "0"],
    ["hub", "init", "--ip", HUB_IP, "--port", "70000"],
    ["hub", "init", "--ip", HUB_IP, "--subnet", "10.0.0.0/33"],
    ["hub", "init", "--ip", "not-an-ip"],
]


def test_bad_inputs_exit_2_and_change_nothing(lab):
    peers = config_peers()
    before = hub_snapshot()
    failures = []
    for argv in BAD_INPUTS:
        argv = [{"@worker1": peers["worker1"]["ip"], "@worker1-key": peers["worker1"]["public_key"]}.get(a, a)
                for a in argv]
        proc = hub(*argv, timeout=120)
        # one clear line (error: ...), perhaps with a hint, and no traceback
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        if (proc.returncode != 2 or not lines or not lines[0].startswith("error: ") or len(lines) > 2
                or "Traceback" in proc.stderr):
            failures.append(f"gridx {' '.join(argv)}: exit {proc.returncode}, stderr {proc.stderr!r}")
    assert not failures, "\n".join(failures)
    assert hub_snapshot() == before
    assert peer_row("newpeer") is None


# ---------------------------------------------------------------------------
# firewall
# ---------------------------------------------------------------------------

def drop_counts():
    """{rule: packets} for the DROP rules of the hub's GRIDX-INPUT chain."""
    out = ok(hub_sh("iptables -L GRIDX-INPUT -v -n -x"), "iptables -L GRIDX-INPUT")
    counts = {}
    for line in out.splitlines():
        match = re.match(r"\s*(\d+)\s+\d+\s+DROP\s.*\b(tcp|udp) dpt:(\d+)", line)
        if match:
            counts[f"{match.group(3)}/{match.group(2)}"] = int(match.group(1))
    return counts


def tcp_connect(node, host, port, wait=4):
    """Exit status of a TCP connect from NODE: 0 connected, 124 no answer (dropped), 1 refused."""
    return node_exec(node, ["timeout", str(wait), "bash", "-c", f"</dev/tcp/{host}/{port}"], timeout=60).returncode


def test_swarm_ports_answer_over_the_vpn_only(lab):
    # From a worker: over the VPN the swarm ports answer; at the hub's bridge
    # address (not the VPN) the firewall drops them: no answer at all (exit
    # 124), where a port nobody listens on would be refused at once (exit 1).
    before = drop_counts()
    for port in (2377, 7946):
        assert tcp_connect("worker1", HUB_VPN_IP, port) == 0, f"{HUB_VPN_IP}:{port} unreachable over the VPN"
        assert tcp_connect("worker1", HUB_IP, port) == 124, f"{HUB_IP}:{port} answered from a non-VPN address"
    # sshd listens everywhere: the bridge path itself works, and a closed port is refused
    assert tcp_connect("worker1", HUB_IP, 22) == 0
    assert tcp_connect("worker1", HUB_IP, 2378) == 1
    for port in (7946, 4789):
        node_exec("worker1", ["bash", "-c", f"for i in 1 2 3; do echo x > /dev/udp/{HUB_IP}/{port}; done"])
    after = drop_counts()
    for rule in ("2377/tcp", "7946/tcp", "7946/udp", "4789/udp"):
        assert after.get(rule, 0) > before.get(rule, 0), f"the hub's firewall dropped nothing for {rule}: {after}"
    # WireGuard's port is the public one: the workers' handshakes come over the bridge.
    endpoints = {r["name"]: r["endpoint"] for r in hub_json("hub", "list-peers")["peers"]}
    for worker in WORKERS:
        assert endpoints[worker].startswith(WORKER_BRIDGE_IPS[worker] + ":"), endpoints


# ---------------------------------------------------------------------------
# 20 add-peer at once
# ---------------------------------------------------------------------------

def test_twenty_concurrent_add_peer_get_twenty_addresses(lab):
    names = [f"bulk{i:02d}" for i in range(1, 21)]
    existing = config_peers()
    try:
        procs = [subprocess.Popen(["docker", "exec", HUB, "gridx", "hub", "add-peer", "--json", name],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names]
        results = [(p.communicate(timeout=600), p.returncode) for p in procs]
        failed = [f"{n}: exit {rc}: {err}" for n, ((_, err), rc) in zip(names, results) if rc != 0]
        assert not failed, "\n".join(failed)
        added = {json.loads(out)["peer"]["name"]: json.loads(out)["peer"]["ip"] for (out, _), _ in results}
        assert set(added) == set(names)
        assert len(set(added.values())) == 20, added
        used = {p["ip"] for p in existing.values()} | {HUB_VPN_IP}
        assert not set(added.values()) & used, added
        assert all(ip.startswith("10.0.0.") for ip in added.values()), added

        peers = config_peers()  # hub_config.json parses
        assert set(peers) == set(existing) | set(names)
        assert {n: peers[n]["ip"] for n in names} == added
        live = wg_peers()
        assert set(live) == {p["public_key"] for p in peers.values()}, "wg show lists other peers than the config"
        for peer in peers.values():
            assert live[peer["public_key"]]["allowed"] == peer["ip"] + "/32", peer
        assert sorted(wg_conf_peers()) == sorted(p["public_key"] for p in peers.values())
        bundles = ok(hub_sh("ls /etc/gridx/bundles"), "ls bundles").split()
        assert {f"gridx-{n}-bundle" for n in names} <= set(bundles)
    finally:
        procs = [subprocess.Popen(["docker", "exec", HUB, "gridx", "hub", "remove-peer", name],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names]
        for p in procs:
            p.communicate(timeout=600)
    peers = config_peers()
    assert set(peers) == set(existing), peers
    assert set(wg_peers()) == {p["public_key"] for p in existing.values()}
    assert sorted(wg_conf_peers()) == sorted(p["public_key"] for p in existing.values())
    assert not [b for b in ok(hub_sh("ls /etc/gridx/bundles"), "ls").split() if b.startswith("gridx-bulk")]


# ---------------------------------------------------------------------------
# remove-peer while the others keep their session
# ---------------------------------------------------------------------------

def join(node, folder, *flags, timeout=240):
    return node_exec(node, [f"{folder}/join.sh", *(flags or JOIN_FLAGS)], timeout=timeout)


def test_remove_peer_keeps_other_sessions_and_rotates_the_token(lab, fresh_node):
    name = "victim"
    old_token = ok(hub_sh("docker swarm join-token -q worker"), "join token").strip()
    try:
        added = add_peer(name)
        folder = copy_bundle(added["bundle"], fresh_node)
        ok(join(fresh_node, folder), "join.sh of the peer to remove")
        victim = wait_peer_ready(name)
        victim_key = victim["public_key"]
        assert ok(node_exec(fresh_node, ["cat", f"{folder}/swarm-token"]), "bundle token").strip() == old_token

        others = {w: peer_row(w)["public_key"] for w in WORKERS}
        before = wg_peers()
        for worker, key in others.items():
            assert before[key]["handshake"] > 0, f"{worker} never shook hands"
        ips = worker_vpn_ips()
        # A continuous ping from the hub to every other worker across the removal.
        pings = {w: subprocess.Popen(["docker", "exec", HUB, "ping", "-n", "-i", "0.2", "-c", "50", "-W", "2", ip],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for w, ip in ips.items()}
        time.sleep(2)
        removed = hub("hub", "remove-peer", name, timeout=120)
        outputs = {w: p.communicate(timeout=120)[0] for w, p in pings.items()}
        ok(removed, "gridx hub remove-peer victim")
        after = wg_peers()

        for worker, out in outputs.items():
            match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
            assert match and match.group(1) == match.group(2) == "50", f"ping to {worker} lost packets:\n{out}"
        for worker, key in others.items():
            # Not reset: a restarted interface starts from 0 handshakes and 0 bytes.
            assert after[key]["handshake"] >= before[key]["handshake"] > 0, (worker, before[key], after[key])
            assert after[key]["rx"] >= before[key]["rx"] and after[key]["tx"] >= before[key]["tx"], worker
        assert victim_key not in after
        assert name not in config_peers()
        assert victim_key not in wg_conf_peers()
        nodes = hub_json("cluster")["nodes"]
        assert victim["ip"] not in {n["address"] for n in nodes}, "the removed peer's swarm node is still there"
        assert hub_sh(f"test -e /etc/gridx/bundles/gridx-{name}-bundle").returncode != 0
        new_token = ok(hub_sh("docker swarm join-token -q worker"), "join token").strip()
        assert new_token != old_token, "remove-peer did not rotate the worker join token"

        # The removed peer's old bundle no longer joins: give it back a VPN
        # address (a new peer of the same name) but keep its old token.
        ok(node_exec(fresh_node, f"{folder}/leave.sh", timeout=180), "leave.sh on the removed peer")
        state = machine_state(fresh_node)
        assert state == unjoined(state)
        readded = add_peer(name)
        folder = copy_bundle(readded["bundle"], fresh_node)
        node_exec(fresh_node, ["sh", "-c", f"cat > {folder}/swarm-token"], input=old_token + "\n", check=True)
        proc = join(fresh_node, folder)
        assert proc.returncode == 1, f"join with the old token: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
        assert "could not join the swarm" in proc.stderr, proc.stderr
        assert "the hub answered" in proc.stderr, "the VPN itself did not work: the token was not what failed"
        assert machine_state(fresh_node) == state, "the failed join was not rolled back"
        # and with the bundle's own (new) token it joins
        node_exec(fresh_node, ["sh", "-c", f"cat > {folder}/swarm-token"], input=new_token + "\n", check=True)
        ok(join(fresh_node, folder), "join.sh with the new token")
        wait_peer_ready(name)
        ok(node_exec(fresh_node, f"{folder}/leave.sh", timeout=180), "leave.sh")
    finally:
        remove_peer_quietly(name)
    assert peer_row(name) is None


# ---------------------------------------------------------------------------
# status: healthy, then degraded when a worker stops (runs last: it restarts one)
# ---------------------------------------------------------------------------

def test_status_exits_1_when_a_worker_is_stopped(lab):
    wait_hub_healthy(timeout=60)
    proc = hub("hub", "status")
    assert proc.returncode == 0 and "healthy" in proc.stdout, proc.stdout + proc.stderr
    cname = lab.container("worker2")
    ok(subprocess.run(["docker", "stop", cname], capture_output=True, text=True, timeout=120), "docker stop worker2")
    try:
        def degraded():
            proc = hub("hub", "status")
            return proc if proc.returncode == 1 else None
        proc = wait_until(degraded, 90, "gridx hub status to exit 1 with worker2 stopped", interval=2)
        assert "worker2" in proc.stderr and "problem" in proc.stderr, proc.stderr
        assert "degraded" in proc.stdout
        status = hub_json_any("hub", "status")
        assert status["healthy"] is False and any("worker2" in p for p in status["problems"]), status
    finally:
        start_stopped_worker("worker2")
    ok(node_exec("worker2", "/root/gridx-worker2-bundle/status.sh"), "worker2 status.sh after the restart")


def hub_json_any(*args):
    """--json output of a command whatever its exit status."""
    return json.loads(hub(*args, "--json").stdout)
