"""End-to-end tests on the local lab (see ../../test.sh).

Every test in tests/e2e is marked ``e2e``. The session fixture ``lab`` brings
the lab up once (``./test.sh start`` then ``./test.sh setup``, both idempotent
and fast when the lab is already up) and skips, with the reason, when Docker
cannot run on this machine (fails instead with GRIDX_E2E_REQUIRED=1, as
``make test`` and ``make e2e`` set it: CI must not pass with nothing run).

Helpers (plain functions and the lab's names) are in e2e_helpers.py: tests
import them from there (pytest advises against importing conftest). The
``lab`` fixture's object carries the main ones too: hub(*args), node_exec(node,
cmd), test_sh(*args), all returning ``subprocess.CompletedProcess`` with text
stdout/stderr and never raising on a non-zero exit (pass ``check=True``).

Fixture ``fresh_node``: a worker-like container (gridx-lab-fresh, hostname
fresh, 172.29.240.20) that took no part in ``setup``, for bundle tests such as
``add-external``; removed after the test. Fixture ``user_node`` (per module):
a member's machine (gridx-lab-user, no docker, no Python, dist/gridx) with
the users e2e-alice and e2e-bob set up from their bundles.

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

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from e2e_helpers import (
    ALICE,
    BINARY,
    BOB,
    E2E_DIR,
    FRESH_IP,
    HUB,
    HUB_IP,
    NETWORK,
    NODE_IMAGE,
    NODE_RUN_FLAGS,
    SETUP_TIMEOUT,
    START_TIMEOUT,
    SUITE,
    TEST_SH,
    USER_NODE,
    USER_NODE_IP,
    WORKERS,
    _run,
    carry_bundle,
    container,
    docker_unavailable_reason,
    hub,
    node_exec,
    ok,
    test_sh,
    wait_until,
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


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


def pushed_to_registry(image, timeout):
    """./test.sh push-image IMAGE: built when missing, pushed to the hub's
    registry; the name workers pull it by (10.0.0.1:5000/IMAGE)."""
    t0 = time.monotonic()
    name = ok(test_sh("push-image", image, timeout=timeout), f"./test.sh push-image {image}").strip()
    print(f"\n./test.sh push-image {image}: {time.monotonic() - t0:.1f} s")
    assert name == f"10.0.0.1:5000/{image}", name
    return name


@pytest.fixture(scope="session")
def registry_python(lab):
    """python:3.11 pushed to the hub's registry: the lab's nodes got it from
    `start`, not from the registry; the tests that pull it from the registry
    ask for this."""
    return pushed_to_registry("python:3.11", 900)


@pytest.fixture(scope="session")
def registry_jupyter(lab):
    """The lab's Jupyter image in the hub's registry, once for the tests that
    run it: the worker a Jupyter job lands on pulls it over the VPN."""
    return pushed_to_registry("gridx-lab-jupyter:latest", 1200)


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


@pytest.fixture(scope="module")
def user_node(lab):
    if not os.path.isfile(BINARY):
        pytest.fail(f"{BINARY} is missing: the user container runs the static binary; build it: make binary",
                    pytrace=False)
    for name in (ALICE, BOB):
        hub("hub", "remove-user", name, "--stop-jobs")
    cname = container(USER_NODE)
    subprocess.run(["docker", "rm", "-f", "-v", cname], capture_output=True)
    ok(subprocess.run(["docker", "run", "-d", "--name", cname, "--hostname", USER_NODE, "--network", NETWORK,
                       "--ip", USER_NODE_IP, "-v", "/var/lib/docker", *NODE_RUN_FLAGS, NODE_IMAGE],
                      capture_output=True, text=True), "docker run the user container")
    try:
        wait_until(lambda: node_exec(USER_NODE, ["test", "-e", "/run/gridx-lab.ready"]).returncode == 0, 90,
                   "the user container")
        # a person's machine: no docker CLI, no Python
        ok(node_exec(USER_NODE, "rm -f /usr/bin/docker /usr/bin/dockerd"), "remove docker")
        assert node_exec(USER_NODE, "command -v docker || command -v python3 || command -v python").returncode != 0
        ok(subprocess.run(["docker", "cp", BINARY, f"{cname}:/usr/local/bin/gridx"], capture_output=True, text=True),
           "copy the binary")
        added = json.loads(ok(hub("hub", "add-user", ALICE, "--max-gpus", "1", "--json"), "add-user alice"))
        carry_bundle(ALICE)
        # bob brings his own SSH key: the hub never has its private half
        ok(node_exec(USER_NODE, f"ssh-keygen -q -t ed25519 -N '' -C bob@laptop -f /root/.ssh/gridx-{BOB}"), "keygen")
        pub = ok(node_exec(USER_NODE, f"cat /root/.ssh/gridx-{BOB}.pub"), "bob's key").strip()
        ok(hub("hub", "add-user", BOB, "--pubkey", pub), "add-user bob --pubkey")
        carry_bundle(BOB)
        yield {"alice": added}
    finally:
        for name in (ALICE, BOB):
            hub("hub", "remove-user", name, "--stop-jobs")
        subprocess.run(["docker", "rm", "-f", "-v", cname], capture_output=True)
