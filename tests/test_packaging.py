"""Python packaging (pyproject.toml): what `pip install .` gives.

One install for the module (tests/pip_install.py: a wheel built from a copy
of the checkout, installed into a new venv, offline where this machine's
setuptools can build it): the `gridx` console script runs from anywhere,
prints gridx.VERSION, imports the module from site-packages (its bytecode
cached there), and `gridx worker status` finds the bundle templates where
the wheel's data files put them (PREFIX/share/gridx/bundle_templates): a
fake `bash` first on PATH saves the folder it was handed, as in
tests/test_binary.py.
"""

import glob
import os
import subprocess

import pytest
from pip_install import InstallError, install

import gridx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(ROOT, "bundle_templates")
FAKE_BASH = """#!/bin/sh
# Stands in for bash: keeps the bundle folder gridx handed it, then succeeds.
mkdir "$FAKE_OUT/bundle"
cp "$(dirname "$1")"/* "$FAKE_OUT/bundle/"
"""


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    work = tmp_path_factory.mktemp("pip-install")
    try:
        folder, how = install(str(work))
    except InstallError as error:
        pytest.fail(f"pip install of the checkout failed: {error}", pytrace=False)
    print(f"gridx installed into {folder} ({how})")
    return folder


def run(argv, cwd, env=None):
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=60)


def test_console_script_prints_the_version(venv, tmp_path):
    result = run([os.path.join(venv, "bin", "gridx"), "--version"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"gridx {gridx.VERSION}\n"


def test_console_script_imports_the_installed_module_with_its_bytecode(venv, tmp_path):
    with open(os.path.join(venv, "bin", "gridx")) as handle:
        script = handle.read()
    assert "from gridx import main" in script, script
    python = os.path.join(venv, "bin", "python")
    where = run([python, "-c", "import gridx; print(gridx.__file__)"], cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    module = where.stdout.strip()
    assert module.startswith(os.path.join(venv, "lib")) and module.endswith("site-packages/gridx.py"), module
    assert glob.glob(os.path.join(os.path.dirname(module), "__pycache__", "gridx.*.pyc")), "no cached bytecode"


def test_worker_status_finds_the_installed_templates(venv, tmp_path):
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    (bin_dir / "bash").write_text(FAKE_BASH)
    (bin_dir / "bash").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", FAKE_OUT=str(out))
    result = run([os.path.join(venv, "bin", "gridx"), "worker", "status"], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    installed = os.path.join(venv, "share", "gridx", "bundle_templates")
    assert sorted(os.listdir(installed)) == sorted(gridx.BUNDLE_SCRIPTS)
    bundle = out / "bundle"
    assert sorted(os.listdir(bundle)) == sorted(gridx.BUNDLE_SCRIPTS)
    for name in gridx.BUNDLE_SCRIPTS:
        with open(os.path.join(TEMPLATES, name), "rb") as handle:
            assert (bundle / name).read_bytes() == handle.read(), name


def test_version_is_read_from_gridx_py():
    with open(os.path.join(ROOT, "pyproject.toml")) as handle:
        text = handle.read()
    assert 'dynamic = ["version"]' in text
    assert 'version = { attr = "gridx.VERSION" }' in text
    assert "\nversion =" not in text.split("[tool.setuptools.dynamic]")[0], "a second, static version"
