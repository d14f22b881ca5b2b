"""What a job may reach (issue 19, item 9), tried from real jobs on the lab.

A worker-like node (``fresh``) joins with an allow-list in its bundle's
settings.env (GRIDX_JOB_ALLOW: a lab container, the "data server", port
8080), and its resolv.conf naming that same container as its name server
(as a home router would be). Then, from a job that gridx placed there:
- the data server's allow-listed port answers, and so does its DNS port
  (the job's resolv.conf names it); its other port does not;
- the other nodes' LAN and VPN addresses, the hub's SSH and registry, the
  worker's own LAN and VPN addresses, its docker0 gateway and another job's
  container on the same worker do not answer,
  while every one of them answers from the worker itself (so "does not
  answer" is the rules' doing, not a closed port);
- that the internet stays open is read from the worker's rules (no packet
  ever goes outside the lab): GRIDX-JOBS rejects exactly the private,
  link-local and CGNAT ranges and the VPN subnet, with no catch-all;
- the rules survive a restart of Docker;
- the hub changes the allow-list of the joined worker over its SSH
  (jobnet.sh allow), and a bad list is exit 2 with nothing changed;
- leave.sh takes away exactly what join.sh added: iptables-save of the
  chains Grid-X touches is the same before the join and after the leave,
  the volunteer's own rules kept.
(The published Jupyter port still answering from the hub: test_jobs.py.)
"""

import json
import re
import subprocess

import pytest
from e2e_helpers import (
    FRESH_IP,
    HUB_IP,
    HUB_VPN_IP,
    LAB_NET,
    NETWORK,
    PREFIX,
    WORKER_BRIDGE_IPS,
    add_peer,
    container,
    copy_bundle,
    hub,
    node_exec,
    ok,
    remove_peer_quietly,
    wait_peer_ready,
    wait_until,
)

DATA = "dataserver"
DATA_IP = LAB_NET + ".30"
DATA_PORTS = (53, 8080, 8081)
# A TCP server that names its port, on each of DATA_PORTS.
DATA_SERVER = """
import socket, threading
def serve(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    while True:
        c, _ = s.accept()
        c.sendall(b"gridx-data-%d\\n" % port)
        c.close()
for p in PORTS:
    threading.Thread(target=serve, args=(p,), daemon=True).start()
threading.Event().wait()
""".replace("PORTS", repr(DATA_PORTS))
# What a job runs: a TCP connect to each HOST:PORT given, a line each.
PROBE = """
import socket, sys
print("resolv", " ".join(l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")))
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((host, int(port)))
        print(target, "open")
    except OSError as e:
        print(target, "closed", e.errno)
    finally:
        s.close()
"""
NAME = "jobnet"           # the peer the fresh node joins as
NEIGHBOUR = "jobnet-neighbour"  # a service beside the job on the same worker
SHARED_MEMORY = "6G"      # more than the lab's workers share (4G): a 5G job lands on fresh only
JOB_MEMORY = "5G"
ALLOW = f"{DATA_IP}/32:tcp/8080"
PRIVATE4 = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10")
# The chains Grid-X adds rules to or makes, per family (iptables' FORWARD is
# Docker's: it adds docker_gwbridge's rules there when the swarm is joined).
OURS = ("INPUT", "DOCKER-USER", "GRIDX-WORKER", "GRIDX-JOBS", "GRIDX-JOBS-HOST")
TOUCHED = {"iptables": OURS, "ip6tables": (*OURS, "FORWARD")}


@pytest.fixture(scope="module")
def dataserver(lab):
    """A lab container the admin allow-lists: a server on the lab network."""
    cname = PREFIX + DATA
    subprocess.run(["docker", "rm", "-f", cname], capture_output=True)
    image = ok(subprocess.run(["docker", "inspect", "--format", "{{.Config.Image}}", container("hub")],
                              capture_output=True, text=True), "the hub's image").strip()
    ok(subprocess.run(["docker", "run", "-d", "--name", cname, "--network", NETWORK, "--ip", DATA_IP,
                       "--label", "io.gridx.lab.name=" + NETWORK, "--entrypoint", "python3", image, "-c",
                       DATA_SERVER], capture_output=True, text=True), "docker run the data server")
    wait_until(lambda: reaches("worker2", DATA_IP, 8080), 30, "the data server to answer")
    yield DATA_IP
    subprocess.run(["docker", "rm", "-f", cname], capture_output=True)


def reaches(node, host, port):
    """Does a TCP connect from NODE itself (not a job) to HOST:PORT succeed?"""
    return node_exec(node, ["timeout", "5", "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"],
                     timeout=30).returncode == 0


def firewall(node):
    """iptables-save and ip6tables-save (filter) of the chains Grid-X touches,
    counters left out: what must be the same before join and after leave."""
    out = {}
    for tool in ("iptables", "ip6tables"):
        text = ok(node_exec(node, f"{tool}-save -t filter"), f"{tool}-save")
        lines = [re.sub(r"\[\d+:\d+\]", "", line) for line in text.splitlines() if not line.startswith("#")]
        out[tool] = [line for line in lines if line.split(" ")[0].lstrip(":") in TOUCHED[tool]
                     or (line.startswith("-A ") and line.split(" ")[1] in TOUCHED[tool])]
    return out


def neighbour_address(node):
    """A web server in a container on NODE, made by hand on the manager: its
    address on docker0."""
    ok(hub_sh(["docker", "service", "create", "--detach", "--quiet", "--no-resolve-image", "--name", NEIGHBOUR,
               "--constraint", "node.hostname==fresh", "--restart-condition", "none", "python:3.11",
               "python3", "-m", "http.server", "8000"]), "docker service create the neighbour")
    find = ("docker ps -q --filter label=com.docker.swarm.service.name=%s | head -n 1 | xargs -r docker inspect "
            "--format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}'" % NEIGHBOUR)
    address = wait_until(lambda: node_exec(node, find).stdout.strip(), 120, "the neighbour's container")
    wait_until(lambda: reaches(node, address, 8000), 60, "the neighbour's web server")
    return address


def hub_sh(argv):
    return node_exec("hub", argv, timeout=120)


def probe(job, targets):
    """Run PROBE as a gridx job that only the fresh node can take; {target: open/closed}, resolvers."""
    proc = hub("jobs", "run", "--wait", "--name", job, "--cpus", "1", "--memory", JOB_MEMORY, "python:3.11", "--",
               "python3", "-c", PROBE, *targets, timeout=300)
    ok(proc, f"gridx jobs run {job}")
    status = json.loads(ok(hub("jobs", "status", "--json", job), "gridx jobs status"))
    assert [t["node"] for t in status["tasks"]] == ["fresh"], status
    seen, resolvers = {}, None
    for line in proc.stdout.splitlines():
        words = line.split()
        if words[:1] == ["resolv"]:
            resolvers = words[1:]
        elif len(words) >= 2 and words[0] in targets:
            seen[words[0]] = words[1]
    assert set(seen) == set(targets), proc.stdout
    ok(hub("jobs", "delete", job), f"delete {job}")
    return seen, resolvers


def test_a_job_reaches_the_allow_list_and_nothing_private(lab, fresh_node, dataserver, registry_python):
    node = fresh_node
    # the volunteer's own rules, which leave must keep
    ok(node_exec(node, "iptables -A INPUT -s 192.0.2.1/32 -j DROP && ip6tables -A INPUT -s 2001:db8::1/128 -j DROP"),
       "the volunteer's own rules")
    before = firewall(node)
    vpn_ip = None
    try:
        # the admin opens the data server for every job; a bundle made now carries it
        ok(hub("hub", "allow-jobs", *ALLOW.split()), "gridx hub allow-jobs")
        added = add_peer(NAME)
        vpn_ip = added["peer"]["ip"]
        folder = copy_bundle(added["bundle"], node)
        assert f"GRIDX_JOB_ALLOW='{ALLOW}'" in ok(node_exec(node, f"cat {folder}/settings.env"), "settings.env")
        # The name server a home router would be: DNS to it, and only DNS, is let through.
        ok(node_exec(node, f"printf 'nameserver {DATA_IP}\\n' > /etc/resolv.conf"), "resolv.conf")
        joined = node_exec(node, [f"{folder}/join.sh", "--yes", "--cpus", "1", "--memory", SHARED_MEMORY],
                           timeout=300)
        ok(joined, "join.sh")
        assert f"The hub's admin opened, for every job: {ALLOW}" in joined.stderr, joined.stderr
        assert f"Name servers: {DATA_IP}." in joined.stderr, joined.stderr
        wait_peer_ready(NAME, timeout=120)
        ok(node_exec(node, f"docker pull -q {registry_python} >/dev/null && "
                           f"docker tag {registry_python} python:3.11", timeout=300), "pull python:3.11")
        neighbour = neighbour_address(node)

        closed = {
            "the hub's SSH over the VPN": f"{HUB_VPN_IP}:22",
            "the hub's registry": f"{HUB_VPN_IP}:5000",
            "another worker's SSH over the VPN": "10.0.0.2:22",
            "the hub's LAN address": f"{HUB_IP}:22",
            "another worker's LAN address": f"{WORKER_BRIDGE_IPS['worker2']}:22",
            "this worker's own LAN address": f"{FRESH_IP}:22",
            "this worker's own VPN address": f"{vpn_ip}:22",
            "this worker's docker0": "172.17.0.1:22",
            "another container on this worker": f"{neighbour}:8000",
            "the data server's other port": f"{DATA_IP}:8081",
        }
        opened = {"the allow-listed port": f"{DATA_IP}:8080", "DNS to the name server": f"{DATA_IP}:53"}
        # From the worker itself every one of them answers: what a job does not
        # reach below, the rules keep it from.
        for what, target in {**closed, **opened}.items():
            assert reaches(node, *target.rsplit(":", 1)), f"{what} ({target}) does not answer even from the worker"

        seen, resolvers = probe("jobnet-probe", list(closed.values()) + list(opened.values()))
        assert resolvers == [DATA_IP], resolvers
        for what, target in opened.items():
            assert seen[target] == "open", f"a job does not reach {what} ({target}): {seen}"
        for what, target in closed.items():
            assert seen[target] == "closed", f"a job reaches {what} ({target}): {seen}"
        ok(hub_sh(["docker", "service", "rm", NEIGHBOUR]), "docker service rm the neighbour")

        # The internet stays open: GRIDX-JOBS rejects exactly these, and nothing
        # without a destination; GRIDX-JOBS-HOST (this machine) rejects all.
        rules = ok(node_exec(node, "iptables -S GRIDX-JOBS"), "iptables -S GRIDX-JOBS").splitlines()
        rejected = [r.split()[3] for r in rules if r.endswith("-j REJECT --reject-with icmp-admin-prohibited")]
        assert sorted(rejected) == sorted([*PRIVATE4, "10.0.0.0/24"]), rules
        assert all(r.startswith(("-N ", "-A GRIDX-JOBS -d ", "-A GRIDX-JOBS -m conntrack")) for r in rules), rules
        assert not [r for r in rules if "DROP" in r], rules
        user = ok(node_exec(node, "iptables -S DOCKER-USER"), "iptables -S DOCKER-USER").splitlines()
        assert "-A DOCKER-USER -i docker0 -j GRIDX-JOBS" in user, user
        assert not [r for r in user if r.endswith(("-j DROP", "-j REJECT")) and "DNAT" not in r], user
        host_rules = ok(node_exec(node, "iptables -S GRIDX-JOBS-HOST"), "GRIDX-JOBS-HOST").splitlines()
        assert host_rules[-1] == "-A GRIDX-JOBS-HOST -j REJECT --reject-with icmp-admin-prohibited", host_rules
        six = ok(node_exec(node, "ip6tables -S GRIDX-JOBS"), "ip6tables -S GRIDX-JOBS")
        assert "-d fc00::/7 -j REJECT" in six and "-d fe80::/10 -j REJECT" in six, six

        # Docker's restart keeps them (DOCKER-USER's rules are the user's)
        saved = firewall(node)
        ok(node_exec(node, "service docker restart", timeout=120), "service docker restart")
        wait_until(lambda: node_exec(node, "docker info").returncode == 0, 60, "Docker back")
        assert firewall(node)["iptables"] == saved["iptables"]
        assert firewall(node)["ip6tables"] == saved["ip6tables"]
        wait_peer_ready(NAME, timeout=120)

        # The hub changes the list of the joined workers (over their SSH): a bad list first
        bad = hub("hub", "allow-jobs", f"{DATA_IP}:8081")
        assert bad.returncode == 2 and "invalid allow-list entry" in bad.stderr, bad.stderr
        assert firewall(node) == saved and hub("hub", "allow-jobs").stdout.strip() == ALLOW
        changed = hub("hub", "allow-jobs", f"{DATA_IP}/32:tcp/8081", "198.51.100.7:udp/9000-9009")
        assert changed.returncode == 0 and NAME in changed.stderr, changed.stderr  # "applied on …"
        seen, _ = probe("jobnet-probe2", [f"{DATA_IP}:8080", f"{DATA_IP}:8081", f"{HUB_VPN_IP}:22"])
        assert seen == {f"{DATA_IP}:8080": "closed", f"{DATA_IP}:8081": "open", f"{HUB_VPN_IP}:22": "closed"}, seen

        status = json.loads(ok(node_exec(node, f"{folder}/status.sh --json"), "status.sh --json"))
        assert status["jobs_network"] is True and status["healthy"] is True, status

        # leave: exactly what join added goes, the volunteer's rules stay
        ok(node_exec(node, f"{folder}/leave.sh", timeout=300), "leave.sh")
        after = firewall(node)
        assert after == before, (before, after)
        assert "-A INPUT -s 192.0.2.1/32 -j DROP" in after["iptables"]
        assert node_exec(node, "test -e /var/lib/gridx").returncode != 0
    finally:
        hub("hub", "allow-jobs", "--none")
        hub_sh(["docker", "service", "rm", NEIGHBOUR])
        remove_peer_quietly(NAME)
        for job in ("jobnet-probe", "jobnet-probe2"):
            hub("jobs", "delete", job)
