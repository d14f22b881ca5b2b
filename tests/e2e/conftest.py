"""End-to-end tests on the local lab (see ../../test.sh).

Every test in tests/e2e is marked ``e2e``. The session fixture ``lab`` brings
the lab up once (``./test.sh start`` then ``./test.sh setup``, both idempotent
and fast when the lab is already up) and skips, with the reason, when Docker
cannot run on this machine (fails instead with GRIDX_E2E_REQUIRED=1, as
``make test`` and ``make e2e`` set it: CI must not pass with nothing run).

Helpers (plain functions, import them or use the ``lab`` fixture's methods):
    hub(*args)             ``gridx ARGS`` in the hub container
    node_exec(node, cmd)   a command in a node container (str: ``sh -c``)
    test_sh(*args)         ``./test.sh ARGS`` on the host
All return ``subprocess.CompletedProcess`` with text stdout/stderr and never
raise on a non-zero exit status (pass ``check=True`` for that).

Fixture ``fresh_node``: a worker-like container (gridx-lab-fresh, hostname
fresh, 172.29.240.20) that took no part in ``setup``, for bundle tests such as
``add-external``; removed after the test.

Environment:
    GRIDX_LAB_KEEP   1 (default): leave the lab running after the session, so
                     the next run starts at once and it can be inspected
                     (./test.sh status); 0: ``./test.sh clean`` at the end.
    GRIDX_LAB_NAME, GRIDX_LAB_NET   which lab (see test.sh): e.g.
                     GRIDX_LAB_NAME=gridx-ci GRIDX_LAB_NET=172.29.250 for a
                     lab of its own beside a developer's gridx-lab.
    GRIDX_LAB_SUITE  the Debian suite the lab's nodes run: bookworm (Docker
                     20.10, the default), trixie (Docker 26.1) or forky
                     (Docker 28.5), as test.sh.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
E2E_DIR = Path(__file__).resolve().parent
TEST_SH = ROOT / "test.sh"
NETWORK = os.environ.get("GRIDX_LAB_NAME") or "gridx-lab"
LAB_NET = os.environ.get("GRIDX_LAB_NET") or "172.29.240"
PREFIX = NETWORK + "-"
HUB = PREFIX + "hub"
WORKERS = ("worker1", "worker2", "worker3")
HUB_IP = LAB_NET + ".10"
FRESH_IP = LAB_NET + ".20"
# The Debian suite the lab's nodes run (test.sh: GRIDX_LAB_SUITE), and its image.
SUITE = os.environ.get("GRIDX_LAB_SUITE") or "bookworm"
NODE_IMAGE = "gridx-lab-node:" + SUITE
# The capability settings of docker-compose.yml, for containers made here.
NODE_RUN_FLAGS = [
    "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--device", "/dev/net/tun", "--device-cgroup-rule", "a *:* rwm",
    "--label", "io.gridx.lab.name=" + NETWORK, "--label", "io.gridx.lab.suite=" + SUITE,
]
START_TIMEOUT = 1800  # from nothing: debootstrap + builds, on 2 slow cores
SETUP_TIMEOUT = 900


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def _run(argv, timeout=300, check=False, input=None):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def container(node):
    """hub / worker1 / fresh ... -> the container name (gridx-lab-...)."""
    return node if node.startswith(PREFIX) else PREFIX + node


def hub(*args, timeout=300, check=False, input=None):
    """Run ``gridx ARGS`` in the hub (the checkout's gridx.py, mounted)."""
    return _run(["docker", "exec", "-i", HUB, "gridx", *map(str, args)],
                timeout=timeout, check=check, input=input)


def node_exec(node, cmd, timeout=300, check=False, input=None):
    """Run CMD in a node: a list as argv, a string under ``sh -c``."""
    argv = ["sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
    return _run(["docker", "exec", "-i", container(node), *argv],
                timeout=timeout, check=check, input=input)


def test_sh(*args, timeout=600, check=False):
    """Run ``./test.sh ARGS`` on the host."""
    return _run([str(TEST_SH), *map(str, args)], timeout=timeout, check=check)


test_sh.__test__ = False  # a helper, not a test for pytest to collect


def docker_unavailable_reason():
    if shutil.which("docker") is None:
        return "Docker is not installed (scripts/install-deps.sh lab)"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 30 s"
    if info.returncode != 0:
        return "Docker is not running here: " + (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
    if shutil.which("docker-compose") is None and _run(["docker", "compose", "version"]).returncode != 0:
        return "neither docker compose nor docker-compose is installed"
    return None


class Lab:
    """What the ``lab`` fixture yields: the helpers plus names and timings."""

    hub_container = HUB
    workers = WORKERS
    hub_ip = HUB_IP
    network = NETWORK

    def __init__(self, timings):
        self.timings = timings

    hub = staticmethod(hub)
    node_exec = staticmethod(node_exec)
    test_sh = staticmethod(test_sh)
    container = staticmethod(container)


def _lab_step(name, timeout, timings):
    t0 = time.monotonic()
    proc = _run([str(TEST_SH), name], timeout=timeout)
    timings[name] = round(time.monotonic() - t0, 1)
    if proc.returncode != 0:
        pytest.fail(
            f"./test.sh {name} failed (exit {proc.returncode}) after {timings[name]} s\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def lab(request):
    """The lab, up and set up (hub initialised, 3 workers joined), once a session."""
    reason = docker_unavailable_reason()
    if reason and os.environ.get("GRIDX_E2E_REQUIRED") == "1":
        pytest.fail(f"e2e: {reason} (GRIDX_E2E_REQUIRED=1: the end-to-end tests must run)", pytrace=False)
    if reason:
        pytest.skip(f"e2e: {reason}")
    timings = {}
    _lab_step("start", START_TIMEOUT, timings)
    _lab_step("setup", SETUP_TIMEOUT, timings)
    # A reused lab keeps its swarm: jobs that an interrupted earlier run left
    # there would clash with the names the tests use.
    node_exec("hub", "docker service ls -q --filter label=gridx.job | xargs -r docker service rm >/dev/null; "
                     "docker config ls -q --filter label=gridx.job | xargs -r docker config rm >/dev/null",
              timeout=120)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"lab {NETWORK} (Debian {SUITE}) ready: ./test.sh start {timings['start']} s, "
                            f"setup {timings['setup']} s")
    yield Lab(timings)
    if os.environ.get("GRIDX_LAB_KEEP", "1") == "0":
        test_sh("clean", timeout=300)


@pytest.fixture
def fresh_node(lab):
    """A worker-like container that took no part in setup; removed afterwards."""
    name = "fresh"
    cname = container(name)
    _run(["docker", "rm", "-f", "-v", cname])
    _run(["docker", "run", "-d", "--name", cname, "--hostname", name,
          "--network", NETWORK, "--ip", FRESH_IP,
          "-v", "/var/lib/docker", *NODE_RUN_FLAGS, NODE_IMAGE], check=True)
    deadline = time.monotonic() + 90
    while node_exec(name, ["test", "-e", "/run/gridx-lab.ready"]).returncode != 0:
        if time.monotonic() > deadline:
            logs = _run(["docker", "logs", cname])
            _run(["docker", "rm", "-f", "-v", cname])
            pytest.fail(f"{cname}: dockerd not ready after 90 s\n{logs.stdout}{logs.stderr}", pytrace=False)
        time.sleep(0.5)
    yield name
    _run(["docker", "rm", "-f", "-v", cname])
