"""Workers on the real lab (issues 4, 12): bundles joining with flags and
through a terminal, sharing exactly what was chosen, contained (the engine
remapped, no-new-privileges) and with the swarm ports on the VPN only; a join
failing at the swarm step rolled back; join -> leave -> join; --no-hub-ssh
seen by the hub; the hub's SSH key trusted from the hub's VPN address only.
Worker containers have no Python.

(shellcheck of every bundle script: tests/test_bundle_join.py.)
"""

import os
import time

import pytest
from e2e_helpers import (
    HUB_VPN_IP,
    OTHER_KEY_LINE,
    WORKER_BRIDGE_IPS,
    WORKERS,
    add_peer,
    answer_policy_then_continue,
    cluster_node,
    contained,
    copy_bundle,
    hub,
    install_jq,
    machine_state,
    node_exec,
    ok,
    peer_row,
    prepare_machine,
    remove_peer_quietly,
    sudo_path_as_forky,
    terminal_in,
    unjoined,
    wait_peer_ready,
)

# A volunteer's own Docker settings, which join must merge into and leave must restore.
OWN_DAEMON_JSON = '{\n    "log-level": "warn",\n    "max-concurrent-downloads": 2\n}\n'
FAKE_GPUS = ("GPU-term-aaaa", "GPU-term-bbbb")
FAKE_NVIDIA_SMI = """#!/bin/sh
# made-up GPUs for the test: what nvidia-smi prints for join.sh's query
case "$*" in
*--query-gpu=uuid*) printf '%s\\n' {gpus} ;;
*) echo "GPU 0: Test GPU (UUID: {first})" ;;
esac
""".format(gpus=" ".join(FAKE_GPUS), first=FAKE_GPUS[0])


def lab_cpus():
    """The CPUs test.sh setup shares on each worker (its GRIDX_LAB_CPUS rule)."""
    if os.environ.get("GRIDX_LAB_CPUS"):
        return int(os.environ["GRIDX_LAB_CPUS"])
    return min(int(ok(node_exec("worker1", "nproc"), "nproc").strip()), 4)


def bundle_token(node, folder):
    return ok(node_exec(node, ["cat", f"{folder}/swarm-token"]), "swarm-token").strip()


def test_lab_workers_share_exactly_what_their_flags_said(lab):
    """setup joined worker1..3 with flags only (worker3 naming made-up GPU UUIDs)."""
    cpus = lab_cpus()
    for worker in WORKERS:
        row = peer_row(worker)
        node = cluster_node(row["ip"])
        assert node["hostname"] == worker and node["state"] == "ready" and not node["manager"], node
        gpu_ids = ["GPU-fake-0000", "GPU-fake-0001"] if worker == "worker3" else []
        assert node["shared"] == {"cpus": cpus, "memory_mib": 4096, "gpus": len(gpu_ids), "gpu_ids": gpu_ids}, node
        # the worker's own record says the same
        state = ok(node_exec(worker, "cat /var/lib/gridx/state.env"), "state.env")
        assert f"SHARED_CPUS='{cpus}'" in state and "SHARED_MEMORY_MIB='4096'" in state, state
        assert contained(worker), f"{worker}: Docker is not remapped with no-new-privileges"
        machine = machine_state(worker)
        assert machine["fwchain"] == "yes" and machine["jobchain"] == "yes", machine


def test_jobs_run_on_remapped_workers_and_their_root_is_not_the_machines(lab):
    """A job's root is uid 100000 and up on the worker (userns-remap)."""
    proc = hub("jobs", "run", "--wait", "python:3.11", "cat /proc/self/uid_map", timeout=300)
    out = ok(proc, "gridx jobs run --wait on a remapped worker")
    first = out.split()
    assert first[:3] == ["0", "100000", "65536"], out


def test_swarm_ports_answer_over_the_vpn_only(lab):
    """VXLAN (4789/udp) listens on every interface: the worker's INPUT chain drops
    what comes from elsewhere (moby/moby#47667)."""
    node_exec("worker1", "iptables -Z GRIDX-WORKER", check=True)
    node_exec("worker2", ["bash", "-c", "for i in 1 2 3; do printf x > /dev/udp/%s/4789; done"
                          % WORKER_BRIDGE_IPS["worker1"]], check=True)
    counters = ok(node_exec("worker1", "iptables -L GRIDX-WORKER -v -n -x"), "GRIDX-WORKER counters")
    vxlan = [line.split() for line in counters.splitlines() if "dpt:4789" in line]
    assert vxlan and int(vxlan[0][0]) >= 3, counters


def test_terminal_join_then_leave_then_flags_join(lab, fresh_node):
    if not install_jq(fresh_node):
        pytest.skip("jq is not installed on this host (scripts/install-deps.sh lab installs it)")
    node_exec(fresh_node, "cat > /usr/local/bin/nvidia-smi && chmod 755 /usr/local/bin/nvidia-smi",
              input=FAKE_NVIDIA_SMI, check=True)
    # jq and nvidia-smi stand in /usr/local/bin only, which sudo leaves off
    # PATH (forky's sudo, set here on every suite): join.sh must find them
    sudo_path_as_forky(fresh_node)
    hidden = node_exec(fresh_node, ["sudo", "sh", "-c", "command -v jq || command -v nvidia-smi"])
    assert hidden.returncode != 0 and not hidden.stdout, hidden.stdout
    prepare_machine(fresh_node, OWN_DAEMON_JSON)
    before = machine_state(fresh_node)
    assert before["daemon.json"] != "absent" and before["authorized_keys"] != "absent"
    name = "volunteer"
    try:
        added = add_peer(name)
        ip = added["peer"]["ip"]
        folder = copy_bundle(added["bundle"], fresh_node)

        # 1. Through a terminal, typing the answers (impossible ones first).
        term = terminal_in(fresh_node, f"cd {folder} && sudo ./join.sh")
        try:
            term.expect(r"this machine has \d+ CPUs")
            term.expect(r"How many CPUs to share \(1-\d+\) \[\d+\]: ")
            term.type("0")
            term.expect(r"share at least 1 CPU")
            term.expect(r"How many CPUs to share \(1-\d+\) \[\d+\]: ")
            term.type("1")
            term.expect(r"How much memory to share .*\]: ")
            term.type("8X")
            term.expect(r"not a size")
            term.expect(r"How much memory to share .*\]: ")
            term.type("768M")
            term.expect(r"How many GPUs to share \(0-2\) \[2\]: ")
            term.type("1")
            term.expect(r"Which GPUs .*\]: ")
            term.type("1")
            answer_policy_then_continue(term)
            term.type("y")
            rc = term.wait(timeout=300)
        finally:
            term.close()
        assert rc == 0, f"join.sh through a terminal exited {rc}:\n{term.text[-4000:]}"
        grant = term.text[term.text.index("What you grant the hub"):term.text.index("Continue?")]
        assert "root only inside its container" in grant and "SSH in as root, from" in grant, grant
        assert contained(fresh_node)
        wait_peer_ready(name)
        node = cluster_node(ip)
        assert node["hostname"] == "fresh" and node["state"] == "ready", node
        assert node["shared"] == {"cpus": 1, "memory_mib": 768, "gpus": 1, "gpu_ids": [FAKE_GPUS[1]]}, node
        merged = ok(node_exec(fresh_node, "jq -c . /etc/docker/daemon.json"), "daemon.json")
        assert '"log-level":"warn"' in merged and '"max-concurrent-downloads":2' in merged, merged
        assert f"NVIDIA-GPU={FAKE_GPUS[1]}" in merged and "gridx_cpu=1" in merged, merged
        keys = ok(node_exec(fresh_node, "cat /root/.ssh/authorized_keys"), "authorized_keys")
        assert keys.splitlines()[0] == OTHER_KEY_LINE and f'from="{HUB_VPN_IP}"' in keys, keys

        # 2. leave: everything back
        ok(node_exec(fresh_node, f"{folder}/leave.sh", timeout=180), "leave.sh")
        assert machine_state(fresh_node) == unjoined(before)

        # 3. join again, with flags only
        proc = node_exec(fresh_node, [f"{folder}/join.sh", "--yes", "--cpus", "2", "--memory", "640M",
                                      "--gpu-ids", FAKE_GPUS[0]], timeout=240)
        ok(proc, "join.sh with flags after a leave")
        wait_peer_ready(name)
        node = cluster_node(ip)
        assert node["state"] == "ready", node
        assert node["shared"] == {"cpus": 2, "memory_mib": 640, "gpus": 1, "gpu_ids": [FAKE_GPUS[0]]}, node
        ok(node_exec(fresh_node, f"{folder}/status.sh"), "status.sh after the second join")

        # 4. leave, twice
        ok(node_exec(fresh_node, f"{folder}/leave.sh", timeout=180), "second leave.sh")
        assert machine_state(fresh_node) == unjoined(before)
        again = node_exec(fresh_node, f"{folder}/leave.sh", timeout=60)
        assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr, again.stderr
        assert machine_state(fresh_node) == unjoined(before)
    finally:
        remove_peer_quietly(name)


def test_no_hub_ssh_is_seen_by_the_hub_and_leave_restores(lab, fresh_node):
    prepare_machine(fresh_node)
    before = machine_state(fresh_node)
    name = "declined"
    try:
        added = add_peer(name)
        folder = copy_bundle(added["bundle"], fresh_node)
        proc = node_exec(fresh_node, [f"{folder}/join.sh", "--yes", "--cpus", "1", "--memory", "512M",
                                      "--no-hub-ssh"], timeout=240)
        ok(proc, "join.sh --no-hub-ssh")
        assert "The hub may not SSH in" in proc.stderr, proc.stderr
        wait_peer_ready(name)
        keys = ok(node_exec(fresh_node, "cat /root/.ssh/authorized_keys"), "authorized_keys")
        assert keys == OTHER_KEY_LINE + "\n", keys
        # what gridx.py reads (LABEL_HUB_SSH) to say the worker declined
        labels = ok(node_exec("hub", ["docker", "node", "inspect", "fresh", "--format",
                                      "{{json .Description.Engine.Labels}}"]), "docker node inspect fresh")
        assert '"gridx.hub-ssh":"no"' in labels, labels
        # ...and says so instead of trying: exit 3, at once
        started = time.monotonic()
        declined = hub("hub", "ssh", name, "--", "true", timeout=60)
        assert declined.returncode == 3 and "declined" in declined.stderr, (declined.returncode, declined.stderr)
        assert time.monotonic() - started < 20
        assert contained(fresh_node)
        ok(node_exec(fresh_node, f"{folder}/leave.sh", timeout=180), "leave.sh")
        assert machine_state(fresh_node) == unjoined(before)
    finally:
        remove_peer_quietly(name)


def test_join_failing_at_the_swarm_step_leaves_the_machine_as_it_was(lab, fresh_node):
    prepare_machine(fresh_node, OWN_DAEMON_JSON)
    before = machine_state(fresh_node)
    name = "wrongtoken"
    try:
        added = add_peer(name)
        folder = copy_bundle(added["bundle"], fresh_node)
        flags = [f"{folder}/join.sh", "--yes", "--cpus", "1", "--memory", "512M"]

        # No python3 and no jq to merge into a daemon.json with settings: join
        # stops before changing anything and says what to add by hand.
        proc = node_exec(fresh_node, flags, timeout=120)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "neither python3 nor jq" in proc.stderr and '"node-generic-resources"' in proc.stderr, proc.stderr
        assert machine_state(fresh_node) == before

        if not install_jq(fresh_node):
            pytest.skip("jq is not installed on this host (scripts/install-deps.sh lab installs it)")
        # A wrong token (the right cluster, a made-up secret): every step up to
        # the swarm works (VPN, handshake, Docker config and restart), then
        # the swarm refuses it and join undoes all of it.
        token = bundle_token(fresh_node, folder)
        prefix, secret = token.rsplit("-", 1)
        wrong = prefix + "-" + ("0" * len(secret) if secret != "0" * len(secret) else "1" * len(secret))
        node_exec(fresh_node, ["sh", "-c", f"cat > {folder}/swarm-token"], input=wrong + "\n", check=True)
        proc = node_exec(fresh_node, flags, timeout=240)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "the hub answered" in proc.stderr, "the join failed before the swarm step:\n" + proc.stderr
        assert "restart" in proc.stderr.lower(), "Docker's config was not changed before the swarm step"
        assert "could not join the swarm" in proc.stderr and "rolled back" in proc.stderr, proc.stderr
        assert machine_state(fresh_node) == before
        assert node_exec(fresh_node, "cat /etc/docker/daemon.json").stdout == OWN_DAEMON_JSON
        ok(node_exec(fresh_node, "docker info --format '{{.ServerVersion}}'"), "Docker runs after the rollback")
        assert peer_row(name)["node_state"] is None, "a node joined the swarm after all"
    finally:
        remove_peer_quietly(name)


def test_hub_key_logs_in_only_from_the_hubs_vpn_address(lab):
    proc = hub("hub", "ssh", "worker1", "--", "hostname", timeout=60)
    assert ok(proc, "gridx hub ssh worker1 -- hostname").strip() == "worker1"
    keys = ok(node_exec("worker1", "cat /root/.ssh/authorized_keys"), "worker1 authorized_keys")
    assert f'from="{HUB_VPN_IP}"' in keys and "gridx-hub" in keys, keys

    ssh = ("ssh -i {key} -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
           "-o UserKnownHostsFile=/dev/null -o ConnectTimeout=10 root@{host} hostname")
    worker1_vpn = peer_row("worker1")["ip"]
    # The hub's own key from the hub's VPN address: accepted (the control).
    proc = node_exec("hub", ssh.format(key="/etc/gridx/ssh/id_ed25519", host=worker1_vpn), timeout=60)
    assert ok(proc, "ssh from the hub over the VPN").strip() == "worker1"
    # The same key from the hub's bridge address: refused.
    proc = node_exec("hub", ssh.format(key="/etc/gridx/ssh/id_ed25519", host=WORKER_BRIDGE_IPS["worker1"]),
                     timeout=60)
    assert proc.returncode == 255 and "Permission denied" in proc.stderr, proc.stdout + proc.stderr
    # The key copied to another node: refused over the bridge and over the VPN.
    key = ok(node_exec("hub", "cat /etc/gridx/ssh/id_ed25519"), "the hub's private key")
    try:
        node_exec("worker2", "umask 077 && cat > /tmp/stolen_hub_key", input=key, check=True)
        for host in (WORKER_BRIDGE_IPS["worker1"], worker1_vpn):
            proc = node_exec("worker2", ssh.format(key="/tmp/stolen_hub_key", host=host), timeout=60)
            assert proc.returncode == 255 and "Permission denied" in proc.stderr, (host, proc.stdout + proc.stderr)
            assert "worker1" not in proc.stdout
    finally:
        node_exec("worker2", "rm -f /tmp/stolen_hub_key")
