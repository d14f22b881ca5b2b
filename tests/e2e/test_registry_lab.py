"""The hub's image registry on the real lab (issue 14, first half): a join
installs the bundle's CA; an image built on the hub and pushed with `gridx
image push` runs on that worker, which never had it (pulled over the VPN by
its remapped engine, trusting the CA in certs.d); `image ls` shows it with
its size; `image rm` removes it and frees its space; leave removes the CA;
the registry answers on the VPN address only; init again changes nothing;
a lab worker pulls the lab's job image from the registry over the VPN.
"""

import json
import os
import time

import pytest
from conftest import WORKERS, hub, node_exec, test_sh
from e2e_helpers import (
    HUB_VPN_IP,
    add_peer,
    contained,
    copy_bundle,
    hub_json,
    ok,
    remove_peer_quietly,
    wait_peer_ready,
)

REGISTRY = f"{HUB_VPN_IP}:5000"
CERTS = f"/etc/docker/certs.d/{REGISTRY}"
# 5 MB that do not compress: the pushed image's own layer, freed by image rm
DOCKERFILE = """FROM python:3.11
RUN head -c 5000000 /dev/urandom > /blob && echo 'hello from the hub registry {tag}' > /hello.txt
"""


# The fresh node joins as a volunteer's machine does, and its engine pulls a
# job's image as every lab engine does (only Docker Hub is made to fail at
# once, lab/entrypoint.sh): a job of an image only the hub's registry has is
# pulled over the VPN. Only the fresh node can hold the job's memory.
FRESH_MEMORY, JOB_MEMORY = "6G", "5G"  # the lab's workers share 4G


@pytest.fixture(scope="module")
def registry_python(lab):
    """python:3.11 pushed to the hub's registry (./test.sh push-image): the
    name workers pull it by. The lab's nodes got it from `start`, not from
    the registry; these tests make the workers use the registry."""
    t0 = time.monotonic()
    name = ok(test_sh("push-image", "python:3.11", timeout=900), "./test.sh push-image python:3.11").strip()
    print(f"\n./test.sh push-image python:3.11: {time.monotonic() - t0:.1f} s")
    assert name == f"{REGISTRY}/python:3.11", name
    return name


def image_on(node, image):
    return node_exec(node, ["docker", "image", "inspect", "--format={{.Id}}", "--", image]).returncode == 0


def test_a_pushed_image_runs_on_a_worker_that_never_had_it_and_leave_removes_the_ca(lab, fresh_node,
                                                                                   registry_python):
    tag = f"t{int(time.time())}"
    local, job, name = f"e2e/hello:{tag}", f"reg-{tag}", "regnode"
    remote = f"{REGISTRY}/e2e/hello:{tag}"
    assert node_exec(fresh_node, ["test", "-e", "/etc/docker/certs.d"]).returncode != 0
    try:
        # a volunteer's machine joins: the bundle's CA goes where Docker reads it
        added = add_peer(name)
        folder = copy_bundle(added["bundle"], fresh_node)
        ok(node_exec(fresh_node, [f"{folder}/join.sh", "--yes", "--cpus", "1", "--memory", FRESH_MEMORY],
                     timeout=300), "join.sh")
        wait_peer_ready(name)
        assert contained(fresh_node)
        hub_ca = ok(node_exec("hub", "cat /etc/gridx/registry/ca.crt"), "the hub's CA")
        assert ok(node_exec(fresh_node, f"cat {CERTS}/ca.crt"), "the worker's CA") == hub_ca
        state = ok(node_exec(fresh_node, "cat /var/lib/gridx/state.env"), "state")
        assert f"REGISTRY='{REGISTRY}'" in state and "REGISTRY_DIRS_CREATED='2'" in state, state
        status = json.loads(node_exec(fresh_node, [f"{folder}/status.sh", "--json"]).stdout)
        assert status["registry"] == REGISTRY and status["registry_ca"] is True, status

        # an image built on the hub, pushed, run there by a job
        ok(node_exec("hub", ["docker", "build", "-q", "-t", local, "-"], input=DOCKERFILE.format(tag=tag),
                     timeout=300), "docker build on the hub")
        assert not image_on(fresh_node, remote) and not any(image_on(w, remote) for w in WORKERS)
        t0 = time.monotonic()
        pushed = ok(hub("image", "push", local, timeout=300), "gridx image push")
        push_s = time.monotonic() - t0
        assert pushed == remote + "\n"
        t0 = time.monotonic()
        proc = hub("jobs", "run", "--wait", f"--name={job}", f"--memory={JOB_MEMORY}", remote, "--",
                   "cat", "/hello.txt", timeout=300)
        run_s = time.monotonic() - t0
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"hello from the hub registry {tag}" in proc.stdout
        assert hub_json("jobs", "status", job)["tasks"][0]["node"] == "fresh"
        assert image_on(fresh_node, remote)  # pulled by the remapped engine, TLS checked against certs.d
        print(f"\nimage push {push_s:.1f} s; jobs run --wait of an image the worker never had {run_s:.1f} s")

        # image ls: with its size
        listed = hub_json("image", "ls")
        mine = [i for i in listed["images"] if i["name"] == remote]
        assert len(mine) == 1 and mine[0]["size_bytes"] > 5_000_000, listed
        assert mine[0]["digest"].startswith("sha256:") and listed["registry"] == REGISTRY
        table = ok(hub("image", "ls"), "gridx image ls")
        assert remote in table and " MiB" in table

        # image rm: gone, and its space freed by the garbage collection
        du_before = int(ok(node_exec("hub", "du -sb /var/lib/gridx/registry"), "du").split()[0])
        removed = hub("image", "rm", remote, timeout=300)
        assert removed.returncode == 0, removed.stdout + removed.stderr
        du_after = int(ok(node_exec("hub", "du -sb /var/lib/gridx/registry"), "du").split()[0])
        assert du_before - du_after > 4_000_000, (du_before, du_after)
        freed = removed.stdout.rsplit("freed ", 1)[1].strip()
        assert freed.endswith(" MiB") and float(freed.split()[0]) >= 4, removed.stdout
        print(f"image rm freed {freed} (du -sb: {du_before - du_after} bytes)")
        names = [i["name"] for i in hub_json("image", "ls")["images"]]
        assert remote not in names and registry_python in names  # it answers again, the rest kept
        assert hub("image", "rm", remote).returncode == 2  # gone: exit 2, said so

        # leave: the CA goes, and the folders join made for it
        ok(node_exec(fresh_node, f"{folder}/leave.sh", timeout=180), "leave.sh")
        assert node_exec(fresh_node, ["test", "-e", "/etc/docker/certs.d"]).returncode != 0
        assert "REGISTRY" not in node_exec(fresh_node, "cat /var/lib/gridx/state.env 2>/dev/null").stdout
    finally:
        hub("jobs", "delete", job)
        node_exec("hub", ["docker", "rmi", "-f", local, remote])
        node_exec(fresh_node, f"[ ! -e /var/lib/gridx/state.env ] || /root/gridx-{name}-bundle/leave.sh", timeout=180)
        remove_peer_quietly(name)


def test_a_lab_engine_pulls_a_jobs_image_and_docker_hub_refuses_at_once(lab):
    # every node points Docker Hub's names at 127.0.0.1 (lab/entrypoint.sh): refused, no DNS wait
    proc = node_exec("worker1", "start=$(date +%s%N); docker pull -q python:3.11; rc=$?; "
                                "echo; echo rc=$rc ms=$(( ($(date +%s%N) - start) / 1000000 ))")
    rc, ms = proc.stdout.split()[-2:]
    assert rc == "rc=1" and "127.0.0.1:443: connect: connection refused" in proc.stderr, proc
    assert int(ms[3:]) < 5000, proc  # a lookup that waits for the DNS timeout takes 10-20 s
    job = f"hubpull-{int(time.time())}"
    try:
        proc = hub("jobs", "run", "--wait", f"--name={job}", "python:3.11", "--", "python3", "-c", "print(6 * 7)")
        assert proc.returncode == 0 and "42" in proc.stdout, proc.stdout + proc.stderr
        task = hub_json("jobs", "status", job)["tasks"][0]
        # the task's engine tried Docker Hub first, as a volunteer's does, then ran the image it has
        log = ok(node_exec(task["node"], ["grep", "-F", f"task.id={task['id']}", "/var/log/docker.log"]), "log")
        assert "pulling image failed" in log and "connection refused" in log, log
        print(f"\na pull from Docker Hub refused in {ms[3:]} ms")
    finally:
        hub("jobs", "delete", job)


def test_the_registry_answers_on_the_vpn_address_only(lab):
    listening = ok(node_exec("hub", "ss -Hltn 'sport = :5000'"), "ss")
    assert [line.split()[3] for line in listening.splitlines()] == [REGISTRY], listening
    hub_bridge = lab.hub_ip
    # from a worker, over the lab's bridge (not the VPN): nothing answers
    proc = node_exec("worker1", f"timeout 5 bash -c 'echo > /dev/tcp/{hub_bridge}/5000'")
    assert proc.returncode != 0
    proc = node_exec("worker1", f"timeout 5 bash -c 'echo > /dev/tcp/{HUB_VPN_IP}/5000'")
    assert proc.returncode == 0, proc.stderr
    rules = ok(node_exec("hub", "iptables -S GRIDX-INPUT"), "iptables")
    assert "-A GRIDX-INPUT -p tcp -m tcp --dport 5000 -j DROP" in rules
    assert rules.index("-i gridx0 -j RETURN") < rules.index("--dport 5000")


def test_hub_init_again_changes_nothing_and_keeps_the_ca(lab):
    before = ok(node_exec("hub", "sha256sum /etc/gridx/registry/ca.crt /etc/gridx/registry/ca.key"), "sha")
    proc = hub("hub", "init", f"--ip={lab.hub_ip}")
    assert proc.returncode == 0 and "nothing changed" in proc.stderr, proc.stderr
    assert ok(node_exec("hub", "sha256sum /etc/gridx/registry/ca.crt /etc/gridx/registry/ca.key"), "sha") == before
    modes = ok(node_exec("hub", "stat -c '%a %n' /etc/gridx/registry /etc/gridx/registry/ca.key "
                                "/etc/gridx/registry/server.key"), "stat")
    assert modes.split("\n")[:3] == ["700 /etc/gridx/registry", "600 /etc/gridx/registry/ca.key",
                                     "600 /etc/gridx/registry/server.key"], modes


def test_a_lab_worker_pulls_the_job_image_from_the_hub_registry_over_the_vpn(lab, registry_python):
    """The image start put into worker1 is taken out of it, pulled back from
    the hub's registry, every layer over the VPN, and is the same image.
    Everything that could hold its layers goes first: the ended containers
    of earlier tests' jobs, and every image (images built FROM python:3.11
    by earlier tests share its layers, and a pull would fetch none)."""
    worker = WORKERS[0]
    local = ok(node_exec(worker, ["docker", "image", "inspect", "--format={{.Id}}", "python:3.11"]), "inspect")
    try:
        ok(node_exec(worker, "docker container prune -f >/dev/null && docker image prune -af >/dev/null && "
                             "test -z \"$(docker images -qa)\""), "worker1 without images")
        size = next(i["size_bytes"] for i in hub_json("image", "ls")["images"] if i["name"] == registry_python)
        received = "cat /sys/class/net/gridx0/statistics/rx_bytes"
        before = int(ok(node_exec(worker, received), "rx_bytes"))
        t0 = time.monotonic()
        ok(node_exec(worker, ["docker", "pull", "-q", registry_python], timeout=600), "docker pull over the VPN")
        pull_s = time.monotonic() - t0
        got = int(ok(node_exec(worker, received), "rx_bytes")) - before
        assert got >= size, (got, size)  # every layer came over the VPN (the registry's compressed size)
    finally:
        node_exec(worker, ["docker", "tag", registry_python, "python:3.11"])
        node_exec(worker, ["docker", "rmi", registry_python])
    back = ok(node_exec(worker, ["docker", "image", "inspect", "--format={{.Id}}", "python:3.11"]), "inspect")
    assert back == local, (back, local)  # the very image start put there
    print(f"\na worker pulled python:3.11 ({got / 2**20:.0f} MiB over the VPN) from the hub's registry in "
          f"{pull_s:.1f} s; lab setup "
          f"{lab.timings.get('setup')} s (start {lab.timings.get('start')} s); load average {os.getloadavg()[0]:.1f}")
