"""The worker's bundle scripts on the fake machine (worker_machine.Lab): GPU
discovery and sharing (nvidia-smi, the NVIDIA runtime, made-up UUIDs), and
the tools found under sudo's secure_path."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from worker_machine import EXISTING, NVIDIA_SMI, NVIDIA_TOML, ROOT, TEMPLATES, TOKEN, assert_nothing_changed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the scripts re-run themselves under sudo when not root")


# ------------------------------------------------------------------ GPUs ----


def test_gpus_from_nvidia_smi(lab):
    lab.with_gpus("GPU-aaaa", "GPU-bbbb")
    r = lab.join("--cpus", "2", "--memory", "1G", "--gpus", "1", "--yes")
    res = json.loads(lab.daemon_json.read_text())["node-generic-resources"]
    assert res == ["gridx_cpu=2", "gridx_mem=1024", "NVIDIA-GPU=GPU-aaaa"]
    assert "2 GPUs" in r.stderr and "nvidia-container-runtime is not installed" in r.stderr


@pytest.mark.parametrize(
    "args, says",
    [
        (["--gpus", "3"], "only 2 GPUs"),
        (["--gpu-ids", "GPU-zzzz"], "not on this machine"),
        (["--gpus", "2", "--gpu-ids", "GPU-aaaa"], "--gpus 2 but --gpu-ids names 1"),
        (["--gpu-ids", "GPU-aaaa,GPU-aaaa"], "named twice"),
    ],
)
def test_gpu_answers_checked_against_nvidia_smi(lab, args, says):
    lab.with_gpus("GPU-aaaa", "GPU-bbbb")
    before = lab.snapshot()
    r = lab.run("join.sh", "--cpus", "1", "--memory", "1G", *args, "--yes")
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert_nothing_changed(lab, before)


def test_gpu_ids_by_index(lab):
    lab.with_gpus("GPU-aaaa", "GPU-bbbb")
    lab.join("--cpus", "1", "--memory", "1G", "--gpu-ids", "1", "--yes")
    assert json.loads(lab.daemon_json.read_text())["node-generic-resources"][-1] == "NVIDIA-GPU=GPU-bbbb"


def test_gpu_ids_without_nvidia_smi_accepted_with_warning(lab):
    r = lab.join("--cpus", "1", "--memory", "1G", "--gpu-ids", "GPU-fake-0000,GPU-fake-0001", "--yes")
    assert "unchecked" in r.stderr
    assert "nvidia-container-runtime is not installed" in r.stderr
    res = json.loads(lab.daemon_json.read_text())["node-generic-resources"]
    assert res[2:] == ["NVIDIA-GPU=GPU-fake-0000", "NVIDIA-GPU=GPU-fake-0001"]
    assert "default-runtime" not in json.loads(lab.daemon_json.read_text())


def test_gpus_with_nvidia_runtime_set_default_runtime_and_swarm_resource(lab):
    lab.with_python3()
    lab.with_gpus("GPU-aaaa")
    lab.stub("nvidia-container-runtime", "exit 0\n")
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_bytes(EXISTING)
    lab.nvidia_toml.parent.mkdir()
    lab.nvidia_toml.write_text(NVIDIA_TOML)
    before = lab.snapshot()
    lab.join("--cpus", "1", "--memory", "1G", "--gpus", "1", "--yes")
    d = json.loads(lab.daemon_json.read_text())
    assert d["default-runtime"] == "nvidia"
    assert d["runtimes"] == {
        "crun": {"path": "/usr/bin/crun"},
        "nvidia": {"path": str(lab.bin / "nvidia-container-runtime"), "runtimeArgs": []},
    }
    assert d["node-generic-resources"][-1] == "NVIDIA-GPU=GPU-aaaa"
    # the commented-out swarm-resource line is set in place; the unprivileged
    # switch (absent) comes first, on: swarm tasks are never privileged
    want = NVIDIA_TOML.splitlines()
    want[2] = 'swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"'
    assert lab.nvidia_toml.read_text().splitlines() == [
        "accept-nvidia-visible-devices-envvar-when-unprivileged = true"] + want
    assert lab.run("leave.sh").returncode == 0
    assert lab.snapshot() == before


def test_tools_only_in_usr_local_bin_are_found_under_sudos_secure_path(lab):
    """sudo's secure_path on Debian forky (and RHEL) has no /usr/local/bin:
    jq, nvidia-smi and the NVIDIA runtime installed only there are found."""
    if not shutil.which("jq"):
        pytest.skip("jq not installed")
    os.symlink(shutil.which("jq"), lab.local_bin / "jq")
    (lab.fake / "gpus").write_text("GPU-aaaa\n")
    for name, body in (("nvidia-smi", NVIDIA_SMI), ("nvidia-container-runtime", "exit 0\n")):
        (lab.local_bin / name).write_text("#!/bin/bash\n" + body)
        (lab.local_bin / name).chmod(0o755)
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_bytes(EXISTING)
    r = lab.join("--cpus", "1", "--memory", "1G", "--gpus", "1", "--yes")
    assert "unchecked" not in r.stderr and "nvidia-container-runtime is not installed" not in r.stderr, r.stderr
    d = json.loads(lab.daemon_json.read_text())
    assert d["node-generic-resources"][-1] == "NVIDIA-GPU=GPU-aaaa"
    assert d["runtimes"]["nvidia"]["path"] == str(lab.local_bin / "nvidia-container-runtime")
    assert any(line.startswith("nvidia-smi ") for line in lab.log()), lab.log()


@pytest.mark.parametrize("path, want", [
    ("/usr/sbin:/usr/bin:/sbin:/bin", "/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/sbin:/usr/local/bin"),
    ("/usr/local/bin:/usr/bin:/bin", "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin"),
    ("/usr/local/sbin:/usr/local/bin:/usr/bin", "/usr/local/sbin:/usr/local/bin:/usr/bin"),
    ("", "/usr/local/sbin:/usr/local/bin"),
])
def test_path_gets_usr_local_at_its_end_where_it_lacks_it(path, want):
    script = 'GRIDX_PROG=t; . "$1"; printf %s "$PATH"'
    r = subprocess.run([shutil.which("bash"), "-c", script, "t", os.path.join(TEMPLATES, "lib.sh")],
                       env={"PATH": path}, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == want, (r.stdout, r.stderr)


# ------------------------------------------------------------------ GPUs ----

NVIDIA_CTK = 'echo "NVIDIA Container Toolkit CLI version {v}"\necho "commit: 0123abc"\n'


@pytest.mark.parametrize("version, warned", [("1.17.8", True), ("1.18.2", True), ("1.19.0", False), ("1.20.0", False)])
def test_toolkit_older_than_1_19_is_warned_about(lab, version, warned):
    lab.with_gpus("GPU-aaaa")
    lab.stub("nvidia-container-runtime", "exit 0\n")
    lab.stub("nvidia-ctk", NVIDIA_CTK.format(v=version))
    r = lab.join("--cpus", "1", "--memory", "1G", "--gpus", "1", "--yes")
    assert ("toolkit here is %s, older than 1.19" % version in r.stderr) == warned, r.stderr
    if warned:
        assert "NVIDIA/nvidia-container-toolkit#1599" in r.stderr


def test_toolkit_version_unknown_is_warned_about(lab):
    lab.with_gpus("GPU-aaaa")
    lab.stub("nvidia-container-runtime", "exit 1\n")
    r = lab.join("--cpus", "1", "--memory", "1G", "--gpus", "1", "--yes")
    assert "cannot read the NVIDIA container toolkit's version" in r.stderr


@pytest.mark.parametrize("existing, want", [
    # nothing: both keys, at the top
    ("", ['swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"',
          'accept-nvidia-visible-devices-envvar-when-unprivileged = true']),
    # a config that hid every GPU from unprivileged containers: turned back on, in place
    ('accept-nvidia-visible-devices-envvar-when-unprivileged = false\n#swarm-resource = "DOCKER_RESOURCE_GPU"\n'
     '[nvidia-container-cli]\nswarm-resource = "not top level"\n',
     ['accept-nvidia-visible-devices-envvar-when-unprivileged = true',
      'swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"', '[nvidia-container-cli]', 'swarm-resource = "not top level"']),
    # a commented line and a set one: the set one is replaced, the comment kept
    ('#swarm-resource = "DOCKER_RESOURCE_GPU"\nswarm-resource = "DOCKER_RESOURCE_GPU"\n'
     '#accept-nvidia-visible-devices-envvar-when-unprivileged = true\n',
     ['#swarm-resource = "DOCKER_RESOURCE_GPU"', 'swarm-resource = "DOCKER_RESOURCE_NVIDIA-GPU"',
      'accept-nvidia-visible-devices-envvar-when-unprivileged = true']),
])
def test_rendered_toolkit_config(lab, existing, want):
    """The swarm's assignment is what a job gets: swarm-resource, with the
    unprivileged switch on (swarm tasks are never privileged, and the toolkit
    applies that switch to the swarm variable too)."""
    lab.with_gpus("GPU-aaaa")
    lab.stub("nvidia-container-runtime", "exit 0\n")
    lab.stub("nvidia-ctk", NVIDIA_CTK.format(v="1.19.0"))
    if existing:
        lab.nvidia_toml.parent.mkdir()
        lab.nvidia_toml.write_text(existing)
    lab.join("--cpus", "1", "--memory", "1G", "--gpus", "1", "--yes")
    lines = lab.nvidia_toml.read_text().splitlines()
    assert lines == want
    top = lines[:next((i for i, x in enumerate(lines) if x.startswith("[")), len(lines))]
    for key in ("swarm-resource", "accept-nvidia-visible-devices-envvar-when-unprivileged"):
        assert len([x for x in top if x.startswith(key + " =")]) == 1
    assert lab.run("leave.sh").returncode == 0
    assert (lab.nvidia_toml.read_text() == existing) if existing else not lab.nvidia_toml.exists()


@pytest.mark.parametrize("existed", [False, True])
def test_leave_removes_the_dockremap_user_that_the_join_made(lab, existed):
    """dockerd makes the user dockremap and its subuid/subgid ranges for
    "userns-remap": "default"; leave.sh removes them when join was the cause."""
    users = lab.fake / "users"
    users.write_text("dockremap\n" if existed else "")
    lab.stub("getent", 'grep -qx "$2" "$FAKE/users"\n')
    lab.stub("userdel", 'echo "userdel $*" >>"$FAKE/log"\n: >"$FAKE/users"\n')
    subuid, subgid = lab.etc / "subuid", lab.etc / "subgid"
    subuid.write_text("alice:165536:65536\n")
    subgid.write_text("alice:165536:65536\n")
    env = lab.env(GRIDX_SUBUID=str(subuid), GRIDX_SUBGID=str(subgid))
    r = lab.run("join.sh", "--cpus", "1", "--memory", "1G", "--yes", env=env)
    assert r.returncode == 0, r.stderr
    assert "DOCKREMAP_CREATED='%d'" % (0 if existed else 1) in (lab.state / "state.env").read_text()
    # as dockerd does at its restart
    users.write_text("dockremap\n")
    for f in (subuid, subgid):
        f.write_text(f.read_text() + "dockremap:100000:65536\n")
    r = lab.run("leave.sh", env=env)
    assert r.returncode == 0, r.stderr
    if existed:
        assert "userdel dockremap" not in lab.log() and "dockremap:100000" in subuid.read_text()
    else:
        assert "userdel dockremap" in lab.log()
        assert subuid.read_text() == subgid.read_text() == "alice:165536:65536\n"


def test_gridx_worker_join_wg_config_with_postup_is_exit_2_and_nothing_runs(lab):
    """`gridx worker join --wg-config FILE` hands FILE to the same join.sh."""
    pwned = lab.tmp / "pwned"
    conf = lab.tmp / "worker.conf"
    conf.write_text((lab.bundle / "gridx0.conf").read_text().replace(
        "[Interface]\n", "[Interface]\nPostUp = touch %s\n" % pwned))
    before = lab.snapshot()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "gridx.py"), "worker", "join", "--wg-config", str(conf),
                        "--token", TOKEN, "--cpus", "1", "--memory", "1G", "--yes"],
                       env=lab.env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "'PostUp' is not a key Grid-X writes" in r.stderr
    assert not pwned.exists()
    assert_nothing_changed(lab, before)
