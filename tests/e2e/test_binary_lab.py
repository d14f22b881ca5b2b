"""The static binary dist/gridx as the hub, on a lab node that has no Python.

Issue 6's end-to-end flow: an extra container from the lab's node image (no
python3) on the lab network becomes a hub run by the binary alone:
`gridx hub init`, `gridx hub add-peer`, a fresh worker-like container joins
with the bundle's join.sh, then `gridx jobs run --wait` and `gridx jobs logs`.

Skipped unless dist/gridx exists and is newer than gridx.py and
bundle_templates/ (`make binary`); GRIDX_BINARY names another binary to test.
The job image is a tiny one made on the spot from the host's static busybox
(busybox-static), else the lab's python:3.11 is loaded into the worker.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import conftest
import pytest
from e2e_helpers import NETWORK, NODE_IMAGE, NODE_RUN_FLAGS, ROOT, container, node_exec

BINARY = os.environ.get("GRIDX_BINARY") or str(ROOT / "dist" / "gridx")
LAB_NET = conftest.HUB_IP.rsplit(".", 1)[0]
BIN_HUB, BIN_HUB_IP = "binhub", LAB_NET + ".21"
BIN_WORKER, BIN_WORKER_IP = "binworker", LAB_NET + ".22"
TINY_IMAGE = "gridx-tiny:1"
# Docker 20.10's swarm constraint enforcer can reject a task that holds
# generic resources (every gridx job) when its node is updated; `--wait` runs
# such a job again (at most 3 times): said clearly if it still happens.
ENFORCER_ERROR = "assigned node no longer meets constraints"


def run(argv, timeout=300, input=None):
    return subprocess.run(argv, capture_output=True, timeout=timeout, input=input,
                          text=not isinstance(input, bytes))


def check(proc, what):
    out, err = proc.stdout, proc.stderr
    if isinstance(out, bytes):
        out, err = out.decode(errors="replace"), err.decode(errors="replace")
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    return out


def newest_source_mtime():
    templates = ROOT / "bundle_templates"
    return max(p.stat().st_mtime for p in [ROOT / "gridx.py", *templates.iterdir()])


def start_node(name, ip):
    cname = container(name)
    run(["docker", "rm", "-f", "-v", cname])
    check(run(["docker", "run", "-d", "--name", cname, "--hostname", name, "--network", NETWORK, "--ip", ip,
               "-v", "/var/lib/docker", *NODE_RUN_FLAGS, NODE_IMAGE]), f"docker run {cname}")
    return cname


def wait_ready(name, timeout=90):
    deadline = time.monotonic() + timeout
    while node_exec(name, ["test", "-e", "/run/gridx-lab.ready"]).returncode != 0:
        if time.monotonic() > deadline:
            logs = run(["docker", "logs", container(name)])
            pytest.fail(f"{container(name)}: dockerd not ready after {timeout} s\n{logs.stdout}{logs.stderr}",
                        pytrace=False)
        time.sleep(0.5)


def tiny_image_tar():
    """A root filesystem with the host's static busybox, or None."""
    busybox = shutil.which("busybox")
    if not busybox:
        return None
    info = run(["file", "-L", busybox]) if shutil.which("file") else None
    if info is None or "statically linked" not in info.stdout:
        return None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(busybox, arcname="bin/busybox")
        for applet in ("sh", "echo", "cat", "true"):
            link = tarfile.TarInfo("bin/" + applet)
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    return buffer.getvalue()


def load_job_image(worker):
    """Put a job image into the worker's engine; returns its name."""
    data = tiny_image_tar()
    if data is not None:
        check(run(["docker", "exec", "-i", worker, "docker", "import", "--change", "ENV PATH=/bin", "-", TINY_IMAGE],
                  input=data), "docker import of the busybox image")
        return TINY_IMAGE
    save = subprocess.Popen(["docker", "save", "python:3.11"], stdout=subprocess.PIPE)
    load = run(["docker", "exec", "-i", worker, "docker", "load", "-q"], input=save.stdout.read())
    save.wait()
    check(load, "docker load of python:3.11")
    return "python:3.11"


@pytest.fixture
def binary_nodes(request):
    if not os.path.isfile(BINARY):
        pytest.skip(f"{BINARY} not built: run make binary")
    if "GRIDX_BINARY" not in os.environ and os.path.getmtime(BINARY) < newest_source_mtime():
        pytest.skip("dist/gridx is older than gridx.py or bundle_templates/: run make binary")
    request.getfixturevalue("lab")  # the lab's network and images, once the binary is there
    names = [start_node(BIN_HUB, BIN_HUB_IP), start_node(BIN_WORKER, BIN_WORKER_IP)]
    try:
        wait_ready(BIN_HUB)
        wait_ready(BIN_WORKER)
        yield names
    finally:
        for cname in names:
            run(["docker", "rm", "-f", "-v", cname])


def test_binary_hub_flow_without_python(binary_nodes):
    hub_c, worker_c = binary_nodes

    def gridx(*args, timeout=300):
        return run(["docker", "exec", hub_c, "gridx", *args], timeout=timeout)

    assert node_exec(BIN_HUB, "command -v python3 || command -v python").returncode != 0, \
        "the lab node image has Python: this test needs a hub without it"
    check(run(["docker", "cp", BINARY, f"{hub_c}:/usr/local/bin/gridx"]), "docker cp dist/gridx")
    version = check(gridx("--version"), "gridx --version")
    assert version == check(run([sys.executable, str(ROOT / "gridx.py"), "--version"]), "gridx.py --version")

    check(gridx("hub", "init", "--ip", BIN_HUB_IP), "gridx hub init")
    added = check(gridx("hub", "add-peer", "--json", BIN_WORKER), "gridx hub add-peer")
    bundle = json.loads(added)["bundle"]
    # hub -> worker:/root as a tar stream (modes kept)
    copy = subprocess.Popen(["docker", "cp", f"{hub_c}:{bundle}", "-"], stdout=subprocess.PIPE)
    check(run(["docker", "cp", "-", f"{worker_c}:/root/"], input=copy.stdout.read()), "copy the bundle")
    copy.wait()
    folder = "/root/" + os.path.basename(bundle)
    check(node_exec(BIN_WORKER, [f"{folder}/join.sh", "--yes", "--cpus", "1", "--memory", "1G"], timeout=180),
          "join.sh with the binary hub's bundle")

    nodes = check(gridx("cluster", "--json"), "gridx cluster --json")
    worker = [n for n in json.loads(nodes)["nodes"] if n["hostname"] == BIN_WORKER]
    assert worker and worker[0]["state"] == "ready" and worker[0]["shared"]["cpus"] == 1, nodes

    image = load_job_image(worker_c)
    job = "binjob"
    result = gridx("jobs", "run", "--wait", "--name", job, image, "echo hello-from-the-binary-hub", timeout=180)
    if result.returncode != 0 and ENFORCER_ERROR in result.stderr:
        pytest.fail("the job was rejected by Docker 20.10's constraint enforcer more often than gridx runs "
                    "it again: a gridx.py matter, not the binary's\n" + result.stderr, pytrace=False)
    out = check(result, "gridx jobs run --wait")
    assert "hello-from-the-binary-hub" in out
    logs = check(gridx("jobs", "logs", job), "gridx jobs logs")
    assert "hello-from-the-binary-hub" in logs
    status = json.loads(check(gridx("jobs", "status", "--json", job), "gridx jobs status"))
    assert status["state"] == "complete" and status["exit_code"] == 0, status
