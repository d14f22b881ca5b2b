"""Install Grid-X as `pip install .` does, into a new virtual environment.

Shared by tests/test_packaging.py and tests/bench.py (standard library only).
The checkout is copied first (gridx.py, pyproject.toml, README.md,
bundle_templates/), so no build/ or gridx.egg-info/ lands in it.

The wheel is built offline when an interpreter here can (its setuptools is
70.1 or newer, which builds wheels itself, or it has setuptools and wheel:
Debian's python3-setuptools + python3-wheel), with `--no-build-isolation`;
else with pip's isolated build, which fetches setuptools from PyPI (or
pip's cache). The wheel is then installed offline (`--no-index`).
"""

import glob
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("gridx.py", "pyproject.toml", "README.md", "bundle_templates")
CAN_BUILD_OFFLINE = """
import sys
import setuptools
version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
if version < (70, 1):
    import wheel  # noqa: F401 (bdist_wheel, for setuptools before 70.1)
import pip  # noqa: F401
"""


class InstallError(Exception):
    pass


def run(argv, timeout=300):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise InstallError(f"{' '.join(argv)} exited {proc.returncode}:\n{(proc.stderr or proc.stdout)[-2000:]}")
    return proc


def offline_builder():
    """An interpreter that can build the wheel without the network, or None."""
    for python in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(python) and subprocess.run([python, "-c", CAN_BUILD_OFFLINE],
                                                     capture_output=True).returncode == 0:
            return python
    return None


def copy_source(dest):
    os.makedirs(dest)
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(dest, name))
        else:
            shutil.copy2(path, dest)
    return dest


def build_wheel(work):
    """Builds gridx's wheel under work/; returns (wheel path, how it was built)."""
    source = copy_source(os.path.join(work, "source"))
    out = os.path.join(work, "wheel")
    builder = offline_builder()
    if builder:
        run([builder, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps", "--no-index",
             "--no-build-isolation", "-w", out, source])
        how = f"offline, with {builder}'s setuptools"
    else:
        run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps", "-w", out,
             source])
        how = "isolated build (setuptools from PyPI or pip's cache)"
    wheels = glob.glob(os.path.join(out, "gridx-*.whl"))
    if len(wheels) != 1:
        raise InstallError(f"expected one gridx wheel in {out}, found {os.listdir(out)}")
    return wheels[0], how


def install(work, python=None):
    """A venv under work/venv with gridx installed from its wheel; returns
    (venv folder, how the wheel was built).

    The venv is made without pip, and this interpreter's pip installs into it
    (`pip --python`, pip 22.3 and newer): putting a pip into every new venv
    (ensurepip) was most of the time this took. An older pip gets a venv
    with its own pip, as before."""
    wheel, how = build_wheel(work)
    venv = os.path.join(work, "venv")
    target = os.path.join(venv, "bin", "python")
    options = ["install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps", wheel]
    run([python or sys.executable, "-m", "venv", "--without-pip", venv])
    try:
        run([sys.executable, "-m", "pip", "--python", target, *options])
    except InstallError:
        shutil.rmtree(venv)
        run([python or sys.executable, "-m", "venv", venv])
        run([target, "-m", "pip", *options])
    return venv, how
