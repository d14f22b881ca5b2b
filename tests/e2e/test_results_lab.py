"""Work folders and results (issue 14, second half) on the real lab.

A job with --workdir reads a 50 MB input from its folder (sent as a layer
built by the hub's Docker, pushed to the hub's registry, pulled by the
worker over the VPN) and writes a 50 MB result computed from it; after
--wait the result is on the submitter's machine with the right checksum, on
the hub as root and through --manager root@HUB (users: test_users_lab.py).
What the folder's .gridxignore leaves out is not in the job. A failed job's
partial output comes back with its exit status; a job submitted without
--wait is collected by `hub watch`, so its results are there after its worker
stops; a missing or over-limit output is said in status; a link in the
output is left on the worker; delete removes the results unless
--keep-results.
"""

import json
import re
import shlex
import subprocess

import pytest
from e2e_helpers import HUB_VPN_IP, container, hub, hub_json, node_exec, ok, start_stopped_worker, wait_until

WORK = "/root/e2e-work"  # the submitter's folder, on the hub
SUBMIT = "/root/e2e-submit"  # where the submitter runs gridx (results land in ./JOB)
RESULTS = "/var/lib/gridx/results"
# reads the 50 MB input, writes it reversed (50 MB) and the input's sha256
PROGRAM = """import hashlib, os, sys
data = open("data/in.bin", "rb").read()
os.makedirs("out", exist_ok=True)
open("out/reversed.bin", "wb").write(data[::-1])
open("out/sum.txt", "w").write(hashlib.sha256(data).hexdigest() + "\\n")
print("left out:", os.path.exists("junk"), os.path.exists("notes.log"))
"""


def in_hub(cmd, timeout=300):
    return node_exec("hub", ["sh", "-c", cmd], timeout=timeout)


def gridx_in(folder, *args, timeout=600):
    """gridx ARGS run on the hub from folder (results land there)."""
    return in_hub(f"cd {folder} && gridx {shlex.join(args)}", timeout=timeout)


@pytest.fixture(scope="module")
def work(lab):
    """The folder with a 50 MB input, and the checksums its result must have."""
    ok(in_hub(f"rm -rf {WORK} {SUBMIT} && mkdir -p {WORK}/data {WORK}/junk {SUBMIT} && "
              f"head -c 50000000 /dev/urandom > {WORK}/data/in.bin && "
              f"head -c 1000000 /dev/urandom > {WORK}/junk/big.bin && echo x > {WORK}/notes.log && "
              f"printf 'junk\\n*.log\\n' > {WORK}/.gridxignore"), "make the work folder")
    ok(subprocess.run(["docker", "exec", "-i", container("hub"), "sh", "-c", f"cat > {WORK}/program.py"],
                      input=PROGRAM, capture_output=True, text=True), "write program.py")
    sums = ok(in_hub(f"python3 -c \"import hashlib; d=open('{WORK}/data/in.bin','rb').read(); "
                     "print(hashlib.sha256(d).hexdigest(), hashlib.sha256(d[::-1]).hexdigest())\""), "checksums")
    made = []
    yield {"input": sums.split()[0], "reversed": sums.split()[1], "jobs": made}
    if made:
        hub("jobs", "delete", *made, timeout=180)
    in_hub(f"rm -rf {WORK} {WORK}-small {WORK}-train {SUBMIT}")


def only_task(record):
    (task,) = record["tasks"].values()
    return task


def sha(path):
    return ok(in_hub(f"sha256sum < {shlex.quote(path)}"), f"sha256 {path}").split()[0]


def test_a_workdir_job_reads_its_folder_and_its_result_comes_back_with_wait(work):
    job = "wd-local"
    work["jobs"].append(job)
    proc = gridx_in(SUBMIT, "jobs", "run", "--workdir", WORK, "--wait", "--name", job, "python:3.11",
                    "python program.py")
    out = ok(proc, "jobs run --workdir --wait")
    assert "left out: False False" in out  # .gridxignore kept junk/ and *.log out of the layer
    assert "50000000" not in proc.stderr and "47.7 MiB" in proc.stderr, proc.stderr  # the size, said
    assert sha(f"{SUBMIT}/{job}/reversed.bin") == work["reversed"]
    assert ok(in_hub(f"cat {SUBMIT}/{job}/sum.txt"), "sum.txt").strip() == work["input"]
    status = hub_json("jobs", "status", job)
    assert only_task(status["results"])["state"] == "collected", status
    assert status["results"]["bytes"] == 50000000 + 65
    spec = json.loads(ok(in_hub(f"docker service inspect {job}"), "inspect"))[0]["Spec"]
    # the layer: under a tag no one can guess, run by its digest (issue 19)
    assert re.fullmatch(rf"{HUB_VPN_IP}:5000/gridx/work:{job}-[0-9a-f]{{32}}@sha256:[0-9a-f]{{64}}",
                        spec["TaskTemplate"]["ContainerSpec"]["Image"]), spec["TaskTemplate"]["ContainerSpec"]
    assert "engine.labels.gridx.hub-ssh!=no" in spec["TaskTemplate"]["Placement"]["Constraints"]
    # the results never overwrite: the same destination again is exit 2
    again = gridx_in(SUBMIT, "jobs", "results", job)
    assert again.returncode == 2 and "not an empty folder" in again.stderr, again.stderr


def service_id(job):
    return ok(in_hub(f"docker service inspect --format '{{{{.ID}}}}' {job}"), "service ID").strip()


def test_the_same_through_manager_root_at_the_hub(work):
    """docker over SSH builds on the hub's Docker; the hub's gridx sends the results."""
    job = "wd-remote"
    work["jobs"].append(job)
    trust = ("test -e /root/.ssh/id_ed25519 || ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519; "
             "grep -qF \"$(cat /root/.ssh/id_ed25519.pub)\" /root/.ssh/authorized_keys 2>/dev/null "
             "|| cat /root/.ssh/id_ed25519.pub >> /root/.ssh/authorized_keys; "
             f"ssh-keyscan {HUB_VPN_IP} 2>/dev/null >> /root/.ssh/known_hosts")
    ok(in_hub(trust), "trust root's key")
    # a small folder: the 50 MB one goes through the gridx account (test_users_lab.py)
    ok(in_hub(f"rm -rf {WORK}-small && mkdir -p {WORK}-small/data && head -c 3000000 /dev/urandom "
              f"> {WORK}-small/data/in.bin && cp {WORK}/program.py {WORK}-small/"), "a small folder")
    expected = ok(in_hub(f"python3 -c \"import hashlib; d=open('{WORK}-small/data/in.bin','rb').read(); "
                         "print(hashlib.sha256(d[::-1]).hexdigest())\""), "checksum").strip()
    proc = gridx_in(SUBMIT, "jobs", "run", "--manager", f"root@{HUB_VPN_IP}", "--workdir", f"{WORK}-small",
                    "--wait", "--name", job, "python:3.11", "python program.py")
    ok(proc, "jobs run --manager root@HUB --workdir --wait")
    assert sha(f"{SUBMIT}/{job}/reversed.bin") == expected
    status = hub_json("jobs", "status", job, "--manager", f"root@{HUB_VPN_IP}")
    assert only_task(status["results"])["state"] == "collected", status


def test_train_ends_with_the_model_in_job_folder(work):
    """jobs train SCRIPT --workdir DIR: the script runs from the layer, its
    model (under /work/out) comes back into ./JOB."""
    job = "wd-train"
    work["jobs"].append(job)
    script = "import os; os.makedirs('out', exist_ok=True); open('out/model.txt', 'w').write('weights 42')"
    ok(in_hub(f"mkdir -p {WORK}-train && echo {shlex.quote(script)} > {WORK}-train/train.py"), "train.py")
    proc = gridx_in(SUBMIT, "jobs", "train", f"{WORK}-train/train.py", "--workdir", f"{WORK}-train",
                    "--framework", "pytorch", "--image", "python:3.11", "--name", job, "--wait")
    ok(proc, "jobs train --workdir --wait")
    assert ok(in_hub(f"cat {SUBMIT}/{job}/model.txt"), "the model").strip() == "weights 42"
    outside = gridx_in(SUBMIT, "jobs", "train", f"{WORK}/program.py", "--workdir", f"{WORK}-train",
                       "--framework", "pytorch")
    assert outside.returncode == 2 and "must be in that folder" in outside.stderr, outside.stderr


def test_a_failed_jobs_partial_output_comes_back_with_its_exit_status(work):
    job = "wd-failed"
    work["jobs"].append(job)
    proc = gridx_in(SUBMIT, "jobs", "run", "--output", "/tmp/out", "--wait", "--name", job, "python:3.11",
                    "mkdir -p /tmp/out/deep && echo half > /tmp/out/deep/partial.txt && exit 3")
    assert proc.returncode == 3, (proc.returncode, proc.stderr)
    assert ok(in_hub(f"cat {SUBMIT}/{job}/deep/partial.txt"), "partial.txt").strip() == "half"


def test_watch_collects_a_job_without_wait_so_its_results_outlive_the_worker(work):
    job = "wd-watched"
    work["jobs"].append(job)
    ok(hub("jobs", "run", "--output", "/tmp/out", "--name", job, "python:3.11",
           "mkdir -p /tmp/out && echo watched > /tmp/out/r.txt"), "jobs run (no --wait)")
    # no gridx command here collects: only the record watch writes is looked at (filed by service ID)
    key = service_id(job)
    wait_until(lambda: in_hub(f"grep -q '\"state\"' {RESULTS}/{key}.json").returncode == 0, 60,
               "hub watch to collect it")
    record = json.loads(ok(in_hub(f"cat {RESULTS}/{key}.json"), "record"))
    assert (record["job"], record["service"], record["owner"]) == (job, key, "root")
    node = only_task(record)["node"]
    assert only_task(record)["state"] == "collected", record
    ok(subprocess.run(["docker", "stop", "-t", "2", container(node)], capture_output=True, text=True,
                      timeout=120), f"docker stop {node}")
    try:
        dest = f"{SUBMIT}/watched"
        ok(gridx_in(SUBMIT, "jobs", "results", job, dest), "jobs results with its worker stopped")
        assert ok(in_hub(f"cat {dest}/r.txt"), "r.txt").strip() == "watched"
    finally:
        start_stopped_worker(node)


def test_missing_and_over_limit_output_is_said_and_a_link_stays_on_the_worker(work):
    missing, big = "wd-missing", "wd-big"
    work["jobs"].extend([missing, big])
    ok(gridx_in(SUBMIT, "jobs", "run", "--output", "/tmp/none", "--wait", "--name", missing, "python:3.11",
                "true"), "a job that writes nothing")
    line = ok(hub("jobs", "status", missing), "status")
    assert "missing: /tmp/none is not in the job's container" in line, line
    proc = gridx_in(SUBMIT, "jobs", "run", "--output", "/tmp/out", "--output-limit", "4M", "--wait", "--name", big,
                    "python:3.11", "mkdir -p /tmp/out && head -c 3000000 /dev/zero > /tmp/out/a && "
                    "head -c 3000000 /dev/zero > /tmp/out/b && ln -s /etc/shadow /tmp/out/shadow")
    assert proc.returncode == 0 and "over-limit" in proc.stderr, proc.stderr
    kept = ok(in_hub(f"cd {SUBMIT}/{big} && ls -A && stat -c %s *"), "what came back").split()
    assert kept[:1] in (["a"], ["b"]) and kept[1:] == ["3000000"], kept  # one file fit; no link
    assert "over-limit" in ok(hub("jobs", "status", big), "status")


def test_delete_removes_results_unless_kept(work):
    kept, gone = "wd-kept", "wd-gone"
    for job in (kept, gone):
        ok(gridx_in(SUBMIT, "jobs", "run", "--output", "/tmp/out", "--name", job, "--wait", "python:3.11",
                    "mkdir -p /tmp/out && echo $HOSTNAME > /tmp/out/host"), f"jobs run {job}")
    where, keys = {}, {job: service_id(job) for job in (kept, gone)}
    for job in (kept, gone):  # the ended container, with the output in it, on its worker
        task = ok(in_hub(f"docker service ps -q --no-trunc {job}"), "task").split()[0]
        found = ok(in_hub("docker inspect --format '{{.Status.ContainerStatus.ContainerID}} {{.NodeID}}' " + task),
                   "container").split()
        node = ok(in_hub(f"docker node inspect --format '{{{{.Description.Hostname}}}}' {found[1]}"), "node").strip()
        where[job] = (node, found[0])
    ok(hub("jobs", "delete", gone), "delete")
    ok(hub("jobs", "delete", "--keep-results", kept), "delete --keep-results")
    assert in_hub(f"test -e {RESULTS}/{keys[gone]} || test -e {RESULTS}/{keys[gone]}.json").returncode != 0
    # the kept ones hold their name (issue 19): no new job takes it until they are deleted
    taken = hub("jobs", "run", "--name", kept, "python:3.11", "true")
    assert taken.returncode == 2 and "are kept on the hub" in taken.stderr, taken.stderr
    for job, (node, container_id) in where.items():  # Docker 20.10 alone keeps them after service rm
        assert container_id not in ok(node_exec(node, "docker ps -a -q --no-trunc"), "containers"), (job, node)
    ok(gridx_in(SUBMIT, "jobs", "results", kept, f"{SUBMIT}/kept-again"), "results of a deleted job, kept")
    assert in_hub(f"test -s {SUBMIT}/kept-again/host").returncode == 0
    ok(hub("jobs", "results", kept, "--delete"), "results --delete")
    assert hub("jobs", "results", kept).returncode == 2
    assert in_hub(f"test -e {RESULTS}/{keys[kept]}.json").returncode != 0
    ok(hub("jobs", "run", "--name", kept, "--wait", "python:3.11", "true"), "the name is free again")
    ok(hub("jobs", "delete", kept), "delete it")
