"""The hub's image registry on the real lab (issue 14, first half; issue 19,
item 2): a join installs the bundle's CA; an image built on the hub and
pushed with `gridx image push` (through the writer on the hub's loopback)
runs on a worker that never had it (pulled over the VPN from the read-only
side by its remapped engine, trusting the CA in certs.d), with the digest
the writer stored; `image ls` shows it with its size; `image rm` removes it
and frees its space; leave removes the CA. Who may write: a job on a worker
and a volunteer's own Docker are refused (405) by the read-only side and
do not reach the writer; the two processes run as their unprivileged
accounts, the reader cannot write the storage, the hub's other accounts
cannot reach the writer. A hub that ran the single root registry is moved
over by init, its images kept; the registry part of hub reset stops both.
The registry answers on the VPN address only; init again changes nothing;
a lab worker pulls the lab's job image from the registry over the VPN.
"""

import base64
import json
import os
import re
import time

import pytest
from e2e_helpers import (
    HUB_VPN_IP,
    WORKERS,
    add_peer,
    contained,
    copy_bundle,
    hub,
    hub_json,
    node_exec,
    ok,
    remove_peer_quietly,
    wait_peer_ready,
    wait_until,
)

REGISTRY = f"{HUB_VPN_IP}:5000"
WRITER = "127.0.0.1:5001"
CERTS = f"/etc/docker/certs.d/{REGISTRY}"
CURL_READER = f"curl -sS --cacert {CERTS}/ca.crt"
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
# 5 MB that do not compress: the pushed image's own layer, freed by image rm
DOCKERFILE = """FROM python:3.11
RUN head -c 5000000 /dev/urandom > /blob && echo 'hello from the hub registry {tag}' > /hello.txt
"""


# The fresh node joins as a volunteer's machine does, and its engine pulls a
# job's image as every lab engine does (only Docker Hub is made to fail at
# once, lab/entrypoint.sh): a job of an image only the hub's registry has is
# pulled over the VPN. Only the fresh node can hold the job's memory.
FRESH_MEMORY, JOB_MEMORY = "6G", "5G"  # the lab's workers share 4G


@pytest.fixture(scope="module", autouse=True)
def python_in_the_registry(registry_python):
    """Every test here finds python:3.11 in the registry (conftest's
    registry_python pushes it once a session)."""
    assert registry_python == f"{REGISTRY}/python:3.11"


def image_on(node, image):
    return node_exec(node, ["docker", "image", "inspect", "--format={{.Id}}", "--", image]).returncode == 0


def served_digest(url_base, repository, tag, curl="curl -sS"):
    """The digest a registry's side serves for a tag (HEAD, from the hub)."""
    head = ok(node_exec("hub", f"{curl} --head -H 'Accept: {MANIFEST_V2}' {url_base}/v2/{repository}/manifests/{tag}"),
              "HEAD manifest")
    return {k.strip().lower(): v.strip() for k, _, v in
            (line.partition(":") for line in head.splitlines())}.get("docker-content-digest")


def registry_processes():
    """{config path: (user, uid, gid, groups, NoNewPrivs)} of the docker-registry processes on the hub."""
    found = {}
    for pid in ok(node_exec("hub", "pgrep -f '^/usr/bin/docker-registry serve' || true"), "pgrep").split():
        cmdline = node_exec("hub", f"tr '\\0' ' ' < /proc/{pid}/cmdline").stdout.split()
        status = dict(line.split(":", 1) for line in node_exec("hub", f"cat /proc/{pid}/status").stdout.splitlines()
                      if ":" in line)
        user = ok(node_exec("hub", f"ps -o user:32= -p {pid}"), "ps").strip()
        found[cmdline[-1]] = (user, status["Uid"].split()[0], status["Gid"].split()[0],
                              status["Groups"].split(), status["NoNewPrivs"].strip())
    return found


def test_a_pushed_image_runs_on_a_worker_that_never_had_it_and_leave_removes_the_ca(lab, fresh_node,
                                                                                   registry_python):
    tag = f"t{int(time.time())}"
    local, job, name = f"e2e/hello:{tag}", f"reg-{tag}", "regnode"
    remote = f"{REGISTRY}/e2e/hello:{tag}"
    assert node_exec(fresh_node, ["test", "-e", "/etc/docker/certs.d"]).returncode != 0
    try:
        # a volunteer's machine joins: the bundle's CA goes where Docker reads it
        added = add_peer(name)
        folder = copy_bundle(added["bundle"], fresh_node)
        ok(node_exec(fresh_node, [f"{folder}/join.sh", "--yes", "--cpus", "1", "--memory", FRESH_MEMORY],
                     timeout=300), "join.sh")
        wait_peer_ready(name)
        assert contained(fresh_node)
        hub_ca = ok(node_exec("hub", "cat /etc/gridx/registry/ca.crt"), "the hub's CA")
        assert ok(node_exec(fresh_node, f"cat {CERTS}/ca.crt"), "the worker's CA") == hub_ca
        state = ok(node_exec(fresh_node, "cat /var/lib/gridx/state.env"), "state")
        assert f"REGISTRY='{REGISTRY}'" in state and "REGISTRY_DIRS_CREATED='2'" in state, state
        status = json.loads(node_exec(fresh_node, [f"{folder}/status.sh", "--json"]).stdout)
        assert status["registry"] == REGISTRY and status["registry_ca"] is True, status

        # an image built on the hub, pushed, run there by a job
        ok(node_exec("hub", ["docker", "build", "-q", "-t", local, "-"], input=DOCKERFILE.format(tag=tag),
                     timeout=300), "docker build on the hub")
        assert not image_on(fresh_node, remote) and not any(image_on(w, remote) for w in WORKERS)
        t0 = time.monotonic()
        pushed = ok(hub("image", "push", local, timeout=300), "gridx image push")
        push_s = time.monotonic() - t0
        assert pushed == remote + "\n"
        # one storage: the tag pushed through the writer is served by the read-only side, same digest
        digest = served_digest(f"http://{WRITER}", "e2e/hello", tag)
        assert digest and digest.startswith("sha256:")
        assert served_digest(f"https://{REGISTRY}", "e2e/hello", tag, CURL_READER) == digest
        assert not image_on("hub", f"{WRITER}/e2e/hello:{tag}")  # gridx untagged the writer's name
        t0 = time.monotonic()
        proc = hub("jobs", "run", "--wait", f"--name={job}", f"--memory={JOB_MEMORY}", remote, "--",
                   "cat", "/hello.txt", timeout=300)
        run_s = time.monotonic() - t0
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"hello from the hub registry {tag}" in proc.stdout
        assert hub_json("jobs", "status", job)["tasks"][0]["node"] == "fresh"
        assert image_on(fresh_node, remote)  # pulled by the remapped engine, TLS checked against certs.d
        repo_digests = ok(node_exec(fresh_node, ["docker", "image", "inspect", "--format={{json .RepoDigests}}",
                                                 remote]), "RepoDigests")
        assert f"{REGISTRY}/e2e/hello@{digest}" in json.loads(repo_digests)
        print(f"\nimage push {push_s:.1f} s; jobs run --wait of an image the worker never had {run_s:.1f} s")

        # image ls: with its size
        listed = hub_json("image", "ls")
        mine = [i for i in listed["images"] if i["name"] == remote]
        assert len(mine) == 1 and mine[0]["size_bytes"] > 5_000_000, listed
        assert mine[0]["digest"].startswith("sha256:") and listed["registry"] == REGISTRY
        table = ok(hub("image", "ls"), "gridx image ls")
        assert remote in table and " MiB" in table

        # image rm: gone, and its space freed by the garbage collection
        du_before = int(ok(node_exec("hub", "du -sb /var/lib/gridx/registry"), "du").split()[0])
        removed = hub("image", "rm", remote, timeout=300)
        assert removed.returncode == 0, removed.stdout + removed.stderr
        du_after = int(ok(node_exec("hub", "du -sb /var/lib/gridx/registry"), "du").split()[0])
        assert du_before - du_after > 4_000_000, (du_before, du_after)
        freed = removed.stdout.rsplit("freed ", 1)[1].strip()
        assert freed.endswith(" MiB") and float(freed.split()[0]) >= 4, removed.stdout
        print(f"image rm freed {freed} (du -sb: {du_before - du_after} bytes)")
        names = [i["name"] for i in hub_json("image", "ls")["images"]]
        assert remote not in names and registry_python in names  # it answers again, the rest kept
        assert hub("image", "rm", remote).returncode == 2  # gone: exit 2, said so

        # leave: the CA goes, and the folders join made for it
        ok(node_exec(fresh_node, f"{folder}/leave.sh", timeout=180), "leave.sh")
        assert node_exec(fresh_node, ["test", "-e", "/etc/docker/certs.d"]).returncode != 0
        assert "REGISTRY" not in node_exec(fresh_node, "cat /var/lib/gridx/state.env 2>/dev/null").stdout
    finally:
        hub("jobs", "delete", job)
        node_exec("hub", ["docker", "rmi", "-f", local, remote])
        node_exec(fresh_node, f"[ ! -e /var/lib/gridx/state.env ] || /root/gridx-{name}-bundle/leave.sh", timeout=180)
        remove_peer_quietly(name)


def test_a_lab_engine_pulls_a_jobs_image_and_docker_hub_refuses_at_once(lab):
    # every node points Docker Hub's names at 127.0.0.1 (lab/entrypoint.sh): refused, no DNS wait
    proc = node_exec("worker1", "start=$(date +%s%N); docker pull -q python:3.11; rc=$?; "
                                "echo; echo rc=$rc ms=$(( ($(date +%s%N) - start) / 1000000 ))")
    rc, ms = proc.stdout.split()[-2:]
    assert rc == "rc=1" and "127.0.0.1:443: connect: connection refused" in proc.stderr, proc
    assert int(ms[3:]) < 5000, proc  # a lookup that waits for the DNS timeout takes 10-20 s
    job = f"hubpull-{int(time.time())}"
    try:
        proc = hub("jobs", "run", "--wait", f"--name={job}", "python:3.11", "--", "python3", "-c", "print(6 * 7)")
        assert proc.returncode == 0 and "42" in proc.stdout, proc.stdout + proc.stderr
        task = hub_json("jobs", "status", job)["tasks"][0]
        # the task's engine tried Docker Hub first, as a volunteer's does, then ran the image it has
        log = ok(node_exec(task["node"], ["grep", "-F", f"task.id={task['id']}", "/var/log/docker.log"]), "log")
        assert "pulling image failed" in log and "connection refused" in log, log
        print(f"\na pull from Docker Hub refused in {ms[3:]} ms")
    finally:
        hub("jobs", "delete", job)


def test_the_registry_answers_on_the_vpn_address_only(lab):
    listening = ok(node_exec("hub", "ss -Hltn 'sport = :5000'"), "ss")
    assert [line.split()[3] for line in listening.splitlines()] == [REGISTRY], listening
    listening = ok(node_exec("hub", "ss -Hltn 'sport = :5001'"), "ss")
    assert [line.split()[3] for line in listening.splitlines()] == [WRITER], listening
    proc = node_exec("worker1", f"timeout 5 bash -c 'echo > /dev/tcp/{HUB_VPN_IP}/5001'")
    assert proc.returncode != 0 and "refused" in proc.stderr, proc.stderr
    hub_bridge = lab.hub_ip
    # from a worker, over the lab's bridge (not the VPN): nothing answers
    proc = node_exec("worker1", f"timeout 5 bash -c 'echo > /dev/tcp/{hub_bridge}/5000'")
    assert proc.returncode != 0
    proc = node_exec("worker1", f"timeout 5 bash -c 'echo > /dev/tcp/{HUB_VPN_IP}/5000'")
    assert proc.returncode == 0, proc.stderr
    rules = ok(node_exec("hub", "iptables -S GRIDX-INPUT"), "iptables")
    assert "-A GRIDX-INPUT -p tcp -m tcp --dport 5000 -j DROP" in rules
    assert rules.index("-i gridx0 -j RETURN") < rules.index("--dport 5000")


def test_hub_init_again_changes_nothing_and_keeps_the_ca(lab):
    before = ok(node_exec("hub", "sha256sum /etc/gridx/registry/ca.crt /etc/gridx/registry/ca.key"), "sha")
    proc = hub("hub", "init", f"--ip={lab.hub_ip}")
    assert proc.returncode == 0 and "nothing changed" in proc.stderr, proc.stderr
    assert ok(node_exec("hub", "sha256sum /etc/gridx/registry/ca.crt /etc/gridx/registry/ca.key"), "sha") == before
    modes = ok(node_exec("hub", "stat -c '%a %U:%G %n' /etc/gridx/registry /etc/gridx/registry/ca.key "
                                "/etc/gridx/registry/server.key /etc/gridx-registry/reader "
                                "/etc/gridx-registry/reader/server.key /etc/gridx-registry/writer "
                                "/etc/gridx-registry/writer/config.yml /var/lib/gridx/registry"), "stat")
    assert modes.split("\n")[:8] == [
        "700 root:root /etc/gridx/registry", "600 root:root /etc/gridx/registry/ca.key",
        "600 root:root /etc/gridx/registry/server.key",
        # the key's copy: root's, readable by the read-only side's own group alone
        "750 root:gridx-registry-ro /etc/gridx-registry/reader",
        "640 root:gridx-registry-ro /etc/gridx-registry/reader/server.key",
        "750 root:gridx-registry /etc/gridx-registry/writer",
        "640 root:gridx-registry /etc/gridx-registry/writer/config.yml",
        "750 gridx-registry:gridx-registry /var/lib/gridx/registry"], modes


def test_a_lab_worker_pulls_the_job_image_from_the_hub_registry_over_the_vpn(lab, registry_python):
    """The image start put into worker1 is taken out of it, pulled back from
    the hub's registry, every layer over the VPN, and is the same image.
    Everything that could hold its layers goes first: the ended containers
    of earlier tests' jobs, and every image (images built FROM python:3.11
    by earlier tests share its layers, and a pull would fetch none)."""
    worker = WORKERS[0]
    local = ok(node_exec(worker, ["docker", "image", "inspect", "--format={{.Id}}", "python:3.11"]), "inspect")
    try:
        ok(node_exec(worker, "docker container prune -f >/dev/null && docker image prune -af >/dev/null && "
                             "test -z \"$(docker images -qa)\""), "worker1 without images")
        size = next(i["size_bytes"] for i in hub_json("image", "ls")["images"] if i["name"] == registry_python)
        received = "cat /sys/class/net/gridx0/statistics/rx_bytes"
        before = int(ok(node_exec(worker, received), "rx_bytes"))
        t0 = time.monotonic()
        ok(node_exec(worker, ["docker", "pull", "-q", registry_python], timeout=600), "docker pull over the VPN")
        pull_s = time.monotonic() - t0
        got = int(ok(node_exec(worker, received), "rx_bytes")) - before
        assert got >= size, (got, size)  # every layer came over the VPN (the registry's compressed size)
    finally:
        node_exec(worker, ["docker", "tag", registry_python, "python:3.11"])
        node_exec(worker, ["docker", "rmi", registry_python])
    back = ok(node_exec(worker, ["docker", "image", "inspect", "--format={{.Id}}", "python:3.11"]), "inspect")
    assert back == local, (back, local)  # the very image start put there
    print(f"\na worker pulled python:3.11 ({got / 2**20:.0f} MiB over the VPN) from the hub's registry in "
          f"{pull_s:.1f} s; lab setup "
          f"{lab.timings.get('setup')} s (start {lab.timings.get('start')} s); load average {os.getloadavg()[0]:.1f}")


# -- who may write: the accounts, a job, a volunteer ------------------------------

READER_CONFIG, WRITER_CONFIG = "/etc/gridx-registry/reader/config.yml", "/etc/gridx-registry/writer/config.yml"


def test_the_two_sides_run_as_unprivileged_accounts_and_only_the_writer_writes(lab):
    ids = {name: ok(node_exec("hub", f"id -u {name}; id -g {name}"), "id").split()
           for name in ("gridx-registry", "gridx-registry-ro")}
    processes = registry_processes()
    assert set(processes) == {READER_CONFIG, WRITER_CONFIG}, processes
    writer_uid, writer_gid = ids["gridx-registry"]
    reader_uid, reader_gid = ids["gridx-registry-ro"]
    assert processes[WRITER_CONFIG] == ("gridx-registry", writer_uid, writer_gid, [], "1")
    assert processes[READER_CONFIG] == ("gridx-registry-ro", reader_uid, reader_gid, [writer_gid], "1")
    assert "0" not in (writer_uid, reader_uid)
    # the side every worker talks to reads the storage and cannot change a byte of it
    as_reader = "setpriv --reuid=gridx-registry-ro --regid=gridx-registry-ro --groups=gridx-registry"
    assert ok(node_exec("hub", f"{as_reader} ls /var/lib/gridx/registry"), "ls as the reader").split() == ["docker"]
    proc = node_exec("hub", f"{as_reader} touch /var/lib/gridx/registry/docker/x")
    assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc
    assert node_exec("hub", "find /var/lib/gridx/registry ! -user gridx-registry").stdout == ""
    # on the hub, the writer answers root alone (the hub's Docker, the admin's gridx)
    assert ok(node_exec("hub", f"curl -sS -o /dev/null -w '%{{http_code}}' http://{WRITER}/v2/"), "root") == "200"
    for account, group in (("gridx-registry-ro", "gridx-registry-ro"), ("gridx-registry", "gridx-registry"),
                           ("nobody", "nogroup")):
        proc = node_exec("hub", f"setpriv --reuid={account} --regid={group} --clear-groups "
                                f"curl -sS -o /dev/null http://{WRITER}/v2/")
        # curl 7.88 (bookworm) says "Couldn't connect", 8.x "Could not connect"
        assert proc.returncode == 7 and re.search(r"Could(n't| not) connect", proc.stderr), (account, proc)


# What a job tries (python:3.11, run by gridx on a worker): the read-only
# side's write calls (certificate unchecked: a job has no CA, an attacker
# needs none) and a connection to the writer's port on the VPN address.
ATTACK = """
import http.client, json, socket, ssl
def call(method, path, body=None, headers={}):
    try:
        c = http.client.HTTPSConnection("10.0.0.1", 5000, context=ssl._create_unverified_context(), timeout=10)
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        return [r.status, r.read().decode(errors="replace").strip()[:60]]
    except OSError as e:
        return ["unreachable", type(e).__name__]
out = {
    "catalog": call("GET", "/v2/_catalog"),
    "upload": call("POST", "/v2/python/blobs/uploads/"),
    "manifest": call("PUT", "/v2/python/manifests/3.11", b"{}",
                     {"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"}),
    "delete": call("DELETE", "/v2/python/manifests/sha256:" + "0" * 64),
}
try:
    socket.create_connection(("10.0.0.1", 5001), timeout=5).close()
    out["writer"] = "open"
except OSError as e:
    out["writer"] = "unreachable: " + type(e).__name__
print("RESULT " + json.dumps(out))
"""


def refused(answer):
    """The read-only side refused the write (405 Method not allowed), or the job reached nothing."""
    return answer[0] == 405 or answer[0] == "unreachable"


def test_a_job_on_a_worker_cannot_write_the_registry(lab):
    job = f"regpush-{int(time.time())}"
    before = served_digest(f"https://{REGISTRY}", "python", "3.11", CURL_READER)
    script = f"import base64; exec(base64.b64decode('{base64.b64encode(ATTACK.encode()).decode()}'))"
    try:
        proc = hub("jobs", "run", "--wait", f"--name={job}", "python:3.11", "--", "python3", "-c", script,
                   timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert hub_json("jobs", "status", job)["tasks"][0]["node"] in WORKERS  # a volunteer's machine
        out = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
        print(f"\nfrom a job on a worker: {out}")
        for call in ("upload", "manifest", "delete"):
            assert refused(out[call]), out
        assert out["writer"].startswith("unreachable"), out
    finally:
        hub("jobs", "delete", job)
    assert served_digest(f"https://{REGISTRY}", "python", "3.11", CURL_READER) == before


def test_a_volunteers_own_docker_cannot_push(lab):
    name = f"{REGISTRY}/e2e/volunteer:t{int(time.time())}"
    try:
        ok(node_exec("worker1", ["docker", "tag", "python:3.11", name]), "docker tag")
        proc = node_exec("worker1", ["docker", "push", name], timeout=120)
        print(f"\na volunteer's docker push: exit {proc.returncode}: {proc.stderr.strip()[-200:]}")
        # the registry's 405: Docker 20.10 prints the status, 26.1 and 28.5 its text
        assert proc.returncode != 0 and re.search(r"405|Method not allowed", proc.stdout + proc.stderr), proc
        assert "e2e/volunteer" not in ok(node_exec("hub", f"{CURL_READER} https://{REGISTRY}/v2/_catalog"), "cat")
    finally:
        node_exec("worker1", ["docker", "image", "rm", name])


# -- the move from the single root registry, and reset ------------------------------

SINGLE_CONFIG = """# Managed by gridx: the hub's image registry (gridx hub init writes it).
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: /var/lib/gridx/registry
  delete:
    enabled: true
http:
  addr: 10.0.0.1:5000
  tls:
    certificate: /etc/gridx/registry/server.crt
    key: /etc/gridx/registry/server.key
"""


def test_init_moves_a_hub_off_the_single_root_registry_and_keeps_its_images(lab):
    before = served_digest(f"https://{REGISTRY}", "python", "3.11", CURL_READER)
    # the hub as the release before left it: one registry as root, writable on the VPN, a root-owned storage
    ok(node_exec("hub", "kill $(cat /etc/gridx/registry/reader.pid /etc/gridx/registry/writer.pid); sleep 1; "
                        "rm -f /etc/gridx/registry/reader.pid /etc/gridx/registry/writer.pid; "
                        "chown -R root:root /var/lib/gridx/registry; chmod -R go-rwx /var/lib/gridx/registry"),
       "stop both")
    ok(node_exec("hub", "cat > /etc/gridx/registry/config.yml", input=SINGLE_CONFIG), "the single config")
    ok(node_exec("hub", "setsid /usr/bin/docker-registry serve /etc/gridx/registry/config.yml "
                        ">>/var/log/gridx-registry.log 2>&1 < /dev/null & echo $! > /etc/gridx/registry/registry.pid"),
       "the single registry")
    wait_until(lambda: node_exec("hub", f"{CURL_READER} -f https://{REGISTRY}/v2/").returncode == 0, 10,
               "the single registry")
    assert node_exec("hub", f"{CURL_READER} -o /dev/null -w '%{{http_code}}' -X POST "
                            f"https://{REGISTRY}/v2/python/blobs/uploads/").stdout == "202"  # what it let anyone do

    proc = hub("hub", "init", f"--ip={lab.hub_ip}")
    assert proc.returncode == 0, proc.stderr
    assert "stopped the single registry of before" in proc.stderr, proc.stderr
    assert "gave /var/lib/gridx/registry to 'gridx-registry' (its images kept)" in proc.stderr, proc.stderr
    assert set(registry_processes()) == {READER_CONFIG, WRITER_CONFIG}
    assert node_exec("hub", "test -e /etc/gridx/registry/config.yml || test -e /etc/gridx/registry/registry.pid"
                     ).returncode != 0
    assert node_exec("hub", "find /var/lib/gridx/registry ! -user gridx-registry").stdout == ""
    # the images are kept: the same digest, and a layer still reads whole through the read-only side
    assert served_digest(f"https://{REGISTRY}", "python", "3.11", CURL_READER) == before
    manifest = json.loads(ok(node_exec("hub", f"{CURL_READER} -H 'Accept: {MANIFEST_V2}' "
                                              f"https://{REGISTRY}/v2/python/manifests/3.11"), "manifest"))
    layer = manifest["layers"][-1]["digest"]
    read = ok(node_exec("hub", f"{CURL_READER} https://{REGISTRY}/v2/python/blobs/{layer} | sha256sum"), "blob")
    assert "sha256:" + read.split()[0] == layer
    assert node_exec("hub", f"{CURL_READER} -o /dev/null -w '%{{http_code}}' -X POST "
                            f"https://{REGISTRY}/v2/python/blobs/uploads/").stdout == "405"
    assert "nothing changed" in hub("hub", "init", f"--ip={lab.hub_ip}").stderr


def test_the_registry_part_of_hub_reset_stops_both_and_init_starts_them(lab):
    """reset_registry as `gridx hub reset` calls it (the rest of a reset would
    take the lab's VPN and swarm down)."""
    ok(node_exec("hub", "cd /opt/gridx && python3 -c 'import gridx; gridx.reset_registry()'"), "reset_registry")
    assert registry_processes() == {}
    assert node_exec("hub", "test -e /etc/gridx-registry").returncode != 0  # configs and the key's copy
    assert node_exec("hub", "ls /etc/gridx/registry").stdout.split() == ["ca.crt", "ca.key"]
    assert node_exec("hub", "test -d /var/lib/gridx/registry/docker").returncode == 0  # the images stay
    proc = hub("hub", "init", f"--ip={lab.hub_ip}")
    assert proc.returncode == 0 and set(registry_processes()) == {READER_CONFIG, WRITER_CONFIG}, proc.stderr
    assert f"{REGISTRY}/python:3.11" in [i["name"] for i in hub_json("image", "ls")["images"]]
