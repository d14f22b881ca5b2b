"""Issue 22 end to end: what members reach for every day, from the user
container (a member's machine: the static binary, ssh, no docker, no Python).

- A member's Jupyter (the lab's gridx-lab-jupyter image) loads through
  `gridx jobs jupyter --forward` in the user container, several connections
  at once, while the worker's own address does not answer there (no
  firewall hole); bob cannot forward to alice's job (through gridx, or by
  asking serve for `jobs connect` himself); Ctrl-C ends a forward and leaves
  no session on the hub; deleting the job ends the forward.
- `jobs train LOCAL_FILE` through serve runs the member's file.
- Notifications: a receiver in the lab (its own container) gets exactly one
  event per end, with a valid Standard Webhooks signature (alice's key),
  also for a job that ended while the hub was restarting (the hub container
  restarted mid-job, then `./test.sh setup`); a member's private target is
  refused until the admin allows it.
- Usage: hub watch's ledger has one line per task, the same after the hub's
  restart and after the jobs are deleted; `gridx usage` (as the admin and
  through serve) and `hub list-users` show the member's hours and the nodes
  that gave them.
"""

import base64
import hashlib
import hmac
import json
import re
import select
import subprocess
import time

import pytest
from e2e_helpers import (
    ALICE,
    BOB,
    HUB,
    LAB_NET,
    MANAGER,
    NETWORK,
    PREFIX,
    USER_NODE,
    as_user,
    container,
    hub,
    hub_sh,
    node_exec,
    ok,
    settings,
    ssh_as,
    test_sh,
    wait_until,
)

RECEIVER, RECEIVER_IP = PREFIX + "receiver", LAB_NET + ".33"
HOOK = f"http://{RECEIVER_IP}:8080/hook"


class Background:
    """A command in the user container, its output read as it comes."""

    def __init__(self, cmd, name=ALICE):
        self.process = subprocess.Popen(["docker", "exec", container(USER_NODE), "bash", "-c", settings(name) + cmd],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.err = b""

    def line(self, timeout):
        deadline = time.monotonic() + timeout
        out = b""
        while not out.endswith(b"\n"):
            ready, _, _ = select.select([self.process.stdout, self.process.stderr], [], [],
                                        max(0.1, deadline - time.monotonic()))
            if time.monotonic() > deadline:
                raise AssertionError(f"no line within {timeout} s; stderr: {self.err.decode()[-2000:]}")
            if self.process.stderr in ready:
                self.err += self.process.stderr.read1(65536)
            if self.process.stdout in ready:
                chunk = self.process.stdout.read1(1)
                if not chunk:
                    raise AssertionError(f"it ended: {self.err.decode()[-2000:]}")
                out += chunk
        return out.decode().strip()

    def wait(self, timeout):
        try:
            _, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"still running after {timeout} s: {self.err.decode()[-2000:]}") from None
        self.err += err
        return self.process.returncode

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def get_here(port, path, timeout=20):
    """(status, body) of GET PATH from 127.0.0.1:PORT in the user container
    (bash's /dev/tcp: the member's machine has no curl)."""
    script = (f'exec 3<>/dev/tcp/127.0.0.1/{port} && printf "GET %s HTTP/1.0\\r\\nHost: 127.0.0.1\\r\\n\\r\\n" '
              f'"$1" >&3 && timeout {timeout} cat <&3')
    proc = node_exec(USER_NODE, ["bash", "-c", script, "get", path], timeout=timeout + 10)
    match = re.match(r"HTTP/1\.\d (\d{3})", proc.stdout)
    return (int(match.group(1)) if match else 0), proc.stdout


@pytest.fixture(scope="module")
def daily(user_node):
    made = []
    yield made
    for job in made:
        hub("jobs", "delete", job)
    subprocess.run(["docker", "rm", "-f", RECEIVER], capture_output=True)
    hub("hub", "set-defaults", "--notify-allow", "none")


# ---------------------------------------------------------------------------
# A member's Jupyter, forwarded
# ---------------------------------------------------------------------------


def test_a_members_jupyter_loads_through_the_forward_and_only_theirs(daily, registry_jupyter):
    daily.append("e2e-nb")
    # the image from the hub's registry, which members read (the workers pull it over the VPN)
    jupyter = Background(f"exec gridx jobs jupyter --image {registry_jupyter} --name e2e-nb --port 8894 "
                         f"--forward 18894 --manager {MANAGER}")
    try:
        url = jupyter.line(600)
        match = re.fullmatch(r"http://127\.0\.0\.1:18894/\?token=([0-9a-f]{32})", url)
        assert match, url
        token = match.group(1)
        assert get_here(18894, f"/api/status?token={token}")[0] == 200
        status, page = get_here(18894, f"/tree?token={token}")
        assert status == 200 and "jupyter" in page.lower(), page[:500]
        assert get_here(18894, "/api/status")[0] == 403  # the token is still needed
        # a notebook opens several connections at once
        many = ok(node_exec(USER_NODE, ["bash", "-c", f"""for i in 1 2 3 4 5 6; do
            (exec 3<>/dev/tcp/127.0.0.1/18894 && printf 'GET /api/status?token={token} HTTP/1.0\\r\\n\\r\\n' >&3 &&
             head -c 12 <&3; echo) & done; wait"""], timeout=120), "six at once")
        assert many.count("HTTP/1.1 200") == 6, many
        # no firewall hole: the worker's own address does not answer the member's machine
        worker = json.loads(ok(hub("jobs", "connect", "--probe", "--", "e2e-nb"), "probe"))["address"]
        direct = node_exec(USER_NODE, ["bash", "-c", f"timeout 5 bash -c 'exec 3<>/dev/tcp/{worker}/8894'"])
        assert direct.returncode != 0
        # bob: not through gridx, not by asking serve himself
        bobs = as_user(f"gridx jobs forward e2e-nb 18895 --manager {MANAGER}", name=BOB, timeout=120)
        assert bobs.returncode == 2 and f"is {ALICE}'s" in bobs.stderr, bobs.stderr
        bare = ssh_as(BOB, "jobs connect e2e-nb", options=["-n"])
        assert bare.returncode == 2 and f"is {ALICE}'s" in bare.stderr, bare.stderr
        # Ctrl-C ends a forward, and its sessions on the hub with it
        second = Background(f"exec gridx jobs forward e2e-nb 18896 --manager {MANAGER}")
        assert second.line(120) == f"http://127.0.0.1:18896/?token={token}"
        assert get_here(18896, f"/api/status?token={token}")[0] == 200
        ok(node_exec(USER_NODE, "pkill -INT -f 'jobs forward e2e-nb 1889[6]'"), "Ctrl-C")
        assert second.wait(30) == 130
        wait_until(lambda: "jobs connect" not in hub_sh("ps -eo args").stdout, 20, "no connect left on the hub")
        # the job's end ends the forward
        ok(as_user(f"gridx jobs delete e2e-nb --manager {MANAGER}"), "delete")
        daily.remove("e2e-nb")
        assert jupyter.wait(60) == 0
        assert "job e2e-nb is gone: the forward ends" in jupyter.err.decode()
    finally:
        jupyter.kill()


def test_a_member_trains_a_local_file_through_serve(daily):
    daily.append("e2e-trainfile")
    ok(node_exec(USER_NODE, "cat > /root/train-e2e.py", input='print("trained-through-serve", 6 * 7)\n'), "write")
    proc = as_user(f"gridx jobs train /root/train-e2e.py --framework pytorch --image python:3.11 --name e2e-trainfile "
                   f"--wait --manager {MANAGER}", timeout=300)
    assert proc.returncode == 0 and "trained-through-serve 42" in proc.stdout, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------
# Notifications and usage, across a restart of the hub
# ---------------------------------------------------------------------------

RECEIVER_CODE = r"""
import base64, http.server, json
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open("/tmp/got.jsonl", "a") as got:
            got.write(json.dumps({"headers": {k.lower(): v for k, v in self.headers.items()},
                                  "body": base64.b64encode(body).decode()}) + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Hook).serve_forever()
"""


def received():
    out = subprocess.run(["docker", "exec", RECEIVER, "sh", "-c", "cat /tmp/got.jsonl 2>/dev/null"],
                         capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def events_of(job):
    return [e for e in received() if json.loads(base64.b64decode(e["body"]))["data"]["job"] == job]


def mine(spans, ids):
    return [s for s in spans if s["service"] in ids]


def signed_by(event, key):
    body = base64.b64decode(event["body"])
    secret = base64.b64decode(key[len("whsec_"):])
    h = event["headers"]
    expected = base64.b64encode(hmac.new(secret, f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + body,
                                         hashlib.sha256).digest()).decode()
    return f"v1,{expected}" in h["webhook-signature"].split()


def ledger():
    out = hub_sh("cat /var/lib/gridx/usage/ledger.jsonl 2>/dev/null").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_one_signed_event_per_end_across_a_hub_restart_and_the_usage_it_leaves(daily):
    subprocess.run(["docker", "rm", "-f", RECEIVER], capture_output=True)
    ok(subprocess.run(["docker", "run", "-d", "--name", RECEIVER, "--network", NETWORK, "--ip", RECEIVER_IP,
                       "--label", "io.gridx.lab.name=" + NETWORK, "python:3.11", "python3", "-c", RECEIVER_CODE],
                      capture_output=True, text=True), "start the receiver")
    # a member's private target (the receiver is on the lab's LAN), the VPN, the hub: refused, nothing made
    for target in (HOOK, "http://10.0.0.1:5000/", "http://127.0.0.1:8080/", f"http://{LAB_NET}.10/"):
        refused = as_user(f"gridx jobs run python:3.11 true --name e2e-refused --notify {target} --manager {MANAGER}")
        assert refused.returncode == 2 and "is refused" in refused.stderr, refused.stderr
    assert hub("jobs", "status", "e2e-refused").returncode == 2
    ok(hub("hub", "set-defaults", "--notify-allow", RECEIVER_IP), "allow the receiver")
    daily.extend(["e2e-n1", "e2e-n2"])
    for name, command in (("e2e-n1", "sleep 2; exit 3"), ("e2e-n2", "sleep 45")):
        ok(as_user(f"gridx jobs run python:3.11 '{command}' --name {name} --notify {HOOK} --manager {MANAGER}"),
           f"submit {name}")
    ids = {ok(hub_sh(f"docker service inspect --format '{{{{.ID}}}}' {name}"), "service ID").strip(): name
           for name in ("e2e-n1", "e2e-n2")}  # an earlier run's jobs of these names are in the ledger too
    key = ok(hub_sh(f"cat /etc/gridx/notify/keys/{ALICE}.key"), "alice's key (made at add-user)").strip()
    assert hub_sh(f"stat -c %a /etc/gridx/notify/keys/{ALICE}.key /etc/gridx/notify/keys").stdout.split() == \
        ["600", "700"]
    first = wait_until(lambda: events_of("e2e-n1"), 90, "e2e-n1's event")
    data = json.loads(base64.b64decode(first[0]["body"]))
    assert signed_by(first[0], key) and data["type"] == "job.ended"
    assert data["data"]["state"] == "failed" and data["data"]["exit_code"] == 3 and data["data"]["owner"] == ALICE
    assert data["data"]["where"][0]["node_id"] and data["data"]["run_time_s"] >= 1, data
    wait_until(lambda: mine(ledger(), ids), 30, "e2e-n1 in the ledger")
    # the hub restarts while e2e-n2 runs; it ends before hub watch is back
    running = wait_until(lambda: json.loads(hub("jobs", "status", "e2e-n2", "--json").stdout or "{}")
                         .get("state") == "running", 120, "e2e-n2 running")
    assert running
    ok(subprocess.run(["docker", "restart", "-t", "5", HUB], capture_output=True, text=True, timeout=120),
       "restart the hub")
    time.sleep(50)  # e2e-n2 ends meanwhile, on its worker
    ok(test_sh("setup", timeout=900), "./test.sh setup brings the hub back")
    second = wait_until(lambda: events_of("e2e-n2"), 180, "e2e-n2's event after the restart")
    assert json.loads(base64.b64decode(second[0]["body"]))["data"]["state"] == "complete" and signed_by(second[0], key)
    time.sleep(15)  # three more passes of hub watch: nothing is sent again
    assert len(events_of("e2e-n1")) == 1 and len(events_of("e2e-n2")) == 1
    assert json.loads(hub("jobs", "status", "e2e-n2", "--json").stdout)["notify"]["delivered"] == 1
    # usage: one line per task, the same after the restart and after the jobs are gone
    # one line per task; Docker 20.10 runs a failed job once more when the
    # hub's Docker restarts (measured: a second task of e2e-n1, no `hub
    # watch` re-run): that task ran, and is counted as itself
    spans = mine(ledger(), ids)
    assert {s["job"] for s in spans} == {"e2e-n1", "e2e-n2"} and len({s["task"] for s in spans}) == len(spans), spans
    node_ids = set(hub_sh("docker node ls -q").stdout.split())
    assert all(s["node_id"] in node_ids and s["node"] for s in spans)
    assert next(s for s in spans if s["job"] == "e2e-n2")["ended"] - \
        next(s for s in spans if s["job"] == "e2e-n2")["started"] >= 40
    before = json.loads(ok(hub("usage", "--json", "--user", ALICE), "usage"))
    assert before["users"][0]["kinds"]["run"]["cpu_hours"] > 0
    for name in ("e2e-n1", "e2e-n2"):
        ok(as_user(f"gridx jobs delete {name} --manager {MANAGER}"), f"delete {name}")
        daily.remove(name)
    time.sleep(12)
    after = json.loads(ok(as_user(f"gridx usage --json --user {ALICE} --manager {MANAGER}"), "usage via serve"))
    assert after["users"][0]["kinds"]["run"]["tasks"] >= before["users"][0]["kinds"]["run"]["tasks"]
    assert after["users"][0]["kinds"]["run"]["cpu_hours"] >= before["users"][0]["kinds"]["run"]["cpu_hours"]
    assert mine(ledger(), ids) == spans
    assert len({(s["task"], s["started"]) for s in ledger()}) == len(ledger())
    given = {n["node_id"] for n in after["nodes"]}
    assert {s["node_id"] for s in spans} <= given
    users = json.loads(ok(hub("hub", "list-users", "--json"), "list-users"))["users"]
    assert next(u for u in users if u["name"] == ALICE)["usage_7d"]["cpu_hours"] > 0
