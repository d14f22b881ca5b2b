"""Fixtures the unit tests share (the fakes they build on are in fakes.py;
the worker's fake machine in worker_machine.py)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fakes import GRIDX  # noqa: E402
from worker_machine import Lab  # noqa: E402

import gridx  # noqa: E402 (after the path)


@pytest.fixture(scope="session", autouse=True)
def gridx_bytecode(tmp_path_factory):
    """gridx.py's bytecode, cached for this session (fakes.gridx_argv)."""
    import fakes

    fakes.PYCACHE = str(tmp_path_factory.mktemp("pycache"))
    yield
    fakes.PYCACHE = None


@pytest.fixture
def lab(tmp_path):
    """The worker's fake machine (worker_machine.Lab): the bundle scripts run
    there for real, every system command a stub."""
    return Lab(tmp_path)


@pytest.fixture
def serve_env(tmp_path, monkeypatch):
    """A hub's users.json for alice (2 GPUs, 8 CPUs at most), and every
    program gridx would run recorded (and refused: a test that expects
    nothing to run fails when something does)."""
    home = tmp_path / "users"
    home.mkdir()
    (home / "users.json").write_text(json.dumps({"users": {"alice": {
        "cpus": 8, "memory_mib": None, "gpus": 2, "jobs": None}}}))
    monkeypatch.setenv("GRIDX_USERS_HOME", str(home))
    monkeypatch.delenv("GRIDX_MANAGER", raising=False)
    calls = []

    def recorded(argv, **kwargs):
        calls.append(list(argv))
        raise AssertionError(f"ran {argv}")

    monkeypatch.setattr(subprocess, "run", recorded)
    monkeypatch.setattr(subprocess, "Popen", recorded)
    monkeypatch.setattr(gridx, "watch_session_end", lambda armed=False: None)
    monkeypatch.setattr(gridx, "OWNER", None)
    monkeypatch.setattr(gridx, "SERVE_LIMITS", None)
    return calls


@pytest.fixture
def hub_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.setenv("GRIDX_REGISTRY_STORAGE", str(tmp_path / "storage"))
    monkeypatch.setenv("GRIDX_DOCKER_CERTS_DIR", str(tmp_path / "certs.d"))
    monkeypatch.delenv("GRIDX_MANAGER", raising=False)
    gridx.ensure_dir(str(tmp_path / "cfg"))
    return tmp_path


@pytest.fixture
def gridx_for_others():
    """gridx.py and bundle_templates/ copied where any user can read them, for
    tests that drop to another user: the checkout may sit in a private folder
    (root's home, a 0700 temp folder), and pytest's tmp_path is 0700 too."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="gridx-readable-")
    try:
        shutil.copy(GRIDX, folder)
        shutil.copytree(os.path.join(ROOT, "bundle_templates"), os.path.join(folder, "bundle_templates"))
        for dirpath, _, filenames in os.walk(folder):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)
        yield os.path.join(folder, "gridx.py")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def stop_fake_engines():
    """Every FakeEngine (fakes.py) a test started is stopped after it, and
    gridx forgets its connection."""
    from fakes import FakeEngine

    yield
    gridx.ENGINES.clear()
    while FakeEngine.started:
        FakeEngine.started.pop().stop()
