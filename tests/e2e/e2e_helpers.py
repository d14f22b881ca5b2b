"""Helpers of the end-to-end tests (plain functions and names: tests import
them from here; the fixtures that use them are in conftest.py).

The lab's names (containers, network, suite), running things in it
(``hub``, ``node_exec``, ``test_sh``), what a worker-like node looks like
(``machine_state``), adding a peer and carrying its bundle to a node,
joining through a real terminal (a pty on the host driving ``docker exec
-it``), waiting for a condition, and a member's machine (the user container:
its bundle, ``as_user``, ``ssh_as``).
"""

import json
import os
import pty
import re
import select
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
E2E_DIR = Path(__file__).resolve().parent
TEST_SH = ROOT / "test.sh"
NETWORK = os.environ.get("GRIDX_LAB_NAME") or "gridx-lab"
LAB_NET = os.environ.get("GRIDX_LAB_NET") or "172.29.240"
PREFIX = NETWORK + "-"
HUB = PREFIX + "hub"
WORKERS = ("worker1", "worker2", "worker3")
HUB_IP = LAB_NET + ".10"
FRESH_IP = LAB_NET + ".20"
# The Debian suite the lab's nodes run (test.sh: GRIDX_LAB_SUITE), and its image.
SUITE = os.environ.get("GRIDX_LAB_SUITE") or "bookworm"
NODE_IMAGE = "gridx-lab-node:" + SUITE
# The capability settings of docker-compose.yml, for containers made here.
NODE_RUN_FLAGS = [
    "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--device", "/dev/net/tun", "--device-cgroup-rule", "a *:* rwm",
    "--label", "io.gridx.lab.name=" + NETWORK, "--label", "io.gridx.lab.suite=" + SUITE,
]
START_TIMEOUT = 1800  # from nothing: debootstrap + builds, on 2 slow cores
SETUP_TIMEOUT = 900


def _run(argv, timeout=300, check=False, input=None):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def container(node):
    """hub / worker1 / fresh ... -> the container name (gridx-lab-...)."""
    return node if node.startswith(PREFIX) else PREFIX + node


def hub(*args, timeout=300, check=False, input=None):
    """Run ``gridx ARGS`` in the hub (the checkout's gridx.py, mounted)."""
    return _run(["docker", "exec", "-i", HUB, "gridx", *map(str, args)],
                timeout=timeout, check=check, input=input)


def node_exec(node, cmd, timeout=300, check=False, input=None):
    """Run CMD in a node: a list as argv, a string under ``sh -c``."""
    argv = ["sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
    return _run(["docker", "exec", "-i", container(node), *argv],
                timeout=timeout, check=check, input=input)


def test_sh(*args, timeout=600, check=False):
    """Run ``./test.sh ARGS`` on the host."""
    return _run([str(TEST_SH), *map(str, args)], timeout=timeout, check=check)


test_sh.__test__ = False  # a helper, not a test for pytest to collect


def docker_unavailable_reason():
    if shutil.which("docker") is None:
        return "Docker is not installed (scripts/install-deps.sh lab)"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 30 s"
    if info.returncode != 0:
        return "Docker is not running here: " + (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
    if shutil.which("docker-compose") is None and _run(["docker", "compose", "version"]).returncode != 0:
        return "neither docker compose nor docker-compose is installed"
    return None


VPN_SUBNET_PREFIX = "10.0.0."
HUB_VPN_IP = "10.0.0.1"
WORKER_BRIDGE_IPS = {"worker1": LAB_NET + ".11", "worker2": LAB_NET + ".12", "worker3": LAB_NET + ".13"}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
# A line for authorized_keys that is not the hub's: it must survive join/leave.
OTHER_KEY_LINE = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDfakefakefakefakefakefakefakefakefakefakefake"
                  " owner@laptop")


def ok(proc, what):
    """proc's stdout when it exited 0, else an AssertionError with its output."""
    assert proc.returncode == 0, (
        f"{what}: exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout


def hub_json(*args, timeout=300):
    return json.loads(ok(hub(*args, "--json", timeout=timeout), "gridx " + " ".join(map(str, args))))


def wait_until(predicate, timeout, what, interval=1.0):
    """Poll predicate() until it returns something true; fail after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def sha(node, path):
    """sha256 of a file in a node, or 'absent'."""
    proc = node_exec(node, f"if [ -e {shlex.quote(path)} ]; then sha256sum < {shlex.quote(path)}; "
                           "else echo absent; fi", check=True)
    return proc.stdout.split()[0]


def machine_state(node):
    """What join.sh may change on a worker-like node, and leave.sh must restore."""
    script = r"""
        ip link show gridx0 >/dev/null 2>&1 && echo link=yes || echo link=no
        [ -e /etc/wireguard/gridx0.conf ] && echo wgconf=yes || echo wgconf=no
        [ -e /var/lib/gridx ] && echo statedir=yes || echo statedir=no
        echo swarm=$(docker info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null || echo unknown)
        iptables -S DOCKER-USER 2>/dev/null | grep -q 'comment gridx' && echo fwrule=yes || echo fwrule=no
        iptables -S GRIDX-WORKER >/dev/null 2>&1 && echo fwchain=yes || echo fwchain=no
        iptables -S GRIDX-JOBS >/dev/null 2>&1 && echo jobchain=yes || echo jobchain=no
        docker info --format '{{range .SecurityOptions}}{{.}} {{end}}' | grep -q name=userns \
            && echo remapped=yes || echo remapped=no
        getent passwd dockremap >/dev/null && echo dockremap=yes || echo dockremap=no
        grep -qs '^dockremap:' /etc/subuid /etc/subgid && echo subids=yes || echo subids=no
    """
    out = node_exec(node, script, check=True).stdout
    state = dict(line.split("=", 1) for line in out.split())
    state["daemon.json"] = sha(node, "/etc/docker/daemon.json")
    state["authorized_keys"] = sha(node, "/root/.ssh/authorized_keys")
    return state


def unjoined(state_before):
    """What machine_state must say on a node that is not (or no longer) joined."""
    return {**state_before, "link": "no", "wgconf": "no", "statedir": "no", "swarm": "inactive", "fwrule": "no",
            "fwchain": "no", "jobchain": "no", "remapped": "no"}


def contained(node):
    """Is NODE's engine remapped, with no-new-privileges in its daemon.json?"""
    state = machine_state(node)
    daemon = node_exec(node, "cat /etc/docker/daemon.json", check=True).stdout
    return state["remapped"] == "yes" and '"no-new-privileges": true' in daemon


def prepare_machine(node, daemon_json=None):
    """A volunteer's machine that already has settings of its own."""
    node_exec(node, ["sh", "-c", 'mkdir -p /root/.ssh && chmod 700 /root/.ssh && printf "%s\\n" "$1" '
                     '> /root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys', "sh", OTHER_KEY_LINE],
              check=True)
    if daemon_json is not None:
        node_exec(node, "mkdir -p /etc/docker && cat > /etc/docker/daemon.json", input=daemon_json, check=True)


def add_peer(name, *extra):
    """``gridx hub add-peer NAME --json``: the document it prints."""
    return hub_json("hub", "add-peer", name, *extra)


def remove_peer_quietly(name):
    hub("hub", "remove-peer", name)


def copy_bundle(hub_path, node):
    """hub:PATH -> node:/root/ as a tar stream (modes kept); the path there."""
    dest = container(node)
    node_exec(node, ["rm", "-rf", "/root/" + os.path.basename(hub_path)])
    out = subprocess.Popen(["docker", "cp", f"{HUB}:{hub_path}", "-"], stdout=subprocess.PIPE)
    proc = subprocess.run(["docker", "cp", "-", f"{dest}:/root/"], stdin=out.stdout, capture_output=True, text=True,
                          timeout=120)
    out.wait(timeout=120)
    ok(proc, f"copy {hub_path} to {dest}")
    return "/root/" + os.path.basename(hub_path)


def peer_row(name):
    rows = [p for p in hub_json("hub", "list-peers")["peers"] if p["name"] == name]
    return rows[0] if rows else None


def wait_peer_ready(name, timeout=60):
    """The peer shook hands and its swarm node is Ready on the hub."""
    def ready():
        row = peer_row(name)
        return row if row and row["node_state"] == "ready" and row["handshake_age"] is not None else None
    return wait_until(ready, timeout, f"peer {name} Ready on the hub")


def cluster_node(address):
    nodes = [n for n in hub_json("cluster")["nodes"] if n["address"] == address]
    assert len(nodes) == 1, f"gridx cluster shows {len(nodes)} nodes at {address}: {nodes}"
    return nodes[0]


def hub_healthy():
    return hub("hub", "status").returncode == 0


def wait_hub_healthy(timeout=180):
    wait_until(hub_healthy, timeout, "gridx hub status to exit 0", interval=2)


def start_stopped_worker(node):
    """`docker start` a worker a test stopped, then what its systemd would
    do (the lab has none; join.sh tells the volunteer): its VPN back up, and
    the owner-activity agent started where join.sh installed one; wait
    until the hub is healthy again."""
    ok(subprocess.run(["docker", "start", container(node)], capture_output=True, text=True, timeout=120),
       f"docker start {node}")
    wait_until(lambda: node_exec(node, ["test", "-e", "/run/gridx-lab.ready"]).returncode == 0, 120,
               f"{node}'s dockerd")
    if node_exec(node, "ip link show gridx0").returncode != 0:
        # The lab's WireGuard is userspace (wireguard-go: no kernel module
        # here). Once in two CI runs on three loaded labs, the first try after
        # a SIGKILLed container found no wireguard-go socket ("Unable to modify
        # interface: Protocol not supported"): up to three tries, 2 s apart,
        # the stale socket of the killed wireguard-go removed first.
        for attempt in range(3):
            node_exec(node, "ip link show gridx0 >/dev/null 2>&1 || rm -f /var/run/wireguard/gridx0.sock")
            proc = node_exec(node, "wg-quick up gridx0", timeout=120)
            if proc.returncode == 0 or attempt == 2:
                break
            node_exec(node, "wg-quick down gridx0; ip link delete dev gridx0; sleep 2")
        ok(proc, f"wg-quick up gridx0 on {node}")
    if node_exec(node, ["test", "-x", "/var/lib/gridx/agent/agent.sh"]).returncode == 0:
        ok(node_exec(node, ["/var/lib/gridx/agent/agent.sh", "start"], timeout=60), f"agent.sh start on {node}")
    wait_hub_healthy(timeout=180)


# Debian forky's sudo (1.9.17): /usr/local is not on the PATH it gives
# commands, and RHEL's is the same. Set on nodes of every suite by
# sudo_path_as_forky, so that a test of `sudo ./join.sh` finding tools in
# /usr/local/bin proves it on bookworm's and trixie's nodes too.
FORKY_SECURE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def sudo_path_as_forky(node):
    """sudo on NODE gives commands forky's secure_path (a sudoers drop-in
    where the suite's own sudoers has another); checked through sudo."""
    script = ('printf \'Defaults secure_path="%s"\\n\' "$1" > /etc/sudoers.d/zz-gridx-e2e && '
              'chmod 0440 /etc/sudoers.d/zz-gridx-e2e && visudo -c -q')
    ok(node_exec(node, ["sh", "-c", script, "sh", FORKY_SECURE_PATH]), "sudoers drop-in")
    seen = ok(node_exec(node, ["sudo", "sh", "-c", 'printf %s "$PATH"']), "sudo's PATH")
    assert seen == FORKY_SECURE_PATH, seen


def install_jq(node):
    """Copy the host's jq (Debian, like the node image) into a node: a machine
    where join.sh can merge into an existing daemon.json."""
    libs = []
    for lib in ("libjq.so.1", "libonig.so.5"):
        found = [os.path.join(d, lib) for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/lib64")
                 if os.path.exists(os.path.join(d, lib))]
        if not found:
            return False
        libs.append(os.path.realpath(found[0]))
    if not os.path.exists("/usr/bin/jq"):
        return False
    dest = container(node)
    ok(subprocess.run(["docker", "cp", "-L", "/usr/bin/jq", f"{dest}:/usr/local/bin/jq"], capture_output=True,
                      text=True), "docker cp jq")
    for path, soname in zip(libs, ("libjq.so.1", "libonig.so.5")):
        ok(subprocess.run(["docker", "cp", "-L", path, f"{dest}:/usr/local/lib/{soname}"], capture_output=True,
                          text=True), f"docker cp {soname}")
    node_exec(node, "ldconfig", check=True)
    return node_exec(node, "echo '{}' | jq -c .").returncode == 0


# ---------------------------------------------------------------------------
# A real terminal
# ---------------------------------------------------------------------------

class Terminal:
    """A command on a pseudo-terminal of this host, driven like a person."""

    def __init__(self, argv):
        self.argv = argv
        self.raw = ""
        self.pos = 0
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: the pty is stdin/stdout/stderr
            try:
                os.execvp(argv[0], argv)
            finally:
                os._exit(127)

    @property
    def text(self):
        return ANSI.sub("", self.raw).replace("\r", "")

    def _read(self, wait):
        ready, _, _ = select.select([self.fd], [], [], wait)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the other side closed
            data = b""
        if not data:
            return False
        self.raw += data.decode(errors="replace")
        return True

    def expect(self, pattern, timeout=120):
        """Wait for pattern in the output after the last match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text, self.pos)
            if match:
                self.pos = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(min(remaining, 1.0)):
                match = regex.search(self.text, self.pos)
                if match:
                    self.pos = match.end()
                    return match
                raise AssertionError(f"{' '.join(self.argv)}: no {pattern!r} on the terminal "
                                     f"({'timeout' if remaining <= 0 else 'it ended'}); it showed:\n"
                                     f"{self.text[-4000:]}")

    def type(self, answer):
        """Type an answer and press Enter."""
        os.write(self.fd, answer.encode() + b"\r")

    def wait(self, timeout=300):
        """Read to the end; the exit status."""
        deadline = time.monotonic() + timeout
        while self._read(1.0):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                raise AssertionError(f"{' '.join(self.argv)} did not end within {timeout} s:\n{self.text[-4000:]}")
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)

    def close(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


def answer_policy_then_continue(term, share="", hours=""):
    """join.sh's questions on when to share (asked where its bundle carries
    agent.sh; empty answers take the defaults), then its "Continue?"."""
    match = term.expect(r"Share when \(idle or always\) \[\w+\]: |Continue\? \[Y/n\]: ")
    if match.group(0).startswith("Share"):
        term.type(share)
        term.expect(r"Only within these hours .*\]: ")
        term.type(hours)
        term.expect(r"Continue\? \[Y/n\]: ")


def terminal_in(node, shell_command):
    """``docker exec -it NODE bash -c CMD`` on a pty of this host."""
    return Terminal(["docker", "exec", "-it", container(node), "bash", "-c", shell_command])


# -- a member's machine: the user container ------------------------------------

BINARY = os.environ.get("GRIDX_BINARY") or str(ROOT / "dist" / "gridx")
USER_NODE, USER_NODE_IP = "user", LAB_NET + ".23"
ALICE, BOB = "e2e-alice", "e2e-bob"
MANAGER = "gridx@10.0.0.1"


def settings(name):
    """The shell prefix that loads a user bundle's settings (its README's step
    3); a member who brought their own key (bob) names it, as they would in
    their own settings: their gridx then shares no SSH connection with
    another member's key on this machine (alice's)."""
    return (f"set -a; . /root/gridx-{name}-user/settings.env; set +a; "
            f'export GRIDX_SSH_KEY="${{GRIDX_SSH_KEY:-/root/.ssh/gridx-{name}}}"; ')


def as_user(cmd, name=ALICE, timeout=300):
    return node_exec(USER_NODE, ["bash", "-c", settings(name) + cmd], timeout=timeout)


def ssh_as(name, *args, options=(), timeout=60):
    """Plain ssh to the gridx account with NAME's key (no gridx on the way)."""
    key = f"/root/.ssh/gridx-{name}"
    argv = ["ssh", "-o", "BatchMode=yes", "-i", key, "-o", "IdentitiesOnly=yes", *options, MANAGER, *args]
    return node_exec(USER_NODE, argv, timeout=timeout)


def hub_sh(cmd, timeout=120):
    return node_exec("hub", ["sh", "-c", cmd], timeout=timeout)


def serve_pids(name):
    out = hub_sh(f"pgrep -u gridx -f 'serve {name}$' || true").stdout
    return [int(pid) for pid in out.split()]


def carry_bundle(name):
    """The user bundle from the hub into the user container, then its
    README's steps: the VPN (alice only: one tunnel per container), the
    hub's host key, the SSH key (when the hub made it)."""
    tar = subprocess.run(["docker", "exec", HUB, "tar", "-C", "/etc/gridx/bundles", "-cf", "-",
                          f"gridx-{name}-user"], capture_output=True, check=True).stdout
    subprocess.run(["docker", "exec", "-i", container(USER_NODE), "tar", "-C", "/root", "-xf", "-"],
                   input=tar, check=True)
    steps = f"cd /root/gridx-{name}-user && install -d -m 700 ~/.ssh && cat known_hosts >> ~/.ssh/known_hosts"
    if name == ALICE:
        steps += (" && install -m 600 gridx-user.conf /etc/wireguard/gridx-user.conf"
                  " && wg-quick up gridx-user >/dev/null 2>&1")
    steps += f" && if [ -e id_ed25519 ]; then install -m 600 id_ed25519 ~/.ssh/gridx-{name}; fi"
    ok(node_exec(USER_NODE, ["bash", "-c", steps]), f"set up {name} from the bundle")
