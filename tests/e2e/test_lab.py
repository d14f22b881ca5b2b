"""The local lab itself (issue 3): test.sh status / ssh / add-external, and a
bundle from add-external joining a machine that took no part in setup,
through a real terminal, then leaving it as it was; the job images that
start puts into a worker's remapped store before its join (issue 20)."""

import os
import re
import shutil
import stat
import subprocess
import tarfile

import pytest
from e2e_helpers import (
    LAB_NET,
    NETWORK,
    ROOT,
    TEST_SH,
    WORKERS,
    add_peer,
    answer_policy_then_continue,
    container,
    copy_bundle,
    machine_state,
    node_exec,
    ok,
    peer_row,
    prepare_machine,
    remove_peer_quietly,
    terminal_in,
    test_sh,
    unjoined,
    wait_hub_healthy,
    wait_peer_ready,
)

SECRET_FILES = ("settings.env", "gridx0.conf", "swarm-token")


def test_status_shows_manager_and_three_workers_ready_on_vpn_addresses(lab):
    out = ok(test_sh("status"), "./test.sh status")
    rows = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and re.fullmatch(r"10\.0\.0\.\d+", fields[1]):
            rows[fields[0]] = fields
    assert set(rows) >= {"hub", *WORKERS}, f"./test.sh status does not list hub and workers with VPN addresses:\n{out}"
    assert rows["hub"][1] == "10.0.0.1" and rows["hub"][2] == "manager" and rows["hub"][3] == "ready", out
    for worker in WORKERS:
        assert rows[worker][2] == "worker" and rows[worker][3] == "ready", out
    addresses = [rows[name][1] for name in ("hub", *WORKERS)]
    assert len(set(addresses)) == 4, out
    assert re.search(r"^healthy$", out, re.M), out


def test_ssh_worker2_hostname(lab):
    out = ok(test_sh("ssh", "worker2", "hostname"), "./test.sh ssh worker2 hostname")
    assert out.strip() == "worker2"


def test_workers_have_no_python(lab):
    for worker in WORKERS:
        proc = node_exec(worker, "command -v python3 || command -v python || ls /usr/bin/python3*")
        assert proc.returncode != 0 and not proc.stdout.strip(), f"{worker} has Python: {proc.stdout}"


def run_test_sh_in(folder, *args):
    return subprocess.run([str(TEST_SH), *args], cwd=folder, capture_output=True, text=True, timeout=300)


def test_add_external_bundle_joins_through_a_terminal_and_leaves(lab, fresh_node, tmp_path):
    name = "laptop"
    folder = tmp_path / f"gridx-{name}-bundle"
    archive = tmp_path / f"gridx-{name}-bundle.tar.gz"
    try:
        ok(run_test_sh_in(tmp_path, "add-external", name), "./test.sh add-external laptop")
        # On the host: the folder 0700, secrets 0600, the archive beside it.
        assert folder.is_dir() and archive.is_file(), os.listdir(tmp_path)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        for secret in SECRET_FILES:
            assert stat.S_IMODE((folder / secret).stat().st_mode) == 0o600, secret
        for script in ("join.sh", "leave.sh", "status.sh"):
            assert os.access(folder / script, os.X_OK), script
            assert (folder / script).read_bytes() == (ROOT / "bundle_templates" / script).read_bytes(), script
        with tarfile.open(archive) as tar:
            names = set(tar.getnames())
        assert {f"gridx-{name}-bundle/{f}" for f in ("join.sh", *SECRET_FILES)} <= names, names
        assert "Address = 10.0.0." in (folder / "gridx0.conf").read_text()

        # A fresh machine, with an authorized_keys of its own.
        prepare_machine(fresh_node)
        before = machine_state(fresh_node)
        assert before["link"] == "no" and before["swarm"] == "inactive", before
        ok(subprocess.run(["docker", "cp", str(folder), f"{container(fresh_node)}:/root/"],
                          capture_output=True, text=True), "docker cp the bundle into the fresh node")

        term = terminal_in(fresh_node, f"cd /root/gridx-{name}-bundle && sudo ./join.sh")
        try:
            term.expect(r"How many CPUs to share \(1-\d+\) \[\d+\]: ")
            term.type("1")
            term.expect(r"How much memory to share .*\]: ")
            term.type("512M")
            answer_policy_then_continue(term)
            term.type("y")
            rc = term.wait(timeout=300)
        finally:
            term.close()
        assert rc == 0, f"join.sh through a terminal exited {rc}:\n{term.text[-4000:]}"
        assert "Done." in term.text, term.text[-2000:]

        row = wait_peer_ready(name)
        assert row["node"] == "fresh" and row["shared"]["cpus"] == 1 and row["shared"]["memory_mib"] == 512, row
        status = ok(test_sh("status"), "./test.sh status")
        assert re.search(r"^fresh\s+10\.0\.0\.\d+\s+worker\s+ready", status, re.M), status

        left = node_exec(fresh_node, f"cd /root/gridx-{name}-bundle && ./leave.sh", timeout=180)
        ok(left, "./leave.sh")
        assert machine_state(fresh_node) == unjoined(before)
        again = node_exec(fresh_node, f"cd /root/gridx-{name}-bundle && ./leave.sh", timeout=60)
        assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr
    finally:
        remove_peer_quietly(name)
        shutil.rmtree(folder, ignore_errors=True)
        if archive.exists():
            archive.unlink()
    assert peer_row(name) is None


def test_setup_cuts_a_dead_node_left_on_the_lab_bridge(lab):
    """A killed Docker daemon can leave a dead node's network namespace on the
    lab bridge for minutes, still answering for the node's address (CI's joins
    once sent their handshakes there). Setup takes such a port off the bridge."""
    if os.geteuid() != 0:
        pytest.skip("needs root: ip netns")
    bridge = "br-" + ok(subprocess.run(["docker", "network", "inspect", "-f", "{{.Id}}", NETWORK],
                                       capture_output=True, text=True), "docker network inspect")[:12]
    # named after the lab: labs side by side (make test's suites) run this at once
    netns, port, address = f"{NETWORK}-dead", "gxdead" + LAB_NET.rsplit(".", 1)[1], LAB_NET + ".40"

    def ip(*args):
        return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)

    try:
        for step in (["netns", "add", netns],
                     ["link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns],
                     ["link", "set", port, "master", bridge, "up"],
                     ["-n", netns, "addr", "add", address + "/24", "dev", "eth0"],
                     ["-n", netns, "link", "set", "eth0", "up"]):
            ok(ip(*step), "ip " + " ".join(step))
        # like a dead node: no process, but its kernel answers for its address
        ok(node_exec("worker1", f"ping -c 1 -W 5 {address}"), "ping the dead namespace")
        proc = test_sh("setup", timeout=600)
        ok(proc, "./test.sh setup")
        assert f"removing their links ({port})" in proc.stderr, proc.stderr
        assert not os.path.exists(f"/sys/class/net/{port}")
        assert node_exec("worker1", f"ping -c 1 -W 1 {address}").returncode != 0
    finally:
        ip("link", "delete", port)
        ip("netns", "delete", netns)


def test_setup_brings_a_restarted_lab_back(lab):
    """Containers restarted (a host reboot, without systemd): the hub's Docker
    came up before its VPN, so its swarm manager is in error; setup brings
    every VPN back, restarts the hub's Docker and the swarm is whole again."""
    names = [container("hub")] + [container(w) for w in WORKERS]
    ok(subprocess.run(["docker", "restart", "-t", "5", *names], capture_output=True, text=True, timeout=300),
       "docker restart the lab")
    ok(test_sh("start", timeout=600), "./test.sh start")
    proc = node_exec("hub", "gridx hub init --ip " + lab.hub_ip)
    assert proc.returncode == 3 and "started before gridx0" in proc.stderr, proc.stderr
    ok(test_sh("setup", timeout=600), "./test.sh setup after the restart")
    wait_hub_healthy(timeout=120)


# What lab/seed-images.sh must leave as it found it: the files dockerd
# changes when it remaps (and their "-" copies), and daemon.json.
SEED_FILES = "/etc/docker/daemon.json " + " ".join(
    f"/etc/{f} /etc/{f}-" for f in ("passwd", "group", "shadow", "gshadow", "subuid", "subgid"))


def files_state(node):
    return ok(node_exec(node, f"for f in {SEED_FILES}; do "
                              "if [ -e $f ]; then sha256sum $f; else echo absent $f; fi; done"), "sha256sum")


def test_start_puts_the_job_image_where_the_joined_engine_finds_it(lab, fresh_node):
    """lab/seed-images.sh (what start runs in each worker) loads python:3.11 into
    the store the engine uses once join.sh turns on userns-remap, and leaves
    the machine as it found it: the same files, the engine not remapped. After
    a real join the image is there, with no load and no pull."""
    image_id = ok(subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", "python:3.11"],
                                 capture_output=True, text=True), "inspect python:3.11").strip()
    script = (ROOT / "lab" / "seed-images.sh").read_text()
    before = files_state(fresh_node)
    state = machine_state(fresh_node)

    def seed():
        save = subprocess.Popen(["docker", "save", "python:3.11"], stdout=subprocess.PIPE)
        proc = subprocess.run(["docker", "exec", "-i", container(fresh_node), "bash", "-c", script, "seed-images",
                               f"python:3.11={image_id}"], stdin=save.stdout, capture_output=True, text=True,
                              timeout=600)
        save.stdout.close()
        save.wait(timeout=60)
        return ok(proc, "seed-images.sh") + proc.stderr

    seed()
    assert files_state(fresh_node) == before
    assert machine_state(fresh_node) == state  # not remapped, no dockremap, nothing joined
    assert node_exec(fresh_node, "docker image inspect python:3.11").returncode != 0  # not in the plain store
    assert "already there" in seed()  # a second start does nothing
    name = "seeded"
    try:
        folder = copy_bundle(add_peer(name)["bundle"], fresh_node)
        ok(node_exec(fresh_node, [f"{folder}/join.sh", "--yes", "--cpus", "1", "--memory", "512M"], timeout=300),
           "join.sh")
        wait_peer_ready(name)
        remapped = ok(node_exec(fresh_node, ["docker", "image", "inspect", "-f", "{{.Id}}", "python:3.11"]),
                      "python:3.11 in the remapped store").strip()
        assert remapped == image_id
        ok(node_exec(fresh_node, ["docker", "run", "--rm", "python:3.11", "python3", "-c", "print(6 * 7)"]),
           "a container of it")
        ok(node_exec(fresh_node, f"{folder}/leave.sh", timeout=180), "leave.sh")
        assert machine_state(fresh_node) == unjoined(state)
    finally:
        node_exec(fresh_node, f"[ ! -e /var/lib/gridx/state.env ] || /root/gridx-{name}-bundle/leave.sh", timeout=180)
        remove_peer_quietly(name)
