"""Members are apart (issue 19), tried as an attacker would on the lab: as a
member through serve (the stock gridx, and a hand-made client where gridx
cannot send the attack), as a job, as the admin's mistakes would let them.

Names never read as the admin or the hub; a work layer is unguessable, run
by digest, made only after the job's name and limits are taken, and gone
with its job; another member's layer cannot be run; an upload's own tar
headers never reach the hub's Docker, nor does a malformed frame; a base
image's ONBUILD triggers never run on the hub; the hub's limits bound a
member's folder, results and kept results; kept results keep their name;
what members wrote reaches others' terminals escaped; and a worker that
stops answering a results copy does not stop hub watch from re-running a
lost job.
"""

import io
import json
import re
import subprocess
import tarfile
import time

import pytest
from e2e_helpers import (
    ALICE,
    BOB,
    LAB_NET,
    MANAGER,
    NETWORK,
    USER_NODE,
    as_user,
    container,
    hub,
    hub_sh,
    node_exec,
    ok,
    ssh_as,
    start_stopped_worker,
    wait_until,
)

SESSION_HELLO, UPLOAD_MAGIC = b"gridx\n", b"gridx-upload "  # same as gridx.py's (see send_upload)
LISTENER, LISTENER_IP = "onbuild-listener", LAB_NET + ".40"


def layer_tags():
    """The work layers' tags in the hub's registry (the VPN side, as a worker reads it)."""
    out = ok(hub_sh("curl -s --cacert /etc/docker/certs.d/10.0.0.1:5000/ca.crt "
                    "https://10.0.0.1:5000/v2/gridx/work/tags/list"), "tags")
    return set(json.loads(out).get("tags") or [])


def service_image(job):
    return ok(hub_sh(f"docker service inspect --format '{{{{.Spec.TaskTemplate.ContainerSpec.Image}}}}' {job}"),
              "image").strip()


def user_folder(name, size_kb=4, files=1):
    """A work folder on the user's machine."""
    folder = f"/root/wd-{name}"
    ok(node_exec(USER_NODE, f"rm -rf {folder} && mkdir -p {folder} && for i in $(seq 1 {files}); do "
                            f"head -c {size_kb * 1024} /dev/urandom > {folder}/f$i.bin; done"), "make folder")
    return folder


def hand_made_upload(name, command, payload):
    """A member's own client: the session hello, the upload magic, a header,
    then PAYLOAD as it is (frames or not), to the gridx account's forced
    serve. stdin stays open a moment after, as gridx's does."""
    key = f"/root/.ssh/gridx-{name}"
    argv = ["docker", "exec", "-i", container(USER_NODE), "sh", "-c",
            f"(cat; sleep 2) | ssh -o BatchMode=yes -i {key} -o IdentitiesOnly=yes {MANAGER} '{command}'"]
    return subprocess.run(argv, input=SESSION_HELLO + UPLOAD_MAGIC + b'{"script": null}\n' + payload,
                          capture_output=True, timeout=180)


def frames(data):
    return b"%x\n" % len(data) + data + b"0\n"


def pax_tar_renaming_to(new_name):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("notes.txt")
        info.pax_headers = {"path": new_name}
        info.size = 21
        archive.addfile(info, io.BytesIO(b"FROM scratch\nRUN id\n\n"))
    return raw.getvalue()


@pytest.fixture
def cleanup():
    jobs = []
    yield jobs
    if jobs:
        hub("jobs", "delete", *jobs, timeout=180)
        for job in jobs:
            hub("jobs", "results", job, "--delete")


# -- names ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["root", "gridx", "hub", "admin", "docker", "bin"])
def test_no_member_is_named_like_the_admin_the_hub_or_its_accounts(lab, name):
    before = hub_sh("cat /var/lib/gridx/users/.ssh/authorized_keys 2>/dev/null; "
                    "cat /etc/gridx/hub_config.json").stdout
    proc = hub("hub", "add-user", name)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert hub_sh("cat /var/lib/gridx/users/.ssh/authorized_keys 2>/dev/null; "
                  "cat /etc/gridx/hub_config.json").stdout == before


# -- work layers --------------------------------------------------------------


def test_a_layer_is_unguessable_by_digest_and_gone_with_its_job(user_node, cleanup):
    folder = user_folder("a")
    job = "e2e-layer-a"
    cleanup.append(job)
    before = layer_tags()
    ok(as_user(f"gridx jobs run --workdir {folder} --name {job} --wait python:3.11 'ls /work'"), "alice's job")
    image = service_image(job)
    found = re.fullmatch(rf"10\.0\.0\.1:5000/gridx/work:({job}-[0-9a-f]{{32}})@sha256:[0-9a-f]{{64}}", image)
    assert found, image
    tag = found.group(1)
    assert layer_tags() - before == {tag}
    # bob cannot run it, by tag or by digest; nor can he take the job's name
    for theirs in (image, image.split("@")[0], "10.0.0.1:5000/gridx/work@" + image.split("@")[1]):
        proc = ssh_as(BOB, f"jobs run {theirs} true")
        assert proc.returncode == 2 and "work layer" in proc.stderr, proc.stderr
    bobs = user_folder("b")
    proc = as_user(f"gridx jobs run --workdir {bobs} --name {job} python:3.11 true", name=BOB)
    assert proc.returncode == 2 and "exists" in proc.stderr, proc.stderr
    assert layer_tags() - before == {tag} and service_image(job) == image  # nothing pushed, nothing changed
    ok(as_user(f"gridx jobs delete {job}"), "alice deletes it")
    # serve (the gridx account) cannot write the registry: hub watch's sweep removes it (every 10 passes)
    wait_until(lambda: tag not in layer_tags(), 120, "hub watch to remove the deleted job's layer")


def test_a_refused_submit_leaves_nothing(user_node, cleanup):
    ok(hub("hub", "set-user", ALICE, "--max-jobs", "1"), "one job at a time")
    try:
        running = ok(ssh_as(ALICE, "jobs run python:3.11 'sleep 120'"), "her one job").strip()
        cleanup.append(running)
        before, services = layer_tags(), hub_sh("docker service ls -q | sort").stdout
        proc = as_user(f"gridx jobs run --workdir {user_folder('r')} --name e2e-refused python:3.11 true")
        assert proc.returncode == 2 and "jobs unfinished" in proc.stderr, proc.stderr
        assert layer_tags() == before and hub_sh("docker service ls -q | sort").stdout == services
        assert hub_sh("docker ps -a -q --filter label=gridx.layer").stdout.strip() == ""  # no container left
    finally:
        ok(hub("hub", "set-user", ALICE, "--max-jobs", "default"), "back to the default")


# -- uploads --------------------------------------------------------------------


def test_a_hand_made_upload_cannot_rename_a_file_nor_send_a_bad_frame(user_node):
    before, services = layer_tags(), hub_sh("docker service ls -q | sort").stdout
    tar = pax_tar_renaming_to("../Dockerfile")
    for payload, says in ((frames(tar), "outside"), (b"-1\n" + tar, "damaged frame"),
                          (b"+10\n" + tar[:16] + b"0\n", "damaged frame"), (b"0x10\n", "damaged frame")):
        proc = hand_made_upload(ALICE, "jobs run --workdir . --name e2e-handmade python:3.11 true", payload)
        assert proc.returncode == 2 and says in proc.stderr.decode(), proc.stderr
    assert layer_tags() == before and hub_sh("docker service ls -q | sort").stdout == services


@pytest.fixture
def onbuild_base(lab):
    """A base image on the hub whose ONBUILD triggers would leave a mark and
    fetch from a lab container that records every request."""
    subprocess.run(["docker", "rm", "-f", container(LISTENER)], capture_output=True)
    ok(subprocess.run(["docker", "run", "-d", "--name", container(LISTENER), "--network", NETWORK,
                       "--ip", LISTENER_IP, "python:3.11", "python3", "-m", "http.server", "8080"],
                      capture_output=True, text=True), "the listener")
    dockerfile = (f"FROM python:3.11\nONBUILD RUN touch /onbuild-ran\n"
                  f"ONBUILD ADD http://{LISTENER_IP}:8080/fetched /fetched\n")
    ok(node_exec("hub", "docker build -q -t e2e-onbuild:1 -", input=dockerfile), "build the base")
    yield "e2e-onbuild:1"
    subprocess.run(["docker", "rm", "-f", container(LISTENER)], capture_output=True)
    hub_sh("docker image rm e2e-onbuild:1")


def test_a_base_images_onbuild_triggers_never_run_on_the_hub(onbuild_base, cleanup):
    """The layer is made without a build: no trigger runs, nothing is fetched."""
    job = "e2e-onbuild"
    cleanup.append(job)
    ok(hub_sh("rm -rf /root/wd-onbuild && mkdir /root/wd-onbuild && echo hi > /root/wd-onbuild/a.txt"), "folder")
    out = ok(hub_sh(f"cd /root && gridx jobs run --workdir wd-onbuild --name {job} --wait {onbuild_base} "
                    "'test -e /onbuild-ran && echo RAN; test -e /fetched && echo FETCHED; cat a.txt'", timeout=300),
             "a job on the ONBUILD image")
    assert out.split() == ["hi"], out
    logs = subprocess.run(["docker", "logs", container(LISTENER)], capture_output=True, text=True)
    assert "GET" not in logs.stdout + logs.stderr, logs.stderr


# -- what a member's jobs put on the hub ------------------------------------------------


def test_the_hubs_limits_bound_a_members_folder_files_and_kept_results(user_node, cleanup):
    ok(hub("hub", "set-user", ALICE, "--max-workdir", "1M", "--max-output-files", "10", "--max-kept", "1"),
       "alice's limits")
    try:
        before = layer_tags()
        proc = as_user(f"gridx jobs run --workdir {user_folder('big', size_kb=2048)} --name e2e-big python:3.11 true")
        assert proc.returncode == 2 and "limit" in proc.stderr, proc.stderr
        proc = as_user(f"gridx jobs run --workdir {user_folder('f')} --workdir-limit 2M --name e2e-big python:3.11 "
                       "true")
        assert proc.returncode == 2 and "over your limit on this hub, 1M" in proc.stderr, proc.stderr
        assert layer_tags() == before
        job = "e2e-many"
        cleanup.append(job)
        as_user(f"gridx jobs run --output /tmp/out --name {job} --wait python:3.11 "
                "'mkdir -p /tmp/out && for i in $(seq 1 100); do echo $i > /tmp/out/$i; done'")
        status = json.loads(ok(ssh_as(ALICE, f"jobs status {job} --json"), "status"))
        (task,) = status["results"]["tasks"].values()
        assert task["state"] == "over-limit" and task["files"] == 10, task
        ok(as_user(f"gridx jobs delete --keep-results {job}"), "keep one")
        second = "e2e-second"
        cleanup.append(second)
        ok(as_user(f"gridx jobs run --output /tmp/out --name {second} --wait python:3.11 "
                   "'mkdir -p /tmp/out && echo x > /tmp/out/x'"), "a second job")
        proc = as_user(f"gridx jobs delete --keep-results {second}")
        assert proc.returncode == 2 and "the most the hub allows is 1" in proc.stderr, proc.stderr
        assert hub_sh(f"docker service inspect {second} >/dev/null").returncode == 0  # nothing deleted
    finally:
        ok(hub("hub", "set-user", ALICE, "--max-workdir", "default", "--max-output-files", "default",
               "--max-kept", "default"), "back to the defaults")


def test_kept_results_keep_their_name_and_go_to_their_owner_only(user_node, cleanup):
    job = "e2e-kept"
    cleanup.append(job)
    ok(as_user(f"gridx jobs run --output /tmp/out --name {job} --wait python:3.11 "
               "'mkdir -p /tmp/out && echo alices > /tmp/out/secret'"), "alice's job")
    ok(as_user(f"gridx jobs delete --keep-results {job}"), "kept")
    for name in (BOB, ALICE):  # bob would get her results; she would mix two jobs' results
        proc = as_user(f"gridx jobs run --output /tmp/out --name {job} python:3.11 true", name=name)
        assert proc.returncode == 2 and "are kept on the hub" in proc.stderr, proc.stderr
    proc = ssh_as(BOB, f"jobs results --tar -- {job}")
    assert proc.returncode == 2 and f"was {ALICE}'s" in proc.stderr, proc.stderr
    assert "alices" in ok(as_user(f"cd /tmp && rm -rf kept && gridx jobs results {job} kept && cat kept/secret"),
                          "hers")
    ok(as_user(f"gridx jobs results {job} --delete"), "deleted")
    proc = as_user(f"gridx jobs results {job} --json")
    assert proc.returncode == 2, proc.stderr


# -- what members wrote, on others' terminals -----------------------------------------


def test_control_characters_in_a_members_command_reach_others_escaped(user_node, cleanup):
    job = "e2e-escape"
    cleanup.append(job)
    # real control characters in the command line serve receives (a title and a screen clear)
    ok(ssh_as(ALICE, f"jobs run --name {job} python:3.11 'echo \x1b]0;owned\x07\x1b[2J; sleep 60'"),
       "alice's job")
    for proc in (ssh_as(BOB, "jobs list"), ssh_as(BOB, f"jobs status {job}"), hub("jobs", "list")):
        shown = ok(proc, "list")
        assert job in shown and "\x1b" not in shown and "\x07" not in shown, shown
        assert "\\x1b]0;owned\\x07" in shown, shown


# -- collection never holds up hub watch ------------------------------------------------


def test_a_worker_that_stops_answering_a_copy_does_not_stop_watch_rerunning_jobs(lab):
    """worker3's docker cp hangs (the SSH session stays up, nothing comes);
    while hub watch copies from it, worker2 goes down with a job: the job
    runs again elsewhere within watch's usual time."""
    hung, lost = "e2e-hung-copy", "e2e-lost"
    hang = ("mv /usr/bin/docker /usr/bin/docker.e2e && "
            "printf '#!/bin/sh\\nsleep 3600\\n' > /usr/bin/docker && chmod 755 /usr/bin/docker")
    labels = ["--label", "gridx.job={}", "--label", "gridx.kind=run", "--label", "gridx.owner=root"]
    try:
        ok(node_exec("worker3", hang), "worker3's docker CLI hangs")
        ok(hub_sh(" ".join(["docker service create -d -q --no-resolve-image --mode replicated-job",
                            "--restart-condition none --constraint node.hostname==worker3",
                            *(a.format(hung) for a in labels), "--label gridx.output=/tmp/out",
                            f"--name {hung} python:3.11 sh -c 'mkdir -p /tmp/out && echo x > /tmp/out/x'"])),
           "a job with --output on worker3")
        wait_until(lambda: hub_sh("pgrep -f 'docker cp -- .*:/tmp/out -' >/dev/null || "
                                  "pgrep -f 'ssh.*docker cp' >/dev/null").returncode == 0, 60,
                   "hub watch copying from worker3")
        ok(hub_sh(" ".join(["docker service create -d -q --no-resolve-image --mode replicated-job",
                            "--restart-condition none --constraint node.hostname==worker2",
                            *(a.format(lost) for a in labels), f"--name {lost} python:3.11 sleep 600"])),
           "a long job on worker2")
        wait_until(lambda: "Running" in hub_sh(f"docker service ps --format '{{{{.CurrentState}}}}' {lost}").stdout,
                   120, "it runs")
        # let it run anywhere once it runs again (the constraint held it on worker2 only)
        ok(subprocess.run(["docker", "stop", "-t", "2", container("worker2")], capture_output=True, text=True,
                          timeout=120), "stop worker2")
        started = time.monotonic()
        wait_until(lambda: hub_sh(f"docker service ps --format '{{{{.Node}}}} {{{{.CurrentState}}}}' {lost}")
                   .stdout.count("\n") >= 2, 180, "hub watch to run the lost job again")
        assert time.monotonic() - started < 180
        assert hub_sh("pgrep -f 'ssh.*docker cp' >/dev/null").returncode == 0  # the copy still hangs
    finally:
        node_exec("worker3", "test -e /usr/bin/docker.e2e && mv /usr/bin/docker.e2e /usr/bin/docker; "
                             "pkill -f 'sleep 3600'")
        hub_sh("pkill -f 'ssh.*docker cp'")  # the collector gives up on it, and watch collects again
        hub_sh(f"docker service rm {hung} {lost}")
        if subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", container("worker2")],
                          capture_output=True, text=True).stdout.strip() != "true":
            start_stopped_worker("worker2")
