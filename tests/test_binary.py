"""The static binary dist/gridx built by packaging/build.sh (`make binary`).

Skipped unless dist/gridx exists (GRIDX_BINARY names another binary to test)
and is newer than gridx.py and bundle_templates/: `make test` builds it first
when it is missing or older (the Makefile's dist/gridx rule). The chroot, noexec and
missing-/proc checks need root with chroot, unshare and mount; each skips
with its reason where they cannot run. One test needs no binary: it checks
that gridx.py imports none of the modules packaging/gridx.spec leaves out.

Bundle templates and the child environment are checked through the real code
path: `gridx worker status` copies the templates out of the binary and runs
`bash status.sh` with host_env(); a fake `bash` first on PATH saves the
folder it was given and its environment (and, from /proc, its parent's).
"""

import ast
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import gridx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "gridx.py")
TEMPLATES = os.path.join(ROOT, "bundle_templates")
SPEC = os.path.join(ROOT, "packaging", "gridx.spec")
BINARY = os.environ.get("GRIDX_BINARY") or os.path.join(ROOT, "dist", "gridx")

FAKE_BASH = """#!/bin/sh
# Stands in for bash: keeps what gridx handed it, then succeeds.
env > "$FAKE_OUT/env"
tr '\\0' '\\n' < /proc/$PPID/environ > "$FAKE_OUT/parent_env"
mkdir "$FAKE_OUT/bundle"
cp "$(dirname "$1")"/* "$FAKE_OUT/bundle/"
echo "$1" > "$FAKE_OUT/argv"
"""


def newest_source_mtime():
    """Of gridx.py and the templates the binary packs (packaging/gridx.spec
    leaves dotfiles out; the Makefile's dist/gridx rule depends on the same)."""
    paths = [SOURCE] + [os.path.join(TEMPLATES, name) for name in os.listdir(TEMPLATES) if not name.startswith(".")]
    return max(os.path.getmtime(path) for path in paths)


@pytest.fixture(scope="module")
def binary():
    if not os.path.isfile(BINARY):
        pytest.skip(f"{BINARY} not built: run make binary")
    if "GRIDX_BINARY" not in os.environ and os.path.getmtime(BINARY) < newest_source_mtime():
        pytest.skip("dist/gridx is older than gridx.py or bundle_templates/: run make binary")
    return BINARY


def run(argv, env=None, timeout=60):
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)


def host_env(**extra):
    """The test's environment without anything a frozen parent could leak."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("_MEI", "_PYI_", "STATICX_")) and key not in ("LD_LIBRARY_PATH_ORIG",)}
    env.update(extra)
    return env


def read_env(path):
    with open(path) as handle:
        return dict(line.rstrip("\n").split("=", 1) for line in handle if "=" in line)


def need_root_tools(*tools):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    if "unshare" in tools and run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("cannot make a mount namespace here (unshare -m)")


@pytest.fixture
def fake_bash(tmp_path):
    """A bin folder whose `bash` records its call under tmp_path/out."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    script = bin_dir / "bash"
    script.write_text(FAKE_BASH)
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", "FAKE_OUT": str(out)}, out


# --- no binary needed -------------------------------------------------------


def spec_excludes():
    with open(SPEC) as handle:
        tree = ast.parse(handle.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "EXCLUDES" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("EXCLUDES not found in packaging/gridx.spec")


def test_gridx_imports_nothing_the_binary_leaves_out():
    with open(SOURCE) as handle:
        tree = ast.parse(handle.read())
    imported = set()
    for node in ast.walk(tree):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            imported.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    assert not imported & spec_excludes(), "gridx.py imports a module packaging/gridx.spec excludes"


# --- the binary -------------------------------------------------------------


def test_statically_linked(binary):
    if shutil.which("file") is None:
        pytest.skip("needs file")
    assert "statically linked" in run(["file", "-b", binary]).stdout


def test_ldd_says_not_dynamic(binary):
    if shutil.which("ldd") is None:
        pytest.skip("needs ldd")
    result = run(["ldd", binary])
    assert "not a dynamic executable" in result.stdout + result.stderr


def test_version_matches_python(binary):
    frozen = run([binary, "--version"], env=host_env())
    source = run([sys.executable, SOURCE, "--version"])
    assert frozen.returncode == 0, frozen.stderr
    assert frozen.stdout == source.stdout
    assert frozen.stdout.startswith(f"gridx {gridx.VERSION}")


def test_hub_help(binary):
    result = run([binary, "hub", "--help"], env=host_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: gridx hub")
    assert "add-peer" in result.stdout


def test_templates_inside_and_child_gets_host_environment(binary, fake_bash, tmp_path):
    extra, out = fake_bash
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = host_env(LD_LIBRARY_PATH="/nonexistent/host-lib", TMPDIR=str(tmpdir), **extra)
    result = run([binary, "worker", "status"], env=env)
    assert result.returncode == 0, result.stderr
    assert (out / "argv").read_text().strip().endswith("/status.sh")

    # Every bundle script came out of the binary, byte for byte.
    bundle = out / "bundle"
    assert sorted(os.listdir(bundle)) == sorted(gridx.BUNDLE_SCRIPTS)
    for name in gridx.BUNDLE_SCRIPTS:
        with open(os.path.join(TEMPLATES, name), "rb") as handle:
            assert (bundle / name).read_bytes() == handle.read(), name

    # The frozen gridx process did run with its unpack folder on
    # LD_LIBRARY_PATH (so the check below means something) ...
    parent = read_env(out / "parent_env")
    assert "_MEI" in parent.get("LD_LIBRARY_PATH", ""), parent.get("LD_LIBRARY_PATH")
    # ... and the command it ran got the host's environment back.
    child = read_env(out / "env")
    assert child.get("LD_LIBRARY_PATH") == "/nonexistent/host-lib"
    assert child.get("TMPDIR") == str(tmpdir)
    leaked = sorted(key for key in child if key.startswith(("_MEI", "_PYI_", "STATICX_")) or key.endswith("_ORIG"))
    assert not leaked


def test_child_has_no_ld_library_path_when_host_had_none(binary, fake_bash):
    extra, out = fake_bash
    env = host_env(**extra)
    env.pop("LD_LIBRARY_PATH", None)
    env.pop("TMPDIR", None)
    result = run([binary, "worker", "status"], env=env)
    assert result.returncode == 0, result.stderr
    child = read_env(out / "env")
    assert "LD_LIBRARY_PATH" not in child
    assert "TMPDIR" not in child


# The environment of CI's unit tests when dist/gridx died of SIGSEGV there
# (TMPDIR unset), as strings only: the crash depended on its layout.
CRASH_ENV = {
    "PWD": "/root/ci-run/gridx", "GRIDX_LAB_NAME": "gridx-ci", "_": "/usr/bin/python3", "HOME": "/root",
    "E2E": "required", "MFLAGS": "", "MAKEFLAGS": "", "TERM": "dumb", "SHLVL": "1", "MAKELEVEL": "1",
    "LC_ALL": "C", "PATH": "/tmp/fb/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "CI": "true", "GRIDX_LAB_NET": "172.29.250", "OLDPWD": "/root/ci-run/gridx",
    "PYTEST_CURRENT_TEST": "tests/test_binary.py::test_child_has_no_ld_library_path_when_host_had_none (call)",
    "FAKE_OUT": "/tmp/fb/out",
}


def crash_env_variants():
    """CI's environment with each of its variables left out in turn (or none),
    and padded by 0 to 56 bytes: every variable left out twice, at two
    paddings apart, and every padding with the whole environment. 49 of the
    270 combinations (each start unpacks the binary: 0.1 s of CPU); every
    variable and every padding is still tried."""
    sizes = range(0, 60, 4)
    pairs = [(None, size) for size in sizes]
    for i, dropped in enumerate(CRASH_ENV):
        pairs += [(dropped, sizes[i % len(sizes)]), (dropped, sizes[(i + 7) % len(sizes)])]
    envs = []
    for dropped, size in pairs:
        env = {key: value for key, value in CRASH_ENV.items() if key != dropped}
        if size:
            env["P"] = "x" * size
        envs.append(env)
    return envs


def test_it_starts_whatever_the_environment_without_tmpdir(binary):
    """With TMPDIR unset the bootloader used to set TMPDIR=/tmp for the
    child (a setenv it did not need), and then died of SIGSEGV after
    unpacking for some environments: CI's, and 239 of the 270 combinations
    of crash_env_variants' two factors, run four at a time (measured with
    the old bootloader: all 49 here would have had to pass by chance, about
    one chance in 10**46). /tmp is the child's own default now: no setenv,
    no crash."""
    from concurrent.futures import ThreadPoolExecutor

    envs = crash_env_variants()

    def exit_status(env):
        return subprocess.run([binary, "--version"], env=env, capture_output=True, timeout=60).returncode

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(exit_status, envs))
    assert [c for c in codes if c] == [], f"{sum(1 for c in codes if c)} of {len(codes)} did not start"


def test_ctrl_c_gives_130_and_leaves_no_temporary_files(binary, tmp_path):
    bin_dir, tmpdir, started = tmp_path / "bin", tmp_path / "tmp", tmp_path / "started"
    bin_dir.mkdir()
    tmpdir.mkdir()
    (bin_dir / "bash").write_text(f"#!/bin/sh\ntouch {started}\nexec sleep 30\n")
    (bin_dir / "bash").chmod(0o755)
    env = host_env(PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", TMPDIR=str(tmpdir))
    # Its own process group, signalled as a whole: what a terminal's Ctrl-C does.
    process = subprocess.Popen([binary, "worker", "status"], env=env, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert started.exists(), "the fake bash never ran"
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert os.listdir(tmpdir) == []


def test_noexec_tmpdir_falls_back_and_child_keeps_tmpdir(binary, fake_bash, tmp_path):
    need_root_tools("unshare", "mount")
    extra, out = fake_bash
    noexec = tmp_path / "noexec"
    noexec.mkdir()
    env = host_env(TMPDIR=str(noexec), **extra)
    result = run(["unshare", "-m", "sh", "-c",
                  'mount -t tmpfs -o noexec,size=1m tmpfs "$1" && shift && exec "$@"',
                  "_", str(noexec), binary, "worker", "status"], env=env)
    assert result.returncode == 0, result.stderr
    assert read_env(out / "env").get("TMPDIR") == str(noexec)


def test_no_usable_tmp_folder_names_tmpdir(binary, request):
    need_root_tools("unshare", "mount")
    folders = ["/tmp", "/var/tmp", "/dev/shm"]
    if any(os.path.realpath(binary).startswith(folder + "/") for folder in folders):
        # a checkout under /tmp: run a copy that the tmpfs mounts leave visible
        home = tempfile.mkdtemp(dir=os.path.expanduser("~"))
        request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
        binary = shutil.copy(binary, os.path.join(home, "gridx"))
    mounts = " && ".join(
        f"mount -t tmpfs -o noexec,size=1m tmpfs {folder}" for folder in folders if os.path.isdir(folder)
    )
    env = host_env()
    env.pop("TMPDIR", None)
    result = run(["unshare", "-m", "sh", "-c", f'{mounts} && exec "$0" --version', binary], env=env)
    assert result.returncode == 3, result.stderr
    assert "noexec" in result.stderr
    assert "TMPDIR" in result.stderr
    assert "Traceback" not in result.stderr


def make_root(tmp_path, binary):
    """A root folder holding only the binary, an empty /proc and /tmp."""
    root = tmp_path / "root"
    for folder in ("proc", "tmp"):
        (root / folder).mkdir(parents=True)
    (root / "tmp").chmod(0o1777)
    shutil.copy(binary, root / "gridx")
    return root


def test_missing_proc_is_explained(binary, tmp_path):
    need_root_tools("chroot")
    root = make_root(tmp_path, binary)
    result = run(["chroot", str(root), "/gridx", "--version"], env=host_env())
    assert result.returncode == 3, result.stderr
    assert "/proc is not mounted" in result.stderr


def test_runs_in_chroot_without_libc(binary, tmp_path):
    need_root_tools("chroot", "unshare", "mount")
    root = make_root(tmp_path, binary)
    expected = run([sys.executable, SOURCE, "--version"]).stdout
    script = ('mount --bind /proc "$1/proc" && chroot "$1" /gridx --version'
              ' && chroot "$1" /gridx hub --help')
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}
    result = run(["unshare", "-m", "sh", "-c", script, "_", str(root)], env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(root)) == ["gridx", "proc", "tmp"]
    assert result.stdout.startswith(expected)
    assert "usage: gridx hub" in result.stdout
