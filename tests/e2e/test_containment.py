"""Volunteers' machines stay theirs (issue 12), tried as an attacker would.

- A service made by hand on the manager, with a bind mount of the worker's /
  and every capability, runs as root inside its container and yet can neither
  create nor change a root-owned file of the worker nor read /etc/shadow: the
  worker's engine remaps user namespaces (join.sh turned it on before the
  swarm join), which the manager cannot undo.
- The same mount smuggled through gridx's own arguments is exit 2, and no
  service is made.
- A job that asked for no GPU is told NVIDIA_VISIBLE_DEVICES=void, whatever
  its image sets (the lab has no real GPU: what is checked is what the
  NVIDIA toolkit would be handed).
(A worker that declined the hub's SSH: test_workers.py.)
"""

import json

import pytest
from e2e_helpers import WORKERS, hub, node_exec, ok, wait_until

ESCAPE_SERVICE = "gridx-e2e-escape"
TARGET = "worker2"
OWNED = "/root/gridx-e2e-owned"       # a root-owned file of the volunteer's
CREATED = "/root/gridx-e2e-created"   # must never appear
# Each attempt says what it got; only "uid=0" and the world-writable /tmp
# must succeed. /etc/hostname is world-readable: it proves the mount is real.
ESCAPE_SCRIPT = f"""
echo uid=$(id -u)
echo hostname=$(cat /host/etc/hostname)
touch /host{CREATED} 2>/dev/null && echo created=yes || echo created=no
echo pwned 2>/dev/null >> /host{OWNED} && echo changed=yes || echo changed=no
head -c 1 /host/etc/shadow >/dev/null 2>&1 && echo shadow=yes || echo shadow=no
touch /host/tmp/gridx-e2e-tmp 2>/dev/null && echo tmp=yes || echo tmp=no
true
"""


def in_hub(cmd, timeout=120):
    return node_exec("hub", cmd, timeout=timeout)


def swarm_services():
    return ok(in_hub("docker service ls -q | sort"), "docker service ls")


def service_ended(name):
    state = in_hub(f"docker service ps --format '{{{{.CurrentState}}}}' {name}").stdout.split()
    return state and state[0] in ("Complete", "Failed", "Rejected")


def test_every_worker_engine_is_remapped_and_without_new_privileges(lab):
    for worker in WORKERS:
        options = ok(node_exec(worker, "docker info --format '{{json .SecurityOptions}}'"), "docker info")
        assert "name=userns" in options, (worker, options)
        config = json.loads(ok(node_exec(worker, "cat /etc/docker/daemon.json"), "daemon.json"))
        assert config.get("userns-remap") == "default" and config.get("no-new-privileges") is True, config


def test_a_service_made_by_hand_on_the_manager_cannot_touch_the_workers_files(lab):
    ok(node_exec(TARGET, f"rm -f {CREATED} /tmp/gridx-e2e-tmp; printf 'the volunteer\\n' > {OWNED}; "
                         f"chmod 0644 {OWNED}"), "a root-owned file")
    before = ok(node_exec(TARGET, f"sha256sum {OWNED}"), "sha256sum")
    in_hub(f"docker service rm {ESCAPE_SERVICE}")
    try:
        ok(in_hub(["docker", "service", "create", "--detach", "--quiet", "--no-resolve-image",
                   "--name", ESCAPE_SERVICE, "--mode", "replicated-job", "--restart-condition", "none",
                   "--constraint", f"node.hostname=={TARGET}",
                   "--mount", "type=bind,src=/,dst=/host", "--cap-add", "ALL",
                   "python:3.11", "sh", "-c", ESCAPE_SCRIPT]), "docker service create by hand")
        wait_until(lambda: service_ended(ESCAPE_SERVICE), 120, "the by-hand service to end")
        said = ok(in_hub(f"docker service logs --raw {ESCAPE_SERVICE}"), "its logs")
        got = dict(line.split("=", 1) for line in said.split() if "=" in line)
        # root inside, the mount real, /tmp writable: the attempts really ran
        assert got.get("uid") == "0" and got.get("hostname") == TARGET and got.get("tmp") == "yes", said
        assert got == {"uid": "0", "hostname": TARGET, "created": "no", "changed": "no", "shadow": "no",
                       "tmp": "yes"}, said
        assert node_exec(TARGET, ["test", "-e", CREATED]).returncode != 0
        assert ok(node_exec(TARGET, f"sha256sum {OWNED}"), "sha256sum") == before
        # what it could write belongs to an unprivileged uid of the host
        owner = ok(node_exec(TARGET, "stat -c %u /tmp/gridx-e2e-tmp"), "stat").strip()
        assert owner != "0" and int(owner) >= 65536, owner
    finally:
        in_hub(f"docker service rm {ESCAPE_SERVICE}")
        node_exec(TARGET, f"rm -f {OWNED} {CREATED} /tmp/gridx-e2e-tmp")


INJECTIONS = [
    ("jobs", "run", "--wait", "--", "--mount=type=bind,src=/,dst=/host", "python:3.11",
     "sh", "-c", f"id -u > /host{CREATED}"),
    ("jobs", "run", "--wait", "--mount=type=bind,src=/,dst=/host", "python:3.11", "true"),
    ("jobs", "run", "UPPER/Case:tag", "true"),
    ("jobs", "train", "/tmp/gridx-e2e-train.py", "--framework", "pytorch", "--image=--network=host"),
    ("jobs", "jupyter", "--image", "--mount=type=bind,src=/,dst=/host"),
    ("jobs", "run", "--name", "--mount=type=bind,src=/,dst=/host", "python:3.11", "true"),
    ("jobs", "list", "--manager", "-oProxyCommand=touch /tmp/gridx-e2e-pwned"),
]


@pytest.mark.parametrize("argv", INJECTIONS, ids=lambda argv: " ".join(argv[:3]))
def test_an_option_smuggled_through_gridx_is_exit_2_and_creates_nothing(lab, argv):
    ok(in_hub("echo 'print(1)' > /tmp/gridx-e2e-train.py"), "a train script")
    before = swarm_services()
    proc = hub(*argv, timeout=120)
    # gridx's own "error: …", or argparse's "gridx jobs run: error: …" after its usage
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, (
        proc.returncode, proc.stderr)
    assert swarm_services() == before
    for worker in WORKERS:
        assert node_exec(worker, ["test", "-e", CREATED]).returncode != 0, worker
    assert in_hub("test -e /tmp/gridx-e2e-pwned").returncode != 0


ALL_GPUS_IMAGE = "gridx-e2e-allgpus:latest"
SHOW_GPU_ENV = ("import os; print('visible=' + os.environ.get('NVIDIA_VISIBLE_DEVICES', 'unset')); "
                "print('given=' + os.environ.get('DOCKER_RESOURCE_NVIDIA-GPU', 'none'))")


def test_a_job_without_gpus_is_told_none_whatever_its_image_sets(lab):
    """pytorch/pytorch sets NVIDIA_VISIBLE_DEVICES=all: where the nvidia
    runtime is the default, that image alone would see every GPU."""
    for worker in WORKERS:
        ok(node_exec(worker, f"printf 'FROM python:3.11\\nENV NVIDIA_VISIBLE_DEVICES=all\\n' "
                             f"| docker build -q -t {ALL_GPUS_IMAGE} -", timeout=180), f"build on {worker}")
    names = ["gpus-none", "gpus-one"]
    try:
        proc = hub("jobs", "run", "--wait", "--name", names[0], ALL_GPUS_IMAGE, "--", "python", "-c",
                   SHOW_GPU_ENV, timeout=300)
        assert proc.returncode == 0 and "visible=void" in proc.stdout and "given=none" in proc.stdout, (
            proc.stdout, proc.stderr)
        # asked for one: the swarm's choice is handed over, no override
        proc = hub("jobs", "run", "--wait", "--gpus", "1", "--name", names[1], ALL_GPUS_IMAGE, "--", "python",
                   "-c", SHOW_GPU_ENV, timeout=300)
        assert proc.returncode == 0 and "given=GPU-fake-000" in proc.stdout, (proc.stdout, proc.stderr)
        assert "visible=void" not in proc.stdout, proc.stdout
    finally:
        hub("jobs", "delete", *names, timeout=180)
