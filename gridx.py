#!/usr/bin/env python3
"""Grid-X: pool the idle CPUs and GPUs of a group's computers.

A hub runs a WireGuard VPN and is the Docker Swarm manager; volunteers' PCs
join the VPN and the swarm with a join bundle; jobs are swarm services placed
where the resources that volunteers share are free.

Usage:
    gridx hub init --ip PUBLIC_IP          # on the hub, as root
    gridx hub add-peer laptop              # writes gridx-laptop-bundle/
    sudo ./join.sh                         # on the volunteer's machine
    gridx jobs run python:3.11 "python -c 'print(2**100)'" --wait
    gridx cluster
    gridx image push team/app:1            # on the hub: 10.0.0.1:5000/team/app:1

Environment:
    GRIDX_CONFIG_DIR   hub state folder (default /etc/gridx)
    GRIDX_WG_DIR       WireGuard config folder (default /etc/wireguard)
    GRIDX_MANAGER      run `gridx jobs` against this manager over SSH
                       (user@host), for machines that are not the hub:
                       root@HUB drives its Docker over SSH (the admin),
                       gridx@HUB runs the command there as a user
    GRIDX_SSH_KEY      the SSH key for gridx@HUB (a user bundle's settings)
    DOCKER_HOST        the Docker engine, as for the docker CLI: unix://PATH
                       (default /var/run/docker.sock) or ssh://USER@HOST
    GRIDX_USERS_HOME   the users' account's home on the hub
                       (default /var/lib/gridx/users)
    GRIDX_REGISTRY_STORAGE, GRIDX_DOCKER_CERTS_DIR   the registry's storage
                       (/var/lib/gridx/registry) and Docker's certs.d
                       (/etc/docker/certs.d), moved by tests
    NO_COLOR           no colour in messages

Exit status:
    0 ok, 1 the operation failed, 2 bad usage or input, 3 a precondition is
    missing (not root, a tool not installed, Docker not running, hub not
    initialised, manager unreachable), 130 interrupted.

Standard library only. It runs other programs through one helper, run(), or
its siblings start() and run_streaming() for a command whose output streams
past gridx (all echo the command under -v): wg, wg-quick, docker, ssh,
ssh-keygen, iptables, iptables-restore, ip, openssl, curl, docker-registry,
setpriv, useradd, usermod, systemctl, and the bundle's own join.sh, leave.sh
and status.sh.
"""

# Map: the sections below, in order; each uses only what stands above it
# (tests/test_layout.py holds this list and the direction against the code).
#   Constants                 values every section reads; "same as" notes for the bundle's shell
#   Errors                    GridxError: a message, a hint and an exit status
#   Output                    info/warn, tables, JSON, human_* formats
#   Running commands          run(), start(), need(), docker(); the Engine API (engine_get); the four ways' state
#   State on disk             atomic files, locks, paths, validators and parsers, HubConfig
#   Firewall                  the hub's iptables chains: swarm on the VPN only, users to SSH only
#   SSH                       the hub's key, ssh's argv, known_hosts
#   WireGuard                 keys, the hub's, workers' and users' configs, `wg show`
#   Swarm                     engine versions, swarm info, nodes (known by ID) and their resources
#   Registry                  the hub's image registry: read-only side, loopback writer, accounts, HTTP API
#   Bundles                   a worker's join bundle: settings, files, writing it
#   Accounts                  users: the gridx account, authorized_keys, user bundles
#   Jobs                      asking, creating, reading the swarm, state, owners, re-runs, waiting
#   Work folders and results  --workdir layers, uploads through serve, --output collection
#   Owner activity and checkpoints  the agents' reports, paused nodes, preemption, --checkpoint
#   Usage                     the ledger hub watch writes: who used, and which node gave, how much
#   Notifications             --notify: events when jobs end, signed, sent by hub watch with retries
#   Remote                    --manager: docker over SSH (root) or the hub's `gridx serve` (users); jobs forward
#   Commands: hub             one handler per command, in COMMANDS' order, sub-banners per group
#   Commands: worker          they run the bundle's scripts (one implementation)
#   Commands: jobs
#   Commands: image
#   Commands: serve           the forced command of the users' SSH account
#   Argument parser           argument builders (args_*, add_*), COMMANDS, build_parser
#   Main                      main(): the one place that catches GridxError
#
# A command runs one of four ways, chosen by module state (Running commands):
#   on the hub              DOCKER_HOST None, OWNER None: the local docker, wg, files
#   --manager root@HUB      DOCKER_HOST "ssh://root@HUB": docker's own SSH (set_manager); reads
#                           through `ssh root@HUB docker system dial-stdio` (EngineAPI)
#   --manager USER@HUB      forward_to_serve sends INVOCATION to the hub; ForwardedExit
#   serve NAME (on the hub) OWNER NAME, SERVE_LIMITS theirs: as on the hub, for that user
# Every command is declared once, in COMMANDS (Argument parser): its handler,
# help, example and argument builder; args.command_path names it.
# Imports: argparse and what Python and argparse load anyway at the top; any
# other module inside the function that needs it (`gridx --help` must stay
# fast: make bench's startup row).

import argparse
import os
import posixpath
import re
import stat
import sys
import time

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

# The one place of the version: pyproject.toml reads it (setuptools dynamic
# attr), `--version` and the bundles' settings.env print it.
VERSION = "0.1.0"

DEFAULT_INTERFACE = "gridx0"
DEFAULT_PORT = 51820
DEFAULT_SUBNET = "10.0.0.0/24"
WG_MTU = 1420
VXLAN_OVERHEAD = 50
# Docker subtracts the VXLAN overhead from this value itself, so an overlay
# created with the WireGuard MTU gives containers 1370 and fits the tunnel.
OVERLAY_MTU = WG_MTU
JOB_NETWORK = "gridx-jobs"
SWARM_PORTS = (("tcp", 2377), ("tcp", 7946), ("udp", 7946), ("udp", 4789))
# Candidate swarm address pools; the first that overlaps neither the VPN
# subnet nor an address of this machine is used (Docker's own default,
# 10.0.0.0/8, overlaps the VPN).
ADDRESS_POOLS = ("10.96.0.0/12", "10.208.0.0/12", "172.80.0.0/12", "100.80.0.0/12")
# A peer whose last handshake is older is silent: same as status.sh's
# HANDSHAKE_MAX_AGE (WireGuard renews a handshake every 2 minutes while
# traffic flows; PersistentKeepalive KEEPALIVE_S keeps it flowing).
HANDSHAKE_SILENT_S = 180
KEEPALIVE_S = 25
FIREWALL_CHAIN = "GRIDX-INPUT"

USERS_CHAIN = "GRIDX-USERS"
OUTPUT_CHAIN = "GRIDX-OUTPUT"  # in OUTPUT: which of the hub's own accounts reach the registry's writer

REGISTRY_PORT = 5000  # same as join.sh's GRIDX_REGISTRY (settings.env)
REGISTRY_WRITER_PORT = 5001  # on the hub's loopback only (see Registry)
# The hub's port for the workers' owner-activity reports, on its VPN address
# (not the registry writer's 5001: nothing the VPN reaches shares a number
# with it): same as lib.sh's AGENT_PORT_DEFAULT (bundles carry it as
# GRIDX_AGENT_PORT).
AGENT_PORT = 5002

CONFIG_MARKER = "# Managed by gridx"
PRIVATE_KEY_PLACEHOLDER = "GRIDX_PRIVATE_KEY_PLACEHOLDER"

# The generic resources a worker advertises and a job reserves: same as
# join.sh's RESOURCES (its daemon.json node-generic-resources, and the names
# its two mergers drop), and its nvidia swarm-resource DOCKER_RESOURCE_NVIDIA-GPU.
RES_CPU = "gridx_cpu"
RES_MEM = "gridx_mem"
RES_GPU = "NVIDIA-GPU"
NVIDIA_ENV = "NVIDIA_VISIBLE_DEVICES"  # which GPUs the container toolkit hands a container

LABEL_JOB = "gridx.job"
LABEL_KIND = "gridx.kind"
LABEL_CMD = "gridx.command"
LABEL_CREATED = "gridx.created"
LABEL_TOKEN = "gridx.token"
LABEL_PORT = "gridx.port"
LABEL_KEPT = "gridx.kept"  # a swarm config marking a deleted job's kept results (see Work folders and results)
LABEL_SERVICE = "gridx.service"  # on that marker: the service ID the results are filed under
LABEL_OWNER_STATE = "gridx.owner-state"  # on a node: what its owner does (see Owner activity)
LABEL_PREEMPTED = "gridx.preempted"  # on a node: the task IDs its agent is preempting (--wait waits on)
LABEL_CHECKPOINT = "gridx.checkpoint"  # --checkpoint PATH (see Owner activity and checkpoints)
LABEL_CHECKPOINT_EVERY = "gridx.checkpoint-every"  # seconds
LABEL_RUN_IMAGE = "gridx.run-image"  # the image a job with checkpoints runs without one (a re-run's base)
LABEL_LAYER = "gridx.layer"  # a job's work layer: its tag in the hub's registry (see Work folders and results)
# A job whose work layer is being made waits, its name held, on a constraint
# no node meets: node.labels.gridx.hold==TAG.
HOLD_CONSTRAINT = "node.labels.gridx.hold"
# An engine label (docker node inspect: .Description.Engine.Labels) that a
# worker's join.sh --no-hub-ssh sets to "no": it declined the hub's SSH.
# Same as join.sh's HUB_SSH_LABEL.
LABEL_HUB_SSH = "gridx.hub-ssh"

LABEL_OWNER = "gridx.owner"
ADMIN_OWNER = "root"  # the owner of jobs made by root on the hub (the admin)

USER_ACCOUNT = "gridx"
# Names no member may take: the admin's owner, the service account, and
# words a reader of `jobs list` or a log would take for the system (an
# account of the hub is refused too: its login owns what it submits there).
RESERVED_NAMES = frozenset((ADMIN_OWNER, USER_ACCOUNT, "admin", "administrator", "hub", "docker", "daemon",
                            "nobody", "system", "all", "none", "default", "manager", "worker", "users",
                            "serve", "registry", "gridx-registry", "wheel", "sudo"))

DEFAULT_JOB_CPUS = 1.0
DEFAULT_JOB_MEMORY = "1G"
CONFIG_MAX_BYTES = 1000 * 1024  # swarmkit's limit for one config
FRAMEWORK_IMAGES = {
    "pytorch": "pytorch/pytorch:latest",
    "tensorflow": "tensorflow/tensorflow:latest",
}
JUPYTER_IMAGE = "quay.io/jupyter/base-notebook:latest"
MANAGER_CONNECT_TIMEOUT_S = 5
JUPYTER_FAILURES = 3  # failed starts in a row before `jobs jupyter` gives up
WG_CONFIG_MAX_BYTES = 64 * 1024
WATCH_DEFAULT_INTERVAL_S = 10
WATCH_SWEEP_EVERY = 10  # hub watch removes the layers of deleted jobs every this many passes (and at its start)
WATCH_MAX_S = 86400  # hub watch's --interval / --down-after: time.sleep() overflows on huge values
JUPYTER_MAX_WAIT_S = 86400

INSTALL_HINTS = {
    "wg": "wireguard-tools",
    "wg-quick": "wireguard-tools",
    "docker": "docker.io (Debian/Ubuntu), docker (Arch, Fedora)",
    "ssh": "openssh-client (Debian/Ubuntu), openssh (Arch, Fedora)",
    "ssh-keygen": "openssh-client (Debian/Ubuntu), openssh (Arch, Fedora)",
    "iptables": "iptables",
    "ip": "iproute2 (Debian/Ubuntu/Arch), iproute (Fedora)",
    "setpriv": "util-linux",
}

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PRECONDITION, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def config_dir():
    # absolute: its paths go into argv (iptables-restore, ssh -i), where a
    # relative one beginning with '-' would read as an option
    return os.path.abspath(os.environ.get("GRIDX_CONFIG_DIR") or "/etc/gridx")


def wg_dir():
    return os.path.abspath(os.environ.get("GRIDX_WG_DIR") or "/etc/wireguard")


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class GridxError(Exception):
    """An expected failure: main() prints it as one line (and a hint)."""

    def __init__(self, message, hint=None, code=EXIT_FAILED):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


def usage_error(message, hint=None):
    return GridxError(message, hint, EXIT_USAGE)


def precondition(message, hint=None):
    return GridxError(message, hint, EXIT_PRECONDITION)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

VERBOSE = False


def _tag(name, colour):
    if sys.stderr.isatty() and not os.environ.get("NO_COLOR"):
        return f"\033[{colour}m{name}:\033[0m"
    return f"{name}:"


# Control characters (C0, DEL, C1) and the bidirectional overrides that
# reorder what a terminal shows: a job's command, a worker's hostname or a
# task's error comes from a member or a volunteer, and reaches other people's
# terminals only escaped (JSON escapes them itself).
_UNPRINTABLE = None


def printable(text):
    """TEXT with every control character as \\xNN (or \\uNNNN)."""
    global _UNPRINTABLE
    if _UNPRINTABLE is None:
        _UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                            else f"\\u{ord(m.group()):04x}", str(text))


def say(line=""):
    """A line of a command's human output (stdout), escaped."""
    print(printable(line))


def info(message):
    print(f"{_tag('info', '1;34')} {printable(message)}", file=sys.stderr)


def warn(message):
    print(f"{_tag('warning', '1;33')} {printable(message)}", file=sys.stderr)


def print_json(document):
    import json

    print(json.dumps(document, indent=2, sort_keys=True))


def print_table(headers, rows):
    """Aligned columns, like `docker ps`."""
    table = [list(headers)] + [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def printed_as_json_or_none(as_json, key, items, none_line):
    """A listing's two short forms: --json ({key: items}), or the line
    saying there is none. True when one was printed (no table to print)."""
    if as_json:
        print_json({key: items})
        return True
    if not items:
        print(none_line)
        return True
    return False


def human_age(seconds):
    if seconds is None:
        return "never"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def human_duration(seconds):
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def show_hours(hours):
    """cpu-h/gpu-h/GiB-h of a usage (gridx usage, hub list-users)."""
    return "/".join(f"{hours[key]:.1f}" for key in ("cpu_hours", "gpu_hours", "memory_gib_hours"))


def human_mib(mib):
    if mib >= 1024 and mib % 1024 == 0:
        return f"{mib // 1024}G"
    if mib >= 1024:
        return f"{mib / 1024:.1f}G"
    return f"{mib}M"


def human_bytes(count):
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def unix_time(stamp):
    """Seconds since the epoch of Docker's RFC 3339 time
    ("2026-12-07T18:20:10.559388716Z", or with an offset); None when unreadable."""
    import datetime

    match = re.match(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", stamp or "")
    if not match:
        return None
    parts = [int(part) for part in match.groups()[:6]]
    zone = match.group(8)
    offset = 0 if zone == "Z" else (1 if zone[0] == "+" else -1) * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    try:
        whole = datetime.datetime(*parts, tzinfo=datetime.timezone.utc).timestamp()
    except ValueError:
        return None
    return whole - offset + float(match.group(7) or 0)


def docker_ago(stamp, now=None):
    """How long ago, as `docker service ps` says it ("3 minutes ago"): the
    docker CLI's units.HumanDuration, lower-cased."""
    then = unix_time(stamp)
    if then is None:
        return ""
    seconds = (time.time() if now is None else now) - then
    minutes, hours = int(seconds / 60), round(seconds / 3600)
    if seconds < 1:
        text = "less than a second"
    elif int(seconds) == 1:
        text = "1 second"
    elif seconds < 60:
        text = f"{int(seconds)} seconds"
    elif minutes == 1:
        text = "about a minute"
    elif minutes < 60:
        text = f"{minutes} minutes"
    elif hours == 1:
        text = "about an hour"
    elif hours < 48:
        text = f"{hours} hours"
    elif hours < 24 * 7 * 2:
        text = f"{hours // 24} days"
    elif hours < 24 * 30 * 2:
        text = f"{hours // 24 // 7} weeks"
    elif hours < 24 * 365 * 2:
        text = f"{hours // 24 // 30} months"
    else:
        text = f"{int(seconds / 3600) // 24 // 365} years"
    return text + " ago"


# ---------------------------------------------------------------------------
# Running commands
# ---------------------------------------------------------------------------


def host_env():
    """The environment for child processes: the host's, not a frozen one.

    A PyInstaller binary points LD_LIBRARY_PATH at its unpack folder; a child
    `ssh` would then load the bundled libcrypto.
    """
    env = dict(os.environ)
    if getattr(sys, "frozen", False):
        original = env.pop("LD_LIBRARY_PATH_ORIG", None)
        env.pop("LD_LIBRARY_PATH", None)
        if original:
            env["LD_LIBRARY_PATH"] = original
        for key in list(env):
            if key.startswith("_PYI_") or key.startswith("_MEI") or key.startswith("STATICX_"):
                del env[key]
    return env


def install_hint(tools):
    packages = sorted({INSTALL_HINTS.get(tool, tool) for tool in tools})
    return "install " + "; ".join(packages) + " (apt install / pacman -S / dnf install)"


def need(*tools):
    """Fail with exit 3 naming every missing tool and how to install it."""
    import shutil

    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise precondition(f"{', '.join(missing)} not found on PATH", install_hint(missing))


def require_root():
    if os.geteuid() != 0:
        raise precondition("this command must run as root", "run it again with sudo")


def run(argv, *, check=True, input=None, timeout=120, capture=True):
    """Run one command (argv is a list, never a shell string).

    Returns the CompletedProcess; raises GridxError when it cannot start,
    times out, or (with check) exits non-zero.
    """
    import subprocess

    if VERBOSE:
        import shlex

        print(f"[#] {shlex.join(argv)}", file=sys.stderr)
    try:
        result = subprocess.run(
            argv,
            input=input,
            capture_output=capture,
            text=True,
            timeout=timeout,
            env=host_env(),
        )
    except FileNotFoundError:
        raise precondition(f"{argv[0]} not found on PATH", install_hint([argv[0]])) from None
    except subprocess.TimeoutExpired:
        raise GridxError(f"`{' '.join(argv[:3])}` did not finish within {timeout} s") from None
    if check and result.returncode != 0:
        raise command_error(argv, result)
    return result


def start(argv, **popen_args):
    """Start a command whose output streams past gridx (logs -f, ssh): the
    sibling of run(), echoed the same way under -v, with the host's
    environment. Returns the Popen; the caller waits for it."""
    import subprocess

    if VERBOSE:
        import shlex

        print(f"[#] {shlex.join(argv)}", file=sys.stderr)
    try:
        return subprocess.Popen(argv, env=host_env(), **popen_args)
    except FileNotFoundError:
        raise precondition(f"{argv[0]} not found on PATH", install_hint([argv[0]])) from None


def run_streaming(argv):
    """Run a command with gridx's own stdin/stdout/stderr; its exit status."""
    process = start(argv)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        raise


class Background:
    """One of hub watch's chores in a thread of its own, one run at a time:
    a copy from a worker that answers slowly (or not at all, until its
    deadline) never holds up the pass that re-runs lost jobs."""

    def __init__(self, work):
        self.work, self.thread = work, None

    def start(self, *args):
        """False when the last run has not ended (this pass skips it)."""
        import threading

        if self.thread is not None and self.thread.is_alive():
            return False
        self.thread = threading.Thread(target=self.run, args=args, daemon=True)
        self.thread.start()
        return True

    def run(self, *args):
        try:
            self.work(*args)
        except GridxError as error:
            warn(error.message)

    def join(self):
        if self.thread is not None:
            self.thread.join()


# What stops gridx from reading Docker, the same whether the docker CLI said
# it or the Engine API's socket did (see command_error, EngineAPI).
def docker_not_running():
    return precondition("Docker is not running", "start it: systemctl start docker (or service docker start)")


def docker_socket_denied():
    return precondition(
        "no access to the Docker socket (permission denied)",
        "run it as root (sudo), or as a member of the docker group (which is as good as root)",
    )


def not_a_swarm_manager():
    return precondition(
        "this machine's Docker is not a swarm manager",
        "run this on the hub, or set GRIDX_MANAGER=root@HUB_VPN_IP",
    )


def manager_unreachable(ssh_said):
    return precondition(
        f"cannot reach the manager over SSH: {ssh_said or 'ssh failed'}",
        "check the VPN and --manager / GRIDX_MANAGER (user@HUB_VPN_IP, with a key the hub trusts)",
    )


def command_error(argv, result):
    stderr = (result.stderr or "").strip()
    if argv[0] == "docker" and (
        "Cannot connect to the Docker daemon" in stderr or "Is the docker daemon running" in stderr
    ):
        return docker_not_running()
    if argv[0] == "docker" and "permission denied while trying to connect to the Docker daemon" in stderr:
        return docker_socket_denied()
    if argv[0] == "docker" and "This node is not a swarm manager" in stderr:
        return not_a_swarm_manager()
    if argv[0] == "docker" and "dial-stdio" in stderr and "exit status 255" in stderr:
        return manager_unreachable((stderr.rpartition("stderr=")[2].strip().splitlines() or [""])[-1])
    last = " | ".join(stderr.splitlines()[-3:]) or "no error output"
    shown = " ".join(argv[:4]) + (" …" if len(argv) > 4 else "")
    return GridxError(f"`{shown}` failed (exit {result.returncode}): {last}")


DOCKER_HOST = None  # set from --manager / GRIDX_MANAGER: docker over SSH

OWNER = None  # set by `gridx serve NAME`: whom the command runs for
SERVE_LIMITS = None  # serve: that user's limits, {USER_LIMITS key: number or None}
INVOCATION = []  # main()'s argv: what the client side forwards to serve


def docker(*args):
    """argv for a docker call, against the remote manager when one is set."""
    if DOCKER_HOST:
        return ["docker", f"--host={DOCKER_HOST}", *args]
    return ["docker", *args]


# -- the Engine API -------------------------------------------------------------
# What gridx reads of the swarm (jobs, their tasks, the nodes) comes from
# Docker's Engine API in a fixed number of requests whatever the number of
# jobs: the docker CLI makes one request per service for `service inspect`
# and `service ps`. HTTP/1.1 over the engine's unix socket ($DOCKER_HOST
# unix://PATH, else DOCKER_SOCKET), or for --manager root@HUB through `ssh
# root@HUB docker system dial-stdio`, which is how the docker CLI reaches a
# manager over SSH. One connection per process, kept open; the API version
# is asked once (GET /_ping's Api-Version, at most ENGINE_API_NEWEST) and
# every path carries it. What changes the swarm stays with the docker CLI.
# HTTP is spoken by read_http_response, not http.client: importing that
# costs more than the requests themselves (14-19 ms on the lab's hub, 34 ms
# in the binary; it loads email and ssl), and Docker's answers need only
# GET, Content-Length and chunked bodies.

ENGINE_API_OLDEST = (1, 41)  # Docker 20.10: every field gridx reads exists there
ENGINE_API_NEWEST = (1, 51)  # Docker 28.5, the newest engine tested: a newer one is spoken to as 28.5
DOCKER_SOCKET = "/var/run/docker.sock"
ENGINE_TIMEOUT_S = 120  # as run()'s
ENGINES = {}  # thread ID -> its EngineAPI (engine_get opens it): one connection is not shared by threads


class EngineError(GridxError):
    """The engine answered a request with an error (status: HTTP's)."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def engine_host():
    """Where the Engine API is: ssh://root@HUB with --manager, else
    $DOCKER_HOST (unix:// or ssh://), else the local socket."""
    host = DOCKER_HOST or os.environ.get("DOCKER_HOST") or f"unix://{DOCKER_SOCKET}"
    if not host.startswith(("unix://", "ssh://")):
        raise precondition(f"gridx reads Docker through a unix socket or ssh://, not DOCKER_HOST={host}",
                           "on the hub unset DOCKER_HOST; elsewhere use --manager root@HUB_VPN_IP")
    return host


def engine_get(path, filters=None):
    """GET PATH of the Engine API (/services, /tasks, /nodes…) with these
    filters ({name: [values]}): the JSON it answers."""
    import json

    query = {"filters": json.dumps(filters, separators=(",", ":"))} if filters else None
    body = engine().read(path, query)
    try:
        return json.loads(body)
    except ValueError:
        raise GridxError(f"Docker's API: GET {path} did not answer JSON") from None


def engine():
    """This thread's EngineAPI, for where engine_host() says (hub watch
    reads the swarm from more than one thread)."""
    import threading

    host = engine_host()
    key = threading.get_ident()
    if key not in ENGINES or ENGINES[key].host != host:
        ENGINES[key] = EngineAPI(host)
    return ENGINES[key]


def write_log_stream(data):
    """Docker's multiplexed log stream (frames of an 8-byte header: the
    stream, 0, 0, 0, the size) to stdout and stderr, as `docker service logs`
    writes it; what has no header (a TTY's stream) to stdout. The daemon's own
    errors (stream 3, "Error grabbing logs: …") are returned, not written:
    the caller says them (the docker CLI's "error from daemon in stream")."""
    at, errors = 0, []
    while at + 8 <= len(data) and data[at] in (0, 1, 2, 3) and data[at + 1:at + 4] == b"\0\0\0":
        size = int.from_bytes(data[at + 4:at + 8], "big")
        frame = data[at + 8:at + 8 + size]
        if data[at] == 3:
            errors.append(frame.decode("utf-8", "replace").strip())
        else:
            (sys.stderr if data[at] == 2 else sys.stdout).buffer.write(frame)
        at += 8 + size
    sys.stdout.buffer.write(data[at:])
    sys.stdout.buffer.flush()
    sys.stderr.buffer.flush()
    return errors


def engine_unix_socket(path):
    """A connected socket to the engine, or the precondition the docker CLI
    would have met (exit 3)."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(ENGINE_TIMEOUT_S)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise docker_not_running() from None
    except PermissionError:
        sock.close()
        raise docker_socket_denied() from None
    except OSError as error:
        sock.close()
        raise precondition(f"cannot connect to Docker's socket {path}: {error.strerror}",
                           "start Docker: systemctl start docker (or service docker start)") from None
    return sock


HTTP_LINE_MAX = 65536  # a status, header or chunk-size line longer than this is no answer of Docker's


def read_http_response(reader):
    """(status, {header name in lower case: value}, body) of one HTTP/1.1
    response from reader (a binary file): its body by Content-Length, by
    chunks, or to the end of the connection (then "connection" is "close")."""
    line = reader.readline(HTTP_LINE_MAX)
    if not line:
        raise ConnectionError("the connection closed before an answer")
    match = re.match(rb"HTTP/1\.[01] (\d{3})[ \r\n]", line)
    if not match:
        raise ValueError(f"not an HTTP answer: {line[:40]!r}")
    headers = {}
    while True:
        line = reader.readline(HTTP_LINE_MAX)
        if line in (b"\r\n", b"\n"):
            break
        if not line.endswith(b"\n"):
            raise ConnectionError("the answer's headers broke off")
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size = int(reader.readline(HTTP_LINE_MAX).split(b";")[0].strip() or b"x", 16)  # ValueError: no size
            if size == 0:
                break
            chunks.append(read_exactly(reader, size))
            read_exactly(reader, 2)  # the chunk's CRLF
        while reader.readline(HTTP_LINE_MAX) not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return int(match.group(1)), headers, b"".join(chunks)
    if "content-length" in headers:
        return int(match.group(1)), headers, read_exactly(reader, int(headers["content-length"]))
    headers["connection"] = "close"
    return int(match.group(1)), headers, reader.read()


def read_exactly(reader, size):
    data = reader.read(size)
    if len(data) != size:
        raise ConnectionError("the answer broke off")
    return data


class EngineAPI:
    """GET requests to one engine over one kept-open connection."""

    def __init__(self, host):
        self.host = host
        self.sock = self.reader = None
        self.process = self.said = None  # ssh and its stderr, for ssh://
        self.version = None

    def read(self, path, query=None):
        """The body of GET PATH?QUERY at the negotiated version; an error
        status raises, with what the engine said."""
        import json
        import urllib.parse

        if self.version is None:
            self.version = self.negotiate()
        target = "/v%d.%d%s" % (self.version + (path,))
        if query:
            target += "?" + urllib.parse.urlencode(query)
        status, _, body = self.request(target)
        if status < 400:
            return body
        try:
            said = json.loads(body).get("message")
        except (ValueError, AttributeError):
            said = None
        said = said or body.decode("utf-8", "replace").strip() or f"HTTP {status}"
        if "not a swarm manager" in said:
            raise not_a_swarm_manager()
        raise EngineError(status, f"Docker's API: GET {path}: {said}")

    def negotiate(self):
        """The API version both speak: the engine's, at most ENGINE_API_NEWEST."""
        status, headers, _ = self.request("/_ping")
        version = headers.get("api-version")
        match = re.match(r"(\d+)\.(\d+)$", version or "")
        if not match:
            raise GridxError(f"Docker's API did not say its version (GET /_ping: HTTP {status})")
        found = (int(match.group(1)), int(match.group(2)))
        if found < ENGINE_API_OLDEST:
            raise precondition(f"Docker's API is {version}; Grid-X needs {'%d.%d' % ENGINE_API_OLDEST} "
                               "(Docker 20.10) or newer", "upgrade Docker on the hub")
        return min(found, ENGINE_API_NEWEST)

    def request(self, target):
        """(status, headers, body) of one GET; a kept-open connection that
        the engine closed meanwhile is opened again, once."""
        if VERBOSE:
            import urllib.parse

            print(f"[#] GET {urllib.parse.unquote(target)}", file=sys.stderr)
        asked = f"GET {target} HTTP/1.1\r\nHost: docker\r\nUser-Agent: gridx/{VERSION}\r\n\r\n".encode()
        for attempt in (1, 2):
            fresh = self.sock is None
            if fresh:
                self.sock = self.open()
                self.reader = self.sock.makefile("rb")
            try:
                self.sock.sendall(asked)
                status, headers, body = read_http_response(self.reader)
            except (OSError, ValueError) as error:
                self.close()
                if fresh or attempt == 2:
                    raise self.failed(error) from None
                continue
            if headers.get("connection", "").lower() == "close":
                self.close()
            return status, headers, body
        raise AssertionError("not reached")

    def close(self):
        if self.sock is not None:
            self.reader.close()
            self.sock.close()
        self.sock = self.reader = None

    def open(self):
        if self.host.startswith("ssh://"):
            return self.dial_stdio()
        return engine_unix_socket(self.host[len("unix://"):])

    def dial_stdio(self):
        """A socket whose other end is `ssh HOST docker system dial-stdio`:
        the manager's API socket, as the docker CLI reaches it (ssh's own
        configuration and known_hosts apply)."""
        import socket
        import tempfile
        import urllib.parse

        self.close_ssh()
        parts = urllib.parse.urlsplit(self.host)
        argv = ["ssh", "-o", f"ConnectTimeout={MANAGER_CONNECT_TIMEOUT_S * 6}", "-T"]
        if parts.username:
            argv += ["-l", parts.username]
        if parts.port:
            argv += ["-p", str(parts.port)]
        ours, theirs = socket.socketpair()
        self.said = tempfile.TemporaryFile()
        try:
            self.process = start(argv + ["--", parts.hostname, "docker", "system", "dial-stdio"],
                                 stdin=theirs, stdout=theirs, stderr=self.said)
        finally:
            theirs.close()
        ours.settimeout(ENGINE_TIMEOUT_S)
        return ours

    def close_ssh(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def failed(self, error):
        """The GridxError of a request that got no answer."""
        import socket
        import subprocess

        if self.process is None:
            if isinstance(error, socket.timeout):  # TimeoutError from 3.10 on
                return GridxError(f"Docker did not answer within {ENGINE_TIMEOUT_S} s")
            return GridxError(f"Docker's API: the connection failed: {error}")
        try:
            code = self.process.wait(timeout=MANAGER_CONNECT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.close_ssh()
            return GridxError(f"the manager's Docker did not answer over SSH within {ENGINE_TIMEOUT_S} s")
        self.said.seek(0)
        lines = [line for line in self.said.read().decode("utf-8", "replace").splitlines()
                 if line.strip() and not line.startswith("Warning: Permanently added")]
        self.process = None
        if code == 255:
            return manager_unreachable(lines[-1] if lines else "")
        return GridxError(f"`docker system dial-stdio` on the manager over SSH ended (exit {code}): "
                          + (lines[-1] if lines else "no error output"),
                          "gridx reads the manager's Docker the way `docker -H ssh://…` does: "
                          "docker must be on the PATH of the manager's SSH login")


def own_program():
    """How to run this gridx again: the binary; the command that imported
    this module (pip's console script, the lab's launcher: a file named gridx
    that runs it with its bytecode cached); else python3 and this file, which
    Python compiles at every start."""
    import shlex

    if getattr(sys, "frozen", False):
        return shlex.quote(os.environ.get("STATICX_PROG_PATH") or sys.executable)
    launcher = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(launcher) == "gridx" and os.path.isfile(launcher) and os.access(launcher, os.X_OK):
        return shlex.quote(launcher)
    return f"{shlex.quote(sys.executable)} {shlex.quote(os.path.abspath(__file__))}"


# ---------------------------------------------------------------------------
# State on disk
# ---------------------------------------------------------------------------


def ensure_dir(path, mode=0o700):
    os.makedirs(path, mode=mode, exist_ok=True)
    os.chmod(path, mode)


def atomic_write(path, data, mode=0o600):
    """Write a file so that readers see the old or the new content, whole."""
    import tempfile

    if isinstance(data, str):
        data = data.encode()
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_if_changed(path, text, mode=0o600):
    """atomic_write, unless the file holds this text already (nothing is
    restarted when nothing changed). True when it wrote."""
    try:
        if read_text(path) == text:
            return False
    except FileNotFoundError:
        pass
    atomic_write(path, text, mode)
    return True


def write_new_file(path, data, mode=0o600):
    """Create a file that must not exist yet (keys are never overwritten)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def read_text(path):
    with open(path) as handle:
        return handle.read()


class StateLock:
    """One exclusive lock around every command that changes hub state."""

    def __init__(self):
        self.handle = None

    def __enter__(self):
        import fcntl

        ensure_dir(config_dir())
        self.handle = open(os.path.join(config_dir(), ".lock"), "a")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.handle.close()


def results_owner():
    """The gridx account's (uid, gid), when there is one: it serves users
    their results (gridx serve reads, and deletes, what root collected)."""
    import pwd

    try:
        entry = pwd.getpwnam(USER_ACCOUNT)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def hand_over(path, recursive=True):
    """Root's collector: what it wrote goes to the gridx account (see results_owner)."""
    owner = results_owner()
    if owner is None or os.geteuid() != 0:
        return
    os.lchown(path, *owner)
    for top, folders, files in os.walk(path) if recursive else ():
        for name in folders + files:
            os.lchown(os.path.join(top, name), *owner)


# -- where things are ---------------------------------------------------------


def hub_config_path():
    return os.path.join(config_dir(), "hub_config.json")


def server_key_path():
    return os.path.join(config_dir(), "server.key")


def ssh_key_path():
    return os.path.join(config_dir(), "ssh", "id_ed25519")


def client_conf_path(name):
    return os.path.join(config_dir(), "clients", f"{name}.conf")


def bundles_dir():
    return os.path.join(config_dir(), "bundles")


def bundle_path(name, out_dir=None):
    return os.path.join(out_dir or bundles_dir(), f"gridx-{name}-bundle")


def wg_conf_path(interface):
    return os.path.join(wg_dir(), f"{interface}.conf")


def users_home():
    """The account's home: root-owned, so the account can change nothing
    there (sshd's StrictModes accepts root-owned folders and files)."""
    return os.path.abspath(os.environ.get("GRIDX_USERS_HOME") or "/var/lib/gridx/users")


def authorized_keys_path():
    return os.path.join(users_home(), ".ssh", "authorized_keys")


def users_limits_path():
    """The users' limits, for serve (which cannot read /etc/gridx)."""
    return os.path.join(users_home(), "users.json")


def users_lock_path():
    """What serve locks around a submission's limit check: a file made once
    and never replaced (users.json is replaced atomically, so a lock on it
    would be a lock on whichever copy each process opened)."""
    return os.path.join(users_home(), "users.lock")


def user_bundle_path(name, out_dir=None):
    return os.path.join(out_dir or bundles_dir(), f"gridx-{name}-user")


def results_dir():
    return os.path.abspath(os.environ.get("GRIDX_RESULTS_DIR") or "/var/lib/gridx/results")


# -- validators and parsers ---------------------------------------------------
# Each returns the normalised value or raises usage_error.

_DNS_LABEL = None


def valid_name(name, what="peer name"):
    global _DNS_LABEL
    if _DNS_LABEL is None:
        _DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
    if not isinstance(name, str) or not _DNS_LABEL.fullmatch(name):
        raise usage_error(
            f"invalid {what} {name!r}: use 1-63 lowercase letters, digits and '-' "
            "(a DNS label), starting and ending with a letter or digit",
            "for example: laptop-anna",
        )
    return name


def valid_interface(name):
    # a leading '-' would reach wg, wg-quick and iptables as an option;
    # the rule is wg-quick's, same as lib.sh's is_interface
    if not re.fullmatch(r"[a-zA-Z0-9_=+.][a-zA-Z0-9_=+.-]{0,14}", name or "") or name in (".", ".."):
        raise usage_error(
            f"invalid interface name {name!r}: 1-15 characters of letters, digits and _=+.-",
            "for example: --interface gridx0",
        )
    return name


def valid_port(value):
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = 0
    if not 1 <= port <= 65535 or str(value).strip() != str(port):
        raise usage_error(f"invalid port {value!r}: use a number from 1 to 65535", "for example: --port 51820")
    return port


def valid_public_ip(value):
    import ipaddress

    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise usage_error(
            f"invalid --ip {value!r}: give the hub's public IP address", "for example: --ip 203.0.113.7"
        ) from None
    if address.is_unspecified or address.is_multicast or address.is_loopback:
        raise usage_error(f"invalid --ip {value}: workers cannot reach it", "give the address workers dial")
    return str(address)


def valid_subnet(value):
    import ipaddress

    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as error:
        raise usage_error(f"invalid --subnet {value!r}: {error}", "for example: --subnet 10.0.0.0/24") from None
    if network.version != 4 or network.prefixlen > 30 or network.prefixlen < 8:
        raise usage_error(
            f"invalid --subnet {value}: use an IPv4 network from /8 to /30",
            "for example: --subnet 10.0.0.0/24",
        )
    return str(network)


def valid_wg_key(value, what="--pubkey"):
    import base64
    import binascii

    try:
        raw = base64.b64decode(value or "", validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32 or len(value) != 44:
        raise usage_error(
            f"invalid {what} {value!r}: a WireGuard key is 44 characters of base64",
            "create one on the worker: wg genkey | tee private.key | wg pubkey",
        )
    return value


# Docker's image reference grammar (distribution/reference): a name of
# lowercase path components, optionally after a registry host[:port], then
# an optional :tag and @digest. The first component is a registry only when
# it has a '.' or a ':' or is localhost, as Docker 20.10 decides.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"sha256:[0-9a-f]{64}"


def valid_image(image, what="image"):
    """An image reference as Docker's grammar has it, so that a value that is
    not one (a leading '-', an upper-case name) is exit 2 here, never a docker
    option nor an error from the daemon."""
    name, _, digest = (image or "").partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        domain, parts = parts[0], parts[1:]
    else:
        domain = ""
    ok = (
        bool(name) and len(name) <= 255
        and (not domain or re.fullmatch(_DOMAIN, domain))
        and all(re.fullmatch(_PATH_COMPONENT, part) for part in parts)
        and (not tag or re.fullmatch(_TAG, tag))
        and (not digest or re.fullmatch(_DIGEST, digest))
        and (colon <= slash or tag) and ("@" not in image or digest)
    )
    if not ok:
        raise usage_error(
            f"invalid {what} {image!r}: use an image reference as Docker has it: lowercase "
            "[REGISTRY[:PORT]/]NAME[/NAME…][:TAG][@sha256:DIGEST]",
            "for example: python:3.11 or registry.example:5000/team/app:1.0",
        )
    return image


def valid_manager(value):
    """--manager / GRIDX_MANAGER: [ssh://][USER@]HOST[:PORT] -> ssh://… for
    `docker -H` (and so ssh's argv): a login name, an IPv4 address or a host
    name, a port; nothing there can begin with '-'."""
    import ipaddress

    rest = value[len("ssh://"):] if value.startswith("ssh://") else value
    match = re.fullmatch(r"(?:([A-Za-z_][A-Za-z0-9_.-]{0,31})@)?([A-Za-z0-9.-]{1,253})(?::([0-9]{1,5}))?", rest)
    host = match.group(2) if match else ""
    labels = host.split(".")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            match = None
    elif not all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label) for label in labels):
        match = None
    if not match or (match.group(3) and not 1 <= int(match.group(3)) <= 65535):
        raise usage_error(
            f"invalid --manager / GRIDX_MANAGER {value!r}: use USER@HOST or USER@HOST:PORT "
            "(a login name, an IPv4 address or a host name)",
            "for example: --manager root@10.0.0.1",
        )
    return "ssh://" + rest


def valid_ssh_public_key(value, what="--ssh-key"):
    """One OpenSSH public key line (type, base64, comment): it goes into the
    worker's authorized_keys, where anything before the type is an option."""
    if not re.fullmatch(r"(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+) [A-Za-z0-9+/]+={0,3}( [^\n\r]*)?",
                        value or ""):
        raise usage_error(f"invalid {what} {value!r}: give one OpenSSH public key line",
                          "for example: the hub's key, from: sudo gridx hub ssh-pubkey")
    return value


def valid_user_ssh_key(value, what="--pubkey"):
    """valid_ssh_public_key, and the key's own bytes name its type: only
    the type and the key go into authorized_keys (the comment is gridx's)."""
    import base64
    import binascii
    import struct

    line = valid_ssh_public_key((value or "").strip(), what)
    kind, blob = line.split()[:2]
    try:
        raw = base64.b64decode(blob, validate=True)
        length = struct.unpack(">I", raw[:4])[0]
        inner = raw[4:4 + length].decode("ascii")
    except (binascii.Error, ValueError, struct.error, UnicodeDecodeError):
        inner = None
    if inner != kind or len(raw) < 4 + length + 4:
        raise usage_error(f"invalid {what}: the key's data is not a {kind} key",
                          "give the .pub file's line, e.g. --pubkey \"$(cat ~/.ssh/id_ed25519.pub)\"")
    return f"{kind} {blob}"


JOB_ALLOW_MAX = 64  # same as lib.sh's JOB_ALLOW_MAX


def valid_job_allow(entries):
    """The allow-list the admin opens for every job (hub allow-jobs): each
    entry ADDRESS[/PREFIX][:tcp|udp[/PORT[-PORT]]], IPv6 in brackets, a
    network no broader than /8 (IPv6 /16) named by its first address. The
    grammar of lib.sh's job_allow_parse, which workers apply (a test runs
    both on the same samples)."""
    import ipaddress

    if len(entries) > JOB_ALLOW_MAX:
        raise usage_error(f"{len(entries)} entries: the allow-list holds at most {JOB_ALLOW_MAX}")
    grammar = (r"(?:(?P<v4>[0-9.]+)|\[(?P<v6>[0-9A-Fa-f:]+))(?:/(?P<prefix>[0-9]{1,3}))?(?(v6)\])"
               r"(?::(?P<proto>tcp|udp)(?:/(?P<lo>[1-9][0-9]{0,4})(?:-(?P<hi>[1-9][0-9]{0,4}))?)?)?")
    hint = "ADDRESS[/PREFIX][:tcp|udp[/PORT[-PORT]]], e.g. 10.0.0.1:tcp/5000 or [fd00::5]:tcp/443"
    for entry in entries:
        found = re.fullmatch(grammar, entry or "")
        if not found:
            raise usage_error(f"invalid allow-list entry {entry!r}", hint)
        address = found["v4"] or found["v6"]
        narrowest = 8 if found["v4"] else 16
        prefix = found["prefix"] or ("32" if found["v4"] else "128")
        try:
            network = ipaddress.ip_network(f"{address}/{int(prefix)}", strict=True)
        except ValueError:
            raise usage_error(f"invalid allow-list entry {entry!r}: not an address, or bits set past its prefix",
                              hint) from None
        if network.version != (4 if found["v4"] else 6) or network.prefixlen < narrowest:
            raise usage_error(f"invalid allow-list entry {entry!r}: broader than /{narrowest}",
                              "the allow-list names servers and their networks, not whole address ranges")
        ports = [int(p) for p in (found["lo"], found["hi"]) if p]
        if any(port > 65535 for port in ports) or (len(ports) == 2 and ports[0] > ports[1]):
            raise usage_error(f"invalid allow-list entry {entry!r}: ports are 1-65535, LOW-HIGH", hint)
    return list(entries)


def parse_cpus(value):
    try:
        cpus = float(value)
    except (TypeError, ValueError):
        cpus = -1.0
    if not cpus > 0 or cpus != cpus or cpus > 4096:
        raise usage_error(f"invalid --cpus {value!r}: give a number of CPUs above 0", "for example: --cpus 2")
    return cpus


_SIZE_UNITS = {"": None, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_memory(value, flag="--memory", job_memory=True):
    """'8G', '512M', '1.5g', '2GiB' -> bytes (a job's memory: at least 4M;
    another size: more than none)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", value or "")
    if not match or not match.group(2):
        raise usage_error(f"invalid {flag} {value!r}: use a size with a unit, like 512M or 8G")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if job_memory and size < 4 * 1024**2:
        raise usage_error(f"invalid {flag} {value!r}: a job needs at least 4M")
    if size < 1:
        raise usage_error(f"invalid {flag} {value!r}: give a size above none, like 512M")
    return size


def parse_count(value, flag, minimum, maximum=None):
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = minimum - 1
    if count < minimum or str(value).strip() != str(count):
        raise usage_error(f"invalid {flag} {value!r}: give a whole number of at least {minimum}")
    if maximum is not None and count > maximum:
        raise usage_error(f"invalid {flag} {value!r}: at most {maximum}")
    return count


def parse_duration(value, flag):
    """'90', '30s', '10m', '2h' -> seconds (at least 10, at most a week)."""
    match = re.fullmatch(r"\s*([0-9]{1,7})\s*([smh]?)\s*", str(value or ""))
    seconds = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)] if match else 0
    if not 10 <= seconds <= 7 * 86400:
        raise usage_error(f"invalid {flag} {value!r}: give a time from 10s to 168h, like 10m",
                          f"for example: {flag} 10m")
    return seconds


def parse_env(items):
    pairs = []
    for item in items or []:
        key, sep, _ = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise usage_error(f"invalid --env {item!r}: use KEY=VALUE", "for example: --env EPOCHS=10")
        if key == NVIDIA_ENV:
            raise usage_error(f"--env {NVIDIA_ENV} is Grid-X's: a job sees the GPUs the swarm gives it",
                              "ask for GPUs with --gpus N")
        pairs.append(item)
    return pairs


def parse_limit(value, key):
    """A --max-… value: a number, `none` (no limit) or `default` (the hub's
    default: returned as ...)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text == "none":
        return None
    if text == "default":
        return ...
    flag = LIMIT_FLAGS[key]
    if key.endswith("_mib"):
        import math

        return math.ceil(parse_memory(value, flag, job_memory=key == "memory_mib") / 1024**2)
    return parse_count(value, flag, 0)


def hub_ip_of(subnet):
    import ipaddress

    return str(next(ipaddress.ip_network(subnet).hosts()))


# -- hub configuration --------------------------------------------------------


class Peer:
    """A worker registered on the hub. Immutable once made."""

    __slots__ = ("name", "ip", "public_key", "key_on_hub", "added")

    def __init__(self, name, ip, public_key, key_on_hub=True, added=""):
        for slot, value in zip(self.__slots__, (name, ip, public_key, key_on_hub, added)):
            object.__setattr__(self, slot, value)

    def __setattr__(self, name, value):
        raise AttributeError("Peer is immutable")

    def to_dict(self):
        return {slot: getattr(self, slot) for slot in self.__slots__}


# A member's limits. What their unfinished jobs reserve is checked at submit
# (a key unset: no limit); what their jobs put on the hub has a value even
# when the admin set none (STORE_DEFAULTS), so a member never fills the hub.
SUBMIT_LIMITS = ("cpus", "memory_mib", "gpus", "jobs")
STORE_LIMITS = ("workdir_mib", "output_mib", "output_files", "kept")  # per folder, per task, per task, per member
USER_LIMITS = SUBMIT_LIMITS + STORE_LIMITS
HUB_LIMITS = ("free_mib",)  # hub-wide (set-defaults): collection stops while the hub has less free
STORE_DEFAULTS = {"workdir_mib": 2048, "output_mib": 2048, "output_files": 10000, "kept": 20, "free_mib": 1024}
# The --max-… flag of each limit (and set-defaults' --min-free).
LIMIT_FLAGS = {"cpus": "--max-cpus", "memory_mib": "--max-memory", "gpus": "--max-gpus", "jobs": "--max-jobs",
               "workdir_mib": "--max-workdir", "output_mib": "--max-output", "output_files": "--max-output-files",
               "kept": "--max-kept", "free_mib": "--min-free"}


class User:
    """A person who submits jobs. Immutable once made.

    limits: only the ones set for this user; a missing key takes the hub's
    default, None is no limit."""

    __slots__ = ("name", "ip", "public_key", "ssh_key", "limits", "added")

    def __init__(self, name, ip, public_key, ssh_key, limits=None, added=""):
        values = (name, ip, public_key, ssh_key, dict(limits or {}), added)
        for slot, value in zip(self.__slots__, values):
            object.__setattr__(self, slot, value)

    def __setattr__(self, name, value):
        raise AttributeError("User is immutable")

    def to_dict(self):
        return {slot: getattr(self, slot) for slot in self.__slots__}


def valid_limits(document, where, keys=USER_LIMITS):
    """{key: whole number >= 0 or None} from hub_config.json."""
    if not isinstance(document, dict):
        raise TypeError(f"{where} is not an object")
    for key, value in document.items():
        if key not in keys:
            raise ValueError(f"{where} has an unknown limit {key!r}")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{where}: {key} is {value!r}, not a whole number or null")
    return dict(document)


def users_from_dict(document, network, hub_ip, peers):
    """The users and the default limits of hub_config.json, validated (the
    caller turns any error into one line: the file is damaged)."""
    import ipaddress

    users = {}
    taken = {hub_ip} | {peer.ip for peer in peers.values()}
    items = document.get("users", {})
    if not isinstance(items, dict):
        raise TypeError("'users' is not an object")
    for name, item in items.items():
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("name", "ip", "ssh_key")):
            raise TypeError(f"user {name!r} is not an object with name, ip and ssh_key")
        if item["name"] != name or name in peers:
            raise ValueError(f"user {name!r} is named {item['name']!r} inside, or is also a peer")
        if ipaddress.ip_address(item["ip"]) not in network or item["ip"] in taken:
            raise ValueError(f"user {name!r} has the address {item['ip']}, not a free one of {network}")
        taken.add(item["ip"])
        users[name] = User(valid_name(name, "user name"), item["ip"],
                           valid_wg_key(item.get("public_key", ""), "user key"),
                           valid_user_ssh_key(item["ssh_key"], f"user {name}'s ssh_key"),
                           valid_limits(item.get("limits", {}), f"user {name!r}'s limits"), str(item.get("added", "")))
    return users, valid_limits(document.get("user_defaults", {}), "user_defaults", USER_LIMITS + HUB_LIMITS)


def users_document(config):
    """hub_config.json's part for users (HubConfig.to_dict)."""
    return {"users": {name: user.to_dict() for name, user in sorted(config.users.items())},
            "user_defaults": dict(config.user_defaults)}


class HubConfig:
    """The hub's settings and peers, as saved in hub_config.json."""

    FIELDS = ("interface", "public_ip", "port", "subnet", "hub_ip", "public_key", "address_pool", "created")

    def __init__(self, interface, public_ip, port, subnet, hub_ip, public_key, address_pool, created, peers,
                 users=None, user_defaults=None, job_allow=()):
        self.interface = interface
        self.public_ip = public_ip
        self.port = port
        self.subnet = subnet
        self.hub_ip = hub_ip
        self.public_key = public_key
        self.address_pool = address_pool
        self.created = created
        self.peers = dict(peers)
        self.users = dict(users or {})  # name -> User
        self.user_defaults = dict(user_defaults or {})
        self.job_allow = list(job_allow)  # what every job may reach on private networks (hub allow-jobs)

    @property
    def endpoint(self):
        host = f"[{self.public_ip}]" if ":" in self.public_ip else self.public_ip
        return f"{host}:{self.port}"

    @property
    def manager(self):
        return f"{self.hub_ip}:2377"

    def to_dict(self):
        document = {field: getattr(self, field) for field in self.FIELDS}
        document["version"] = 1
        document["peers"] = {name: peer.to_dict() for name, peer in sorted(self.peers.items())}
        document.update(users_document(self))
        if self.job_allow:
            document["job_allow"] = list(self.job_allow)
        return document

    @classmethod
    def from_dict(cls, document):
        """Validate once on load, so the code inside can trust the types.

        Anything wrong (a missing field, a wrong type, a peer that is not an
        object) is one GridxError naming it, exit 1: never a traceback.
        """
        import ipaddress

        def field(where, key, kind, default=None):
            value = where.get(key, default)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise TypeError(f"{key!r} is missing or not a {kind.__name__}")
            return value

        try:
            if not isinstance(document, dict):
                raise TypeError("it is not a JSON object")
            subnet = valid_subnet(field(document, "subnet", str))
            network = ipaddress.ip_network(subnet)
            hub_ip = field(document, "hub_ip", str)
            if ipaddress.ip_address(hub_ip) not in network:
                raise ValueError(f"hub_ip {hub_ip} is not in the subnet {subnet}")
            pool = field(document, "address_pool", str, "")
            if pool:
                ipaddress.ip_network(pool)
            peers = {}
            for name, item in field(document, "peers", dict, {}).items():
                if not isinstance(item, dict):
                    raise TypeError(f"peer {name!r} is not an object")
                ip = field(item, "ip", str)
                if ipaddress.ip_address(ip) not in network or ip == hub_ip:
                    raise ValueError(f"peer {name!r} has the address {ip}, not a peer's of {subnet}")
                if field(item, "name", str) != name:
                    raise ValueError(f"peer {name!r} is named {item['name']!r} inside")
                peers[name] = Peer(
                    valid_name(name),
                    ip,
                    valid_wg_key(field(item, "public_key", str), "peer key"),
                    field(item, "key_on_hub", bool, True),
                    field(item, "added", str, ""),
                )
            return cls(
                valid_interface(field(document, "interface", str)),
                valid_public_ip(field(document, "public_ip", str)),
                valid_port(field(document, "port", int)),
                subnet,
                hub_ip,
                valid_wg_key(field(document, "public_key", str), "hub key"),
                pool,
                field(document, "created", str, ""),
                peers,
                *users_from_dict(document, network, hub_ip, peers),
                valid_job_allow(field(document, "job_allow", list, [])),
            )
        except (TypeError, ValueError, GridxError) as error:
            detail = error.message if isinstance(error, GridxError) else str(error)
            raise GridxError(
                f"{hub_config_path()} is damaged: {detail}",
                "restore it from a backup, or start over with a new hub init",
            ) from None


def load_hub_config(required=True):
    import json

    path = hub_config_path()
    try:
        text = read_text(path)
    except FileNotFoundError:
        if required:
            raise precondition(
                f"the hub is not initialised ({path} not found)", "run: gridx hub init --ip PUBLIC_IP"
            ) from None
        return None
    except PermissionError:
        raise precondition(f"cannot read {path}", "run it again with sudo") from None
    except (OSError, UnicodeDecodeError) as error:
        detail = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise GridxError(f"{path} is damaged: {detail}", "restore it from a backup") from None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise GridxError(f"{path} is not valid JSON: {error}", "restore it from a backup") from None
    return HubConfig.from_dict(document)


def save_hub_config(config):
    import json

    ensure_dir(config_dir())
    atomic_write(hub_config_path(), json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n", 0o600)


def _ip_sort_key(ip):
    return tuple(int(part) for part in ip.split("."))


def user_ips(config):
    return {user.ip for user in config.users.values()}


def allocate_ip(config, requested=None):
    """The requested address after checks, or the lowest free one."""
    import ipaddress

    network = ipaddress.ip_network(config.subnet)
    used = {config.hub_ip} | {peer.ip for peer in config.peers.values()} | user_ips(config)
    if requested is not None:
        try:
            address = ipaddress.ip_address(requested)
        except ValueError:
            raise usage_error(f"invalid --ip {requested!r}", f"give an address in {config.subnet}") from None
        if address not in network or address in (network.network_address, network.broadcast_address):
            raise usage_error(f"--ip {address} is not a host address of the VPN subnet {config.subnet}")
        if str(address) == config.hub_ip:
            raise usage_error(f"--ip {address} is the hub's own address", "leave out --ip to get a free one")
        if str(address) in used:
            owner = next(p.name for p in [*config.peers.values(), *config.users.values()] if p.ip == str(address))
            raise usage_error(f"--ip {address} is already used by peer {owner!r}", "leave out --ip to get a free one")
        return str(address)
    for address in network.hosts():
        if str(address) not in used:
            return str(address)
    raise usage_error(
        f"the VPN subnet {config.subnet} is full ({len(config.peers)} peers)",
        "remove a peer (gridx hub remove-peer NAME) or start a hub with a larger --subnet",
    )


def valid_user_name(name, what="user name"):
    """valid_name, and not a name of RESERVED_NAMES."""
    name = valid_name(name, what)
    if name in RESERVED_NAMES:
        raise usage_error(f"{name!r} is reserved: a member's name never reads as the admin, the hub or "
                          "its accounts", "pick another name, e.g. the person's first name")
    return name


def refuse_taken_name(config, name, wg_key=None, what="peer"):
    """A peer and a user never share a name or a WireGuard key (add-peer and
    add-user both ask)."""
    if name in config.users or name in config.peers:
        kind = "user" if name in config.users else "peer"
        raise usage_error(f"{name!r} is already a {kind}" + (f" ({config.users[name].ip})" if kind == "user" else ""),
                          f"pick another name for the {what}")
    if wg_key and any(u.public_key == wg_key for u in [*config.peers.values(), *config.users.values()]):
        raise usage_error("that WireGuard key already belongs to another peer or user", "each needs its own key")


def registered(members, name, kind):
    """config.peers' (or config.users') NAME; exit 2 when there is none."""
    if name not in members:
        raise usage_error(f"no {kind} {name!r}", f"list them: gridx hub list-{kind}s")
    return members[name]


def effective_limits(config, user):
    return {key: user.limits.get(key, config.user_defaults.get(key, STORE_DEFAULTS.get(key))) for key in USER_LIMITS}


def hub_limits(config):
    """The hub-wide values (HUB_LIMITS): set-defaults', else STORE_DEFAULTS."""
    return {key: config.user_defaults.get(key, STORE_DEFAULTS[key]) for key in HUB_LIMITS}


# ---------------------------------------------------------------------------
# Firewall
# ---------------------------------------------------------------------------


def firewall_rules(config):
    """iptables-restore input: swarm ports answer on the VPN interface only.
    Loopback addresses answer on lo only: the kernel drops them elsewhere
    unless route_localnet is on (Docker without its userland proxy, kube-proxy
    turn it on), and the registry's writer listens there (see Registry)."""
    lines = ["*filter", f":{FIREWALL_CHAIN} - [0:0]", f"-A {FIREWALL_CHAIN} -d 127.0.0.0/8 ! -i lo -j DROP",
             *user_firewall_rules(config), *output_firewall_rules()]
    lines.append(f"-A {FIREWALL_CHAIN} -i {config.interface} -j RETURN")
    lines.append(f"-A {FIREWALL_CHAIN} -i lo -j RETURN")
    lines.append(f"-A {FIREWALL_CHAIN} -p udp --dport {config.port} -j ACCEPT")
    for proto, port in SWARM_PORTS + (("tcp", REGISTRY_PORT),):  # the registry too: see Registry
        lines.append(f"-A {FIREWALL_CHAIN} -p {proto} --dport {port} -j DROP")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def user_firewall_rules(config):
    """iptables-restore lines of USERS_CHAIN (hooked into INPUT through the
    hub's chain, and into FORWARD): a user's VPN address reaches the hub's
    SSH port (and ping) only; never the swarm's ports, nor a worker through
    the hub (ip_forward is on for the VPN)."""
    lines = [f":{USERS_CHAIN} - [0:0]"]
    for user in sorted(config.users.values(), key=lambda u: _ip_sort_key(u.ip)):
        source = f"-s {user.ip}/32"
        lines += [
            f"-A {USERS_CHAIN} {source} -d {config.hub_ip}/32 -p tcp --dport 22 -j RETURN",
            f"-A {USERS_CHAIN} {source} -d {config.hub_ip}/32 -p icmp -j RETURN",
            f"-A {USERS_CHAIN} {source} -j DROP",
        ]
    return lines + [f"-A {FIREWALL_CHAIN} -j {USERS_CHAIN}"]


def output_firewall_rules():
    """iptables-restore lines of OUTPUT_CHAIN (hooked into OUTPUT): the
    registry's writer on loopback answers root alone (the hub's Docker, the
    admin's gridx), not the hub's other accounts, the registry's read-only
    side among them: who reaches the writer may push (see Registry)."""
    return [f":{OUTPUT_CHAIN} - [0:0]",
            f"-A {OUTPUT_CHAIN} -o lo -d 127.0.0.1/32 -p tcp --dport {REGISTRY_WRITER_PORT} "
            "-m owner ! --uid-owner 0 -j REJECT --reject-with tcp-reset"]


def firewall_rules_path():
    return os.path.join(config_dir(), "firewall.rules")


def firewall_postup(config):
    """The hub interface's PostUp line: wg-quick runs it through bash (eval),
    so the rules file's path is shell-quoted (a GRIDX_CONFIG_DIR with spaces);
    wg-quick itself cuts a line at '#' and expands %i, which no quoting hides."""
    import shlex

    path = firewall_rules_path()
    if any(c in path for c in "#%\n"):
        raise precondition(f"GRIDX_CONFIG_DIR {config_dir()!r} has a '#', '%' or newline, "
                           "which wg-quick cannot read in a PostUp line", "choose another folder")
    return (
        f"iptables-restore -n {shlex.quote(path)}; "
        f"iptables -C INPUT -j {FIREWALL_CHAIN} 2>/dev/null || iptables -I INPUT 1 -j {FIREWALL_CHAIN}"
        + forward_output_postup()
    )


def forward_output_postup():
    """The hub interface's PostUp, continued: USERS_CHAIN in FORWARD, OUTPUT_CHAIN in OUTPUT."""
    return "".join(f"; iptables -C {parent} -j {chain} 2>/dev/null || iptables -I {parent} 1 -j {chain}"
                   for parent, chain in (("FORWARD", USERS_CHAIN), ("OUTPUT", OUTPUT_CHAIN)))


def apply_firewall(config):
    """Install the rules now; the interface's PostUp re-applies them at boot.

    Returns True when something changed.
    """
    path = firewall_rules_path()
    changed = write_if_changed(path, firewall_rules(config), 0o600)
    current = run(["iptables", "-S", FIREWALL_CHAIN], check=False)
    hooked = run(["iptables", "-C", "INPUT", "-j", FIREWALL_CHAIN], check=False).returncode == 0
    output_hooked = run(["iptables", "-C", "OUTPUT", "-j", OUTPUT_CHAIN], check=False).returncode == 0
    if not changed and current.returncode == 0 and hooked and output_hooked:
        return False
    run(["iptables-restore", "-n", path])
    if not hooked:
        run(["iptables", "-I", "INPUT", "1", "-j", FIREWALL_CHAIN])
    hook_forward_output()
    return True


def hook_forward_output():
    """USERS_CHAIN in FORWARD and OUTPUT_CHAIN in OUTPUT now (apply_firewall),
    as PostUp does at boot."""
    for parent, chain in (("FORWARD", USERS_CHAIN), ("OUTPUT", OUTPUT_CHAIN)):
        if run(["iptables", "-C", parent, "-j", chain], check=False).returncode != 0:
            run(["iptables", "-I", parent, "1", "-j", chain])


# ---------------------------------------------------------------------------
# SSH
# ---------------------------------------------------------------------------


def ssh_public_key():
    path = ssh_key_path() + ".pub"
    try:
        return read_text(path).strip()
    except FileNotFoundError:
        raise precondition(f"the hub has no SSH key ({path})", "run: gridx hub init --ip PUBLIC_IP") from None
    except PermissionError:
        raise precondition(f"cannot read {path}", "run it again with sudo") from None


def ensure_ssh_key():
    """Create the hub's keypair once; never replace it. True if created."""
    path = ssh_key_path()
    ensure_dir(os.path.dirname(path))
    if os.path.exists(path):
        return False
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gridx-hub", "-f", path])
    os.chmod(path, 0o600)
    return True


def known_hosts_path():
    return os.path.join(os.path.dirname(ssh_key_path()), "known_hosts")


def ssh_argv(address, command=(), tty=False):
    argv = [
        "ssh",
        "-i", ssh_key_path(),
        "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known_hosts_path()}",
        "-o", "StrictHostKeyChecking=accept-new",
        "-o", "ConnectTimeout=10",
        # a worker that vanishes mid-command is noticed within a minute, not at TCP's timeout
        "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
    ]
    if tty:
        argv.append("-t")
    else:
        argv += ["-o", "BatchMode=yes"]
    # `--`: ssh reads options after the host too, unless they come after it
    return argv + ["--", f"root@{address}", *command]


def forget_host_key(address):
    """Drop an address's lines, plain or hashed (HashKnownHosts), from the
    hub's known_hosts, so that a worker given the address later is reached
    instead of refused as an impostor. True when a line went."""
    import base64
    import binascii
    import hashlib
    import hmac

    def names(pattern):
        if pattern.startswith("|1|"):
            try:
                salt, digest = (base64.b64decode(part) for part in pattern[3:].split("|", 1))
            except (binascii.Error, ValueError):
                return False
            return any(hmac.compare_digest(hmac.new(salt, host.encode(), hashlib.sha1).digest(), digest)
                       for host in (address, f"[{address}]:22"))
        return pattern in (address, f"[{address}]:22")

    path = known_hosts_path()
    try:
        text = read_text(path)
    except FileNotFoundError:
        return False
    kept = [line for line in text.splitlines(keepends=True)
            if not (line.split() and not line.startswith(("#", "@"))
                    and any(names(pattern) for pattern in line.split()[0].split(",")))]
    if len(kept) == len(text.splitlines()):
        return False
    atomic_write(path, "".join(kept), os.stat(path).st_mode & 0o777)
    return True


# ---------------------------------------------------------------------------
# WireGuard
# ---------------------------------------------------------------------------


def wg_genkey():
    private = run(["wg", "genkey"]).stdout.strip()
    public = run(["wg", "pubkey"], input=private + "\n").stdout.strip()
    return private, public


def wg_pubkey(private):
    return run(["wg", "pubkey"], input=private + "\n").stdout.strip()


def render_hub_wg_conf(config, private_key):
    lines = [
        f"{CONFIG_MARKER} (hub). Change peers with `gridx hub add-peer/remove-peer`;",
        "# this file is rewritten from /etc/gridx/hub_config.json.",
        "[Interface]",
        f"Address = {config.hub_ip}/{config.subnet.split('/')[1]}",
        f"ListenPort = {config.port}",
        f"PrivateKey = {private_key}",
        f"MTU = {WG_MTU}",
        f"PostUp = {firewall_postup(config)}",
        "",
    ]
    for peer in sorted(config.peers.values(), key=lambda p: _ip_sort_key(p.ip)):
        lines += [f"# {peer.name}", "[Peer]", f"PublicKey = {peer.public_key}", f"AllowedIPs = {peer.ip}/32", ""]
    lines += user_wg_peers(config)
    return "\n".join(lines)


def user_wg_peers(config):
    """The hub's [Peer] sections for users (render_hub_wg_conf)."""
    lines = []
    for user in sorted(config.users.values(), key=lambda u: _ip_sort_key(u.ip)):
        lines += [f"# user {user.name}", "[Peer]", f"PublicKey = {user.public_key}", f"AllowedIPs = {user.ip}/32", ""]
    return lines


def render_worker_wg_conf(config, peer, private_key, ssh_public_key=""):
    prefix = config.subnet.split("/")[1]
    lines = [
        f"{CONFIG_MARKER} (worker). Written by the hub for peer {peer.name}.",
        f"# gridx-name = {peer.name}",
        f"# gridx-manager = {config.manager}",
    ]
    if ssh_public_key:
        lines.append(f"# gridx-hub-ssh-key = {ssh_public_key}")
    lines += [
        "[Interface]",
        f"PrivateKey = {private_key or PRIVATE_KEY_PLACEHOLDER}",
        f"Address = {peer.ip}/{prefix}",
        f"MTU = {WG_MTU}",
        "",
        "[Peer]",
        f"PublicKey = {config.public_key}",
        f"Endpoint = {config.endpoint}",
        f"AllowedIPs = {config.subnet}",
        f"PersistentKeepalive = {KEEPALIVE_S}",
        "",
    ]
    return "\n".join(lines)


def render_user_wg_conf(config, user, private_key):
    """The user's side: only the hub's address goes through the tunnel."""
    return "\n".join([
        f"{CONFIG_MARKER} (user). Written by the hub for user {user.name}.",
        "[Interface]",
        f"PrivateKey = {private_key or PRIVATE_KEY_PLACEHOLDER}",
        f"Address = {user.ip}/32",
        f"MTU = {WG_MTU}",
        "",
        "[Peer]",
        f"PublicKey = {config.public_key}",
        f"Endpoint = {config.endpoint}",
        f"AllowedIPs = {config.hub_ip}/32",
        f"PersistentKeepalive = {KEEPALIVE_S}",
        "",
    ])


def write_hub_wg_conf(config):
    ensure_dir(wg_dir())
    private_key = read_text(server_key_path()).strip()
    atomic_write(wg_conf_path(config.interface), render_hub_wg_conf(config, private_key), 0o600)


def wg_dump(interface):
    """`wg show IF dump` parsed: (interface public key, {peer key: info}).

    Returns (None, {}) when the interface is down.
    """
    result = run(["wg", "show", interface, "dump"], check=False)
    if result.returncode != 0:
        return None, {}
    lines = result.stdout.splitlines()
    public_key = lines[0].split("\t")[1] if lines else None
    now = time.time()
    peers = {}
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) < 8:
            continue
        handshake = int(fields[4])
        peers[fields[0]] = {
            "endpoint": None if fields[2] == "(none)" else fields[2],
            "allowed_ips": fields[3],
            "latest_handshake": handshake or None,
            "handshake_age": int(now - handshake) if handshake else None,
            "rx_bytes": int(fields[5]),
            "tx_bytes": int(fields[6]),
        }
    return public_key, peers


def wg_interface_up(interface):
    return run(["wg", "show", interface, "public-key"], check=False).returncode == 0


def systemd_running():
    return os.path.isdir("/run/systemd/system")


# ---------------------------------------------------------------------------
# Swarm
# ---------------------------------------------------------------------------

# Docker 23.0.2 to 25.0.2 (inclusive) carry moby/swarmkit#3162: the swarm
# manager's constraint enforcer compares discrete generic resources the wrong
# way round and rejects every task that reserves part of a node's gridx_cpu
# or gridx_mem, i.e. every Grid-X job. The bug is in the manager, so the hub
# refuses these engines; workers refuse them too. Same range as join.sh's
# check_engine_version (read there in moby's vendored swarmkit of each tag).
BROKEN_ENGINES = ((23, 0, 2), (25, 0, 2))


def engine_refused(version):
    """True for a Docker engine version in BROKEN_ENGINES."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version or "")
    if not match:
        return False
    first, last = BROKEN_ENGINES
    return first <= tuple(int(part) for part in match.groups()) <= last


def check_engine_version():
    """Exit 3 on an engine whose swarm manager would reject every job."""
    version = run(["docker", "version", "--format", "{{.Server.Version}}"]).stdout.strip()
    if engine_refused(version):
        raise precondition(
            f"Docker {version} cannot schedule Grid-X jobs: Docker 23.0.2 to 25.0.2 reject every task that "
            "reserves part of a node's generic resources (moby/swarmkit#3162)",
            "upgrade Docker to 25.0.3 or newer (Debian 13's docker.io, or Docker CE), or use 20.10",
        )


def swarm_info():
    import json

    output = run(["docker", "info", "--format", "{{json .Swarm}}"]).stdout
    return json.loads(output or "{}")


def choose_address_pool(subnet, local_networks=()):
    import ipaddress

    vpn = ipaddress.ip_network(subnet)
    taken = [vpn] + [ipaddress.ip_network(net, strict=False) for net in local_networks]
    for candidate in ADDRESS_POOLS:
        pool = ipaddress.ip_network(candidate)
        if not any(pool.overlaps(net) for net in taken if net.version == 4):
            return candidate
    raise GridxError(
        "every candidate swarm address pool overlaps the VPN subnet or a local network",
        "choose another --subnet",
    )


def local_ipv4_networks():
    import json

    result = run(["ip", "-j", "-4", "addr", "show"], check=False)
    if result.returncode != 0:
        return []
    networks = []
    for link in json.loads(result.stdout or "[]"):
        for addr in link.get("addr_info", []):
            if addr.get("local") and not addr["local"].startswith("127."):
                networks.append(f"{addr['local']}/{addr.get('prefixlen', 32)}")
    return networks


def worker_join_token(rotate=False):
    argv = ["docker", "swarm", "join-token", "-q", "worker"]
    if rotate:
        argv.insert(3, "--rotate")
    return run(argv).stdout.strip()


class Resources(tuple):
    """CPU units, MiB of memory and GPUs: what a node shares, what a job's
    task reserves, what a node holds or has free. Added and subtracted kind
    by kind; ordered as (cpus, memory_mib, gpus) are."""

    __slots__ = ()

    def __new__(cls, cpus=0, memory_mib=0, gpus=0):
        return tuple.__new__(cls, (cpus, memory_mib, gpus))

    cpus = property(lambda self: self[0])
    memory_mib = property(lambda self: self[1])
    gpus = property(lambda self: self[2])

    def __add__(self, other):
        return Resources(*(a + b for a, b in zip(self, other)))

    def __sub__(self, other):
        return Resources(*(a - b for a, b in zip(self, other)))

    def __mul__(self, count):
        return Resources(*(a * count for a in self))

    def fits(self, room):
        """True when each kind of this is at most room's."""
        return all(a <= b for a, b in zip(self, room))

    def to_dict(self):
        return {"cpus": self.cpus, "memory_mib": self.memory_mib, "gpus": self.gpus}

    def show(self):
        """c/m/g, as `cluster` prints it."""
        return f"{self.cpus}/{human_mib(self.memory_mib)}/{self.gpus}"

    def __repr__(self):
        return f"Resources(cpus={self.cpus}, memory_mib={self.memory_mib}, gpus={self.gpus})"


def generic_resources(items):
    """Docker's GenericResources list (a node's, a service's reservation, a
    task's assignment) -> (Resources of its counts, the names of its named
    GPUs, sorted). Discrete gridx_cpu / gridx_mem / NVIDIA-GPU counts; a
    named NVIDIA-GPU counts one GPU each. The names are the ones join.sh
    advertises (RES_CPU, RES_MEM, RES_GPU)."""
    counts = {RES_CPU: 0, RES_MEM: 0, RES_GPU: 0}
    named = []
    for item in items or []:
        discrete = item.get("DiscreteResourceSpec") or {}
        spec = item.get("NamedResourceSpec") or {}
        if discrete.get("Kind") in counts:
            counts[discrete["Kind"]] = int(discrete.get("Value", 0))
        elif spec.get("Kind") == RES_GPU:
            named.append(spec.get("Value"))
    return Resources(counts[RES_CPU], counts[RES_MEM], counts[RES_GPU]), sorted(named)


class Node:
    """A swarm node as gridx shows it, made once from the Engine API's node
    (what `docker node inspect` prints): its ID (what gridx knows it by),
    hostname (for display), address, state and the Resources it shares
    (shared.gpus counts its GPUs, gpu_ids names them)."""

    __slots__ = ("id", "hostname", "address", "state", "availability", "role", "manager", "shared", "gpu_ids",
                 "created", "updated", "hub_ssh", "owner", "preempted")

    def __init__(self, **values):
        for slot in self.__slots__:
            setattr(self, slot, values[slot])

    @classmethod
    def from_docker(cls, node):
        description = node.get("Description", {})
        counts, named = generic_resources((description.get("Resources", {}) or {}).get("GenericResources"))
        # a discrete GPU count (no names): gpu0, gpu1, ...
        gpu_ids = sorted(named + [f"gpu{i}" for i in range(counts.gpus)])
        status = node.get("Status", {})
        spec = node.get("Spec", {})
        return cls(
            id=node.get("ID", ""),
            hostname=description.get("Hostname", ""),
            address=status.get("Addr", ""),
            state=status.get("State", "unknown"),
            availability=spec.get("Availability", ""),
            role=spec.get("Role", ""),
            manager=bool(node.get("ManagerStatus")),
            shared=Resources(counts.cpus, counts.memory_mib, len(gpu_ids)),
            gpu_ids=gpu_ids,
            created=node.get("CreatedAt", ""),
            updated=node.get("UpdatedAt", ""),
            # False: the worker declined the hub's SSH (join.sh --no-hub-ssh)
            hub_ssh=((description.get("Engine") or {}).get("Labels") or {}).get(LABEL_HUB_SSH) != "no",
            # what its volunteer's agent last said, as hub watch labels it (see Owner activity)
            owner=(spec.get("Labels") or {}).get(LABEL_OWNER_STATE, ""),
            preempted=[t for t in (spec.get("Labels") or {}).get(LABEL_PREEMPTED, "").split(",") if t],
        )

    def shared_dict(self):
        """The --json shape of what it shares: its GPUs by name."""
        return {"cpus": self.shared.cpus, "memory_mib": self.shared.memory_mib, "gpus": list(self.gpu_ids)}


# What a node's volunteer does (its label gridx.owner-state, which hub watch
# sets from the agent's reports: see Owner activity and checkpoints).


def describe_owner(label, now=None):
    """A node's owner state, from its label, in words for `gridx cluster` and
    `jobs status` (empty: sharing, or no agent)."""
    parts = (label or "").split()
    if len(parts) < 5 or parts[0] == "sharing":
        return ""
    state, reason, since, preempt_at, hours = parts[:5]
    now = time.time() if now is None else now
    if state == "outside-hours":
        return f"outside its hours ({hours})"
    if state == "unknown":
        return "its agent is silent: owner unknown"
    said = f"paused: owner active ({reason}) for {human_age(now - int(since)).replace(' ago', '')}"
    if state == "preempting":
        return said + ", its jobs preempted"
    if int(preempt_at):
        said += f", jobs preempted in {human_age(max(0, int(preempt_at) - now)).replace(' ago', '')}"
    return said


def owner_document(label):
    """A node's owner state for --json: {state, reason, since, preempt_at,
    hours}, or None (no agent has reported)."""
    parts = (label or "").split()
    if len(parts) < 5:
        return None
    return {"state": parts[0], "reason": parts[1], "since": int(parts[2]) if parts[2].isdigit() else 0,
            "preempt_at": int(parts[3]) if parts[3].isdigit() else 0, "hours": parts[4]}


def swarm_nodes(nodes=None):
    """Every swarm node as a Node, one identity per address (nodes: those
    of all_swarm_nodes() when read already).

    A worker that left and joined again leaves its old identity behind with
    the same address (still Ready until its heartbeats time out, then Down);
    such replaced nodes are left out: one node per address, the newest Ready
    one, else the newest.
    """
    newest = {}
    for node in all_swarm_nodes() if nodes is None else nodes:
        whole, _, fraction = node.created.rstrip("Z").partition(".")
        rank = (node.state == "ready", whole, fraction.ljust(9, "0"))
        if node.address not in newest or rank > newest[node.address][0]:
            newest[node.address] = (rank, node)
    return [node for _, node in newest.values()]


def all_swarm_nodes():
    """Every swarm node, replaced identities too, as Nodes: one request."""
    return [Node.from_docker(node) for node in engine_get("/nodes")]


def node_names(nodes):
    """{node ID: the name to show}: its hostname, with the ID's first 12
    characters where two nodes report the same hostname (volunteers' laptops
    are often all called ubuntu). Nodes are known by ID; this is display."""
    counts = {}
    for node in nodes:
        counts[node.hostname] = counts.get(node.hostname, 0) + 1
    return {node.id: node.hostname if counts[node.hostname] == 1 else f"{node.hostname} ({node.id[:12]})"
            for node in nodes}


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------
# An image registry on the hub (Debian's docker-registry, the CNCF
# distribution registry) as two processes on one storage:
#   the reader   HUB_VPN_IP:5000, TLS, storage.maintenance.readonly: what
#                workers pull from (and `image ls` reads); every write (an
#                upload, a manifest, a delete) is answered 405 Method not
#                allowed (Allow: GET, HEAD; measured on the lab)
#   the writer   127.0.0.1:5001, plain HTTP, deletes on: only the hub itself
#                reaches it: `gridx image push` (the hub's Docker pushes
#                there), the work layer's push, `gridx image rm`
# The registry has no authentication: who may write is who reaches the
# writer, i.e. root on the hub (the firewall's OUTPUT_CHAIN turns the hub's
# other accounts away) and so the hub's Docker, which the docker group
# drives: the hub's admin. A job, a worker or a volunteer's own Docker
# reach only the reader. Credentials (htpasswd) would gate reads too: every
# worker would hold a password, and distribution's htpasswd has no
# read-only user.
# Each runs as its own system account: REGISTRY_ACCOUNT owns the storage
# (folders 0750, files 0640) and runs the writer; REGISTRY_READER_ACCOUNT
# is in its group, so it reads the storage and can neither change a byte of
# it nor reach the writer, even if the process every worker talks to were
# taken over. It alone (and root) reads the copy of the TLS key; the writer
# has none (loopback, plain HTTP). Their configs are root's, readable by
# their group only.
# TLS comes from a small CA the hub makes once at init (never regenerated:
# every worker's bundle carries it). Workers trust it through Docker's own
# /etc/docker/certs.d/HUB_VPN_IP:5000/ca.crt (join.sh installs the bundle's
# registry-ca.crt there, leave.sh removes it): no insecure-registries, no
# Docker restart. The hub's Docker needs nothing for the writer: Docker
# treats 127.0.0.0/8 as an insecure registry by default (moby's
# loadInsecureRegistries, from 1.3.2 to today). Users (GRIDX-USERS) reach
# the hub's SSH only, never port 5000; they have no docker to pull with.

REGISTRY_UNIT = "gridx-registry.service"  # the reader (the single registry's name before the split)
REGISTRY_WRITER_UNIT = "gridx-registry-writer.service"
REGISTRY_ACCOUNT = "gridx-registry"  # the writer's, and the storage's owner
REGISTRY_READER_ACCOUNT = "gridx-registry-ro"  # the reader's: in REGISTRY_ACCOUNT's group
REGISTRY_CA_FILE = "registry-ca.crt"  # the CA's name in a join bundle (join.sh reads it)
REGISTRY_CA_DAYS = 3650
REGISTRY_CERT_DAYS = 3650
REGISTRY_WAIT_S = 10  # how long init waits for a started registry to answer
MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
)
LIST_TYPES = MANIFEST_TYPES[2:]
# role -> (account, systemd unit, log without systemd, umask): the reader
# writes nothing; the writer's files are readable by its group (the reader)
REGISTRY_ROLES = {
    "reader": (REGISTRY_READER_ACCOUNT, REGISTRY_UNIT, "/var/log/gridx-registry.log", 0o077),
    "writer": (REGISTRY_ACCOUNT, REGISTRY_WRITER_UNIT, "/var/log/gridx-registry-writer.log", 0o027),
}


def registry_dir():
    """CA key and cert, server key and cert, the pid files: root's, 0700."""
    return os.path.join(config_dir(), "registry")


def registry_storage():
    """Where the registry keeps its blobs (GRIDX_REGISTRY_STORAGE in tests)."""
    return os.path.abspath(os.environ.get("GRIDX_REGISTRY_STORAGE") or "/var/lib/gridx/registry")


def registry_service_dir(role):
    """What one process reads: its config.yml (and the reader's TLS cert and
    key copy), root-owned, readable by the role's group. Beside config_dir()
    (/etc/gridx-registry/ROLE): /etc/gridx is root's alone."""
    return os.path.join(os.path.dirname(config_dir()), "gridx-registry", role)


def registry_config_path(role):
    return os.path.join(registry_service_dir(role), "config.yml")


def docker_certs_dir():
    """Docker's per-registry trust folder (GRIDX_DOCKER_CERTS_DIR in tests);
    same default as lib.sh's CERTS_DIR."""
    return os.path.abspath(os.environ.get("GRIDX_DOCKER_CERTS_DIR") or "/etc/docker/certs.d")


def registry_paths():
    """root's files; config.yml and registry.pid are the single registry's
    of before the split (hub init removes them)."""
    folder = registry_dir()
    return {name: os.path.join(folder, name) for name in (
        "ca.key", "ca.crt", "server.key", "server.crt", "reader.pid", "writer.pid", "config.yml", "registry.pid")}


def registry_address(hub_ip):
    """The reader: the name workers pull and jobs run (HUB_VPN_IP:5000/…)."""
    return f"{hub_ip}:{REGISTRY_PORT}"


def registry_writer():
    """The writer, where the hub's own Docker pushes (`gridx image push`,
    the work layer) and `gridx image rm` deletes: on the hub's loopback,
    plain HTTP. The hub's Docker needs no setting for it (127.0.0.0/8 is an
    insecure registry by default) and nothing off the hub reaches it. What
    is pushed there as 127.0.0.1:5001/P:T is served to workers as
    HUB_VPN_IP:5000/P:T (one storage): see writer_reference."""
    return f"127.0.0.1:{REGISTRY_WRITER_PORT}"


def registry_trust_path(address):
    """The CA as Docker reads it for that registry (world-readable: public)."""
    return os.path.join(docker_certs_dir(), address, "ca.crt")


def render_storage_config(delete):
    """The storage part both processes share. No blob descriptor cache: a
    process would keep saying a blob exists after the other side's garbage
    collection removed it."""
    return f"""storage:
  filesystem:
    rootdirectory: {registry_storage()}
  delete:
    enabled: {"true" if delete else "false"}
"""


def render_reader_config(hub_ip):
    """The VPN side: read-only (uploads, manifests and deletes refused; no
    purge of old uploads either, the writer does that), TLS."""
    folder = registry_service_dir("reader")
    return f"""{CONFIG_MARKER}: the hub's image registry, read-only side (gridx hub init writes it).
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
{render_storage_config(delete=False)}  maintenance:
    readonly:
      enabled: true
    uploadpurging:
      enabled: false
http:
  addr: {registry_address(hub_ip)}
  tls:
    certificate: {os.path.join(folder, "server.crt")}
    key: {os.path.join(folder, "server.key")}
  headers:
    X-Content-Type-Options: [nosniff]
"""


def render_writer_config():
    """The hub's side: loopback only, plain HTTP, deletion on (image rm)."""
    return f"""{CONFIG_MARKER}: the hub's image registry, writing side (gridx hub init writes it).
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
{render_storage_config(delete=True)}http:
  addr: {registry_writer()}
  headers:
    X-Content-Type-Options: [nosniff]
"""


REGISTRY_UNIT_TEXT = """[Unit]
Description=Grid-X: the hub's image registry, {what}
{after}
[Service]
User={account}
Group={account}
{groups}ExecStart={program} serve {config}
Restart=always
RestartSec=5
UMask={umask:04o}
NoNewPrivileges=yes
CapabilityBoundingSet=
ProtectSystem=strict
{writable}ProtectHome=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""


def render_registry_unit(role, hub_ip, interface, program):
    """The reader listens on the VPN address, which exists once the VPN is
    up; the writer writes the storage and nothing else (ProtectSystem)."""
    account, _, _, umask = REGISTRY_ROLES[role]
    if role == "reader":
        what = f"read-only, on {registry_address(hub_ip)} (VPN only)"
        after = (f"# It listens on the VPN address, which exists once the interface is up.\n"
                 f"Wants=wg-quick@{interface}.service\nAfter=wg-quick@{interface}.service network-online.target\n")
        groups, writable = f"SupplementaryGroups={REGISTRY_ACCOUNT}\n", ""
    else:
        what = f"writing side, on {registry_writer()} (the hub alone)"
        after, groups, writable = "", "", f"ReadWritePaths={registry_storage()}\n"
    return REGISTRY_UNIT_TEXT.format(what=what, after=after, account=account, groups=groups, program=program,
                                     config=registry_config_path(role), umask=umask, writable=writable)


def registry_unit_path(role):
    return f"/etc/systemd/system/{REGISTRY_ROLES[role][1]}"


def openssl_quiet(argv):
    """openssl, with every file it makes private to root (the keys)."""
    old = os.umask(0o077)
    try:
        return run(argv)
    finally:
        os.umask(old)


def ensure_registry_ca():
    """The CA key (0600) and cert, made once and never regenerated: every
    bundle written since carries this cert. True when made now."""
    paths = registry_paths()
    if os.path.exists(paths["ca.key"]) and os.path.exists(paths["ca.crt"]):
        return False
    if os.path.exists(paths["ca.key"]) or os.path.exists(paths["ca.crt"]):
        raise precondition(f"{registry_dir()} holds half a CA (one of ca.key, ca.crt)",
                           "put the missing file back, or move both away to make a new CA (every worker "
                           "then needs a new bundle: gridx hub refresh-bundle NAME)")
    ensure_dir(registry_dir())
    openssl_quiet([
        "openssl", "req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", paths["ca.key"], "-out", paths["ca.crt"], "-days", str(REGISTRY_CA_DAYS),
        "-subj", "/CN=Grid-X hub registry CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    ])
    os.chmod(paths["ca.key"], 0o600)
    os.chmod(paths["ca.crt"], 0o644)
    return True


def certificate_ips(path):
    """The IP addresses of a certificate's subjectAltName (openssl's text)."""
    text = run(["openssl", "x509", "-noout", "-text", "-in", path]).stdout
    return set(re.findall(r"IP Address:([0-9.]+)", text))


def ensure_registry_cert(hub_ip):
    """The server key (0600) and a cert signed by the CA for the hub's VPN
    address (subjectAltName IP:HUB_VPN_IP); made again only when missing or
    for another address. True when made now."""
    paths = registry_paths()
    if (os.path.exists(paths["server.key"]) and os.path.exists(paths["server.crt"])
            and certificate_ips(paths["server.crt"]) == {hub_ip}):
        return False
    folder = registry_dir()
    csr, extensions = os.path.join(folder, "server.csr"), os.path.join(folder, "server.ext")
    atomic_write(extensions, f"subjectAltName=IP:{hub_ip}\nbasicConstraints=CA:FALSE\n"
                             "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    try:
        openssl_quiet([
            "openssl", "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", paths["server.key"] + ".new", "-out", csr, "-subj", f"/CN={hub_ip}",
        ])
        openssl_quiet([
            "openssl", "x509", "-req", "-in", csr, "-CA", paths["ca.crt"], "-CAkey", paths["ca.key"],
            "-set_serial", f"0x{os.urandom(16).hex()}", "-days", str(REGISTRY_CERT_DAYS),
            "-extfile", extensions, "-out", paths["server.crt"] + ".new",
        ])
        os.chmod(paths["server.key"] + ".new", 0o600)
        os.chmod(paths["server.crt"] + ".new", 0o644)
        os.replace(paths["server.key"] + ".new", paths["server.key"])
        os.replace(paths["server.crt"] + ".new", paths["server.crt"])
    finally:
        for path in (csr, extensions, paths["server.key"] + ".new", paths["server.crt"] + ".new"):
            if os.path.exists(path):
                os.unlink(path)
    return True


def install_registry_trust(hub_ip):
    """The hub's own Docker trusts the CA (image ls, service create resolving
    a digest): the same file join.sh installs on workers. True when it changed."""
    path = registry_trust_path(registry_address(hub_ip))
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    return write_if_changed(path, read_text(registry_paths()["ca.crt"]), 0o644)


# -- the accounts and their files ----------------------------------------------


def registry_ids(role):
    """(uid, gid, supplementary gids) the role's process runs with."""
    import grp
    import pwd

    entry = pwd.getpwnam(REGISTRY_ROLES[role][0])
    groups = [grp.getgrnam(REGISTRY_ACCOUNT).gr_gid] if role == "reader" else []
    return entry.pw_uid, entry.pw_gid, groups


def ensure_registry_accounts():
    """The two system accounts (no login, no home, a group each); the
    reader's also in the writer's group. Returns what changed."""
    import grp
    import pwd

    changes = []
    for account, extra in ((REGISTRY_ACCOUNT, []), (REGISTRY_READER_ACCOUNT, ["--groups", REGISTRY_ACCOUNT])):
        try:
            pwd.getpwnam(account)
            continue
        except KeyError:
            pass
        need("useradd")
        run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", "--comment", "Grid-X image registry", *extra, "--", account])
        changes.append(f"created the system account {account!r} (the registry's "
                       f"{'writing' if account == REGISTRY_ACCOUNT else 'read-only'} side runs as it)")
    if REGISTRY_READER_ACCOUNT not in grp.getgrnam(REGISTRY_ACCOUNT).gr_mem:
        run(["usermod", "--append", "--groups", REGISTRY_ACCOUNT, "--", REGISTRY_READER_ACCOUNT])
        changes.append(f"added {REGISTRY_READER_ACCOUNT!r} to the group {REGISTRY_ACCOUNT!r} (it reads the storage)")
    return changes


def install_registry_files(role, files):
    """The role's folder and files: root-owned (no account can change its
    own config), group the role's, 0750 and 0640. True when a file changed."""
    gid = registry_ids(role)[1] if os.geteuid() == 0 else os.getegid()
    folder = registry_service_dir(role)
    os.makedirs(os.path.dirname(folder), mode=0o755, exist_ok=True)
    os.makedirs(folder, mode=0o750, exist_ok=True)
    changed = False
    for path, mode in [(folder, 0o750)] + [(os.path.join(folder, name), 0o640) for name in files]:
        if path != folder:
            changed |= write_if_changed(path, files[os.path.basename(path)], mode)
        if os.geteuid() == 0:
            os.chown(path, 0, gid)  # in a root-owned folder: no account can put a link there
        os.chmod(path, mode)
    return changed


def ancestors_open(path):
    """The folders above path that other accounts cannot pass through."""
    closed, folder = [], os.path.dirname(path)
    while folder != os.path.dirname(folder):
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            closed.append(folder)
        folder = os.path.dirname(folder)
    return closed


def own_registry_storage():
    """The storage is the writer's: folders 0750, files 0640 (the reader
    reads through the group). A storage the single registry of before wrote
    as root is handed over file by file, its top folder last, so that an
    interrupted hand-over is finished by the next init. True when it changed."""
    storage = registry_storage()
    os.makedirs(storage, mode=0o750, exist_ok=True)
    closed = ancestors_open(storage)
    if closed:
        raise precondition(f"the registry's accounts cannot reach {storage}: {closed[0]} is closed to them",
                           f"chmod o+x {closed[0]}, then gridx hub init again")
    if os.geteuid() != 0:
        return False
    uid, gid, _ = registry_ids("writer")
    top = os.lstat(storage)
    if (top.st_uid, top.st_gid, stat.S_IMODE(top.st_mode)) == (uid, gid, 0o750):
        return False
    for folder, folders, files in os.walk(storage):
        for name in folders + files:
            path = os.path.join(folder, name)
            kind = os.lstat(path).st_mode
            os.lchown(path, uid, gid)
            if stat.S_ISDIR(kind) or stat.S_ISREG(kind):  # never through a link
                os.chmod(path, 0o750 if stat.S_ISDIR(kind) else 0o640)
    os.chown(storage, uid, gid)
    os.chmod(storage, 0o750)
    return True


# -- the two processes -----------------------------------------------------------


def parse_http_response(output):
    """curl --include's output -> (status, {lower-case header: value}, body).
    run()'s text mode has turned the header lines' CRLF into LF already."""
    head, _, body = output.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise GridxError(f"the registry's answer is not HTTP: {lines[0][:80]!r}") from None
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


def registry_request(address, ca_path, path, method="GET", accept=(), timeout=10):
    """One request to the registry's API: (status, {header: value}, body).
    HTTPS checked against ca_path; plain HTTP when ca_path is None (the
    writer, on loopback). Through curl: the frozen gridx has no ssl module
    (the binary leaves libssl out). Exit 3 with a hint when the registry does
    not answer (HTTP errors are returned)."""
    argv = ["curl", "--silent", "--show-error", "--http1.1", "--include", "--max-time", str(timeout)]
    argv += ["--cacert", ca_path] if ca_path else ["--noproxy", "*"]
    argv += ["--head"] if method == "HEAD" else ["--request", method]
    if accept:
        argv += ["--header", "Accept: " + ", ".join(accept)]
    result = run(argv + [f"{'https' if ca_path else 'http'}://{address}{path}"], check=False, timeout=timeout + 5)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or [f"curl exit {result.returncode}"])[-1]
        unit = REGISTRY_UNIT if ca_path else REGISTRY_WRITER_UNIT
        raise precondition(
            f"the hub's registry at {address} does not answer: {reason}",
            f"on the hub: gridx hub init (starts it again); systemctl status {unit.removesuffix('.service')}; "
            "from a worker: check the VPN (sudo ./status.sh)",
        )
    return parse_http_response(result.stdout)


def registry_answers(address, ca_path, timeout=2):
    try:
        status, _, _ = registry_request(address, ca_path, "/v2/", timeout=timeout)
    except GridxError:
        return False
    return status == 200


def pid_running(path, config):
    """The pid in path, when that process runs with that config; else None."""
    try:
        pid = int(read_text(path).strip())
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if config.encode() in cmdline else None


def registry_pid(role):
    """The pid of the role's process init started without systemd, when it runs."""
    return pid_running(registry_paths()[f"{role}.pid"], registry_config_path(role))


def stop_pid(path, config):
    """SIGTERM to the process of a pid file (when it is that process), up to
    5 s for it to end; the pid file goes."""
    import signal

    pid = pid_running(path, config)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            if pid_running(path, config) is None:
                break
            time.sleep(0.1)
    if os.path.exists(path):
        os.unlink(path)


def stop_registry(*roles):
    """Stop the processes of these roles (default both): their units, or the
    processes init started."""
    for role in roles or ("writer", "reader"):
        if systemd_running() and os.path.exists(registry_unit_path(role)):
            run(["systemctl", "stop", REGISTRY_ROLES[role][1]], check=False)
        else:
            stop_pid(registry_paths()[f"{role}.pid"], registry_config_path(role))


def stop_single_registry():
    """The single registry of before the split (root, one config.yml in
    /etc/gridx/registry): stopped before anything takes its storage, its
    config and pid file removed. True when there was one."""
    paths = registry_paths()
    found = os.path.exists(paths["config.yml"]) or os.path.exists(paths["registry.pid"])
    unit = registry_unit_path("reader")
    if systemd_running() and os.path.exists(unit) and f"User={REGISTRY_READER_ACCOUNT}\n" not in read_text(unit):
        run(["systemctl", "stop", REGISTRY_UNIT], check=False)  # its unit has the reader's name
        found = True
    stop_pid(paths["registry.pid"], paths["config.yml"])
    if os.path.exists(paths["config.yml"]):
        os.unlink(paths["config.yml"])
    return found


def as_account(role):
    """setpriv's argv prefix: the role's uid, gid and groups only, no new
    privileges (a setuid program gains nothing), a clean environment."""
    account = REGISTRY_ROLES[role][0]
    groups = [f"--groups={REGISTRY_ACCOUNT}"] if role == "reader" else ["--clear-groups"]
    return ["setpriv", f"--reuid={account}", f"--regid={account}", *groups, "--no-new-privs", "--reset-env", "--"]


def start_registry_process(program, role):
    """No systemd (a container, the lab): the role's process as its account,
    in its own session, in the background, logging to its log; its pid in
    ROLE.pid. `gridx hub init` starts it again when it does not run."""
    _, _, log_path, umask = REGISTRY_ROLES[role]
    with open(log_path, "ab") as log, open(os.devnull, "rb") as null:
        # start(): echoed under -v as every command is; its own session (setsid)
        process = start(as_account(role) + [program, "serve", registry_config_path(role)],
                        stdin=null, stdout=log, stderr=log, start_new_session=True, umask=umask)
    atomic_write(registry_paths()[f"{role}.pid"], f"{process.pid}\n", 0o600)


def registry_side(role, hub_ip):
    """(address, CA path or None) a role answers on."""
    if role == "writer":
        return registry_writer(), None
    address = registry_address(hub_ip)
    return address, registry_trust_path(address)


def wait_registry(address, ca_path):
    deadline = time.monotonic() + REGISTRY_WAIT_S
    while not registry_answers(address, ca_path, timeout=1):
        if time.monotonic() > deadline:
            log = "gridx-registry-writer" if ca_path is None else "gridx-registry"
            raise GridxError(f"the registry did not answer on {address} within {REGISTRY_WAIT_S} s",
                             f"look at journalctl -u {log} or /var/log/{log}.log (is the port taken?)")
        time.sleep(0.1)


def ensure_registry_process(config, program, role, changed):
    """One role running its current config: (re)started when its files
    changed or it does not answer. The list of what changed."""
    address, ca_path = registry_side(role, config.hub_ip)
    unit = REGISTRY_ROLES[role][1]
    if systemd_running():
        text = render_registry_unit(role, config.hub_ip, config.interface, program)
        if write_if_changed(registry_unit_path(role), text, 0o644):
            run(["systemctl", "daemon-reload"])
            run(["systemctl", "enable", unit])
            changed = True
        if not changed and registry_answers(address, ca_path):
            return []
        run(["systemctl", "restart", unit])
        return [f"started the registry's {role} on {address} ({unit}, as {REGISTRY_ROLES[role][0]})"]
    if not changed and registry_pid(role) is not None and registry_answers(address, ca_path):
        return []
    stop_registry(role)
    start_registry_process(program, role)
    return [f"started the registry's {role} on {address} as {REGISTRY_ROLES[role][0]} (no systemd: in the "
            f"background, log {REGISTRY_ROLES[role][2]}; gridx hub init starts it again)"]


def registry_ready(config):
    """hub init: the accounts, the CA, the server cert, both configs, the
    storage's owner and both processes running, each changed only when it
    differs (a hub that ran the single root registry is moved over, its
    images kept); the list of what changed. A hub without docker-registry
    or openssl gets a warning."""
    import shutil

    program = shutil.which("docker-registry")
    if program is None or shutil.which("openssl") is None:
        warn("no image registry on this hub: docker-registry or openssl is missing "
             "(apt install docker-registry openssl), then run gridx hub init again")
        return []
    if not systemd_running():
        need("setpriv")
    changes = ensure_registry_accounts()
    paths = registry_paths()
    if ensure_registry_ca():
        changes.append(f"created the registry's CA {paths['ca.crt']} (never made again: bundles carry it)")
    if ensure_registry_cert(config.hub_ip):
        changes.append(f"made the registry's TLS certificate for {config.hub_ip}")
    changed = {
        "reader": install_registry_files("reader", {
            "config.yml": render_reader_config(config.hub_ip),
            "server.crt": read_text(paths["server.crt"]),
            "server.key": read_text(paths["server.key"]),  # a copy its account reads: /etc/gridx is root's
        }),
        "writer": install_registry_files("writer", {"config.yml": render_writer_config()}),
    }
    changes += [f"wrote {registry_config_path(role)}" for role in changed if changed[role]]
    if install_registry_trust(config.hub_ip):
        trust = registry_trust_path(registry_address(config.hub_ip))
        changes.append(f"this hub's Docker trusts the registry ({trust})")
    if stop_single_registry():
        changes.append("stopped the single registry of before (it ran as root, writable over the VPN)")
    if own_registry_storage():
        changes.append(f"gave {registry_storage()} to {REGISTRY_ACCOUNT!r} (its images kept)")
    for role in ("writer", "reader"):
        changes += ensure_registry_process(config, program, role, changed[role])
    for role in ("writer", "reader"):
        wait_registry(*registry_side(role, config.hub_ip))
    return changes


def reset_registry():
    """hub reset: both processes stop, their units, configs and the key's
    copy go, and the server cert (the next init makes them for its
    address); the CA stays (never regenerated), and so do the images and
    the accounts (the hint says where)."""
    stop_single_registry()
    stop_registry()
    reload = False
    for role in REGISTRY_ROLES:
        unit = registry_unit_path(role)
        if os.path.exists(unit):
            if systemd_running():
                run(["systemctl", "disable", REGISTRY_ROLES[role][1]], check=False)
            os.unlink(unit)
            reload = True
    if reload and systemd_running():
        run(["systemctl", "daemon-reload"], check=False)
    import shutil

    shutil.rmtree(os.path.dirname(registry_service_dir("reader")), ignore_errors=True)
    for name in ("server.key", "server.crt", "reader.pid", "writer.pid"):
        path = registry_paths()[name]
        if os.path.exists(path):
            os.unlink(path)


def collect_registry_garbage(config):
    """`docker-registry garbage-collect` as the writer's account, with the
    writer stopped: an upload during a collection could lose a layer the
    collector did not see referenced. The reader goes on serving pulls: a
    read-only registry is what distribution's docs ask for during one."""
    stop_registry("writer")
    try:
        run(as_account("writer") + ["docker-registry", "garbage-collect", registry_config_path("writer")],
            timeout=1800)
    finally:
        registry_ready(config)


def registry_bundle_settings(config):
    """settings.env's GRIDX_REGISTRY for join.sh, when the hub has its CA."""
    if not os.path.exists(registry_paths()["ca.crt"]):
        return {}
    return {"GRIDX_REGISTRY": registry_address(config.hub_ip)}


def registry_bundle_files():
    """The CA a worker installs for the registry (join.sh: registry-ca.crt)."""
    path = registry_paths()["ca.crt"]
    if not os.path.exists(path):
        return {}
    return {REGISTRY_CA_FILE: (read_text(path), 0o644)}


# -- image names --------------------------------------------------------------


def split_image(image):
    """A valid image reference -> (registry host[:port] or "", path, tag, digest)."""
    name, _, digest = image.partition("@")
    slash, colon = name.rfind("/"), name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        return parts[0], "/".join(parts[1:]), tag, digest
    return "", name, tag, digest


def pushed_name(image, address):
    """Where `gridx image push IMAGE` puts it: the same path and tag under
    the hub's registry (python:3.11 -> 10.0.0.1:5000/python:3.11; the
    source's own registry host is dropped)."""
    _, path, tag, digest = split_image(image)
    if digest:
        raise usage_error(f"cannot push {image!r} by digest: a registry stores images under a tag",
                          "push it by name, e.g. team/app:1")
    return f"{address}/{path}:{tag or 'latest'}"


def writer_reference(name):
    """The same repository and tag at the writer, where the hub's Docker
    pushes it: 10.0.0.1:5000/team/app:1 -> 127.0.0.1:5001/team/app:1 (one
    storage: workers then pull it by the first name)."""
    _, path, tag, _ = split_image(name)
    return f"{registry_writer()}/{path}:{tag or 'latest'}"


def registry_reference(name, address):
    """`gridx image rm NAME`: (repository path, tag or digest) in this
    registry; NAME with another registry host is exit 2."""
    domain, path, tag, digest = split_image(name)
    if domain and domain != address:
        raise usage_error(f"{name!r} is not in the hub's registry {address}",
                          f"name it as gridx image ls shows it: {address}/{path}:{tag or 'TAG'}")
    return path, digest or tag


# -- the registry's HTTP API --------------------------------------------------


def parse_link_next(headers):
    """The next page of a paginated list (the Link header), or None."""
    link = headers.get("link") if headers else None
    match = re.match(r'\s*<([^>]+)>\s*;\s*rel="?next"?', link or "")
    return match.group(1) if match else None


def api_json(address, ca_path, path):
    import json

    status, headers, body = registry_request(address, ca_path, path)
    if status != 200:
        raise GridxError(f"the registry answered {status} to GET {path}: {body[:200]}")
    try:
        return json.loads(body), headers
    except ValueError:
        raise GridxError(f"the registry's answer to GET {path} is not JSON") from None


def registry_repositories(address, ca_path):
    """Every repository, following the catalog's pages."""
    repositories, path = [], "/v2/_catalog?n=1000"
    while path:
        document, headers = api_json(address, ca_path, path)
        repositories += document.get("repositories") or []
        path = parse_link_next(headers)
    return sorted(repositories)


def registry_tags(address, ca_path, repository):
    """A repository's tags (none once its last tag was removed, or before
    its first was pushed)."""
    import urllib.parse

    tags, path = [], f"/v2/{urllib.parse.quote(repository)}/tags/list?n=1000"
    status, _, body = registry_request(address, ca_path, path)
    if status == 404 and "NAME_UNKNOWN" in body:
        return []
    while path:
        document, headers = api_json(address, ca_path, path)
        tags += document.get("tags") or []
        path = parse_link_next(headers)
    return sorted(tags)


def manifest_blobs(manifest):
    """{digest: size} of what an image manifest references (config, layers)."""
    blobs = {}
    for item in [manifest.get("config") or {}] + list(manifest.get("layers") or []):
        if item.get("digest"):
            blobs[item["digest"]] = int(item.get("size") or 0)
    return blobs


def registry_manifest(address, ca_path, repository, reference, method="GET"):
    """(digest, manifest document or None) of a tag or digest; None digest
    when the registry does not have it."""
    import json
    import urllib.parse

    path = f"/v2/{urllib.parse.quote(repository)}/manifests/{urllib.parse.quote(reference)}"
    status, headers, body = registry_request(address, ca_path, path, method=method, accept=MANIFEST_TYPES)
    if status == 404:
        return None, None
    if status != 200:
        raise GridxError(f"the registry answered {status} to {method} {path}")
    digest = headers.get("docker-content-digest")
    return digest, (json.loads(body) if method == "GET" else None)


def image_blobs(address, ca_path, repository, reference):
    """(digest, {blob digest: size}) of a tag: an index's images summed."""
    digest, manifest = registry_manifest(address, ca_path, repository, reference)
    if digest is None:
        return None, {}
    blobs = {}
    if manifest.get("mediaType") in LIST_TYPES or "manifests" in manifest:
        for child in manifest.get("manifests") or []:
            blobs.update(image_blobs(address, ca_path, repository, child["digest"])[1])
    else:
        blobs = manifest_blobs(manifest)
    return digest, blobs


def registry_images(address, ca_path):
    """Every tag of every repository: the stable --json shape of `image ls`,
    and the bytes the distinct blobs take (layers shared count once)."""
    images, every_blob = [], {}
    for repository in registry_repositories(address, ca_path):
        for tag in registry_tags(address, ca_path, repository):
            digest, blobs = image_blobs(address, ca_path, repository, tag)
            if digest is None:
                continue  # removed between the two calls
            every_blob.update(blobs)
            images.append({"name": f"{address}/{repository}:{tag}", "repository": repository, "tag": tag,
                           "digest": digest, "size_bytes": sum(blobs.values())})
    return images, sum(every_blob.values())


# ---------------------------------------------------------------------------
# Bundles
# ---------------------------------------------------------------------------

BUNDLE_SCRIPTS = ("join.sh", "leave.sh", "status.sh", "jobnet.sh", "agent.sh", "lib.sh")


def templates_dir():
    """bundle_templates/ inside the frozen binary, beside this file (a
    checkout), or where `pip install` put them (pyproject.toml's data-files):
    PREFIX/share/gridx/bundle_templates, PREFIX being the one this module was
    installed into (PREFIX/lib/pythonX.Y/site-packages: a venv, ~/.local,
    /usr/local), else sys.prefix."""
    frozen = getattr(sys, "_MEIPASS", None)
    if frozen:
        return os.path.join(frozen, "bundle_templates")
    here = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join("share", "gridx", "bundle_templates")
    candidates = (
        os.path.join(here, "bundle_templates"),
        os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(here))), installed),
        os.path.join(sys.prefix, installed),
    )
    return next((path for path in candidates if os.path.isdir(path)), candidates[0])


def shell_quote(value):
    return "'" + str(value).replace("'", "'\\''") + "'"


def render_settings(settings):
    lines = ["# Grid-X bundle settings: values only, read by join.sh, leave.sh and status.sh."]
    lines += [f"{key}={shell_quote(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def worker_settings(name, interface, vpn_ip, hub_ip, endpoint, subnet, manager, needs_private_key):
    """A worker bundle's settings.env values: the one place they are named
    (join.sh, leave.sh and status.sh read them; lib.sh checks them). Built
    from the hub's records (bundle_settings) or from a worker config
    (parse_worker_conf)."""
    return {
        "GRIDX_NAME": name,
        "GRIDX_INTERFACE": interface,
        "GRIDX_VPN_IP": vpn_ip,
        "GRIDX_HUB_VPN_IP": hub_ip,
        "GRIDX_HUB_ENDPOINT": endpoint,
        "GRIDX_SUBNET": subnet,
        "GRIDX_MANAGER": manager,
        "GRIDX_NEEDS_PRIVATE_KEY": "1" if needs_private_key else "0",
        "GRIDX_VERSION": VERSION,
        "GRIDX_AGENT_PORT": str(AGENT_PORT),  # agent.sh reports there
    }


def bundle_settings(config, peer, key_on_hub):
    settings = worker_settings(peer.name, config.interface, peer.ip, config.hub_ip, config.endpoint, config.subnet,
                               config.manager, not key_on_hub)
    if config.job_allow:  # jobnet.sh applies it on the worker
        settings["GRIDX_JOB_ALLOW"] = " ".join(config.job_allow)
    return dict(settings, **registry_bundle_settings(config))  # GRIDX_REGISTRY: see Registry


BUNDLE_README = """Grid-X join bundle for {name}

This folder lets this computer share its CPUs, memory and GPUs with the
Grid-X hub at {endpoint}. It holds secrets (a VPN key, a swarm token):
keep it private.

  sudo ./join.sh            join: asks how many CPUs, how much RAM and how
                            many GPUs to share (or: --cpus 4 --memory 8G
                            --gpus 0 --yes)
  sudo ./status.sh          is the link up, is the node in the swarm
  sudo ./leave.sh           leave and restore everything join changed
{key_note}"""

KEY_NOTE = """
This bundle holds no private key (the hub admin added it with --pubkey).
Give join.sh the key you created:  sudo ./join.sh --private-key private.key
"""


def write_bundle(folder, files, private_parent=True):
    """Write a bundle folder (0700) atomically, and a .tar.gz beside it.

    files: {relative name: (content, mode)}. An existing bundle of the same
    name is replaced whole: readers see the old folder or the new one. The
    parent is the hub's own 0700 bundles folder, or (private_parent False) a
    user's add-peer --out folder, left as it is; nothing here follows a
    symbolic link (check_bundle_target refused them before anything was saved).
    """
    import shutil
    import tarfile
    import tempfile

    parent = os.path.dirname(folder)
    if private_parent:
        ensure_dir(parent)
    else:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    check_bundle_target(folder)
    staging = tempfile.mkdtemp(prefix=".bundle-", dir=parent)
    fd, tmp_archive = tempfile.mkstemp(prefix=".bundle-", suffix=".tar.gz", dir=parent)  # 0600, O_EXCL
    old = None
    try:
        os.chmod(staging, 0o700)
        token = files.get("swarm-token") if private_parent else None
        write_files(staging, {name: item for name, item in files.items() if not (token and name == "swarm-token")})
        if token:  # the hub's own bundles share one token file (see hub_token_path)
            store_join_token(token[0].strip())
            os.link(hub_token_path(), os.path.join(staging, "swarm-token"))
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            tar.add(staging, arcname=os.path.basename(folder))
        if os.path.lexists(folder):
            old = tempfile.mkdtemp(prefix=".old-bundle-", dir=parent)
            os.rename(folder, os.path.join(old, "bundle"))
        os.rename(staging, folder)
        os.replace(tmp_archive, folder + ".tar.gz")  # replaces a name, never follows it
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if os.path.lexists(tmp_archive):
            os.unlink(tmp_archive)
        if old and not os.path.lexists(folder):
            os.rename(os.path.join(old, "bundle"), folder)
        raise
    finally:
        if old:
            shutil.rmtree(old, ignore_errors=True)


def hub_token_path():
    """The one copy of the worker join token that every bundle on the hub
    links to (its swarm-token is a hard link), so a rotation rewrites one
    file, not every bundle: remove-peer costs the same with 2 peers or 250."""
    return os.path.join(bundles_dir(), ".swarm-token")


def store_join_token(token):
    """Write the join token into hub_token_path() in place (its inode, which
    the bundles link to, stays)."""
    ensure_dir(bundles_dir())
    fd = os.open(hub_token_path(), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "r+") as handle:
        handle.truncate(0)
        handle.write(token + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def linked_to_hub_token(folder):
    """Whether a bundle's swarm-token is hub_token_path() (older bundles
    hold a copy of their own)."""
    try:
        return os.path.samefile(os.path.join(folder, "swarm-token"), hub_token_path())
    except OSError:
        return False


def write_files(folder, files):
    """Create each of files ({name: (content, mode)}) new in folder, with its
    mode, never through a symbolic link."""
    for name, (content, mode) in files.items():
        path = os.path.join(folder, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(content if isinstance(content, bytes) else content.encode())
        os.chmod(path, mode)


def check_bundle_target(folder):
    """Refuse to write a bundle through a symbolic link, or over something
    that is not an earlier bundle (exit 2)."""
    parent = os.path.dirname(folder)
    archive = folder + ".tar.gz"
    problem = None
    if os.path.islink(parent):
        problem = f"{parent} is a symbolic link"
    elif os.path.lexists(parent) and not os.path.isdir(parent):
        problem = f"{parent} is not a folder"
    elif not os.path.lexists(parent):
        ancestor = os.path.dirname(parent)
        while not os.path.lexists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            problem = f"{parent} cannot be made: {ancestor} is not a folder"
    elif os.path.islink(folder) or os.path.islink(archive):
        problem = f"{folder if os.path.islink(folder) else archive} is a symbolic link"
    elif os.path.lexists(folder) and not os.path.isdir(folder):
        problem = f"{folder} exists and is not a bundle folder"
    elif os.path.lexists(archive) and not os.path.isfile(archive):
        problem = f"{archive} exists and is not a file"
    if problem:
        raise usage_error(f"cannot write the bundle: {problem}", "choose another --out folder, or move that away")


def bundle_contents(settings=None, conf=None, token=None, ssh_key="", readme=None):
    """A worker bundle's files, {name: (content, mode)}: the scripts, and with
    settings their values (the WireGuard config, the join token, the hub's
    SSH key when known), and a README. The one definition of a bundle: the
    hub's (bundle_files) and `gridx worker`'s (materialise_bundle)."""
    files = {}
    for script in BUNDLE_SCRIPTS:
        path = os.path.join(templates_dir(), script)
        try:
            with open(path, "rb") as handle:
                content = handle.read()
        except FileNotFoundError:
            raise GridxError(f"bundle template {path} is missing", "reinstall gridx") from None
        files[script] = (content, 0o644 if script == "lib.sh" else 0o755)
    if settings:
        files["settings.env"] = (render_settings(settings), 0o600)
        files[f"{settings['GRIDX_INTERFACE']}.conf"] = (conf, 0o600)
        files["swarm-token"] = (token + "\n", 0o600)
        if ssh_key:
            files["hub_ssh.pub"] = (ssh_key + "\n", 0o644)
    if readme:
        files["README.txt"] = (readme, 0o644)
    return files


def bundle_files(config, peer, worker_conf, token, ssh_key, key_on_hub):
    """The bundle the hub writes for a peer (add-peer, refresh-bundle)."""
    readme = BUNDLE_README.format(
        name=peer.name, endpoint=config.endpoint, key_note="" if key_on_hub else KEY_NOTE
    )
    files = bundle_contents(bundle_settings(config, peer, key_on_hub), worker_conf, token, ssh_key, readme)
    files.update(registry_bundle_files())  # the registry's CA: see Registry
    return files


def refresh_bundle(config, name, token, ssh_key, out_dir=None):
    """Rewrite a peer's bundle from the hub's record of it (its client config)
    with the current join token and templates. Returns the folder."""
    peer = config.peers[name]
    try:
        conf = read_text(client_conf_path(name))
    except FileNotFoundError:
        raise GridxError(f"{client_conf_path(name)} is missing",
                         f"re-add the peer: gridx hub remove-peer {name}, then add-peer") from None
    folder = bundle_path(name, out_dir)
    write_bundle(folder, bundle_files(config, peer, conf, token, ssh_key, peer.key_on_hub), out_dir is None)
    return folder


def remove_bundle(name):
    import shutil

    folder = bundle_path(name)
    shutil.rmtree(folder, ignore_errors=True)
    for path in (folder + ".tar.gz", client_conf_path(name)):
        if os.path.exists(path):
            os.unlink(path)


# ---------------------------------------------------------------------------
# Accounts
# ---------------------------------------------------------------------------
# People who submit jobs without being root anywhere. A user is a VPN peer
# that is not a swarm node (no resources, not in `cluster`); it reaches the
# hub over SSH as the unprivileged account USER_ACCOUNT, whose authorized_keys
# (written by gridx, root-owned) force `gridx serve NAME` on every key: serve
# runs only `gridx jobs …` and `gridx cluster`, with the owner set to NAME
# (see Remote). The account is in the docker group (serve needs the socket),
# so it must never reach a shell: the forced command, `restrict` (no
# forwarding, no pty, no ~/.ssh/rc) and the firewall's USERS_CHAIN (a user's
# VPN address reaches the hub's SSH port only) are what keep it there.

HOST_KEY_PATH = "/etc/ssh/ssh_host_ed25519_key.pub"
USER_WG_INTERFACE = "gridx-user"  # the user's side: beside a worker's gridx0


def limits_from_args(args, allow_default=True):
    """{key: number, None (no limit), or ... (back to the default)} for the
    --max-… flags given."""
    found = {}
    for key, flag in LIMIT_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is None:
            continue
        limit = parse_limit(value, key)
        if limit is ... and not allow_default:
            raise usage_error(f"{flag} default: these are the defaults", "give a number or none")
        found[key] = limit
    return found


def show_limit(key, value):
    if value is None:
        return "-"
    return human_mib(value) if key.endswith("_mib") else str(value)


def authorized_keys_line(name, ssh_key, program=None):
    """One line of the account's authorized_keys: every key forces `gridx
    serve NAME`; `restrict` forbids port, agent and X11 forwarding, a pty and
    ~/.ssh/rc. No pty: Ctrl-C reaches serve as the end of its session's input
    (see watch_session_end)."""
    program = program or own_program()
    if any(c in program for c in '"\\\n'):
        raise precondition(f"gridx's path {program!r} has a quote, backslash or newline, "
                           "which an authorized_keys command cannot hold", "install gridx in another folder")
    return f'command="{program} serve {valid_name(name, "user name")}",restrict {ssh_key} gridx-user-{name}'


def render_authorized_keys(config, program=None):
    lines = [f"{CONFIG_MARKER}: every key runs `gridx serve NAME` only. Change it with",
             "# gridx hub add-user/remove-user: this file is rewritten from /etc/gridx/hub_config.json."]
    lines += [authorized_keys_line(user.name, user.ssh_key, program) for user in
              sorted(config.users.values(), key=lambda u: u.name) if user.name not in RESERVED_NAMES]
    return "\n".join(lines) + "\n"


def render_users_limits(config):
    import json

    document = {"users": {name: effective_limits(config, user) for name, user in sorted(config.users.items())},
                "hub": hub_limits(config)}
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def write_user_access(config):
    """The account's authorized_keys and users.json, root-owned in root-owned
    folders (the account reads them, changes nothing), atomically."""
    home = users_home()
    for folder in (os.path.dirname(home), home, os.path.join(home, ".ssh")):
        os.makedirs(folder, mode=0o755, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(folder, 0, 0)
        os.chmod(folder, 0o755)
    atomic_write(authorized_keys_path(), render_authorized_keys(config), 0o644)
    atomic_write(users_limits_path(), render_users_limits(config), 0o644)
    if not os.path.exists(users_lock_path()):
        write_new_file(users_lock_path(), "", 0o644)
    for name in sorted(set(config.users) & RESERVED_NAMES):  # added before names were reserved
        warn(f"user {name!r} has a reserved name: their key no longer logs in; "
             f"remove them (gridx hub remove-user {name}) and add them again under another name")


def refuse_hub_login(name):
    """A member is never named like an account of the hub: a login in the
    docker group that submits there owns its jobs under its own name."""
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return
    raise usage_error(f"{name!r} is an account on the hub: a member of that name would own its jobs",
                      "pick another name for the user")


def ensure_user_account():
    """The unprivileged account users log in as, in the docker group (serve
    runs docker), with its home root-owned. Returns what changed."""
    import grp
    import pwd

    changes = []
    try:
        pwd.getpwnam(USER_ACCOUNT)
    except KeyError:
        need("useradd")
        # password "*": no password, and not "!" (locked), which sshd without PAM refuses keys for too
        run(["useradd", "--system", "--password", "*", "--home-dir", users_home(), "--no-create-home",
             "--shell", "/bin/sh",
             "--comment", "Grid-X users (gridx serve only)", "--", USER_ACCOUNT])
        changes.append(f"created the account {USER_ACCOUNT!r} (users log in as it; it runs gridx serve only)")
    try:
        docker_group = grp.getgrnam("docker")
    except KeyError:
        raise precondition("there is no docker group: gridx serve needs the Docker socket",
                           "install Docker from your distribution (docker.io), which makes the group") from None
    if USER_ACCOUNT not in docker_group.gr_mem:
        run(["usermod", "--append", "--groups", "docker", "--", USER_ACCOUNT])
        changes.append(f"added {USER_ACCOUNT!r} to the docker group (for gridx serve)")
    if os.path.isdir(results_dir()) and os.stat(results_dir()).st_uid != pwd.getpwnam(USER_ACCOUNT).pw_uid:
        hand_over(results_dir())  # results collected before there were users: serve hands them out
        changes.append(f"gave {results_dir()} to {USER_ACCOUNT!r} (gridx serve hands users their results)")
    return changes


def user_account_ready(config):
    """hub init: the account and its files, when the hub has users already."""
    changes = ensure_user_account()
    write_user_access(config)
    return changes


def reset_users():
    """hub reset: no user can log in any more, and their firewall chain
    goes (the account itself stays, unused; a new hub init reuses it)."""
    for path in (authorized_keys_path(), users_limits_path()):
        if os.path.exists(path):
            os.unlink(path)
    run(["iptables", "-D", "FORWARD", "-j", USERS_CHAIN], check=False)
    run(["iptables", "-F", USERS_CHAIN], check=False)
    run(["iptables", "-X", USERS_CHAIN], check=False)


def host_key_line(config):
    """known_hosts for the user: the hub's SSH host key at its VPN address."""
    try:
        kind, blob = read_text(HOST_KEY_PATH).split()[:2]
    except FileNotFoundError:
        raise precondition(f"{HOST_KEY_PATH} not found: users reach the hub over SSH",
                           f"install the SSH server: {install_hint(['openssh-server'])}") from None
    except ValueError:
        raise GridxError(f"{HOST_KEY_PATH} is not an SSH public key", "ssh-keygen -A makes the host keys") from None
    return f"{config.hub_ip} {kind} {blob}"


USER_README = """Grid-X user bundle for {name}

This folder lets you submit jobs to the Grid-X hub at {endpoint} from this
computer: you need WireGuard and ssh here, nothing else (no Docker, no
Python with the gridx binary). It holds secrets: keep it private.

1. Join the VPN (your address {ip}, the hub {hub_ip}):
     sudo install -m 600 {interface}.conf /etc/wireguard/{interface}.conf
     sudo wg-quick up {interface}
{key_step}
2. Trust the hub's SSH host key, and keep your SSH key:
     install -d -m 700 ~/.ssh
     cat known_hosts >> ~/.ssh/known_hosts
{ssh_step}
3. Submit jobs (they run as {name}; you manage only your own):
     set -a; . ./settings.env; set +a      # GRIDX_MANAGER={manager}
     gridx jobs run python:3.11 "python -c 'print(2**100)'" --wait
     gridx jobs list --mine
     gridx cluster
   or name the hub on each command:
     gridx jobs run python:3.11 "python -c 'print(2**100)'" --wait --manager {manager}

   Without gridx, ssh alone does the same:
     ssh {manager} jobs list
{limits}"""


def user_bundle_files(config, user, private_wg_key, private_ssh_key, host_key):
    settings = {"GRIDX_USER": user.name, "GRIDX_HUB_VPN_IP": config.hub_ip,
                "GRIDX_MANAGER": f"{USER_ACCOUNT}@{config.hub_ip}", "GRIDX_VERSION": VERSION}
    if private_ssh_key:
        settings["GRIDX_SSH_KEY"] = f"~/.ssh/gridx-{user.name}"
    limits = effective_limits(config, user)
    shown = ", ".join(f"{key.replace('_mib', '')} {show_limit(key, value)}" for key, value in limits.items()
                      if value is not None)
    readme = USER_README.format(
        name=user.name, endpoint=config.endpoint, ip=user.ip, hub_ip=config.hub_ip, interface=USER_WG_INTERFACE,
        manager=settings["GRIDX_MANAGER"],
        key_step="" if private_wg_key else (
            "   This config holds no private key (the hub admin added you with --wg-pubkey):\n"
            f"   put yours in place of {PRIVATE_KEY_PLACEHOLDER} first.\n"),
        ssh_step=(f"     install -m 600 id_ed25519 ~/.ssh/gridx-{user.name}   # settings.env names it"
                  if private_ssh_key else "   (your own SSH key: the hub has only its public half)"),
        limits=f"\nYour limits: {shown}.\n" if shown else "",
    )
    files = {
        f"{USER_WG_INTERFACE}.conf": (render_user_wg_conf(config, user, private_wg_key), 0o600),
        "known_hosts": (host_key + "\n", 0o644),
        "settings.env": (render_settings(settings).replace(  # the header names a worker bundle's scripts
            render_settings({}), "# Grid-X user settings, values only: set -a; . ./settings.env; set +a\n"), 0o644),
        "README.txt": (readme, 0o644),
    }
    if private_ssh_key:
        files["id_ed25519"] = (private_ssh_key, 0o600)
        files["id_ed25519.pub"] = (user.ssh_key + f" gridx-user-{user.name}\n", 0o644)
    return files


def new_ssh_keypair(name):
    """(private key text, public key line), made in a private temp folder
    that is gone afterwards: the private key lives only in the bundle."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix=".sshkey-", dir=config_dir())
    try:
        path = os.path.join(folder, "key")
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"gridx-user-{name}", "-f", path])
        return read_text(path), valid_user_ssh_key(read_text(path + ".pub"), "the new key")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------
# A job is a swarm service labelled gridx.job; its tasks say where and how it
# ran. Docker's output is read in "reading the swarm" only, into Task and
# Resources (and Node, see Swarm); what follows reads those types.
#   what a job asks for · reading the swarm · job state · running again · waiting

ACTIVE_TASK_STATES = (
    "new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting", "running",
)
UNPLACED_TASK_STATES = ("new", "allocated", "pending")  # active, but on no node yet
# Docker 20.10's swarm constraint enforcer re-checks a node's generic
# resources whenever the node changes (it joins a network, gets a label, its
# engine restarts) and can reject a task that holds them with this error
# although the task fits: seen in the lab on a fresh worker's first GPU job.
# Such a task did not fail by itself, so it is run again, a bounded number of
# times (see "running again").
ENFORCER_REJECTION = "assigned node no longer meets constraints"
ENFORCER_RERUNS = 3
LOG_QUIET_S = 0.1  # `--wait`: a job's logs are over once quiet this long...
LOG_DRAIN_S = 2.0  # ...or after this long past the job's end


# -- what a job asks for ------------------------------------------------------


def new_job_id(prefix="job"):
    import secrets

    return f"{prefix}-{secrets.token_hex(3)}"


class JobRequest:
    """What a job asks for, validated from the command line."""

    def __init__(self, cpus, memory, gpus):
        import math

        self.cpus = parse_cpus(cpus)
        self.memory = parse_memory(memory)
        self.gpus = parse_count(gpus, "--gpus", 0)
        self.cpu_units = math.ceil(self.cpus)
        self.memory_mib = math.ceil(self.memory / 1024**2)

    @property
    def resources(self):
        """What the swarm reserves for each of its tasks."""
        return Resources(self.cpu_units, self.memory_mib, self.gpus)

    def service_args(self):
        args = [
            "--generic-resource", f"{RES_CPU}={self.cpu_units}",
            "--generic-resource", f"{RES_MEM}={self.memory_mib}",
            "--limit-cpu", f"{self.cpus:g}",
            "--limit-memory", str(self.memory),
        ]
        if self.gpus:
            args += ["--generic-resource", f"{RES_GPU}={self.gpus}"]
        return args

    def describe(self):
        text = f"{self.cpus:g} CPU, {human_mib(self.memory_mib)}"
        return text + (f", {self.gpus} GPU" if self.gpus else "")


def worker_nodes(nodes):
    """The nodes that run jobs: the workers, and a manager that shares."""
    return [n for n in nodes if not n.manager or n.shared.cpus]


def check_fits(request, nodes):
    """Refuse at once a job no single worker could ever hold (nodes: Node)."""
    workers = [n for n in worker_nodes(nodes) if n.shared.cpus and n.availability == "active"]
    if not workers:
        raise precondition(
            "no worker shares resources yet", "add one: gridx hub add-peer NAME, then run its join.sh"
        )
    asks = request.resources
    if any(asks.fits(node.shared) for node in workers):
        return
    wants = [
        (asks.gpus, "GPU", lambda n: n.shared.gpus, str),
        (asks.cpus, "CPU", lambda n: n.shared.cpus, str),
        (asks.memory_mib, "memory", lambda n: n.shared.memory_mib, human_mib),
    ]
    for wanted, what, amount, show in wants:
        biggest = max(workers, key=amount)
        if wanted > amount(biggest):
            raise usage_error(
                f"no worker can hold this job: it asks for {show(wanted)} {what}, the biggest worker "
                f"({biggest.hostname}) shares {show(amount(biggest))}",
                "a job runs on one worker; ask for less",
            )
    raise usage_error(
        f"no single worker shares {request.describe()} at once", "a job runs on one worker; ask for less"
    )


def job_labels(job_id, kind, command, extra=()):
    # --flag=VALUE: a value never reads as an option (see create_job)
    labels = [
        f"--label={LABEL_JOB}={job_id}",
        f"--label={LABEL_KIND}={kind}",
        f"--label={LABEL_CREATED}={int(time.time())}",
    ]
    if command:
        labels.append(f"--label={LABEL_CMD}={command}")
    labels.append(f"--label={LABEL_OWNER}={job_owner()}")
    for key, value in extra:
        labels.append(f"--label={key}={value}")
    return labels


def job_command(command):
    """One string runs under `sh -c`; several words run as given."""
    if not command:
        return [], ""
    if len(command) == 1:
        return ["sh", "-c", command[0]], command[0]
    import shlex

    return list(command), shlex.join(command)


def run_naming(argv, job_id, input=None):
    """Run a docker create call; a name already taken is the user's to fix."""
    result = run(argv, check=False, input=input)
    if result.returncode != 0:
        if "AlreadyExists" in result.stderr or "already exists" in result.stderr:
            raise usage_error(f"a job named {job_id!r} exists",
                              f"pick another --name, or: gridx jobs delete {job_id}")
        raise command_error(argv, result)
    return result


def create_job(job_id, image, request, *, kind, command_argv, command_text, mode, replicas,
               env=(), restart="none", extra_args=(), extra_labels=()):
    """`docker service create`: every value a user gave is in --flag=VALUE
    form, so pflag never reads it as a flag, and `--` comes before the image
    (validated as well), so neither it nor the command is ever an option."""
    argv = docker(
        "service", "create", "--detach", "--quiet", "--no-resolve-image",
        f"--name={job_id}",
        f"--mode={mode}",
        f"--restart-condition={restart}",
        *job_labels(job_id, kind, command_text, extra_labels),
        *request.service_args(),
    )
    if mode == "replicated-job":
        argv.append(f"--replicas={replicas}")
    if not request.gpus:
        # Where the nvidia runtime is Docker's default, an image that sets
        # NVIDIA_VISIBLE_DEVICES=all (pytorch's does) would see every GPU of
        # the worker; the service's value wins over the image's. A job with
        # GPUs gets the swarm's assignment from the toolkit (swarm-resource).
        argv.append(f"--env={NVIDIA_ENV}=void")
    argv += [f"--env={item}" for item in env]
    argv += list(extra_args)
    argv += ["--", image, *command_argv]
    with user_limits_checked(request, replicas if mode == "replicated-job" else 1):
        run_naming(argv, job_id)


# -- reading the swarm --------------------------------------------------------
# The only place that reads the Engine API's services and tasks (their JSON
# is what `docker service inspect` and `docker inspect TASK` print), into
# Task and Resources: a fixed number of requests whatever the number of jobs.


class Task:
    """One task of a job, made once from the Engine API's task. Its node is
    node_id; node is that node's hostname, for display only."""

    __slots__ = ("id", "name", "service", "node_id", "node", "state", "since", "desired", "error", "exit_code",
                 "slot", "created", "container", "container_exit", "gpus")

    def __init__(self, id="", name="", service="", node_id="", node="", state="", since="", desired="", error="",
                 exit_code=None, slot=0, created="", container="", container_exit=None, gpus=()):
        self.id, self.name, self.service, self.node_id, self.node = id, name, service, node_id, node
        self.state, self.since, self.desired, self.error = state, since, desired, error
        self.exit_code = exit_code_from(state, error) if exit_code is None else exit_code
        self.slot, self.created, self.container, self.container_exit = slot, created, container, container_exit
        self.gpus = list(gpus)

    @classmethod
    def from_api(cls, task, service, hostnames, now=None):
        """task: the API's; service: its job's name; hostnames: {node ID:
        hostname}. Named and dated as `docker service ps` shows it."""
        status = task.get("Status") or {}
        container = status.get("ContainerStatus") or {}
        node_id, slot = task.get("NodeID") or "", task.get("Slot") or 0
        return cls(id=task.get("ID", ""), name=f"{service}.{slot or node_id}", service=service, node_id=node_id,
                   node=hostnames.get(node_id, node_id), state=(status.get("State") or "").lower(),
                   since=docker_ago(status.get("Timestamp"), now), desired=(task.get("DesiredState") or "").lower(),
                   error=status.get("Err") or "", slot=slot, created=task.get("CreatedAt") or "",
                   container=container.get("ContainerID") or "", container_exit=container.get("ExitCode"),
                   gpus=generic_resources(task.get("GenericResources"))[1])

    @property
    def active(self):
        """Pending, starting or running: not over."""
        return self.state in ACTIVE_TASK_STATES

    @property
    def placed(self):
        """Active on a node: it holds that node's resources."""
        return self.active and self.state not in UNPLACED_TASK_STATES

    def to_dict(self):
        """The stable --json shape of a job's task."""
        return {"id": self.id, "name": self.name, "node": self.node, "node_id": self.node_id, "state": self.state,
                "since": self.since, "error": self.error, "exit_code": self.exit_code}


def exit_code_from(state, error):
    """A task's exit status: 0 once complete, N from "non-zero exit (N)"."""
    if state == "complete":
        return 0
    match = re.search(r"non-zero exit \((\d+)\)", error)
    return int(match.group(1)) if match else None


def is_current(task, batch=True):
    """False for a task that was replaced: run again, orphaned or restarted.

    A batch job's task that ended by itself (even failed, desired state
    Shutdown) stays current, so its exit status stays visible; a task that
    Grid-X ran again elsewhere has desired state Remove. A long-running
    service's restarted tasks (desired Shutdown) are history.
    """
    if task.desired == "remove" or task.state == "orphaned":
        return False
    return batch or task.desired != "shutdown"


def list_job_services(job_ids=None, missing_ok=False):
    """Every Grid-X job's service (one request), or the named ones in that
    order (missing_ok: [] for a job that is not there, else exit 2)."""
    if job_ids is None:
        return engine_get("/services", {"label": [LABEL_JOB]})
    wanted = list(dict.fromkeys(job_ids))
    # the name filter matches prefixes: job-1 finds job-10 too
    found = {s["Spec"]["Name"]: s for s in engine_get("/services", {"name": wanted})}
    missing = [name for name in wanted if name not in found]
    if missing:
        if missing_ok:
            return []
        raise usage_error(f"no job {missing[0]!r}", "list the jobs: gridx jobs list")
    services = [found[name] for name in wanted]
    for service in services:
        if LABEL_JOB not in (service["Spec"].get("Labels") or {}):
            raise usage_error(f"{service['Spec']['Name']!r} is not a Grid-X job", "list the jobs: gridx jobs list")
    return services


def service_names(services):
    return [service["Spec"]["Name"] for service in services]


def list_tasks(services, nodes=None):
    """The tasks of these job services, as Tasks in `docker service ps`'s
    order: one request, and one for the nodes' hostnames unless nodes (all
    identities: all_swarm_nodes()) are given.

    By the services' IDs, as `docker service ps` asks: Docker 20.10 keeps
    the tasks of deleted jobs (on the lab, all 1285 of them 40 minutes after
    the deletes; 28.5 removes them), and a filter on the jobs' label would
    read them all on every call.
    """
    if not services:
        return []
    names = {service["ID"]: service["Spec"]["Name"] for service in services}
    try:
        found = engine_get("/tasks", {"service": list(names)})
    except EngineError as error:
        if error.status != 404:
            raise
        # a job deleted since its service was read: the others' tasks, by their label
        found = engine_get("/tasks", {"label": [LABEL_JOB]})
    found = [task for task in found if task.get("ServiceID") in names]
    if nodes is None:
        nodes = all_swarm_nodes() if any(task.get("NodeID") for task in found) else []
    return tasks_from_api(found, names, {node.id: node.hostname for node in nodes})


def tasks_of(job_id, hostnames=None):
    """Every task of one job, by its name, as Tasks: one request (`--wait`
    polls this). hostnames: {node ID: hostname} the caller keeps; read
    again (one request) when a task is on a node it lacks."""
    found = engine_get("/tasks", {"service": [job_id]})
    hostnames = {} if hostnames is None else hostnames
    if any(task.get("NodeID") and task["NodeID"] not in hostnames for task in found):
        hostnames.update((node.id, node.hostname) for node in all_swarm_nodes())
    return tasks_from_api(found, {task.get("ServiceID"): job_id for task in found}, hostnames)


def tasks_from_api(found, names, hostnames):
    """The API's tasks as Tasks (names: {service ID: job name}), sorted as
    `docker service ps` sorts them: by name in natural order (job.2 before
    job.10; a task of slot 0 is named by its node ID), the newest first."""
    now = time.time()
    tasks = [Task.from_api(task, names[task.get("ServiceID")], hostnames, now) for task in found]
    tasks.sort(key=lambda t: t.created, reverse=True)
    tasks.sort(key=lambda t: (t.service, [(0, int(part), "") if part.isdigit() else (1, 0, part)
                                          for part in re.findall(r"[0-9]+|[^0-9]+", t.name)]))
    return tasks


def tasks_by_service(tasks):
    """{service name: its tasks}."""
    by_service = {}
    for task in tasks:
        by_service.setdefault(task.service, []).append(task)
    return by_service


def service_request(service):
    """The Resources each task of a service reserves (its generic resources)."""
    spec = (service["Spec"]["TaskTemplate"].get("Resources") or {}).get("Reservations") or {}
    return generic_resources(spec.get("GenericResources"))[0]


def log_sources(job_id):
    """What of a job's logs can be read: (sources, {node ID: its name to
    show} of the nodes that cannot).

    The job itself, in one stream, unless one of its tasks ran on a node
    that is not Ready: Docker 20.10 then waits forever for that node's part
    of the stream and 26.1 fails it whole ("incomplete log stream"). Then
    the tasks on the nodes that are up, one by one. One request when every
    node is Ready, two when one is not.
    """
    nodes = all_swarm_nodes()
    down = {node.id: node for node in nodes if node.state != "ready"}
    if not down:
        return [job_id], {}
    tasks = tasks_of(job_id, {n.id: n.hostname for n in nodes})
    lost = {t.node_id for t in tasks if t.node_id in down}
    if not lost:
        return [job_id], {}
    tasks.sort(key=lambda t: (t.slot, t.created))
    names = node_names(nodes)
    return [t.id for t in tasks if t.node_id and t.node_id not in down], {i: names[i] for i in sorted(lost)}


def jobs_overview(job_ids=None):
    """(services, tasks, jobs, nodes) of every job or the named ones, in a
    fixed number of requests: the services, their tasks, the nodes (one
    identity per address, see swarm_nodes)."""
    services = list_job_services(job_ids)
    every_node = all_swarm_nodes()
    tasks = list_tasks(services, every_node)
    by_service = tasks_by_service(tasks)
    jobs = [job_summary(s, by_service.get(s["Spec"]["Name"], [])) for s in services]
    return services, tasks, jobs, swarm_nodes(every_node)


# -- job state ----------------------------------------------------------------


def job_replicas(mode):
    """How many tasks a job wants: completions of a batch job, else replicas."""
    if "ReplicatedJob" in mode:
        return int(mode["ReplicatedJob"].get("TotalCompletions", 1))
    return int(mode.get("Replicated", {}).get("Replicas", 1))


def job_tasks(tasks, batch=True):
    """The Tasks that make a job's state."""
    current = [t for t in tasks if is_current(t, batch)]
    if any(t.state != "rejected" for t in current):
        # A task rejected by the constraint enforcer (see ENFORCER_REJECTION)
        # and then run again is history: the task that ran is the record.
        current = [t for t in current if t.state != "rejected"]
    return current


def job_state(tasks, wanted, kind):
    states = [t.state for t in tasks]
    if not states:
        return "pending"
    if any(s == "running" for s in states):
        return "running"
    if any(s in UNPLACED_TASK_STATES for s in states):
        return "pending"
    if any(s in ACTIVE_TASK_STATES for s in states):
        return "starting"
    if any(s in ("failed", "rejected", "orphaned") for s in states):
        return "failed"
    if kind != "jupyter" and len([s for s in states if s == "complete"]) >= wanted:
        return "complete"
    return states[0]


def job_exit_code(codes):
    """The job's exit status from its tasks' (None: not known yet)."""
    codes = [code for code in codes if code is not None]
    if not codes:
        return None
    return next((code for code in codes if code), 0)


def job_status(tasks, wanted, kind="run", batch=True):
    """A job's state, exit status and current tasks (in the --json shape),
    from all its Tasks: what `jobs list/status` show and `--wait` waits on."""
    current = job_tasks(tasks, batch)
    return {"state": job_state(current, wanted, kind), "exit_code": job_exit_code(t.exit_code for t in current),
            "tasks": [t.to_dict() for t in current]}


def job_summary(service, tasks):
    """The stable --json shape of one job."""
    spec = service["Spec"]
    labels = spec.get("Labels", {})
    mode = spec.get("Mode", {})
    wanted = job_replicas(mode)
    kind = labels.get(LABEL_KIND, "run")
    status = job_status(tasks, wanted, kind, batch="ReplicatedJob" in mode)
    asks = service_request(service)
    limits = spec["TaskTemplate"].get("Resources", {}).get("Limits", {})
    return {
        "id": spec["Name"],
        "kind": kind,
        "owner": labels.get(LABEL_OWNER, ADMIN_OWNER),
        "image": spec["TaskTemplate"]["ContainerSpec"].get("Image", "").split("@")[0],
        "command": labels.get(LABEL_CMD, ""),
        "created": int(labels.get(LABEL_CREATED, "0") or 0),
        "replicas": wanted,
        "cpus": limits.get("NanoCPUs", asks.cpus * 10**9) / 10**9,
        "memory_mib": asks.memory_mib,
        "gpus": asks.gpus,
        # rejected by the enforcer but about to run again: not failed
        "state": "pending" if runs_again(tasks) else status["state"],
        "exit_code": status["exit_code"],
        "tasks": status["tasks"],
    }


def reserved_by_node(services, tasks):
    """The Resources held on each node (by node ID) by placed job tasks."""
    asks = {service["Spec"]["Name"]: service_request(service) for service in services}
    reserved = {}
    for task in tasks:
        if task.placed and is_current(task):
            reserved[task.node_id] = reserved.get(task.node_id, Resources()) + asks.get(task.service, Resources())
    return reserved


def pending_reason(job, service, nodes, reserved):
    """Why a pending job waits, in the user's terms (nodes: Nodes, reserved:
    reserved_by_node's, by node ID)."""
    placement = service["Spec"].get("TaskTemplate", {}).get("Placement") or {}
    if any(c.startswith(HOLD_CONSTRAINT) for c in placement.get("Constraints") or ()):
        return "waiting: the hub is making its work layer (the folder it was sent)"
    asks = service_request(service)
    names = node_names(nodes)
    free = {node.id: node.shared - reserved.get(node.id, Resources())
            for node in nodes if node.shared.cpus and node.state == "ready" and node.availability == "active"}
    owned = [f"{names[n.id]} ({describe_owner(n.owner)})" for n in nodes
             if n.state == "ready" and n.availability == "pause" and describe_owner(n.owner)]
    if not free:
        return "waiting: " + (f"the volunteers are at their machines: {'; '.join(owned)}" if owned
                              else "no worker is Ready and available")
    roomiest = max(free, key=lambda n: free[n])  # the first of the roomiest, as (cpus, memory, gpus) orders them
    room, name = free[roomiest], names[roomiest]
    if asks.gpus and asks.gpus > room.gpus:
        return f"waiting: {asks.gpus} GPUs requested, {max(room.gpus, 0)} free on {name}"
    if asks.cpus > room.cpus:
        return f"waiting: {asks.cpus} CPUs requested, {max(room.cpus, 0)} free on {name}"
    if asks.memory_mib > room.memory_mib:
        return (f"waiting: {human_mib(asks.memory_mib)} memory requested, "
                f"{human_mib(max(room.memory_mib, 0))} free on {name}")
    errors = [t["error"] for t in job["tasks"] if t["error"]]
    if any(ENFORCER_REJECTION in error for error in errors):
        return f"waiting to run again: Docker rejected it ({ENFORCER_REJECTION})"
    if owned and errors and "no suitable node" in errors[0]:
        return f"waiting: {errors[0]}; and the volunteers are at their machines: {'; '.join(owned)}"
    return "waiting: " + (errors[0] if errors else "the scheduler has not placed it yet")


def jobs_on_nodes(node_ids, tasks=None):
    """Job services with unfinished tasks on these nodes (by node ID)."""
    if tasks is None:
        tasks = list_tasks(list_job_services())
    return sorted({t.service for t in tasks if t.node_id in node_ids and t.active and is_current(t)})


# -- owners and fair share ----------------------------------------------------


def job_owner():
    """The owner label of a job made now: the serve user, else the admin
    (root on the hub, or docker over SSH as root), else the local login."""
    import pwd

    if OWNER:
        return OWNER
    if DOCKER_HOST or os.geteuid() == 0:
        return ADMIN_OWNER
    try:
        return valid_name(pwd.getpwuid(os.geteuid()).pw_name, "login")
    except (KeyError, GridxError):
        return f"uid-{os.geteuid()}"


def owner_of(service):
    """A job's owner; a job made before owners existed is the admin's."""
    return service["Spec"].get("Labels", {}).get(LABEL_OWNER) or ADMIN_OWNER


def check_owner(services, action):
    """Through serve, a user acts only on their own jobs (exit 2 naming
    the owner); the admin on all."""
    if OWNER is None:
        return
    for service in services:
        owner = owner_of(service)
        if owner != OWNER:
            raise usage_error(f"job {service['Spec']['Name']} is {owner}'s: {OWNER} can {action} only their own jobs",
                              "see yours: gridx jobs list --mine")


def empty_use():
    return {"cpus": 0, "memory_mib": 0, "gpus": 0, "jobs": 0}


def use_by_owner(services, tasks):
    """What each owner's unfinished jobs reserve: per task that is pending,
    starting or running (a job whose tasks the swarm has not made yet counts
    as all its replicas), and how many such jobs. {owner: use}."""
    by_service = {}
    for task in tasks:
        if task.active and is_current(task):
            by_service[task.service] = by_service.get(task.service, 0) + 1
    seen = {task.service for task in tasks}
    use = {}
    for service in services:
        name = service["Spec"]["Name"]
        active = by_service.get(name, 0)
        if name not in seen:
            active = job_replicas(service["Spec"].get("Mode", {}))
        if not active:
            continue
        asks = service_request(service) * active
        held = use.setdefault(owner_of(service), empty_use())
        held["cpus"] += asks.cpus
        held["memory_mib"] += asks.memory_mib
        held["gpus"] += asks.gpus
        held["jobs"] += 1
    return use


def limit_refusal(owner, use, limits, asks):
    """The first limit a new job would pass, as one line; None when it fits."""
    for key in SUBMIT_LIMITS:
        limit = limits.get(key)
        if limit is None or use[key] + asks[key] <= limit:
            continue
        if key == "jobs":
            return f"{owner} has {use['jobs']} of {limit} jobs unfinished; this job would be one more"
        if key == "memory_mib":
            return (f"{owner} uses {human_mib(use[key])} of {human_mib(limit)} memory; "
                    f"this job asks {human_mib(asks[key])}")
        what = "CPUs" if key == "cpus" else "GPUs"
        return f"{owner} uses {use[key]} of {limit} {what}; this job asks {asks[key]}"
    return None


class user_limits_checked:
    """Around a job's `docker service create`: through serve, refuse a job
    that would take its owner past their limits (exit 2), holding a lock on
    users.json so that two submissions at once cannot both pass."""

    def __init__(self, request, replicas):
        self.request, self.replicas, self.handle = request, replicas, None

    def __enter__(self):
        if OWNER is None or not SERVE_LIMITS or all(v is None for v in SERVE_LIMITS.values()):
            return self
        import fcntl

        try:
            self.handle = open(users_lock_path())  # read-only: serve cannot write there, and needs not to
        except FileNotFoundError:
            raise precondition(f"{users_lock_path()} is missing", "the hub admin runs: gridx hub init") from None
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        services, tasks, _, _ = jobs_overview()
        use = use_by_owner(services, tasks).get(OWNER, empty_use())
        asks = dict((self.request.resources * self.replicas).to_dict(), jobs=1)
        refusal = limit_refusal(OWNER, use, SERVE_LIMITS, asks)
        if refusal:
            self.handle.close()
            raise usage_error(refusal, "wait for one of your jobs to end, or delete one (gridx jobs list --mine); "
                                       "the hub admin sets the limits")
        return self

    def __exit__(self, *exc):
        if self.handle:
            self.handle.close()
        return False


def check_owner_filter(args):
    if getattr(args, "user", None) not in (None, ADMIN_OWNER):
        valid_name(args.user, "--user")


def filter_jobs(jobs, args):
    """jobs list --mine / --user NAME."""
    if getattr(args, "user", None):
        wanted = args.user
    elif getattr(args, "mine", False):
        wanted = job_owner()
    else:
        return jobs
    return [job for job in jobs if job.get("owner") == wanted]


def owners_table(use):
    """cluster: what each owner's unfinished jobs reserve."""
    if not use:
        return
    print()
    print_table(["OWNER", "JOBS", "CPUS", "MEMORY", "GPUS"],
                [[owner, u["jobs"], u["cpus"], human_mib(u["memory_mib"]), u["gpus"]]
                 for owner, u in sorted(use.items())])


# -- running again ------------------------------------------------------------
# One rule, used by `jobs run --wait`, `hub watch` and `jobs list/status`:
# a job runs again when Docker's constraint enforcer rejected every current
# task of it (ENFORCER_REJECTION), at most ENFORCER_RERUNS times, counted in
# its task history (so the runs of --wait and hub watch add up); and a job
# whose worker is gone runs again on the workers that are up.


def rejected_by_enforcer(tasks):
    """True when every current task of the job ended by ENFORCER_REJECTION."""
    current = [t for t in tasks if is_current(t)]
    return bool(current) and all(t.state == "rejected" and ENFORCER_REJECTION in t.error for t in current)


def runs_again(history):
    """The rule: True when Docker's constraint enforcer rejected the job and
    Grid-X runs it again: at most ENFORCER_RERUNS times in its history."""
    rejections = sum(1 for t in history if ENFORCER_REJECTION in t.error)
    return rejected_by_enforcer(history) and rejections <= ENFORCER_RERUNS


def jobs_that_run_again(services, tasks):
    """The jobs that runs_again: {job: the IDs of its tasks so far}."""
    by_service = tasks_by_service(tasks)
    found = {}
    for name in service_names(services):
        history = by_service.get(name, [])
        if runs_again(history):
            found[name] = frozenset(t.id for t in history)
    return found


def run_again(job_ids):
    """A forced update starts the job again on the workers that are up."""
    for job_id in job_ids:
        # The image is not resolved again: see create_job.
        run(docker("service", "update", "--detach", "--force", "--no-resolve-image", "--", job_id))


def run_lost_jobs_again(down_node_ids, tasks=None):
    """Run again the unfinished jobs whose worker is gone (by node ID: two
    laptops may both be called ubuntu).

    Swarm (20.10) leaves a replicated-job task of a Down node "running" for
    24 hours. A forced update starts a new iteration of the job on the
    workers that are up; the old task is shut down when its node returns.
    """
    lost = jobs_on_nodes(down_node_ids, tasks)
    run_again(lost)
    return lost


# -- waiting ------------------------------------------------------------------


def wait_for_job(job_id, replicas=1, poll_s=0.1, timeout=None, log_args=(), may_run_again=True,
                 log_sources=None, unreadable_nodes=()):
    """Stream a batch job's logs until every task ends; return its exit status.

    The job's output is held until the line that says where it runs has been
    printed, so progress never comes after the output it introduces.
    may_run_again: run the job again when runs_again says so (`--wait`; not
    `logs -f`, which only watches). log_sources: the job itself (default),
    or its tasks one by one when some ran on a node that is down
    (unreadable_nodes, by node ID; see log_sources()): tasks made later on
    other nodes are followed too. Each poll is one request (see tasks_of).
    """
    sources = list(log_sources or [job_id])
    per_task = sources != [job_id]
    logs = LogFollower(sources, log_args, hold=True, job_id=job_id)
    started = time.monotonic()
    progress = JobProgress(job_id, started)
    ran_again, preempted = RunAgainWait(job_id), PreemptedWait(job_id)
    hostnames = {}
    try:
        while True:
            tasks = tasks_of(job_id, hostnames)
            job = job_status(tasks, replicas)
            if logs.holding:
                progress.show(job)
                if job["state"] not in ("pending", "starting"):
                    logs.release()
            if per_task:
                logs.add([t.id for t in tasks if t.id not in logs.sources and t.node_id
                          and t.node_id not in unreadable_nodes], log_args)
            if job["state"] in ("complete", "failed") and ran_again.started(tasks):
                if preempted.holds(tasks):
                    time.sleep(1)
                    continue
                if not (may_run_again and ran_again.now(tasks)):
                    break
                continue
            if timeout and time.monotonic() - started > timeout:
                raise GridxError(f"job {job_id} did not finish within {timeout} s")
            time.sleep(poll_s)
    finally:
        logs.stop()
    return job_end(job_id, job)


class RunAgainWait:
    """`--wait`'s side of running again: after a run again, the old rejected
    task reads as the job's end until the swarm has made the new one
    (bounded: 30 s)."""

    def __init__(self, job_id):
        self.job_id, self.seen, self.at = job_id, set(), 0.0

    def started(self, tasks):
        return not self.seen or any(t.id not in self.seen for t in tasks) or time.monotonic() - self.at > 30

    def now(self, tasks):
        """Run the job again if the rule says so; True when it did."""
        if not runs_again(tasks):
            return False
        info(f"job {self.job_id}: Docker rejected it ({ENFORCER_REJECTION}); running it again")
        self.seen, self.at = {t.id for t in tasks}, time.monotonic()
        run_again([self.job_id])
        return True


class PreemptedWait:
    """`--wait`'s side of a preemption: a task that its worker's agent
    stopped (listed in the node's gridx.preempted label, set by hub watch
    before the task's SIGTERM) did not end the job: hub watch runs it again
    elsewhere, from its checkpoint. One request a check, once the job ended."""

    def __init__(self, job_id):
        self.job_id, self.said = job_id, set()

    def holds(self, tasks):
        ended = [t for t in tasks if is_current(t) and not t.active]
        if not ended:
            return False
        marked = {task_id for node in all_swarm_nodes() for task_id in node.preempted}
        stopped = [t for t in ended if t.id in marked]
        for task in stopped:
            if task.id not in self.said:
                info(f"job {self.job_id}: its volunteer on {task.node} needs the machine back: preempted; "
                     "it runs again elsewhere, from its checkpoint when it has one")
                self.said.add(task.id)
        return bool(stopped)


def job_end(job_id, job):
    """The exit status of a job that ended; why, when it failed without one."""
    code = job["exit_code"]
    if job["state"] == "failed" and code is None:
        errors = "; ".join(t["error"] for t in job["tasks"] if t["error"])
        warn(f"job {job_id} failed: {errors or 'no error reported'}")
        return EXIT_FAILED
    return code or 0


class JobProgress:
    """--wait's progress lines: each new one once."""

    def __init__(self, job_id, started):
        self.job_id, self.started, self.shown = job_id, started, None

    def show(self, job):
        line = job_progress(self.job_id, job, time.monotonic() - self.started)
        if line and line != self.shown:
            info(line)
            self.shown = line


def job_progress(job_id, job, waited_s):
    """A line for a waiting job's state while it is not over, else None."""
    nodes = ", ".join(sorted({t["node"] for t in job["tasks"] if t["node"]}))
    if job["state"] == "pending":
        # the scheduler places a job that fits within a moment: say it only
        # when the job really waits
        if waited_s < 1:
            return None
        return f"job {job_id}: waiting for a worker with room (why: gridx jobs status {job_id})"
    if job["state"] == "starting":
        return f"job {job_id}: starting on {nodes or 'a worker'} (pulling its image, if the worker lacks it)"
    if job["state"] == "running":
        return f"job {job_id}: running on {nodes}"
    return None


def logs_argv(source, log_args=(), follow=False):
    """`docker service logs` of a job or of one of its tasks."""
    return docker("service", "logs", "--raw", *(["--follow"] if follow else []), *log_args, "--", source)


# The swarm's log broker sometimes loses a node that is up (moby#35011,
# #37336, open since Docker 17.06; seen on 20.10 here after a worker was
# killed and came back): `docker service logs` then fails with "incomplete
# log stream … node ID is not available". Those nodes' tasks are read from
# their containers on the workers, over the hub's SSH.
BROKER_LOST = re.compile(r"node ([\w.-]+) is not available")


def broker_lost_nodes(line):
    """The node IDs a line of Docker's names as lost by its log broker
    (an "incomplete log stream" error), else []."""
    return BROKER_LOST.findall(line) if "incomplete log stream" in line else []


def container_logs_argv(node, container, log_args=()):
    """`docker logs` of a task's container on its worker, over the hub's SSH."""
    import shlex

    return ssh_argv(node.address, [shlex.join(["docker", "logs", *log_args, "--", container])])


def logs_from_containers(job_id, node_ids, log_args=()):
    """The logs of a job's tasks on these nodes (the broker lost them), each
    from its container; one line for each that cannot be read. True when
    every one was read."""
    nodes = {node.id: node for node in all_swarm_nodes()}
    tasks = [t for t in tasks_of(job_id, {i: n.hostname for i, n in nodes.items()}) if t.node_id in node_ids]
    whole = True
    for task in sorted(tasks, key=lambda t: (t.slot, t.created)):
        node, why = nodes.get(task.node_id), None
        if OWNER is not None or DOCKER_HOST or os.geteuid() != 0:
            why = "only root on the hub reaches the workers: there, sudo gridx jobs logs " + job_id
        elif node is None or node.state != "ready":
            why = "its node is not up"
        elif not node.hub_ssh:
            why = f"{node.hostname} declined the hub's SSH"
        elif not task.container:
            continue  # never started: nothing to read
        if why:
            warn(f"the swarm cannot give the logs of {task.name} ({BROKER_FAILURE_HINT}): {why}")
            whole = False
            continue
        whole = run_streaming(container_logs_argv(node, task.container, log_args)) == 0 and whole
    return whole


BROKER_FAILURE_HINT = "its log broker lost that node, moby#37336"


def read_job_logs(job_id, source, log_args=()):
    """`docker service logs` of a job (or a task): its output as it comes,
    and, where the broker lost a node, that node's tasks from their
    containers. The exit status: 0 when everything was read."""
    import subprocess

    process = start(logs_argv(source, log_args), stderr=subprocess.PIPE)
    try:
        said = process.stderr.read().decode("utf-8", "replace")
        code = process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        raise
    lost = set()
    for line in said.splitlines():
        found = broker_lost_nodes(line)
        lost.update(found)
        if not found:
            print(line, file=sys.stderr)
    if code and lost:
        return 0 if logs_from_containers(job_id, lost, log_args) else 1
    return code


class LogFollower:
    """`docker service logs --follow` of a job (or of some of its tasks),
    copied to stdout as it comes.

    With hold, output is kept until release(). The followers never end by
    themselves, and a job's last lines can arrive a moment after its end is
    recorded: stop() waits until the output has been quiet for LOG_QUIET_S
    (at most LOG_DRAIN_S) before ending them. A follower that has shown
    nothing by then may not have caught up yet with a job that ended at once
    (seen on a loaded machine: `logs -f` of a finished job printed nothing):
    stop() then reads what there is, whole, with one request to the Engine
    API per source (the job_id's service, else a task), not one more docker
    process: a job that prints nothing always comes to this.
    """

    def __init__(self, sources, log_args=(), hold=False, job_id=None):
        import threading

        self.lock = threading.Lock()
        self.held = [] if hold else None  # chunks not yet shown; None once released
        self.last_output = time.monotonic()
        self.any_output = False
        self.log_args, self.job_id = tuple(log_args), job_id
        self.sources, self.processes, self.copiers = [], [], []
        self.broken = set()  # node IDs the swarm's log broker lost (see BROKER_LOST)
        self.add(sources, log_args)

    def add(self, sources, log_args=()):
        import subprocess
        import threading

        for source in sources:
            self.sources.append(source)
            process = start(logs_argv(source, log_args, follow=True), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
            for target in (self._copy, self._errors):
                copier = threading.Thread(target=target, args=(process,), daemon=True)
                copier.start()
                self.copiers.append(copier)
            self.processes.append(process)

    def _errors(self, process):
        """Docker's own stderr, passed on; the nodes its log broker lost, kept
        (stop() reads them from their containers)."""
        for raw in iter(process.stderr.readline, b""):
            line = raw.decode("utf-8", "replace")
            lost = broker_lost_nodes(line)
            if lost:
                with self.lock:
                    self.broken.update(lost)
                continue
            sys.stderr.write(line)
            sys.stderr.flush()

    def _copy(self, process):
        while True:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                return
            with self.lock:
                self.last_output = time.monotonic()
                self.any_output = True
                if self.held is not None:
                    self.held.append(chunk)
                    continue
                if not self._write(chunk):
                    return

    @staticmethod
    def _write(chunk):
        try:
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            return True
        except BrokenPipeError:
            return False

    @property
    def holding(self):
        return self.held is not None

    def release(self):
        """Show what was held, and from now on everything as it comes."""
        with self.lock:
            held, self.held = self.held or [], None
            sys.stdout.flush()  # gridx's own lines first
            for chunk in held:
                if not self._write(chunk):
                    break

    def stop(self):
        deadline = time.monotonic() + LOG_DRAIN_S
        while (self.any_output and time.monotonic() - self.last_output < LOG_QUIET_S
               and time.monotonic() < deadline):
            time.sleep(0.02)
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait()
        for copier in self.copiers:
            copier.join(timeout=1)
        self.release()
        if self.broken and self.job_id:
            logs_from_containers(self.job_id, self.broken, self.log_args)
        elif not self.any_output:
            for source in self.sources:
                self.read_whole(source)

    def read_whole(self, source):
        query = {"stdout": "1", "stderr": "1"}
        query.update(("tail", arg.partition("=")[2]) for arg in self.log_args if arg.startswith("--tail="))
        what = "services" if source == self.job_id else "tasks"
        try:
            errors = write_log_stream(engine().read(f"/{what}/{source}/logs", query))
        except GridxError as error:
            warn(error.message)
            return
        lost = set()
        for error in errors:
            found = broker_lost_nodes(error)
            lost.update(found)
            if not found:
                warn(f"error from daemon in stream: {printable(error)}")
        if lost and self.job_id:
            logs_from_containers(self.job_id, lost, self.log_args)  # see BROKER_LOST


# ---------------------------------------------------------------------------
# Work folders and results
# ---------------------------------------------------------------------------
# `--workdir DIR`: the folder's files (less what its .gridxignore, else its
# .dockerignore, leaves out) become one layer on the job's image, made by the
# hub's Docker without a build (a container of the image, never started,
# the folder copied in, committed): here on the hub, through docker's own
# SSH with --manager root@HUB, or through gridx serve for a user. It is
# pushed through the registry's writer under a tag no one can guess, and the
# job runs it by digest from the read-only side (see Registry).
# `--output PATH`: when a task ends, complete or failed, the hub
# copies PATH out of its ended container (`docker cp` on the worker, over
# the hub's SSH, see SSH) into RESULTS/ID/ (RESULTS/ID/N/ when
# there are several replicas), so results outlive the worker; `jobs
# results` copies them to the submitter. Such a job runs only where the
# hub's SSH reaches (not on a --no-hub-ssh worker).
#   ignore rules · the work layer · the upload through serve · results on the hub · results to the submitter

WORK_DIR = "/work"  # where the folder lands and the job starts
DEFAULT_OUTPUT = WORK_DIR + "/out"  # --output's default with --workdir
DEFAULT_CHECKPOINT = WORK_DIR + "/ckpt"  # --checkpoint's default with --workdir (GRIDX_CHECKPOINT_DIR)
DEFAULT_CHECKPOINT_EVERY_S = 600  # --checkpoint-every: at most this much work is lost when a worker vanishes
DEFAULT_WORKDIR_LIMIT = "2G"
DEFAULT_OUTPUT_LIMIT = "2G"
IGNORE_FILES = (".gridxignore", ".dockerignore")  # the first one found counts
WORK_REPOSITORY = "gridx/work"  # a job's layer: REGISTRY/gridx/work:JOB-TOKEN, run by digest
CHECKPOINT_REPOSITORY = "gridx/checkpoint"  # a job's checkpoint as a layer on its image, for a re-run
WORK_DOCKERFILE = "FROM {image}\nCOPY work/ {workdir}/\nWORKDIR {workdir}\n"
LABEL_OUTPUT = "gridx.output"
LABEL_OUTPUT_LIMIT = "gridx.output-limit"
LABEL_BASE_IMAGE = "gridx.base-image"  # the image a --workdir layer sits on
HUB_SSH_CONSTRAINT = f"engine.labels.{LABEL_HUB_SSH}!=no"  # where the hub can collect results
PROGRESS_EVERY_S = 5  # plain progress lines when stderr is not a terminal
STREAM_CHUNK = 1024 * 1024
UPLOAD_MAGIC = b"gridx-upload "  # serve: after SESSION_HELLO, this, a JSON header line, then frames
RESULTS_ATTEMPTS = 5  # an unreachable worker's output is tried this often (each watch pass), then given up
RESULTS_COPY_TIMEOUT_S = 900  # one task's copy from its worker: killed past this, tried again (an attempt)


def valid_output_path(value, flag="--output"):
    """--output (--checkpoint): an absolute path in the container, in plain
    characters (it goes into `docker cp` on the worker through the hub's SSH)."""
    example = DEFAULT_OUTPUT if flag == "--output" else DEFAULT_CHECKPOINT
    if not value or not re.fullmatch(r"/[A-Za-z0-9._/@+-]*", value) or ".." in value.split("/"):
        raise usage_error(f"invalid {flag} {value!r}: give an absolute path in the job's container",
                          f"for example: {flag} {example}")
    path = posixpath.normpath(value)
    if path == "/":
        raise usage_error(f"{flag} / would copy the whole container", f"for example: {flag} {example}")
    return path


def capped_size(value, flag, key, default):
    """A size flag (--workdir-limit, --output-limit) in bytes: through serve,
    the member's limit (users.json) unless the flag is lower; a flag above it
    is exit 2. The admin's: the flag, else the default."""
    cap = SERVE_LIMITS.get(key, STORE_DEFAULTS[key]) if OWNER is not None and SERVE_LIMITS is not None else None
    if value is None:
        return parse_memory(default, flag, job_memory=False) if cap is None else cap * 1024**2
    asked = parse_memory(value, flag, job_memory=False)
    if cap is not None and asked > cap * 1024**2:
        raise usage_error(f"{flag} {value} is over your limit on this hub, {human_mib(cap)}",
                          f"give {flag} {human_mib(cap)} or less (the hub admin sets the limit)")
    return asked


def job_checkpoint(args):
    """(--checkpoint PATH, --checkpoint-every seconds), default /work/ckpt with
    --workdir, or None."""
    path = getattr(args, "checkpoint", None)
    if path is None and getattr(args, "workdir", None) is None:
        return None
    every = getattr(args, "checkpoint_every", None)
    return (valid_output_path(path or DEFAULT_CHECKPOINT, "--checkpoint"),
            parse_duration(every, "--checkpoint-every") if every else DEFAULT_CHECKPOINT_EVERY_S)


def job_output(args):
    """--output PATH and its limit (default /work/out with --workdir), or None."""
    output = getattr(args, "output", None)
    if output is None and getattr(args, "workdir", None) is None:
        return None
    path = valid_output_path(output or DEFAULT_OUTPUT)
    return path, capped_size(args.output_limit, "--output-limit", "output_mib", DEFAULT_OUTPUT_LIMIT)


# -- ignore rules -------------------------------------------------------------


def ignore_pattern(pattern):
    """One .dockerignore pattern as a regex over a slash path relative to the
    folder: Go's filepath.Match (* and ? stop at '/', [classes]) and ** for
    any number of folders, as Docker reads it."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            body = "^" + body[1:] if body[0] in "!^" else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        elif pattern[i] == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.S)


class IgnoreRules:
    """A .gridxignore / .dockerignore: the last pattern that matches a path
    or one of its folders decides; '!' keeps what an earlier one left out."""

    def __init__(self, text="", source=None):
        self.source, self.rules = source, []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            keep = line.startswith("!")
            pattern = posixpath.normpath(line[1:].strip() if keep else line).lstrip("/")
            if pattern not in ("", "."):
                self.rules.append((keep, ignore_pattern(pattern)))
        # a folder left out can still hold a file that '!' keeps: walk into it
        self.prunes = not any(keep for keep, _ in self.rules)

    def ignored(self, path):
        parts = path.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        verdict = False
        for keep, pattern in self.rules:
            if any(pattern.match(prefix) for prefix in prefixes):
                verdict = not keep
        return verdict


def folder_ignore_rules(folder):
    for name in IGNORE_FILES:
        path = os.path.join(folder, name)
        try:
            # utf-8-sig: a byte order mark (Windows editors) is not part of
            # the first pattern, as Docker's own reader trims it too
            with open(path, encoding="utf-8-sig", errors="replace") as handle:
                return IgnoreRules(handle.read(), name)
        except FileNotFoundError:
            continue
        except OSError as error:
            raise usage_error(f"cannot read {path}: {error.strerror}") from None
    return IgnoreRules()


# -- the work layer -----------------------------------------------------------


class WorkFolder:
    """A --workdir folder as it goes into the layer: its files, folders and
    links (relative slash paths, folders before what they hold), what they
    weigh, and what was left out. Read once, before anything runs, so a
    folder over the limit is refused at once."""

    def __init__(self, path, limit_bytes, ignore=True):
        import math

        if not os.path.isdir(path):
            raise usage_error(f"--workdir {path!r} is not a folder", "give the folder the job needs, e.g. --workdir .")
        self.path = os.path.abspath(path)
        self.rules = folder_ignore_rules(self.path) if ignore else IgnoreRules()  # a checkpoint: all of it
        self.entries, self.bytes, self.skipped = [], 0, 0
        for top, folders, files in os.walk(self.path, onerror=self._unreadable):
            base = os.path.relpath(top, self.path).replace(os.sep, "/")
            base = "" if base == "." else base + "/"
            folders.sort()
            for name in list(folders) + sorted(files):
                relative = base + name
                full = os.path.join(top, name)
                mode = os.lstat(full).st_mode
                is_folder = stat.S_ISDIR(mode)
                if self.rules.ignored(relative):
                    if is_folder and self.rules.prunes:
                        folders.remove(name)
                    continue
                if is_folder:
                    self.entries.append(relative)
                elif stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                    if stat.S_ISLNK(mode) and name in folders:
                        folders.remove(name)  # a link to a folder goes as a link
                    self.entries.append(relative)
                    self.bytes += os.lstat(full).st_size if stat.S_ISREG(mode) else 0
                else:
                    self.skipped += 1  # sockets, fifos, devices
        if self.bytes > limit_bytes:
            raise usage_error(
                f"the work folder {path} holds {human_bytes(self.bytes)}, over the {human_bytes(limit_bytes)} limit",
                f"leave files out with a {IGNORE_FILES[0]} (the syntax of .dockerignore), or raise it: "
                f"--workdir-limit {math.ceil(self.bytes * 2 / 1024**3)}G")

    def _unreadable(self, error):
        raise usage_error(f"cannot read {error.filename}: {error.strerror}", "check the folder's permissions")

    def describe(self):
        files = sum(not os.path.isdir(os.path.join(self.path, e)) for e in self.entries)
        ignored = f", less what {self.rules.source} leaves out" if self.rules.source else ""
        return f"{human_bytes(self.bytes)} in {files} file(s){ignored}"

    def members(self):
        """(TarInfo, open file or None) for each entry, owned by root."""
        import tarfile

        for relative in self.entries:
            full = os.path.join(self.path, relative)
            info = tarfile.TarInfo(relative)
            status = os.lstat(full)
            info.mode, info.mtime = status.st_mode & 0o7777, int(status.st_mtime)
            if os.path.islink(full):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(full)
                yield info, None
            elif os.path.isdir(full):
                info.type = tarfile.DIRTYPE
                yield info, None
            else:
                with open(full, "rb") as handle:
                    info.size = os.fstat(handle.fileno()).st_size
                    yield info, handle


class Meter:
    """Bytes sent and their rate: one line redrawn on a terminal, a plain
    line every PROGRESS_EVERY_S otherwise, and a last line at the end."""

    def __init__(self, what, total):
        self.what, self.total, self.sent = what, total, 0
        self.started = self.shown = time.monotonic()
        self.terminal = sys.stderr.isatty()

    def line(self, now):
        rate = self.sent / max(now - self.started, 1e-6)
        return f"{self.what}: {human_bytes(self.sent)} of {human_bytes(self.total)} ({human_bytes(rate)}/s)"

    def add(self, count):
        self.sent += count
        now = time.monotonic()
        if self.terminal and now - self.shown > 0.2:
            print("\r" + self.line(now) + "\x1b[K", end="", file=sys.stderr, flush=True)
            self.shown = now
        elif not self.terminal and now - self.shown >= PROGRESS_EVERY_S:
            info(self.line(now))
            self.shown = now

    def done(self):
        if self.terminal:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)
        rate = self.sent / max(time.monotonic() - self.started, 1e-6)
        info(f"{self.what}: {human_bytes(self.sent)} sent ({human_bytes(rate)}/s)")


class MeteredPipe:
    """A file-like write end that counts what goes through it."""

    def __init__(self, pipe, meter):
        self.pipe, self.meter = pipe, meter

    def write(self, data):
        self.pipe.write(data)
        self.meter.add(len(data))
        return len(data)


def tar_member(name, kind, mode, mtime, size=0, linkname=""):
    """A tar header gridx writes itself, field by field: root's, a plain
    name, no PAX records (nothing of a member's own tar headers passes
    through: a PAX `path` would rename a file when Docker reads it)."""
    import tarfile

    member = tarfile.TarInfo(name)
    member.type = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "link": tarfile.SYMTYPE}[kind]
    member.mode = mode & 0o777  # no setuid, setgid or sticky bit from a member's folder
    member.mtime = max(0, int(mtime))
    member.size = size if kind == "file" else 0
    member.linkname = linkname if kind == "link" else ""
    member.uid = member.gid = 0
    member.uname = member.gname = "root"
    return member


def write_work_tar(out, members, prefix=""):
    """The folder as a tar stream, every header gridx's own (tar_member),
    GNU long names rather than PAX: a member's upload is re-written here."""
    import tarfile

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT, bufsize=STREAM_CHUNK) as archive:
        parts = prefix.strip("/").split("/") if prefix else []
        for depth in range(1, len(parts) + 1):  # /work, then /work/ckpt: never left to the extractor
            archive.addfile(tar_member("/".join(parts[:depth]), "dir", 0o755, time.time()))
        for member, handle in members:
            kind = "dir" if member.isdir() else "link" if member.issym() else "file"
            archive.addfile(tar_member(prefix + member.name, kind, member.mode, member.mtime, member.size,
                                       member.linkname), handle)


def hub_registry():
    """The hub registry's address, from the manager's own swarm address (its
    VPN IP): the same call here, through --manager, and in serve (which
    cannot read the hub's config)."""
    import ipaddress

    address = run(docker("info", "--format", "{{.Swarm.NodeAddr}}")).stdout.strip()
    try:
        return registry_address(str(ipaddress.IPv4Address(address)))
    except ValueError:
        raise precondition(f"the manager has no swarm address of its own ({address!r})",
                           "is this (or --manager) the hub? gridx hub status there") from None


def layer_registries():
    """(where the hub's Docker pushes a work layer: the registry's writer on
    its loopback, where workers pull it: the read-only side on the VPN)."""
    return registry_writer(), hub_registry()


def base_image_config(image):
    """The hub Docker's (ID, Config) of the image a layer goes on, pulled
    there first when it is missing."""
    import json

    argv = docker("image", "inspect", "--format", "{{json .Id}} {{json .Config}}", "--", image)
    found = run(argv, check=False)
    if found.returncode:
        pulled = run(docker("pull", "--quiet", "--", image), check=False, timeout=3600)
        if pulled.returncode:
            said = (pulled.stderr.strip().splitlines() or ["docker pull failed"])[-1]
            raise usage_error(f"the hub's Docker has no image {image} and cannot pull it: {said}",
                              "push it to the hub's registry first (gridx image push), or name one the hub has")
        found = run(argv)
    image_id, _, config = found.stdout.strip().partition(" ")
    return json.loads(image_id), json.loads(config) or {}


# `docker create` needs a command; an image without one gets this in its
# layer (a commit cannot empty a command again): a job that gives none fails
# to start with these words, as it would have without the layer.
NO_COMMAND = "/gridx: the image has no command: give one after the image"


def create_command(config):
    """What `docker create` gets after the image: nothing when the image has
    an entrypoint or a command (the container's config is then the image's,
    and so is the commit's)."""
    return [] if config.get("Entrypoint") or config.get("Cmd") else [NO_COMMAND]


def copy_into(container, members, size, into=WORK_DIR):
    """`docker cp - CONTAINER:/` of the folder at into (its folders too), metered."""
    import subprocess
    import tempfile

    with tempfile.TemporaryFile() as said:
        process = start(docker("cp", "-", f"{container}:/"), stdin=subprocess.PIPE, stdout=said, stderr=said)
        meter = Meter("work folder", size)
        try:
            write_work_tar(MeteredPipe(process.stdin, meter), members, prefix=into.strip("/") + "/")
            process.stdin.close()
        except BrokenPipeError:
            pass  # docker cp ended early: its output says why
        except BaseException:
            process.kill()
            process.wait()
            raise
        code = process.wait()
        meter.done()
        if code:
            said.seek(0)
            lines = said.read().decode("utf-8", "replace").strip().splitlines() or ["no output"]
            raise GridxError(f"the hub's Docker could not take the work folder: {lines[-1]}")


def push_digest(target):
    """`docker push`, and the digest it printed ("TAG: digest: sha256:… size: N")."""
    pushed = run(docker("push", "--", target), check=False, timeout=3600)
    found = re.search(r"digest: (sha256:[0-9a-f]{64})", pushed.stdout)
    if pushed.returncode or not found:
        said = (pushed.stderr.strip().splitlines() or ["docker push failed"])[-1]
        raise precondition(f"the hub's Docker could not push the work layer to its registry: {said}",
                           "on the hub: gridx hub init (starts the registry), gridx image ls")
    return found.group(1)


class WorkLayer:
    """A job's --workdir: the folder here, or the one a user sent to serve.

    It becomes one layer on the job's image without a build: the hub's
    Docker creates a container of the image (never started: no network, no
    ONBUILD trigger, nothing of the image runs), copies the folder into
    /work and commits it; the commit is pushed under a tag no one can guess
    and the job runs it by digest."""

    def __init__(self, job_id, members, size, what, into=WORK_DIR, repository=WORK_REPOSITORY):
        self.job_id, self.members, self.size, self.what = job_id, members, size, what
        self.into, self.repository = into, repository  # a checkpoint's layer: its PATH, CHECKPOINT_REPOSITORY
        self.folder = None
        self.tag = f"{job_id}-{secrets_token()}"
        self.pushed = None  # (registry address, digest) once in the registry

    def build(self, image):
        """Make, push and forget it; the reference workers pull (by digest)."""
        push_address, pull_address = layer_registries()
        target = f"{push_address}/{self.repository}:{self.tag}"
        what = "the work folder" if self.into == WORK_DIR else "its checkpoint"
        info(f"job {self.job_id}: {what} ({self.what}) goes to the hub as a layer on {image}")
        image_id, config = base_image_config(image)
        created = run(docker("create", "--network=none", f"--label={LABEL_LAYER}={self.tag}", "--", image_id,
                             *create_command(config)))
        container = created.stdout.strip()
        changes = [f"--change=WORKDIR {WORK_DIR}"] if self.into == WORK_DIR else []  # a job starts in its folder
        try:
            copy_into(container, self.members, self.size, self.into)
            run(docker("commit", *changes, "--", container, target))
        finally:
            run(docker("rm", "--force", "--", container), check=False)
        try:
            digest = push_digest(target)
        finally:
            run(docker("image", "rm", "--", target), check=False)  # the registry has it
        self.pushed = (push_address, digest)
        return f"{pull_address}/{self.repository}:{self.tag}@{digest}"


def secrets_token():
    import secrets

    return secrets.token_hex(16)


def work_layer(args, job_id):
    """The WorkLayer of a jobs run/train, or None; checked before anything runs."""
    workdir = getattr(args, "workdir", None)
    if workdir is None:
        return None
    limit = capped_size(args.workdir_limit, "--workdir-limit", "workdir_mib", DEFAULT_WORKDIR_LIMIT)
    upload = getattr(args, "upload", None)
    if upload is not None:  # serve: what the user's gridx sent
        return WorkLayer(job_id, upload_members(upload), upload.size, human_bytes(upload.size))
    folder = WorkFolder(workdir, limit)
    layer = WorkLayer(job_id, folder.members(), folder.bytes, folder.describe())
    layer.folder = folder  # what a user's gridx sends to serve
    return layer


def registry_writer_access():
    """(address, CA path: None, plain HTTP) of the registry's writer, through
    which layers are pushed and deleted: root's on the hub alone (GRIDX-OUTPUT)."""
    return registry_writer(), None


def remove_work_layer(tag, digest=None, repository=WORK_REPOSITORY):
    """Delete a job's layer from the registry (its manifest; the blobs go at
    the next garbage collection). False, with a warning, when it could not
    (hub watch's sweep tries again: sweep_work_layers)."""
    import urllib.parse

    try:
        address, ca_path = registry_writer_access()
        if digest is None:
            digest, _ = registry_manifest(address, ca_path, repository, tag, method="HEAD")
            if digest is None:
                return True
        path = f"/v2/{urllib.parse.quote(repository)}/manifests/{digest}"
        status, _, body = registry_request(address, ca_path, path, method="DELETE")
    except GridxError as error:
        warn(f"the work layer {tag} stays in the hub's registry for now: {error.message}")
        return False
    if status not in (200, 202, 404):
        warn(f"the registry refused to delete the work layer {tag} ({status}): {body[:120]}")
        return False
    return True


def sweep_work_layers():
    """hub watch: remove the layers no job names any more (a job deleted
    through --manager, or a submit that died before it could clean up; a
    checkpoint's layer once its job runs another). The tags are listed
    before the jobs, so a layer pushed meanwhile has its (held) job listed
    already."""
    address, ca_path = registry_writer_access()
    tags = {repository: registry_tags(address, ca_path, repository)
            for repository in (WORK_REPOSITORY, CHECKPOINT_REPOSITORY)}
    if not any(tags.values()):
        return []
    services = list_job_services(missing_ok=True)
    images = [s["Spec"]["TaskTemplate"]["ContainerSpec"].get("Image", "") for s in services]
    live = {s["Spec"].get("Labels", {}).get(LABEL_LAYER) for s in services}
    live |= {image.split("@")[0].rpartition(":")[2] for image in images}
    live |= {s["Spec"].get("Labels", {}).get(LABEL_RUN_IMAGE, "").split("@")[0].rpartition(":")[2]
             for s in services}
    swept = [tag for repository, found in tags.items() for tag in found
             if tag not in live and remove_work_layer(tag, repository=repository)]
    if swept:
        info(f"removed the layers of deleted jobs: {', '.join(swept)}")
    return swept


def refuse_work_layer_image(image):
    """A member runs a work layer only through --workdir: never another's
    (nor their own again) by naming it."""
    if OWNER is not None and split_image(image)[1] == WORK_REPOSITORY:
        raise usage_error(f"{image} is a job's work layer: members' layers are theirs alone",
                          "send the folder with --workdir DIR")


# -- the upload through serve -------------------------------------------------
# A user's gridx sends SESSION_HELLO, UPLOAD_MAGIC and a JSON header line,
# then the folder's tar in frames (a line of 1-8 lowercase hex digits, then
# that many bytes, at most FRAME_MAX), and a frame of 0 at the end; stdin then
# stays open as in any serve session. Nothing of it is unpacked on the hub,
# and its tar headers are read, never passed on (write_work_tar).

SESSION_HELLO = b"gridx\n"  # the client's first bytes on serve's stdin
FRAME_MAX = 4 * STREAM_CHUNK
_FRAME = None


class FrameWriter:
    def __init__(self, pipe):
        self.pipe = pipe

    def write(self, data):
        for start_at in range(0, len(data), FRAME_MAX):
            chunk = data[start_at:start_at + FRAME_MAX]
            self.pipe.write(b"%x\n" % len(chunk) + chunk)
        return len(data)

    def end(self):
        self.pipe.write(b"0\n")
        self.pipe.flush()


class Upload:
    """The tar a user sent, spooled on the hub (at most the limit), and its header."""

    def __init__(self, spool, size, header):
        self.spool, self.size, self.header = spool, size, header


def frame_length(line):
    """A frame's length line: 1-8 lowercase hex digits and a newline, at most
    FRAME_MAX; None when it is anything else (a sign, 0x, blanks, -1)."""
    global _FRAME
    if _FRAME is None:
        _FRAME = re.compile(rb"[0-9a-f]{1,8}\n")
    if not _FRAME.fullmatch(line):
        return None
    length = int(line, 16)
    return length if length <= FRAME_MAX else None


def read_upload(stream, limit, what="the work folder"):
    """serve: read the framed upload from stdin; exit 2 when it is not one."""
    import json
    import tempfile

    def fail(why):
        return usage_error(f"{what} did not arrive: {why}", "send it with gridx jobs … --workdir DIR, or "
                                                           "gridx jobs train FILE, through the hub's SSH")

    try:
        if stream.read(len(SESSION_HELLO)) != SESSION_HELLO or stream.read(len(UPLOAD_MAGIC)) != UPLOAD_MAGIC:
            raise fail("no upload on stdin")
        header = json.loads(stream.readline(4096))
    except OSError:  # no input at all
        raise fail("no upload on stdin") from None
    except (ValueError, RecursionError):  # RecursionError: [[[[… nested deeper than Python parses
        raise fail("a damaged header") from None
    if not isinstance(header, dict):
        raise fail("a damaged header")
    spool, size = tempfile.TemporaryFile(), 0
    while True:
        length = frame_length(stream.readline(16))
        if length is None:
            raise fail(f"a damaged frame (each is 1-8 hex digits of at most {FRAME_MAX:x}, then the bytes)")
        if length == 0:
            break
        size += length
        if size > limit:
            raise usage_error(f"{what} is over the {human_bytes(limit)} limit",
                              f"leave files out with a {IGNORE_FILES[0]}, or raise it: --workdir-limit"
                              if what == "the work folder" else "send its folder with --workdir DIR")
        data = stream.read(length)
        if len(data) != length:
            raise fail("it ended early")
        spool.write(data)
    spool.seek(0)
    return Upload(spool, size, header)


def upload_members(upload):
    """A user's tar as members for the layer: folders, files and links with
    plain relative names only (nothing of it is ever unpacked on the hub,
    and write_work_tar writes every header anew)."""
    import tarfile

    try:
        with tarfile.open(fileobj=upload.spool, mode="r|") as archive:
            for member in archive:
                name = posixpath.normpath(member.name)
                if name.startswith("/") or name == ".." or name.startswith("../") or name == ".":
                    raise usage_error(f"the work folder has a path outside it: {member.name!r}")
                if not (member.isreg() or member.isdir() or member.issym()):
                    continue  # hard links, devices: not from a folder walk
                member.name = name
                yield member, archive.extractfile(member) if member.isreg() else None
    except tarfile.TarError as error:
        raise usage_error(f"the work folder's tar is damaged: {error}") from None


def send_upload(pipe, folder, header):
    """The client's side: hello, header and the folder in frames."""
    import json

    pipe.write(SESSION_HELLO + UPLOAD_MAGIC + json.dumps(header).encode() + b"\n")
    frames = FrameWriter(pipe)
    meter = Meter("work folder", folder.bytes)
    write_work_tar(MeteredPipe(frames, meter), folder.members())
    frames.end()
    meter.done()


def send_script(pipe, name, content):
    """`jobs train FILE` through serve: hello, header and the file's bytes in frames."""
    import json

    pipe.write(SESSION_HELLO + UPLOAD_MAGIC + json.dumps({"script": name}).encode() + b"\n")
    frames = FrameWriter(pipe)
    frames.write(content)
    frames.end()


# -- results on the hub -------------------------------------------------------
# Results belong to the job that made them: RESULTS/SERVICE_ID/ holds the
# files and RESULTS/SERVICE_ID.json (its job's name and owner inside) says,
# per replica slot, which task they came from, what they weigh, or why there
# are none. A job is found by name through its service; a deleted job whose
# results are kept, through a swarm config gridx-kept-JOB (labels: its
# owner and service ID), which also holds the name: no new job takes it
# until the results are deleted.


def results_record_path(key):
    return os.path.join(results_dir(), f"{key}.json")


def results_files_path(key):
    return os.path.join(results_dir(), key)


def load_results_record(key):
    """The record of the job whose service ID is key, or None."""
    import json

    try:
        record = json.loads(read_text(results_record_path(key)))
    except (FileNotFoundError, ValueError):
        return None
    except PermissionError:
        raise precondition(f"cannot read {results_record_path(key)}",
                           "on the hub as root (gridx hub init gives the results to the gridx account)") from None
    return record if isinstance(record, dict) and isinstance(record.get("tasks"), dict) else None


def safe_extract(stream, dest, limit, strip=0, max_files=None):
    """Unpack a tar stream into dest (a fresh folder): folders and files only,
    names kept under dest, at most limit bytes (a file's full size counts:
    a sparse one arrives dense) and max_files files. Returns (bytes, files,
    over_limit, left_out)."""
    import tarfile

    written = files = left_out = 0
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            name = posixpath.normpath(member.name)
            parts = [p for p in name.split("/") if p not in ("", ".")]
            if name.startswith("/") or ".." in parts:
                left_out += 1  # not from docker cp: nothing lands outside dest
                continue
            if len(parts) <= strip:
                if not member.isreg():
                    continue  # the output folder itself
                parts = parts[-1:]  # --output named a file: it comes as itself
            else:
                parts = parts[strip:]
            path = os.path.join(dest, *parts)
            if member.isdir():
                os.makedirs(path, mode=0o755, exist_ok=True)
                continue
            if not member.isreg():
                left_out += 1  # links and devices stay behind: a link could point anywhere here
                continue
            if written + member.size > limit or (max_files is not None and files >= max_files):
                return written, files, True, left_out
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            source = archive.extractfile(member)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as target:
                while True:
                    chunk = source.read(STREAM_CHUNK)
                    if not chunk:
                        break
                    target.write(chunk)
            written += member.size
            files += 1
    return written, files, False, left_out


def copy_out(node, container, output, dest, limits):
    """docker cp of an ended container's output, on its worker over the hub's
    SSH (here when the hub itself ran it), within RESULTS_COPY_TIMEOUT_S:
    what came, or why nothing did. limits: (bytes, files or None)."""
    import shlex
    import subprocess
    import tarfile
    import tempfile
    import threading

    copy = ["docker", "cp", "--", f"{container}:{output}", "-"]
    local = node.address == load_hub_config().hub_ip
    argv = copy if local else ssh_argv(node.address, [shlex.join(copy)])
    with tempfile.TemporaryFile() as said:
        process = start(argv, stdout=subprocess.PIPE, stderr=said)
        deadline = threading.Timer(RESULTS_COPY_TIMEOUT_S, process.kill)  # a worker that stops answering
        deadline.start()
        written, files, over, left_out, broken = 0, 0, False, 0, None
        try:
            written, files, over, left_out = safe_extract(process.stdout, dest, limits[0], 1, limits[1])
            while not over and process.stdout.read(STREAM_CHUNK):
                pass  # the tar's padding: docker cp ends by itself
        except (tarfile.TarError, OSError) as error:
            broken = str(error)
        finally:
            process.stdout.close()
            if (over or broken) and process.poll() is None:
                process.kill()  # the rest is not wanted (over the limit) or cannot be read
            code = process.wait()
            timed_out = not deadline.is_alive() and code < 0
            deadline.cancel()
        said.seek(0)
        lines = [line for line in said.read().decode("utf-8", "replace").strip().splitlines()
                 if not line.startswith("Warning: Permanently added")]  # ssh's accept-new, not an error
        error = (lines or [""])[-1]
    record = {"node": node.hostname, "bytes": written, "files": files}
    if left_out:
        record["left_out"] = left_out
    if over:
        what = f"{human_bytes(limits[0])}" + (f" or {limits[1]} files" if limits[1] is not None else "")
        return dict(record, state="over-limit", error=f"over the {what} limit: kept what fit")
    if timed_out:
        return dict(record, state="unreachable",
                    error=f"the copy from {node.hostname} took over {RESULTS_COPY_TIMEOUT_S} s")
    if code == 0 and broken is None:
        return dict(record, state="collected")
    if "Could not find the file" in error or "No such container:path" in error:
        return dict(record, state="missing", error=f"{output} is not in the job's container")
    if "No such container" in error:
        return dict(record, state="gone", error=f"the container is gone from {node.hostname}")
    if not local and code == 255:
        return dict(record, state="unreachable", error=f"the hub's SSH to {node.hostname}: {error or 'failed'}")
    return dict(record, state="failed", error=error or broken or f"exit {code}")


class ResultsLock:
    """Around a change of RESULTS/: short, never held across a copy from a
    worker (collectors claim their tasks instead: claim_due)."""

    def __enter__(self):
        import fcntl

        path = os.path.join(results_dir(), ".lock")
        if os.geteuid() == 0:  # the folder and its lock are the gridx account's too (serve deletes)
            ensure_dir(results_dir())
            self.handle = open(path, "a")
            hand_over(results_dir(), recursive=False)
            hand_over(path, recursive=False)
        else:
            self.handle = open(path, "a")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.handle.close()


RESULTS_FINAL = ("collected", "missing", "over-limit", "gone")  # tried again: unreachable, failed, hub-full


def ended_tasks(tasks):
    """A batch job's current tasks that completed or failed, oldest first
    (a rejected task never ran a container)."""
    ended = [t for t in job_tasks(tasks) if t.state in ("complete", "failed") and t.node_id]
    return sorted(ended, key=lambda t: (t.since, t.id))


def uncollected(record, tasks):
    """The ended Tasks whose output is not (finally) on the hub yet, and
    not given up on (RESULTS_ATTEMPTS)."""
    def due(entry):
        return entry.get("state") not in RESULTS_FINAL and entry.get("attempts", 0) < RESULTS_ATTEMPTS
    return [t for t in ended_tasks(tasks) if due(record["tasks"].get(t.id, {}))]


def claim_due(record, tasks):
    """The due tasks no live collector is copying, claimed for this one in
    the record (the caller saves it under the lock): --wait, jobs results
    and hub watch never copy the same task at once."""
    now = time.time()
    claims = {task_id: claim for task_id, claim in record.get("collecting", {}).items()
              if claim.get("until", 0) > now and process_alive(claim.get("pid"))}
    mine = [t for t in uncollected(record, tasks) if t.id not in claims]
    for task in mine:
        claims[task.id] = {"pid": os.getpid(), "until": now + RESULTS_COPY_TIMEOUT_S + 60}
    record["collecting"] = claims
    return mine


def process_alive(pid):
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def results_folder(record, task_id, several):
    """RESULTS/ID/ of a job of one replica (a task run again replaces the
    old one's); RESULTS/ID/N/ of its Nth task with several."""
    if not several:
        return ""
    taken = [int(t["folder"]) for i, t in record["tasks"].items() if t.get("folder", "").isdigit() and i != task_id]
    known = record["tasks"].get(task_id, {}).get("folder")
    return known or str(max(taken, default=0) + 1)


def collection_limits(service):
    """(bytes, files or None, free bytes the hub keeps) for a job's output:
    its --output-limit, and its owner's limits (users.json) when a member's."""
    import json

    labels = service["Spec"].get("Labels", {})
    size = int(labels.get(LABEL_OUTPUT_LIMIT) or parse_memory(DEFAULT_OUTPUT_LIMIT))
    try:
        document = json.loads(read_text(users_limits_path()))
    except (OSError, ValueError):
        document = {}
    hub = document.get("hub") or {}
    free = hub.get("free_mib", STORE_DEFAULTS["free_mib"])
    mine = (document.get("users") or {}).get(owner_of(service))
    files = None
    if isinstance(mine, dict):  # a member's job: their limits bound what it puts on the hub
        cap = mine.get("output_mib", STORE_DEFAULTS["output_mib"])
        size = size if cap is None else min(size, cap * 1024**2)
        files = mine.get("output_files", STORE_DEFAULTS["output_files"])
    return size, files, (free or 0) * 1024**2


def hub_room(floor, folder=None):
    """Bytes the hub may still take for results (or checkpoints, in folder):
    what is free above the floor."""
    status = os.statvfs(folder or results_dir())
    return status.f_bavail * status.f_frsize - floor


def collect_results(service, tasks, nodes=None):
    """Copy the output of the job's tasks that ended and are not collected
    yet onto the hub; the job's results record (None: no --output). The
    tasks are claimed under the lock, copied without it (each into a folder
    of its own, within its deadline), then put in place under it again."""
    labels = service["Spec"].get("Labels", {})
    output = labels.get(LABEL_OUTPUT)
    if not output:
        return None
    job_id, key = service["Spec"]["Name"], service["ID"]
    record = load_results_record(key) or {"job": job_id, "service": key, "owner": owner_of(service),
                                          "output": output, "tasks": {}}
    if not uncollected(record, tasks) or os.geteuid() != 0:
        return record  # serve (the gridx account) has no SSH to workers: watch collects
    with ResultsLock():
        record = load_results_record(key) or record  # another collector may have been first
        due = claim_due(record, tasks)
        save_results_record(key, record)
    if due:
        copied = copy_tasks(service, due, nodes if nodes is not None else all_swarm_nodes())
        with ResultsLock():
            record = load_results_record(key) or record
            several = job_replicas(service["Spec"]["Mode"]) > 1
            for task in due:
                file_results(record, key, task, several, *copied[task.id])
            save_results_record(key, record)
    return wait_for_other_collectors(key, record)


def wait_for_other_collectors(key, record):
    """The record once the copies other collectors claimed are filed (or
    their claims ran out): --wait and jobs results give the whole results
    even when hub watch was copying them."""
    while record.get("collecting"):
        until = max(claim.get("until", 0) for claim in record["collecting"].values())
        if time.time() > until or not any(process_alive(c.get("pid")) for c in record["collecting"].values()):
            return record
        time.sleep(0.5)
        record = load_results_record(key) or record
    return record


def copy_tasks(service, due, nodes):
    """{task ID: (what came, the folder it came into)} of the due tasks."""
    import tempfile

    output = service["Spec"]["Labels"][LABEL_OUTPUT]
    size, files, floor = collection_limits(service)
    # by node ID, every identity: a task's node may share its hostname with
    # another's, or have been replaced by a rejoin (same worker, same address)
    by_id = {n.id: n for n in nodes}
    containers = {task.id: task.container for task in due if task.container}  # the API's task says it
    copied = {}
    for task in due:
        node, container = by_id.get(task.node_id), containers.get(task.id)
        fresh = tempfile.mkdtemp(prefix=f".{service['ID']}-", dir=results_dir())
        room = hub_room(floor)
        if node is None or not container:
            collected = {"node": task.node, "bytes": 0, "files": 0, "state": "gone",
                         "error": f"{task.node or 'its node'} is no longer in the swarm"}
        elif room <= 0:
            collected = {"node": task.node, "bytes": 0, "files": 0, "state": "hub-full",
                         "error": f"the hub keeps {human_bytes(floor)} of its disk free: collection waits"}
        else:
            collected = copy_out(node, container, output, fresh, (min(size, room), files))
        copied[task.id] = (collected, fresh)
    return copied


def file_results(record, key, task, several, collected, fresh):
    """Put a task's copied output in place and say so in the record (under the lock)."""
    import shutil

    folder = results_folder(record, task.id, several)
    attempts = record["tasks"].get(task.id, {}).get("attempts", 0) + (collected["state"] != "hub-full")
    if not several:  # the task that ran last is the job's record
        record["tasks"] = {}
    target = os.path.join(results_files_path(key), folder) if folder else results_files_path(key)
    if os.path.isdir(target):
        shutil.rmtree(target)
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    os.chmod(fresh, 0o755)
    hand_over(fresh)
    os.rename(fresh, target)
    record["tasks"][task.id] = dict(collected, folder=folder, exit_code=task.exit_code, attempts=attempts)
    record.get("collecting", {}).pop(task.id, None)


def save_results_record(key, record):
    import json

    record["bytes"] = sum(t.get("bytes", 0) for t in record["tasks"].values())
    atomic_write(results_record_path(key), json.dumps(record, indent=2) + "\n", mode=0o644)
    hand_over(results_record_path(key))


def came(record):
    """The tasks whose output is on the hub (state collected)."""
    return {task_id for task_id, entry in record["tasks"].items() if entry.get("state") == "collected"}


def collect_due_results(services, tasks, nodes):
    """hub watch: every job with --output whose ended tasks are not collected."""
    by_service = tasks_by_service(tasks)
    collected = []
    for service in services:
        if LABEL_OUTPUT not in service["Spec"].get("Labels", {}):
            continue
        before = load_results_record(service["ID"]) or {"tasks": {}}
        record = collect_results(service, by_service.get(service["Spec"]["Name"], []), nodes)
        if record and came(record) - came(before):
            collected.append(service["Spec"]["Name"])
    return collected


def collect_and_say(services, tasks, nodes):
    """hub watch's collection (in a Background of its own)."""
    collected = collect_due_results(services, tasks, nodes)
    if collected:
        info(f"collected the results of {', '.join(collected)}")


def results_summary(record):
    """The line jobs status shows, from a results record."""
    if not record or not record["tasks"]:
        return "none yet: collected onto the hub when the job's task ends"
    parts = []
    for s in sorted(record["tasks"].values(), key=lambda t: t.get("folder", "").zfill(9)):
        where = f"replica {s['folder']}: " if s.get("folder") else ""
        shown = f"{human_bytes(s.get('bytes', 0))} in {s.get('files', 0)} file(s)"
        if s["state"] == "collected":
            parts.append(f"{where}{shown} from {s['node']}")
        else:
            parts.append(f"{where}{s['state']}: {s.get('error', '')}" + (f" ({shown})" if s.get("bytes") else ""))
    return "; ".join(parts)


def remove_results(key):
    import shutil

    with ResultsLock():
        shutil.rmtree(results_files_path(key), ignore_errors=True)
        try:
            os.unlink(results_record_path(key))
        except FileNotFoundError:
            pass


def write_results_tar(key, out):
    """The hub's side of `jobs results`: RESULTS/SERVICE_ID/ as a tar stream."""
    import tarfile

    files = results_files_path(key)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=STREAM_CHUNK) as archive:
        for top, folders, names in os.walk(files):
            folders.sort()
            for name in sorted(names):
                full = os.path.join(top, name)
                if os.path.isfile(full) and not os.path.islink(full):
                    archive.add(full, arcname=os.path.relpath(full, files), recursive=False)


def output_containers(services, tasks, keep=False):
    """Before `jobs delete` on the hub as root: {node address: container IDs}
    of the ended tasks of jobs with --output (Docker 20.10 keeps them on the
    worker after `service rm`, and the output with them). keep: collect
    what is not collected yet first (--keep-results)."""
    if DOCKER_HOST or OWNER is not None or os.geteuid() != 0:
        return {}  # through --manager or serve nothing here reaches the workers
    outputs = [s for s in services if LABEL_OUTPUT in s["Spec"].get("Labels", {})]
    names = {s["Spec"]["Name"] for s in outputs}
    ended = [t for t in tasks if t.service in names and t.state in ("complete", "failed") and t.node_id]
    if not ended:
        return {}
    nodes = all_swarm_nodes()
    if keep:
        by_service = tasks_by_service(tasks)
        for service in outputs:
            collect_results(service, by_service.get(service["Spec"]["Name"], []), nodes)
    containers = {t.id: t.container for t in ended if t.container}
    ready = {n.id: n.address for n in nodes if n.state == "ready" and n.hub_ssh}  # by node ID, see collect_results
    found = {}
    for task in ended:
        if task.node_id in ready and task.id in containers:
            found.setdefault(ready[task.node_id], []).append(containers[task.id])
    return found


def remove_containers(found):
    """`docker rm -f` of output_containers(), one call per node, at once."""
    import shlex
    import subprocess

    if not found:
        return
    hub_ip = load_hub_config().hub_ip
    processes = []
    for address, ids in sorted(found.items()):
        argv = ["docker", "rm", "-f", "--", *ids]
        if address != hub_ip:
            argv = ssh_argv(address, [shlex.join(argv)])
        processes.append(start(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for process in processes:
        process.wait()  # best effort: a container Docker removed itself is no error


def kept_marker(job_id):
    return f"gridx-kept-{job_id}"


def kept_results(job_id):
    """{"service": ID, "owner": NAME} of a deleted job whose results are
    kept, or None (one docker call)."""
    import json

    found = run(docker("config", "inspect", "--format", "{{json .Spec.Labels}}", "--", kept_marker(job_id)),
                check=False)
    if found.returncode:
        # Docker 20.10 and 26.1 say "No such config: NAME", 28 "config NAME not found"
        error = found.stderr.lower()
        if "no such config" in error or f"config {kept_marker(job_id).lower()} not found" in error:
            return None
        raise command_error(docker("config", "inspect"), found)
    labels = json.loads(found.stdout or "{}") or {}
    return {"service": labels.get(LABEL_SERVICE, ""), "owner": labels.get(LABEL_OWNER, ADMIN_OWNER)}


def refuse_kept_name(job_id):
    """A new job never takes the name of a deleted one whose results are kept."""
    if kept_results(job_id):
        raise usage_error(f"the results of an earlier job {job_id} are kept on the hub under that name",
                          f"pick another --name, or delete them: gridx jobs results {job_id} --delete")


def keep_results(service):
    """jobs delete --keep-results: the marker that finds them, by name, once
    the job is gone."""
    name = service["Spec"]["Name"]
    run(docker("config", "create", f"--label={LABEL_KEPT}={name}", f"--label={LABEL_OWNER}={owner_of(service)}",
               f"--label={LABEL_SERVICE}={service['ID']}", "--", kept_marker(name), "-"), input=name + "\n")


def check_kept_limit(more):
    """Through serve: exit 2 when keeping MORE results would take the member
    past their limit of kept results (before anything is deleted)."""
    if OWNER is None or SERVE_LIMITS is None or not more:
        return
    cap = SERVE_LIMITS.get("kept", STORE_DEFAULTS["kept"])
    listed = run(docker("config", "ls", "--filter", f"label={LABEL_KEPT}",
                        "--format", '{{.Label "%s"}}' % LABEL_OWNER)).stdout.split()
    held = listed.count(OWNER)
    if cap is not None and held + more > cap:
        raise usage_error(f"{OWNER} keeps the results of {held} deleted job(s), the most the hub allows is {cap}",
                          "delete some first: gridx jobs results JOB --delete (or delete this job without "
                          "--keep-results after fetching them: gridx jobs results JOB)")


def forget_kept(job_id):
    run(docker("config", "rm", "--", kept_marker(job_id)), check=False)


# -- results to the submitter -------------------------------------------------


def results_destination(dest, job_id):
    """DEST (default ./JOB): a folder that does not exist or is empty, so
    nothing of the user's is overwritten."""
    path = os.path.abspath(dest or job_id)
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)):
        raise usage_error(f"{dest or job_id} exists and is not an empty folder: results never overwrite files",
                          f"give another destination: gridx jobs results {job_id} DEST")
    return path


def results_here(key, dest, record):
    """On the hub: copy RESULTS/SERVICE_ID/ to dest; (bytes, files) as its record says."""
    import shutil

    os.makedirs(dest, mode=0o755, exist_ok=True)
    files = results_files_path(key)
    if os.path.isdir(files):
        shutil.copytree(files, dest, symlinks=True, dirs_exist_ok=True)
    tasks = (record or {}).get("tasks", {}).values()
    return sum(t.get("bytes", 0) for t in tasks), sum(t.get("files", 0) for t in tasks)


# ---------------------------------------------------------------------------
# Owner activity and checkpoints
# ---------------------------------------------------------------------------
# A volunteer's machine is theirs first. Its agent (the bundle's agent.sh,
# docs/CONTRACT.md) freezes Grid-X's containers there while the owner is at
# it, and reports each change to the hub: one line over TCP to
# HUB_VPN_IP:AGENT_PORT, the worker known by the connection's source (its
# VPN address, which WireGuard authenticates; jobs cannot reach the hub).
# hub watch listens (OwnerReports, a thread of its own), pauses the node in
# the swarm (no new task there) and labels it with the owner's state
# (gridx cluster and jobs status read the label, through any manager path).
# A task the agent stops (preempting) is recorded before its end, and its
# job runs again elsewhere from its latest checkpoint: `--checkpoint PATH`
# is copied from the running container every --checkpoint-every and at the
# end of a preempted task, kept whole on the hub, and laid on the job's
# image (a layer, as a work folder is) whenever it runs again.
#   the agent's reports · checkpoints · running again from a checkpoint

OWNER_STATES = ("sharing", "paused", "outside-hours", "preempting")
OWNER_REASONS = ("-", "input", "terminal", "logind", "cpu", "gpu", "hours")
AGENT_LINE_MAX = 4096  # same as the agent's contract: one line, at most 4 KiB, within 5 s
AGENT_SILENT_S = 90  # three heartbeats missed: the owner's state is unknown
CHECKPOINTS = "/var/lib/gridx/checkpoints"  # CHECKPOINTS/SERVICE_ID/{current/,checkpoint.json}
_AGENT_REPORT = None
_OWNERS_LOCK = None


def checkpoints_dir():
    return os.path.abspath(os.environ.get("GRIDX_CHECKPOINTS_DIR") or CHECKPOINTS)


def owners_path():
    """What hub watch knows of the owners (their last reports) and of the
    tasks the agents preempted: kept across the hub's restarts."""
    return os.path.join(config_dir(), "owners.json")


# -- the agent's reports ------------------------------------------------------


def parse_agent_report(line):
    """One line of the agent ({field: value}), or None when it is not one:
    the version-1 grammar of docs/CONTRACT.md, fields in order; later
    key=value fields are ignored."""
    global _AGENT_REPORT
    if _AGENT_REPORT is None:
        _AGENT_REPORT = re.compile(
            rf"gridx-agent 1 state=(?P<state>{'|'.join(OWNER_STATES)}) since=(?P<since>[0-9]{{1,12}}) "
            rf"reason=(?P<reason>{'|'.join(map(re.escape, OWNER_REASONS))}) policy=(?P<policy>idle|always) "
            r"hours=(?P<hours>-|[0-2][0-9]:[0-5][0-9]-[0-2][0-9]:[0-5][0-9]) preempt_at=(?P<preempt_at>[0-9]{1,12}) "
            r"tasks=(?P<tasks>-|[a-z0-9]{25}(?:,[a-z0-9]{25})*) mem_mib=(?P<mem_mib>[0-9]{1,9})"
            r"(?: [a-z_]{1,32}=[!-~]{0,256})*\n?")
    found = _AGENT_REPORT.fullmatch(line)
    if not found:
        return None
    report = found.groupdict()
    for key in ("since", "preempt_at", "mem_mib"):
        report[key] = int(report[key])
    report["tasks"] = [] if report["tasks"] == "-" else report["tasks"].split(",")
    return report


def owner_label(report):
    """The node label gridx.owner-state: STATE REASON SINCE PREEMPT_AT HOURS."""
    return f"{report['state']} {report['reason']} {report['since']} {report['preempt_at']} {report['hours']}"


def owners_lock():
    import threading

    global _OWNERS_LOCK
    if _OWNERS_LOCK is None:
        _OWNERS_LOCK = threading.Lock()
    return _OWNERS_LOCK


def load_owners():
    import json

    try:
        document = json.loads(read_text(owners_path()))
    except (FileNotFoundError, ValueError):
        document = {}
    return {"nodes": dict(document.get("nodes") or {}), "preempted": dict(document.get("preempted") or {})}


def save_owners(document):
    import json

    ensure_dir(config_dir())
    atomic_write(owners_path(), json.dumps(document, indent=2, sort_keys=True) + "\n", 0o600)


def owner_node_update(node, report, known):
    """The `docker node update` that makes the swarm follow a report (None
    when nothing changes): paused while the owner is active or outside the
    hours (no new task there, its tasks left as they are), active again when
    sharing, but only if gridx paused it (an admin's drain or pause stays)."""
    label = owner_label(report)
    argv = ["node", "update"]
    sharing = report["state"] == "sharing"
    if report["state"] == "preempting" and report["tasks"]:  # what --wait waits on, not a failure
        argv.append(f"--label-add={LABEL_PREEMPTED}={','.join(report['tasks'])}")
    if not sharing and node.availability == "active":
        argv.append("--availability=pause")
        known["paused_by_gridx"] = True
    elif sharing and node.availability == "pause" and known.get("paused_by_gridx"):
        argv.append("--availability=active")
        known["paused_by_gridx"] = False
    if len(argv) == 2 and (node.owner == label or (sharing and not node.owner)):
        # Every node update is a chance for Docker 20.10's constraint
        # enforcer to reject a running task there (see ENFORCER_REJECTION):
        # a sharing node that never paused keeps no label at all.
        return None
    return docker(*argv, f"--label-add={LABEL_OWNER_STATE}={label}", "--", node.id)


def apply_owner_report(address, report, nodes=None):
    """A report from the worker at address: recorded (its preempted tasks
    first, durably), then the swarm follows. The node it names, or None."""
    node = next((n for n in (all_swarm_nodes() if nodes is None else nodes)
                 if n.address == address and not n.manager and n.state == "ready"), None)
    if node is None:
        return None
    with owners_lock():
        owners = load_owners()
        known = owners["nodes"].setdefault(node.id, {})
        known.update(report=report, seen=time.time(), address=address)
        if report["state"] == "preempting":
            for task_id in report["tasks"]:
                owners["preempted"].setdefault(task_id, {"node": node.id, "at": report["preempt_at"]})
        argv = owner_node_update(node, report, known)
        save_owners(owners)
    if argv:
        run(argv, check=False)
    return node


def silent_agents(nodes, now=None):
    """Nodes gridx paused whose agent has said nothing for AGENT_SILENT_S
    are labelled unknown (one that shares is left alone: no node update for
    nothing). They stay paused: an agent that died may have left Grid-X's
    containers frozen there, and its volunteer is told by status.sh."""
    now = time.time() if now is None else now
    by_id = {n.id: n for n in nodes}
    silent = []
    with owners_lock():
        owners = load_owners()
        for node_id, known in owners["nodes"].items():
            node = by_id.get(node_id)
            if (node and known.get("paused_by_gridx") and now - known.get("seen", 0) > AGENT_SILENT_S
                    and not node.owner.startswith("unknown")):
                silent.append(node)
    for node in silent:
        run(docker("node", "update", f"--label-add={LABEL_OWNER_STATE}=unknown - 0 0 -", "--", node.id), check=False)
    return silent


class OwnerReports:
    """hub watch's listener for the agents' reports, in a thread of its own:
    one line a connection (AGENT_LINE_MAX, 5 s), `ok`, closed. A line that
    is not a report, or from an address that is no worker, is answered
    nothing and changes nothing."""

    def __init__(self, hub_ip, port=AGENT_PORT):
        import socket
        import threading

        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind((hub_ip, port))
        self.server.listen(16)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                conn, (address, _) = self.server.accept()
            except OSError:
                return
            with conn:
                self.answer(conn, address)

    def answer(self, conn, address):
        conn.settimeout(5)
        try:
            raw = conn.makefile("rb").readline(AGENT_LINE_MAX + 1)
        except OSError:
            return
        report = parse_agent_report(raw.decode("ascii", "replace")) if len(raw) <= AGENT_LINE_MAX else None
        if report is None:
            return
        try:
            node = apply_owner_report(address, report)
        except GridxError as error:
            warn(f"the report of {address} could not be applied: {error.message}")
            return
        if node is None:
            return
        try:
            conn.sendall(b"ok\n")
        except OSError:
            pass
        if report["state"] != "sharing":
            info(f"{node.hostname}: {describe_owner(owner_label(report)) or report['state']}")


# -- checkpoints ----------------------------------------------------------------


def checkpoint_folder(key):
    return os.path.join(checkpoints_dir(), key)


def checkpoint_record(key):
    """What the hub keeps of a job's checkpoint (its service ID: key): {task,
    node, at, bytes, files}, or None."""
    import json

    try:
        return json.loads(read_text(os.path.join(checkpoint_folder(key), "checkpoint.json")))
    except (FileNotFoundError, ValueError):
        return None


def take_checkpoint(service, task, node):
    """--checkpoint PATH of a task's container (running, or ended) onto the
    hub: copied into a fresh folder, which replaces the kept one only once
    whole (a half-copied checkpoint never replaces the last complete one).
    What copy_out said."""
    import json
    import shutil
    import tempfile

    key, path = service["ID"], service["Spec"]["Labels"][LABEL_CHECKPOINT]
    size, files, floor = collection_limits(service)  # the owner's limits, as for results
    folder = checkpoint_folder(key)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fresh = tempfile.mkdtemp(prefix=".incoming-", dir=folder)
    room = hub_room(floor, folder)
    got = (copy_out(node, task.container, path, fresh, (min(size, room), files)) if room > 0 else
           {"state": "hub-full", "error": f"the hub keeps {human_bytes(floor)} of its disk free"})
    if got["state"] != "collected":
        shutil.rmtree(fresh, ignore_errors=True)
        return got
    current, old = os.path.join(folder, "current"), os.path.join(folder, ".old")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(current):
        os.rename(current, old)
    os.rename(fresh, current)
    shutil.rmtree(old, ignore_errors=True)
    record = {"task": task.id, "node": node.hostname, "at": int(time.time()), "bytes": got["bytes"],
              "files": got["files"], "path": path}
    atomic_write(os.path.join(folder, "checkpoint.json"), json.dumps(record) + "\n", 0o644)
    hand_over(folder)  # serve (the gridx account) says its age and size
    return got


def remove_checkpoint(key):
    import shutil

    shutil.rmtree(checkpoint_folder(key), ignore_errors=True)


def due_checkpoints(services, tasks, nodes, now=None):
    """hub watch: the running tasks of jobs with --checkpoint whose latest
    checkpoint is older than their --checkpoint-every: taken now."""
    now = time.time() if now is None else now
    by_id = {n.id: n for n in nodes}
    by_service = tasks_by_service(tasks)
    taken = []
    for service in services:
        labels = service["Spec"].get("Labels", {})
        if LABEL_CHECKPOINT not in labels:
            continue
        every = int(labels.get(LABEL_CHECKPOINT_EVERY) or DEFAULT_CHECKPOINT_EVERY_S)
        last = (checkpoint_record(service["ID"]) or {}).get("at", 0)
        for task in by_service.get(service["Spec"]["Name"], []):
            node = by_id.get(task.node_id)
            started = unix_time(task.created) or now
            if (task.state == "running" and task.container and node and node.hub_ssh
                    and now - max(last, started) >= every):
                got = take_checkpoint(service, task, node)
                if got["state"] == "collected":
                    taken.append(service["Spec"]["Name"])
                    last = now
    return taken


def checkpoint_image(service):
    """The image a job runs again with: its first image with its latest
    checkpoint laid at PATH (a layer, made as a work folder's is); None
    when there is no checkpoint yet."""
    labels = service["Spec"]["Labels"]
    key, path = service["ID"], labels[LABEL_CHECKPOINT]
    current = os.path.join(checkpoint_folder(key), "current")
    if not os.path.isdir(current):
        return None
    folder = WorkFolder(current, float("inf"), ignore=False)
    base = labels.get(LABEL_RUN_IMAGE) or service["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
    layer = WorkLayer(service["Spec"]["Name"], folder.members(), folder.bytes, folder.describe(),
                      into=path, repository=CHECKPOINT_REPOSITORY)
    return layer.build(base)


def run_again_from_checkpoint(services, job_ids):
    """Run these jobs again, each from its latest checkpoint when it has one
    (the same forced update as run_again, on the image with it)."""
    by_name = {s["Spec"]["Name"]: s for s in services}
    for job_id in job_ids:
        service = by_name.get(job_id)
        image = None
        if service and LABEL_CHECKPOINT in service["Spec"].get("Labels", {}):
            try:
                image = checkpoint_image(service)
            except GridxError as error:
                warn(f"job {job_id} runs again from its start: its checkpoint could not be laid on its image: "
                     f"{error.message}")
        if image is None:
            run_again([job_id])
            continue
        run(docker("service", "update", "--detach", "--force", "--no-resolve-image", f"--image={image}",
                   "--", job_id))
        info(f"job {job_id} runs again from its checkpoint of "
             f"{time.strftime('%H:%M:%S', time.localtime(checkpoint_record(service['ID'])['at']))}")


def rerun_preempted(services, tasks, nodes):
    """The jobs whose tasks an agent preempted, once those tasks ended: their
    checkpoint taken from the ended container, then run again elsewhere (the
    node is paused). A preemption is recorded before the task's end and
    kept until it ran again: a hub restart loses none."""
    by_task = {t.id: t for t in tasks}
    by_node = {n.id: n for n in nodes}
    by_name = {s["Spec"]["Name"]: s for s in services}
    with owners_lock():
        preempted = dict(load_owners()["preempted"])
    done, ran, again = [], [], []
    for task_id, record in preempted.items():
        task = by_task.get(task_id)
        service = by_name.get(task.service) if task else None
        if task is None or service is None:
            done.append(task_id)  # the job is gone (or its task's history): nothing to run again
            continue
        if task.active or record.get("ran_again"):
            continue  # still stopping (SIGTERM, then its grace), or done: kept for Notifications
        node = by_node.get(task.node_id)
        if LABEL_CHECKPOINT in service["Spec"]["Labels"] and node and task.container and node.hub_ssh:
            take_checkpoint(service, task, node)
        if is_current(task) and task.service not in again:
            again.append(task.service)
        ran.append(task_id)
    if again:
        run_again_from_checkpoint(services, again)
        info(f"ran again, preempted by their volunteers: {', '.join(again)}")
    if done or ran:
        with owners_lock():
            owners = load_owners()
            for task_id in done:
                owners["preempted"].pop(task_id, None)
            for task_id in ran:
                if task_id in owners["preempted"]:
                    owners["preempted"][task_id]["ran_again"] = True
            save_owners(owners)
    return again


def owner_chores(services, tasks, nodes):
    """hub watch's part of this section (in a Background of its own): the
    preempted jobs run again from their checkpoints, the periodic
    checkpoints taken, the silent agents marked."""
    rerun_preempted(services, tasks, nodes)
    taken = due_checkpoints(services, tasks, nodes)
    if taken:
        info(f"took the checkpoints of {', '.join(taken)}")
    silent_agents(nodes)
    live = {service["ID"] for service in services}
    for key in os.listdir(checkpoints_dir()) if os.path.isdir(checkpoints_dir()) else ():
        if key not in live:  # its job was deleted through --manager
            remove_checkpoint(key)


def listen_to_owners():
    """hub watch's OwnerReports on the hub's VPN address, or None (said once)."""
    try:
        return OwnerReports(load_hub_config().hub_ip)
    except (OSError, GridxError) as error:
        warn(f"the workers' owner-activity reports cannot be heard on port {AGENT_PORT}: "
             f"{getattr(error, 'message', None) or error}")
        return None


# ---------------------------------------------------------------------------
# Usage
# ---------------------------------------------------------------------------
# Who used how much, and who gave how much: `hub watch` writes a ledger,
# USAGE/ledger.jsonl (/var/lib/gridx/usage), one JSON line per span a task
# held its node's resources: from the time it started running to the time
# it ended (complete, failed, shut down), went away with its job, or its node
# went Down (Docker 20.10 shows such a task "running" for 24 hours). A span
# is written once, when it closes, by an append of one line under a lock
# (the lines already there are read first: a span is never written twice,
# whoever else appends); a line cut short by a crash is skipped. The spans
# still open are USAGE/open.json (rewritten atomically), so a span outlives
# a restart of the hub; a task whose job was deleted while hub watch was not
# running ends at the last time watch saw it. Resources are what a task
# reserves (its CPUs rounded up, its memory, its GPUs), the amount a
# volunteer gave and others could not have; a task shorter than watch's
# interval starts no earlier than the pass before the one that saw it end.
# The folder is root's (0755) and its files 0644: members read it through
# serve (`gridx usage`), as they see what everyone's jobs reserve now.

USAGE_SEEN_EVERY_S = 60  # open.json's "seen" times are rewritten at most this often
USAGE_DEFAULT_SINCE = "7d"


def usage_dir():
    return os.path.abspath(os.environ.get("GRIDX_USAGE_DIR") or "/var/lib/gridx/usage")


def ledger_path():
    return os.path.join(usage_dir(), "ledger.jsonl")


def open_spans_path():
    return os.path.join(usage_dir(), "open.json")


def unix_seconds(stamp):
    """Docker's RFC 3339 time (nanoseconds, Z) -> Unix seconds, or None."""
    import calendar

    match = re.match(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?Z$", stamp or "")
    if not match:
        return None
    whole = calendar.timegm(tuple(int(part) for part in match.groups()[:6]))
    return whole + float("0." + (match.group(7) or "0"))


def task_times(task_ids):
    """{task ID: (its node's ID, its state, the Unix time it entered it, the
    Unix time it was created)} from one `docker inspect` of the tasks (a
    task gone meanwhile is left out)."""
    import json

    if not task_ids:
        return {}
    result = run(docker("inspect", "--type", "task", "--", *task_ids), check=False)
    try:
        details = json.loads(result.stdout or "[]")
    except ValueError:
        details = []
    found = {}
    for detail in details:
        status = detail.get("Status") or {}
        found[detail.get("ID")] = (detail.get("NodeID") or "", (status.get("State") or "").lower(),
                                   unix_seconds(status.get("Timestamp")), unix_seconds(detail.get("CreatedAt")))
    return found


def read_ledger(path=None, offset=0):
    """(the spans from offset on, the offset after the last whole line)."""
    import json

    spans = []
    try:
        with open(path or ledger_path(), "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        try:
            span = json.loads(line)
        except ValueError:
            continue  # cut short by a crash: the next append starts a new line
        if isinstance(span, dict) and isinstance(span.get("task"), str):
            spans.append(span)
    return spans, offset + end


def span_key(span):
    return span["task"], round(float(span.get("started") or 0), 3)


class Ledger:
    """The append-only ledger: what it holds (keys), appended to under a lock."""

    def __init__(self):
        self.keys, self.offset, self.last_end = set(), 0, {}
        self.extent = {}  # service ID -> (first start, last end): a job's run time (Notifications)
        self.catch_up()

    def catch_up(self):
        spans, self.offset = read_ledger(offset=self.offset)
        for span in spans:
            self.learn(span)

    def learn(self, span):
        self.keys.add(span_key(span))
        ended, started = float(span.get("ended") or 0), float(span.get("started") or 0)
        self.last_end[span["task"]] = max(self.last_end.get(span["task"], 0), ended)
        first, last = self.extent.get(span.get("service"), (started, ended))
        self.extent[span.get("service")] = (min(first, started), max(last, ended))

    def append(self, spans):
        """Write the spans not written yet; the ones written."""
        import fcntl
        import json

        ensure_dir(usage_dir(), 0o755)
        with open(os.path.join(usage_dir(), ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.catch_up()  # another writer's lines first
            fresh = [span for span in spans if span_key(span) not in self.keys]
            if not fresh:
                return []
            fd = os.open(ledger_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                text = "".join(json.dumps(span, sort_keys=True) + "\n" for span in fresh)
                if size and size != self.offset:  # a line cut short by a crash: end it
                    text = "\n" + text
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            for span in fresh:
                self.learn(span)
            self.offset = os.path.getsize(ledger_path())
        return fresh


class UsageRecorder:
    """hub watch's side: every pass, the spans that opened and closed."""

    def __init__(self):
        self.ledger = Ledger()
        self.open = self.load_open()
        self.previous_pass = None
        self.passed = set()  # ended tasks taken note of and not counted (see short_tasks)
        self.saved_at = 0.0

    @staticmethod
    def load_open():
        import json

        try:
            document = json.loads(read_text(open_spans_path()))
        except (FileNotFoundError, ValueError):
            return {}
        return {k: v for k, v in document.items() if isinstance(v, dict)} if isinstance(document, dict) else {}

    def save_open(self, now):
        import json

        ensure_dir(usage_dir(), 0o755)
        atomic_write(open_spans_path(), json.dumps(self.open, indent=1, sort_keys=True) + "\n", 0o644)
        self.saved_at = now

    def record(self, services, tasks, nodes, now=None):
        """Open the spans of tasks now running, close those that ended; never raises."""
        now = time.time() if now is None else now
        try:
            closed = self.step(services, tasks, nodes, now)
        except (GridxError, OSError, ValueError, KeyError, TypeError) as error:  # a damaged open.json too
            warn(f"usage: not recorded this pass: {getattr(error, 'message', error)}")
            return []
        finally:
            self.previous_pass = now
        return closed

    def step(self, services, tasks, nodes, now):
        by_name = {s["Spec"]["Name"]: s for s in services}
        node_of = {node.id: node for node in nodes}
        down = {node.id for node in nodes if node.state == "down"}
        seen = {t.id: t for t in tasks if t.service in by_name}
        starting = [t.id for t in seen.values() if t.state == "running" and t.id not in self.open]
        ending = [i for i in self.open if i in seen and seen[i].state != "running"]
        fresh = self.short_tasks(seen)
        times = task_times(starting + ending + fresh)  # no docker call when nothing changed
        closed, changed = [], False
        for task_id, span in list(self.open.items()):
            task = seen.get(task_id)
            if task is None:
                closed.append(dict(span, ended=span["seen"], how="gone"))  # its job was deleted
            elif task.state != "running":
                _, state, stamp, _ = times.get(task_id, ("", task.state, None, None))
                closed.append(dict(span, ended=min(max(span["started"], stamp or now), now), how=state))
            elif span.get("node_id") in down:
                closed.append(dict(span, ended=now, how="node-down"))
            else:
                changed = changed or now - span["seen"] >= USAGE_SEEN_EVERY_S
                span["seen"] = now
                continue
            del self.open[task_id]
        for task_id in starting:
            node_id, state, stamp, _ = times.get(task_id, ("", "", None, None))
            if state != "running" or node_id in down:
                continue  # ended (or cut off) between the two reads: the next pass sees it
            task, service = seen[task_id], by_name[seen[task_id].service]
            # a task whose node came back after a span was closed starts again now
            started = now if task_id in self.ledger.last_end else min(stamp or now, now)
            self.open[task_id] = dict(task_usage_fields(task, service, node_id, node_of.get(node_id)),
                                      started=started, seen=now)
            changed = True
        closed += self.short_spans(fresh, seen, times, by_name, node_of)
        written = self.ledger.append(closed)
        if closed or changed:
            self.save_open(now)
        return written

    def short_tasks(self, seen):
        """Tasks that ran and ended between two passes (never seen running).
        The first pass after a start cannot tell them from ones that ended
        long ago: it only takes note of them."""
        fresh = [t.id for t in seen.values() if t.state in ("complete", "failed") and t.node
                 and t.id not in self.open and t.id not in self.ledger.last_end and t.id not in self.passed]
        if self.previous_pass is None:
            self.passed.update(fresh)
            return []
        return fresh

    def short_spans(self, fresh, seen, times, by_name, node_of):
        """A span for each short task: from its creation, or the pass before
        the one that saw it end if that is later, to its end."""
        spans = []
        for task_id in fresh:
            self.passed.add(task_id)
            node_id, state, stamp, created = times.get(task_id, ("", "", None, None))
            if stamp is None or stamp < self.previous_pass:
                continue
            task = seen[task_id]
            started = max(self.previous_pass, created or 0)
            spans.append(dict(task_usage_fields(task, by_name[task.service], node_id, node_of.get(node_id)),
                              started=min(started, stamp), ended=stamp, seen=stamp, how=f"{state} (short)"))
        return spans


def task_node(task, nodes):
    """The Node a task runs on: by node ID where the task knows it, else by
    its hostname when exactly one node has it."""
    node_id = getattr(task, "node_id", "")
    for node in nodes:
        if node_id and node.id == node_id:
            return node
    named = [node for node in nodes if node.hostname == task.node]
    return named[0] if len(named) == 1 else None


def task_usage_fields(task, service, node_id, node):
    """What a span says of its task: its job, owner, kind, node and reservation."""
    asks = service_request(service)
    labels = service["Spec"].get("Labels", {})
    return {"task": task.id, "service": service["ID"], "job": service["Spec"]["Name"], "owner": owner_of(service),
            "kind": labels.get(LABEL_KIND, "run"), "node_id": node_id, "node": node.hostname if node else task.node,
            "cpus": asks.cpus, "memory_mib": asks.memory_mib, "gpus": asks.gpus}


def parse_since(value, now=None):
    """--since: 7d, 12h, 30m, or a date (2026-12-01): Unix seconds."""
    import calendar

    now = time.time() if now is None else now
    match = re.fullmatch(r"(\d{1,5})([dhm])", (value or "").strip())
    if match:
        return now - int(match.group(1)) * {"d": 86400, "h": 3600, "m": 60}[match.group(2)]
    try:
        return float(calendar.timegm(time.strptime(value.strip(), "%Y-%m-%d")))
    except (ValueError, AttributeError):
        raise usage_error(f"invalid --since {value!r}: give an age (7d, 12h, 30m) or a date (2026-12-01)",
                          "for example: gridx usage --since 30d") from None


def empty_hours():
    return {"cpu_hours": 0.0, "gpu_hours": 0.0, "memory_gib_hours": 0.0, "tasks": 0}


def add_hours(total, span, seconds):
    hours = seconds / 3600
    total["cpu_hours"] += span.get("cpus", 0) * hours
    total["gpu_hours"] += span.get("gpus", 0) * hours
    total["memory_gib_hours"] += span.get("memory_mib", 0) / 1024 * hours
    total["tasks"] += 1


def rounded(hours):
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in hours.items()}


def usage_report(spans, open_spans, since, now, user=None):
    """The --json shape of `gridx usage`: what each member used (by kind)
    and each node gave between since and now; a span counts the part of it
    inside that window, an open one up to now."""
    users, nodes, running = {}, {}, 0
    for span in list(spans) + [dict(s, ended=now, running=True) for s in open_spans]:
        if user is not None and span.get("owner") != user:
            continue
        seconds = min(float(span.get("ended") or 0), now) - max(float(span.get("started") or 0), since)
        if seconds <= 0:
            continue
        running += bool(span.get("running"))
        member = users.setdefault(span.get("owner", "?"), {"kinds": {}})
        add_hours(member["kinds"].setdefault(span.get("kind", "run"), empty_hours()), span, seconds)
        node = nodes.setdefault(span.get("node_id") or span.get("node", "?"),
                                dict(empty_hours(), hostname=span.get("node", "")))
        add_hours(node, span, seconds)
    shaped = []
    for name, member in sorted(users.items()):
        total = empty_hours()
        for hours in member["kinds"].values():
            for key in total:
                total[key] += hours[key]
        shaped.append(dict(rounded(total), name=name,
                           kinds={kind: rounded(hours) for kind, hours in sorted(member["kinds"].items())}))
    ordered = sorted(nodes.items(), key=lambda item: (item[1]["hostname"], item[0]))
    given = [dict(rounded(hours), node_id=node_id) for node_id, hours in ordered]
    return {"since": int(since), "until": int(now), "users": shaped, "nodes": given, "running": running}


def usage_since(since, now=None, user=None):
    """usage_report from the ledger and the open spans on this machine (the hub)."""
    import json

    now = time.time() if now is None else now
    try:
        spans, _ = read_ledger()
        try:
            document = json.loads(read_text(open_spans_path()))
        except FileNotFoundError:
            document = {}
    except PermissionError:
        raise precondition(f"cannot read {usage_dir()}", "run it on the hub (as root, or through gridx serve)") \
            from None
    except ValueError:
        document = {}
    open_spans = [s for s in document.values() if isinstance(s, dict)] if isinstance(document, dict) else []
    return usage_report(spans, open_spans, since, now, user)


def usage_of_members(days=7):
    """{member: their total hours of the last days} (hub list-users)."""
    report = usage_since(time.time() - days * 86400)
    return {member["name"]: {k: member[k] for k in ("cpu_hours", "gpu_hours", "memory_gib_hours")}
            for member in report["users"]}


# ---------------------------------------------------------------------------
# Notifications
# ---------------------------------------------------------------------------
# `--notify TARGET` (and a default per member and per hub, set by the admin):
# when a job ends, `hub watch` sends one event to TARGET, an http(s) URL, as
# Standard Webhooks does it: a JSON POST with webhook-id (the same on every
# try of one event), webhook-timestamp and webhook-signature (v1, HMAC-SHA256
# over "id.timestamp.body" with the key of whoever chose the target: the
# member's own for their --notify and their default, the hub's for the hub's
# default and the admin's jobs). `text+URL` sends the line alone (ntfy-style
# topics), `slack+`/`discord+` (found by themselves from hooks.slack.com and
# discord.com/api/webhooks) their incoming webhooks' JSON. Events wait in an
# outbox that a thread of hub watch sends, each request within
# NOTIFY_TIMEOUT_S, again after NOTIFY_RETRY_S (a slow receiver never holds
# up watch); the outbox is saved before a try and after it, so an event is
# made once per end, across restarts, and never sent again once delivered.
# A member's own target never reaches the hub itself, the networks the hub
# is on (the VPN among them) or an address that is not global, unless the
# admin allows it (checked at submit, and again on each try, connecting to
# the address that was checked): the hub is no member's way into its own
# services. Keys are 0600 in a 0700 folder and never printed.
#   NOTIFY_SETTINGS   /etc/gridx/notify/settings.json (0600): defaults, the admin's allowances
#   keys/WHO.key      /etc/gridx/notify/keys/ (0600): whsec_…, WHO a member or "hub"
#   NOTIFY_STATE      /var/lib/gridx/notify/outbox.json (0600), status.json (0644, what serve shows)
#   users' copy       /var/lib/gridx/users/notify.json (0644): the allowances alone, for serve's check

LABEL_NOTIFY = "gridx.notify"
NOTIFY_TIMEOUT_S = 10
NOTIFY_RETRY_S = (5, 30, 120, 600, 1800, 3600, 7200)  # waits after each failed try: 8 tries in about 3.6 h
NOTIFY_FORMATS = ("json", "text", "slack", "discord")
NOTIFY_URL_MAX = 2000
NOTIFY_PRUNE_S = 86400  # events of a job that is gone are forgotten this long after their last try


def notify_config_dir():
    return os.path.join(config_dir(), "notify")


def notify_settings_path():
    return os.path.join(notify_config_dir(), "settings.json")


def notify_key_path(who):
    return os.path.join(notify_config_dir(), "keys", f"{who}.key")


def notify_state_dir():
    return os.path.abspath(os.environ.get("GRIDX_NOTIFY_DIR") or "/var/lib/gridx/notify")


def notify_public_path():
    return os.path.join(users_home(), "notify.json")


def parse_target(value):
    """--notify [FORMAT+]http(s)://HOST[:PORT]/PATH -> (format, URL); the
    format found from the URL when not given (Slack's and Discord's
    incoming webhooks), else json. Exit 2 for anything else."""
    import urllib.parse

    hint = "for example: --notify https://example.org/hooks/gridx or --notify text+https://ntfy.sh/my-topic"
    text = (value or "").strip()
    fmt, plus, rest = text.partition("+")
    if not plus or fmt not in NOTIFY_FORMATS:
        fmt, rest = "", text
    if len(rest) > NOTIFY_URL_MAX or re.search(r"[\x00-\x20\x7f-\x9f]", rest):
        raise usage_error(f"invalid --notify: at most {NOTIFY_URL_MAX} characters, no blanks", hint)
    try:
        parts = urllib.parse.urlsplit(rest)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise usage_error("invalid --notify: give an http:// or https:// URL", hint)
    if parts.username is not None or parts.password is not None:
        raise usage_error("invalid --notify: no user or password in the URL", "put a token in its path, as "
                          "Slack's and Discord's webhooks do")
    if not fmt:
        host = parts.hostname.lower()
        fmt = ("slack" if host == "hooks.slack.com" else
               "discord" if host in ("discord.com", "discordapp.com") and parts.path.startswith("/api/webhooks/")
               else "json")
    return fmt, rest


def split_target(target):
    """A saved target (FORMAT+URL; a label made by hand may lack FORMAT+) -> (format, URL)."""
    return parse_target(target)


def shown_target(url):
    """scheme://host of a target: what status shows (a path can hold a secret)."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def valid_notify_allow(entries):
    """--notify-allow: addresses or networks a member's target may be on
    although private; `none` (alone) clears them."""
    import ipaddress

    if entries == ["none"]:
        return []
    found = []
    for entry in entries:
        try:
            found.append(str(ipaddress.ip_network(entry, strict=False)))
        except ValueError:
            raise usage_error(f"invalid --notify-allow {entry!r}: give an address or a network",
                              "for example: --notify-allow 192.168.1.20 (or none)") from None
    return found


def hub_networks():
    """Every address of this machine with its network (IPv4 and IPv6)."""
    import ipaddress
    import json

    result = run(["ip", "-j", "addr", "show"], check=False)
    found = []
    try:
        links = json.loads(result.stdout or "[]") if result.returncode == 0 else []
    except ValueError:
        links = []
    for link in links:
        for addr in link.get("addr_info", []):
            try:
                found.append(ipaddress.ip_interface(f"{addr['local']}/{addr.get('prefixlen', 32)}"))
            except (KeyError, ValueError):
                continue
    return found


def address_refusal(address, allowed=(), local=()):
    """Why a member's target may not be at this address, or None: the hub
    itself and the networks it is on (the VPN), and any address that is not
    global (private, loopback, link-local, shared, reserved), unless allowed."""
    import ipaddress

    ip = ipaddress.ip_address(address)
    if getattr(ip, "ipv4_mapped", None):
        ip = ip.ipv4_mapped
    if any(ip in ipaddress.ip_network(net) for net in allowed):
        return None
    if any(ip == interface.ip for interface in local):
        return "it is the hub itself"
    if any(ip in interface.network for interface in local if interface.network.prefixlen < interface.max_prefixlen):
        return f"it is on a network of the hub's ({next(i.network for i in local if ip in i.network)})"
    if not ip.is_global or ip.is_multicast:
        return f"{ip} is not a public address"
    return None


def target_address(url, allowed):
    """(the address to connect to, None) of a member's target, or (None,
    why it is refused): every address its name has must pass."""
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        return None, f"{parts.hostname} does not resolve: {getattr(error, 'strerror', None) or error}"
    local = hub_networks()
    addresses = list(dict.fromkeys(item[4][0] for item in found))
    for address in addresses:
        why = address_refusal(address, allowed, local)
        if why:
            return None, why
    return addresses[0], None


def public_allowances():
    """The admin's --notify-allow, as serve reads it (users' copy)."""
    import json

    try:
        document = json.loads(read_text(notify_public_path()))
        return [str(net) for net in document.get("allow", [])]
    except (OSError, ValueError, AttributeError):
        return []


def notify_labels(value):
    """--notify: the job's label ([] without). A member's target (through
    serve) is checked here: exit 2, nothing made, when it is refused.
    `none`: no event, whatever the defaults say."""
    if value is None:
        return []
    if value.strip().lower() == "none":
        return [(LABEL_NOTIFY, "none")]
    fmt, url = parse_target(value)
    if OWNER is not None:
        _, why = target_address(url, public_allowances())
        if why:
            raise usage_error(f"--notify {shown_target(url)} is refused: {why}",
                              "give a public http(s) URL, or ask the hub admin to allow it "
                              "(gridx hub set-defaults --notify-allow ADDRESS)")
    return [(LABEL_NOTIFY, f"{fmt}+{url}")]


def load_notify_settings():
    import json

    empty = {"default": None, "users": {}, "allow": []}
    try:
        document = json.loads(read_text(notify_settings_path()))
    except FileNotFoundError:
        return empty
    except (OSError, ValueError) as error:
        raise GridxError(f"{notify_settings_path()} is damaged: {error}",
                         "restore it, or set the defaults again") from None
    if not isinstance(document, dict):
        return empty
    return {"default": document.get("default") if isinstance(document.get("default"), dict) else None,
            "users": {k: v for k, v in (document.get("users") or {}).items() if isinstance(v, dict)},
            "allow": [str(net) for net in document.get("allow") or []]}


def save_notify_settings(settings):
    """settings.json (root's), and the allowances for serve (users' copy)."""
    import json

    ensure_dir(notify_config_dir())
    atomic_write(notify_settings_path(), json.dumps(settings, indent=2, sort_keys=True) + "\n", 0o600)
    ensure_dir(users_home(), 0o755)
    atomic_write(notify_public_path(), json.dumps({"allow": settings["allow"]}, indent=2) + "\n", 0o644)


def notify_setting(value):
    """A default target as saved ({"url": FORMAT+URL, "set_at": now}; it
    applies to jobs made from then on), or None for `none`."""
    if value.strip().lower() == "none":
        return None
    fmt, url = parse_target(value)
    return {"url": f"{fmt}+{url}", "set_at": int(time.time())}


def signing_key(who):
    """whsec_… of WHO (a member, or "hub"): made once, 0600, never printed."""
    import base64
    import secrets

    path = notify_key_path(who)
    try:
        return read_text(path).strip()
    except FileNotFoundError:
        pass
    ensure_dir(notify_config_dir())
    ensure_dir(os.path.dirname(path))
    key = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    try:
        write_new_file(path, key + "\n", 0o600)
    except FileExistsError:
        return read_text(path).strip()
    return key


def forget_signing_key(who):
    try:
        os.unlink(notify_key_path(who))
    except FileNotFoundError:
        pass


def webhook_signature(key, msg_id, timestamp, body):
    """Standard Webhooks' webhook-signature: v1,base64(HMAC-SHA256 of "id.timestamp.body")."""
    import base64
    import hashlib
    import hmac

    secret = base64.b64decode(key[len("whsec_"):] if key.startswith("whsec_") else key)
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()


def job_target(service, settings):
    """Where a job's events go: (FORMAT+URL, whose key signs, checked: a
    member chose it), or None. Its --notify, else its owner's default, else
    the hub's; a default applies to jobs made after it was set."""
    labels = service["Spec"].get("Labels", {})
    owner, made = owner_of(service), int(labels.get(LABEL_CREATED) or 0)
    own = labels.get(LABEL_NOTIFY)
    if own == "none":
        return None
    signer = owner if owner != ADMIN_OWNER and re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", owner) else "hub"
    if own:
        return own, signer, owner != ADMIN_OWNER
    for setting, who in ((settings["users"].get(owner), signer), (settings["default"], "hub")):
        if setting and made >= int(setting.get("set_at", 0)) and setting.get("url"):
            return setting["url"], who, False
    return None


def job_event_data(service, tasks, nodes, state, ledger=None, reason=None, record=None):
    """An event's data: the job, its owner, state, exit status, run time,
    where it ran (node ID and hostname) and its results."""
    summary = job_summary(service, tasks)
    where = []
    for task in job_tasks(tasks):
        node = task_node(task, nodes) if task.node else None
        if task.node and {"hostname": task.node, "node_id": node.id if node else ""} not in where:
            where.append({"hostname": task.node, "node_id": node.id if node else ""})
    extent = (ledger.extent.get(service["ID"]) if ledger else None) or None
    data = {"job": summary["id"], "service": service["ID"], "owner": summary["owner"], "kind": summary["kind"],
            "state": state, "exit_code": summary["exit_code"],
            "run_time_s": round(extent[1] - extent[0], 1) if extent else None, "where": where}
    if reason:
        data["reason"] = reason
    if record is not None:
        data["results"] = {"bytes": record.get("bytes", 0), "files": sum(t.get("files", 0) for t in
                                                                        record["tasks"].values()),
                           "states": sorted({t.get("state", "") for t in record["tasks"].values()})}
    return data


def job_events(service, tasks, nodes, ledger=None, preempted=None):
    """[(key, type, data)]: what a job's tasks say has happened to it. A
    batch job: it ran again elsewhere (its worker lost, or preempted by its
    volunteer (preempted: owners.json's records): one per task it lost), it
    ended (complete, failed, or gave up after Docker rejected it
    ENFORCER_RERUNS times), its results were collected. A preempted task that
    has not run again yet is no end, whatever its exit."""
    sid, mode = service["ID"], service["Spec"].get("Mode", {})
    if "ReplicatedJob" not in mode:
        return []
    events = []
    summary_state = job_summary(service, tasks)["state"]
    placement = service["Spec"].get("TaskTemplate", {}).get("Placement") or {}
    if any("gridx-deleted" in c for c in placement.get("Constraints") or ()):
        return []  # being deleted (stop_running_jobs): its tasks stop, nothing runs again
    preempted = {t.id: preempted[t.id] for t in tasks if t.id in (preempted or {})}
    for task in tasks:
        if task.id in preempted:
            resumes = " from its checkpoint" if LABEL_CHECKPOINT in service["Spec"].get("Labels", {}) else ""
            events.append((f"{sid}/preempted/{task.id}", "job.waiting", job_event_data(
                service, tasks, nodes, "preempted", reason=f"its volunteer on {task.node} needed the machine: it "
                                                           f"runs again{resumes} when another worker has room")))
    if any(not record.get("ran_again") for record in preempted.values()):
        return events  # stopping, or about to run again: not an end
    for task in tasks:
        lost = task.node and task.state != "rejected" and (task.desired == "remove" or task.state == "orphaned")
        if lost and summary_state not in ("complete", "failed"):
            events.append((f"{sid}/waiting/{task.id}", "job.waiting", job_event_data(
                service, tasks, nodes, "waiting", reason=f"its task on {task.node} stopped ({task.state}): it runs "
                                                          "again when a worker has room")))
    if summary_state in ("complete", "failed") and not runs_again(tasks):
        gave_up = sum(1 for t in tasks if ENFORCER_REJECTION in t.error) > ENFORCER_RERUNS
        state = "gave-up" if gave_up and summary_state == "failed" else summary_state
        events.append((f"{sid}/ended", "job.ended", job_event_data(service, tasks, nodes, state, ledger)))
        record = load_results_record(sid) if LABEL_OUTPUT in service["Spec"].get("Labels", {}) else None
        if record and record["tasks"] and not uncollected(record, tasks) and not record.get("collecting") \
                and all(t.id in record["tasks"] for t in ended_tasks(tasks)):
            events.append((f"{sid}/results", "job.results",
                           job_event_data(service, tasks, nodes, state, ledger, record=record)))
    return events


def event_line(event):
    """The event as one line (text, Slack, Discord)."""
    data = event["data"]
    parts = [f"Grid-X: job {data['job']} ({data['owner']}) {data['state']}"]
    if data.get("exit_code") is not None:
        parts.append(f"exit {data['exit_code']}")
    if data.get("run_time_s") is not None:
        parts.append(f"ran {human_duration(data['run_time_s'])}")
    if data.get("where"):
        parts.append("on " + ", ".join(w["hostname"] for w in data["where"]))
    if data.get("results"):
        parts.append(f"results {human_bytes(data['results']['bytes'])} in {data['results']['files']} file(s)")
    if data.get("reason"):
        parts.append(data["reason"])
    return printable(", ".join(parts))


def event_body(event):
    """(body, content type) in the target's format."""
    import json

    fmt = split_target(event["target"])[0]
    if fmt == "text":
        return event_line(event).encode() + b"\n", "text/plain; charset=utf-8"
    if fmt in ("slack", "discord"):
        return json.dumps({"text" if fmt == "slack" else "content": event_line(event)}).encode(), "application/json"
    document = {"type": event["type"], "timestamp": event["made"], "data": event["data"]}
    return json.dumps(document, sort_keys=True).encode(), "application/json"


def post_event(event, allowed):
    """One try, through curl (the static gridx has no TLS of its own):
    (delivered, why not). A member's target is checked again and reached at
    the address that passed (curl --resolve): a name that resolves elsewhere
    now reaches nothing private."""
    import ipaddress
    import urllib.parse

    url = split_target(event["target"])[1]
    parts = urllib.parse.urlsplit(url)
    body, content_type = event_body(event)
    stamp = int(time.time())
    signature = webhook_signature(signing_key(event["signer"]), event["id"], stamp, body)
    argv = ["curl", "-q", "--silent", "--show-error", "--output", "/dev/null", "--write-out", "%{http_code}",
            "--max-time", str(NOTIFY_TIMEOUT_S), "--proto", "=http,https", "--request", "POST",
            "--header", f"Content-Type: {content_type}", "--header", f"User-Agent: gridx/{VERSION}",
            "--header", f"webhook-id: {event['id']}", "--header", f"webhook-timestamp: {stamp}",
            "--header", f"webhook-signature: {signature}", "--data-binary", "@-"]
    if event.get("checked"):
        address, why = target_address(url, allowed)
        if why:
            return False, f"refused: {why}"
        try:
            ipaddress.ip_address(parts.hostname)  # an address: nothing to resolve
        except ValueError:
            shown = f"[{address}]" if ":" in address else address
            argv += ["--resolve", f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}:{shown}"]
    argv += ["--url", url]  # http(s)://…: parse_target made sure
    result = run(argv, check=False, input=body.decode(), timeout=NOTIFY_TIMEOUT_S + 5)
    status = result.stdout.strip()
    if result.returncode:
        return False, ((result.stderr.strip().splitlines() or [f"curl exit {result.returncode}"])[-1])[:200]
    return status.startswith("2"), f"HTTP {status}"


class Notifier:
    """hub watch's notifications: notice() finds the new events of a pass
    and saves them (no network), a thread of its own sends them."""

    def __init__(self, background=True):
        import threading

        self.lock, self.wake, self.thread = threading.Lock(), threading.Event(), None
        self.background = background  # hub watch --once sends in drain(), here
        self.outbox = self.load()

    @staticmethod
    def load():
        import json

        try:
            document = json.loads(read_text(os.path.join(notify_state_dir(), "outbox.json")))
        except (FileNotFoundError, ValueError):
            document = {}
        document = document if isinstance(document, dict) else {}
        return {"events": dict(document.get("events") or {}), "known": dict(document.get("known") or {})}

    def save(self):
        """The outbox (root's) and each job's status (for jobs status, serve's too). Under self.lock."""
        import json

        ensure_dir(notify_state_dir(), 0o755)
        atomic_write(os.path.join(notify_state_dir(), "outbox.json"),
                     json.dumps(self.outbox, indent=1, sort_keys=True) + "\n", 0o600)
        status = {}
        for event in self.outbox["events"].values():
            job = status.setdefault(event["data"]["service"], {"job": event["data"]["job"], "delivered": 0,
                                                               "pending": 0, "undelivered": []})
            if event["state"] == "undelivered":
                job["undelivered"].append({"type": event["type"], "to": shown_target(event["target"].split("+")[-1]),
                                           "tries": event["tries"], "error": event.get("error", "")})
            else:
                job[event["state"]] += 1
        atomic_write(os.path.join(notify_state_dir(), "status.json"), json.dumps(status, indent=1, sort_keys=True)
                     + "\n", 0o644)

    def notice(self, services, tasks, nodes, ledger=None):
        """Make and save the events this pass found; never raises."""
        try:
            settings = load_notify_settings()
            preempted = load_owners()["preempted"]  # see Owner activity and checkpoints
            by_service = tasks_by_service(tasks)
            made = []
            with self.lock:
                present, learnt = set(), False
                for service in services:
                    target = job_target(service, settings)
                    if target is None:
                        continue
                    present.add(service["ID"])
                    learnt = learnt or service["ID"] not in self.outbox["known"]
                    known = self.outbox["known"].setdefault(service["ID"], {
                        "job": service["Spec"]["Name"], "owner": owner_of(service), "ended": False})
                    known["target"] = list(target)
                    if f"{service['ID']}/ended" in self.outbox["events"] and (
                            LABEL_OUTPUT not in service["Spec"].get("Labels", {})
                            or f"{service['ID']}/results" in self.outbox["events"]):
                        continue  # all it will ever say is said
                    for key, kind, data in job_events(service, by_service.get(service["Spec"]["Name"], []), nodes,
                                                      ledger, preempted):
                        if key not in self.outbox["events"]:
                            made.append(self.add(key, kind, data, target))
                        if kind == "job.ended":
                            known["ended"] = True
                made += self.gone(present, {s["ID"] for s in services})
                if made or learnt or self.prune({s["ID"] for s in services}):
                    self.save()
        except (GridxError, OSError, ValueError, KeyError, TypeError) as error:  # a damaged outbox too
            warn(f"notifications: {getattr(error, 'message', error)}")
            return []
        if made and self.background:
            self.wake.set()
            self.start()
        return made

    def add(self, key, kind, data, target):
        import hashlib

        event = {"id": "msg_" + hashlib.sha256(key.encode()).hexdigest()[:32], "type": kind, "data": data,
                 "target": target[0], "signer": target[1], "checked": target[2], "made": _now(), "state": "pending",
                 "tries": 0, "next_try": 0, "last_try": 0}
        self.outbox["events"][key] = event
        return key

    def gone(self, present, listed):
        """A job with a target deleted before it ended: a job.deleted event."""
        made = []
        for sid, known in list(self.outbox["known"].items()):
            if sid in listed:
                continue
            if not known.get("ended") and f"{sid}/deleted" not in self.outbox["events"]:
                data = {"job": known["job"], "service": sid, "owner": known.get("owner"), "state": "deleted",
                        "exit_code": None, "run_time_s": None, "where": []}
                target = known.get("target")
                if target:
                    made.append(self.add(f"{sid}/deleted", "job.deleted", data, target))
            del self.outbox["known"][sid]
        return made

    def prune(self, listed):
        """Forget the delivered (or given up) events of jobs that are gone."""
        now = time.time()
        old = [key for key, event in self.outbox["events"].items() if event["data"]["service"] not in listed
               and event["state"] != "pending" and now - event.get("last_try", 0) > NOTIFY_PRUNE_S]
        for key in old:
            del self.outbox["events"][key]
        return bool(old)

    def start(self):
        import threading

        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self.send_forever, daemon=True)
            self.thread.start()

    def due(self):
        now = time.time()
        with self.lock:
            return [(key, dict(event)) for key, event in self.outbox["events"].items()
                    if event["state"] == "pending" and event["next_try"] <= now]

    def send_due(self):
        """One try of each event that is due; how many were tried."""
        due = self.due()
        allowed = load_notify_settings()["allow"] if due else []
        for key, event in due:
            try:
                delivered, why = post_event(event, allowed)
            except (GridxError, OSError, ValueError) as error:  # a key that cannot be made, a label made by hand
                delivered, why = False, getattr(error, "message", str(error))
            with self.lock:
                event = self.outbox["events"].get(key)
                if event is None:
                    continue
                event["tries"] += 1
                event["last_try"] = time.time()
                if delivered:
                    event["state"], event["error"] = "delivered", ""
                elif event["tries"] > len(NOTIFY_RETRY_S) or why.startswith("refused"):
                    event["state"], event["error"] = "undelivered", why
                    warn(f"notifications: {event['type']} of {event['data']['job']} not delivered: {why}")
                else:
                    event["error"] = why
                    event["next_try"] = time.time() + NOTIFY_RETRY_S[event["tries"] - 1]
                self.save()
        return len(due)

    def send_forever(self):
        while True:
            try:
                self.send_due()
            except Exception as error:  # noqa: BLE001 (the sender must outlive anything one event does to it)
                warn(f"notifications: {getattr(error, 'message', error)}")
            with self.lock:
                waits = [e["next_try"] for e in self.outbox["events"].values() if e["state"] == "pending"]
            self.wake.wait(max(0.2, min(waits) - time.time()) if waits else 60)
            self.wake.clear()

    def drain(self):
        """hub watch --once: one try of what is due now, here."""
        try:
            self.send_due()
        except (GridxError, OSError, ValueError) as error:
            warn(f"notifications: {getattr(error, 'message', error)}")


def notify_status(service_id):
    """What became of a job's events (status.json), or None."""
    import json

    try:
        document = json.loads(read_text(os.path.join(notify_state_dir(), "status.json")))
    except (OSError, ValueError):
        return None
    found = document.get(service_id) if isinstance(document, dict) else None
    return found if isinstance(found, dict) else None


def notify_summary(status):
    """The line jobs status shows."""
    parts = [f"{status.get('delivered', 0)} delivered"]
    if status.get("pending"):
        parts.append(f"{status['pending']} being sent")
    for event in status.get("undelivered", []):
        parts.append(f"NOT delivered: {event['type']} to {event['to']} ({event['error']}, {event['tries']} tries)")
    return printable("; ".join(parts))


# ---------------------------------------------------------------------------
# Remote
# ---------------------------------------------------------------------------
# `gridx jobs … --manager USER@HUB` from a machine that is not the hub:
# root@HUB drives the hub's Docker over Docker's own SSH (DOCKER_HOST, the
# admin's way); any other USER is a member, whose whole command line runs on
# the hub through the gridx account's forced `gridx serve NAME` (see
# Accounts), with stdout, stderr and the exit status passed through
# (ForwardedExit). serve parses the line with gridx's own parser, allows only
# SERVE_JOB_COMMANDS, and runs them with OWNER and SERVE_LIMITS set.

# What `gridx serve` runs: `gridx jobs COMMAND …` for these, `gridx cluster` and `gridx usage`.
SERVE_JOB_COMMANDS = ("run", "jupyter", "train", "list", "status", "logs", "delete", "results", "connect", "usage",
                      "cluster")

SSH_CONTROL_PERSIST_S = 60


def check_manager_reachable(docker_host):
    """Fail in seconds, not minutes, when the manager's SSH port is silent.

    ssh to an address of the VPN with no peer behind it waits for the
    kernel's TCP timeout (about 2 minutes) before docker gives up.
    """
    import socket
    import urllib.parse

    if not docker_host.startswith("ssh://"):
        return
    parts = urllib.parse.urlsplit(docker_host)
    try:
        port = parts.port or 22
        addresses = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (ValueError, OSError):
        return  # a name only ssh's own config knows: let ssh resolve it
    try:
        family, kind, proto, _, address = addresses[0]
        with socket.socket(family, kind, proto) as probe:
            probe.settimeout(MANAGER_CONNECT_TIMEOUT_S)
            probe.connect(address)
    except OSError as error:
        raise precondition(
            f"cannot reach the manager {parts.hostname}:{port} over SSH: {error.strerror or 'timed out'}",
            "check the VPN (sudo wg show; sudo ./status.sh in your bundle) and --manager / GRIDX_MANAGER",
        ) from None


# -- serve: the hub's side of `--manager gridx@HUB` ---------------------------


def serve_words(original):
    """SSH_ORIGINAL_COMMAND -> the gridx argv to run, or exit 2 with one line:
    only `[gridx] jobs COMMAND …` and `[gridx] cluster …` (no global option,
    no `--manager`: that would send the hub's docker elsewhere)."""
    import shlex

    hint = "through SSH as gridx: gridx jobs … --manager gridx@HUB (jobs run/list/status/logs/delete, cluster)"
    if not original or not original.strip():
        raise usage_error("this account runs gridx jobs commands only, never a shell", hint)
    try:
        words = shlex.split(original)
    except ValueError as error:
        raise usage_error(f"cannot read the command ({error})", hint) from None
    if words and words[0] == "gridx":
        words = words[1:]
    if not words or words[0] not in ("jobs", "cluster", "usage"):
        shown = (words[0] if words else original)[:40]
        raise usage_error(f"not allowed here: {shown!r}: only `gridx jobs …` and `gridx cluster` run", hint)
    return words


def check_serve_args(args, words):
    """After parsing: an allowed command, no --manager, no local script."""
    hint = "gridx jobs … --manager gridx@HUB runs jobs commands only"
    allowed = {("jobs", name) for name in SERVE_JOB_COMMANDS} | {("cluster",), ("usage",)}
    if getattr(args, "handler", None) is None:
        raise usage_error("give a jobs command", "gridx jobs --help")
    path = args.command_path
    if path not in allowed:
        raise usage_error(f"not allowed here: {' '.join(words[:2])}", hint)
    if getattr(args, "manager", None):
        raise usage_error("not allowed here: --manager (serve runs on the hub's own swarm)", hint)
    if getattr(args, "forward", None) is not None:
        raise usage_error("not allowed here: --forward (it listens where gridx runs: your gridx does that)",
                          "gridx jobs jupyter --forward --manager gridx@HUB")
    if path == ("jobs", "results") and not (args.tar or args.json or args.delete):
        # a DEST here would be a folder of the hub's: the user's gridx asks for --tar
        raise usage_error("through the hub's SSH, results come as --tar (or --json, --delete)",
                          "gridx jobs results JOB [DEST] --manager gridx@HUB copies them to your machine")


def load_serve_limits(name):
    """The user's limits from users.json; exit 3 when they are not a user."""
    import json

    try:
        document = json.loads(read_text(users_limits_path()))
        limits = document["users"][name]
    except FileNotFoundError:
        raise precondition(f"{users_limits_path()} not found", "the hub admin runs: gridx hub add-user NAME") from None
    except (KeyError, TypeError, ValueError, OSError):
        raise precondition(f"{name!r} is not a user of this hub",
                           "ask the hub admin: gridx hub add-user NAME") from None
    return valid_limits(limits, f"{users_limits_path()}: {name}")


def watch_session_end(armed=False):
    """serve has no pty, so Ctrl-C on the user's side ends their ssh, and
    sshd then closes serve's stdin (and nothing else: the command would run
    on). The end of stdin interrupts serve as Ctrl-C would, and a hang-up
    too, once the client said SESSION_HELLO: gridx keeps stdin open while it
    waits (forward_to_serve); plain `ssh … < /dev/null` ends it at once and
    is not taken for an interruption."""
    import signal
    import threading

    def on_hangup(signum, frame):
        raise KeyboardInterrupt

    def watch(armed=armed):
        try:
            while True:
                chunk = os.read(0, 4096)
                if not chunk:
                    break
                armed = armed or chunk.startswith(SESSION_HELLO)
        except OSError:
            pass
        if armed:
            os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGHUP, on_hangup)
    threading.Thread(target=watch, daemon=True).start()


# -- the client's side: `gridx jobs … --manager USER@HUB` ---------------------


class ForwardedExit(Exception):
    """The command ran on the hub through serve: main() exits with its status."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


def forwarded_words(argv):
    """The command line to send to serve: without --manager (and its value)
    and the global -v; `--` and what follows stay as they are."""
    words, skip, options = [], False, True
    for word in argv:
        if skip:
            skip = False
            continue
        if options and word == "--":
            options = False
        elif options and word.startswith("--ma") and "--manager".startswith(word.partition("=")[0]):
            skip = "=" not in word
            continue
        elif options and not words and (word == "-v" or (word.startswith("--verb") and "--verbose".startswith(word))):
            continue
        words.append(word)
    return words


def ssh_control_dir():
    """A 0700 folder of the user's for ssh's shared connections, or None."""
    home = os.path.expanduser("~")
    if home == "~" or not os.path.isabs(home):
        return None
    folder = os.path.join(home, ".gridx", "ssh")
    if any(c in folder for c in '"%\n '):
        return None  # ssh expands % and would split a quoted or spaced path
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
    except OSError:
        return None
    return folder


def serve_ssh_argv(docker_host, words, control=None):
    """ssh to the gridx account: it runs `gridx serve NAME` whatever it is
    sent; the command line goes as one shell-quoted word (ssh joins words
    with spaces), and no value here can begin with '-' (valid_manager)."""
    import shlex
    import urllib.parse

    parts = urllib.parse.urlsplit(docker_host)
    argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={MANAGER_CONNECT_TIMEOUT_S * 2}"]
    key = os.environ.get("GRIDX_SSH_KEY")
    who = ""
    if key:
        key = os.path.abspath(os.path.expanduser(key))
        argv += ["-i", key, "-o", "IdentitiesOnly=yes"]
        # one shared connection per key: ssh's %C names the host and login
        # only, and a connection made with one member's key is that member
        import hashlib

        who = "-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    if control:
        argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control}/%C{who}",
                 "-o", f"ControlPersist={SSH_CONTROL_PERSIST_S}"]
    if parts.port:
        argv += ["-p", str(parts.port)]
    return argv + ["--", f"{parts.username}@{parts.hostname}", shlex.join(words)]


def hub_gridx_argv(docker_host, words, control=None):
    """ssh running `gridx WORDS` on the hub: serve for a user (which takes
    the leading gridx too), root's shell for root@HUB (gridx on its PATH)."""
    return serve_ssh_argv(docker_host, ["gridx", *words], control)


def fetch_results_over_ssh(docker_host, job_id, dest, control=None):
    """--manager: the hub's gridx collects and sends them as a tar (serve
    for a user; root's shell with root@HUB, gridx on its PATH)."""
    import subprocess
    import tarfile

    argv = hub_gridx_argv(docker_host, ["jobs", "results", "--tar", "--", job_id], control)
    os.makedirs(dest, mode=0o755, exist_ok=True)
    process = start(argv, stdout=subprocess.PIPE)
    try:
        written, files, _, _ = safe_extract(process.stdout, dest, float("inf"))
    except tarfile.TarError:
        written = files = 0  # nothing came: the status and stderr say why
    except OSError as error:
        raise GridxError(f"cannot write the results into {dest}: {error.strerror}") from None
    finally:
        process.stdout.close()
        code = process.wait()
    if code:
        if code == 255:
            raise precondition(f"cannot fetch the results of {job_id} from the hub over SSH",
                               "check the VPN and --manager; on the hub: gridx jobs results " + job_id)
        raise ForwardedExit(code)
    return written, files


def forward_to_serve(docker_host, args=None):
    """--manager USER@HUB with a USER other than root: the whole command runs
    on the hub through the gridx account's forced `gridx serve`, needing ssh
    only here; stdout, stderr and the exit status pass through as they are.
    Raises ForwardedExit. Root keeps docker over SSH (the admin's path)."""
    import subprocess
    import urllib.parse

    user = urllib.parse.urlsplit(docker_host).username
    if user in (None, ADMIN_OWNER):
        return
    need("ssh")
    check_manager_reachable(docker_host)
    control = ssh_control_dir()
    words = forwarded_words(INVOCATION)
    if getattr(args, "command_path", None) == ("jobs", "results") and not (args.tar or args.json or args.delete):
        dest = results_destination(args.dest, args.job_id)
        written, files = fetch_results_over_ssh(docker_host, args.job_id, dest, control)
        print(dest)
        info(f"{human_bytes(written)} in {files} file(s)")
        raise ForwardedExit(EXIT_OK)
    if getattr(args, "job_name", None) and not args.name:
        # the ID is chosen here, so that --wait can fetch the job's results
        words.insert(words.index("jobs") + 2, f"--name={args.job_name}")
    layer = getattr(args, "layer", None)
    argv = serve_ssh_argv(docker_host, words, control)
    # stdin stays open (never written after the hello and the work folder)
    # while ssh runs: its end tells serve that this side is gone (Ctrl-C, a
    # kill), see watch_session_end.
    process = start(argv, stdin=subprocess.PIPE)
    try:
        try:
            if layer:
                send_upload(process.stdin, layer.folder, {"script": getattr(args, "script_in_workdir", None)})
            elif getattr(args, "script_file", None):
                send_script(process.stdin, *args.script_file)
            else:
                process.stdin.write(SESSION_HELLO)
            process.stdin.flush()
        except BrokenPipeError:
            pass  # ssh ended already: its status says why
        code = process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        raise
    if code == 255:  # ssh's own failure; it said why on stderr
        raise precondition(f"cannot run the command on the hub over SSH as {user}",
                           "check the VPN, ~/.ssh/known_hosts (the bundle's known_hosts) and GRIDX_SSH_KEY "
                           "(the bundle's settings.env), or ask the hub admin whether you are a user")
    if getattr(args, "wait", False) and job_output(args):
        dest = results_destination(None, args.job_name)
        written, files = fetch_results_over_ssh(docker_host, args.job_name, dest, control)
        info(f"results: {human_bytes(written)} in {files} file(s) in {dest}/")
    raise ForwardedExit(code)


def set_manager(args):
    """`gridx jobs` on a machine that is not the hub: docker over SSH."""
    global DOCKER_HOST
    manager = getattr(args, "manager", None) or os.environ.get("GRIDX_MANAGER")
    if manager:
        DOCKER_HOST = valid_manager(manager)
        forward_to_serve(DOCKER_HOST, args)  # a user that is not root: the hub's gridx serve
        need("docker", "ssh")
        check_manager_reachable(DOCKER_HOST)
    else:
        need("docker")


# -- a job's port, forwarded: `jobs forward` and the hub's `jobs connect` -----
# The forwarding gridx listens where its user is (127.0.0.1 by default).
# Each connection it accepts gets a session of its own to the hub (ssh's
# shared connection, ssh_control_dir, makes that cheap) running `gridx jobs
# connect JOB` there, with the connection itself as ssh's input and output,
# as `ssh -W` would do: serve checks the owner and relays the session's
# input and output to the job's published port on its worker's VPN address
# (the hub reaches the workers; members never do). sshd forwards nothing
# (`restrict` stays) and the firewall keeps members off the workers. On the
# hub itself gridx connects to the worker directly; with --manager root@HUB
# root's shell on the hub runs the same `gridx jobs connect`.

FORWARD_CHECK_S = 10  # how often a forward asks whether its job is still there
# Ports a forward never reaches on a worker, whatever a job's label says: the
# system's, and the swarm's, the registry's and the agents' reports' (a moment when no job holds
# the port would reach the worker's own service).
FORWARD_NEVER = frozenset(port for _, port in SWARM_PORTS) | {REGISTRY_PORT, REGISTRY_WRITER_PORT, AGENT_PORT}
RELAY_CHUNK = 256 * 1024
JOB_CONNECT_TIMEOUT_S = 10


def job_endpoint(job_id):
    """The hub's side: where a job's published port answers now. Through
    serve only its owner's (exit 2 naming the owner), and only a job that
    publishes a port (exit 2). {"id", "owner", "kind", "state", "port",
    "token" (Jupyter's), "address" (the worker's VPN address, None while no
    task of it runs)}."""
    services, tasks, jobs, nodes = jobs_overview([job_id])
    check_owner(services, "forward the port of")  # through serve: see Jobs, owners
    labels = services[0]["Spec"].get("Labels", {})
    if not labels.get(LABEL_PORT):
        raise usage_error(f"job {job_id} publishes no port (jobs jupyter does)",
                          "forward a Jupyter job: gridx jobs list shows their KIND")
    port = valid_port(labels[LABEL_PORT])
    if port < 1024 or port in FORWARD_NEVER:
        raise usage_error(f"job {job_id} publishes port {port}, one of the worker's own services' ports: "
                          "a forward reaches 1024-65535 only, never the swarm's or the registry's",
                          "start it again with another --port, e.g. 8888")
    running = [t for t in tasks if t.state == "running" and is_current(t, batch=False)]
    node = task_node(running[0], nodes) if running else None
    return {"id": job_id, "owner": jobs[0]["owner"], "kind": jobs[0]["kind"], "state": jobs[0]["state"],
            "port": port, "token": labels.get(LABEL_TOKEN),
            "address": node.address if node else None}


def connect_job(job_id):
    """A TCP connection to the job's published port, from the hub."""
    import socket

    endpoint = job_endpoint(job_id)
    if not endpoint["address"]:
        raise GridxError(f"job {job_id} is {endpoint['state']}: its port answers once it runs",
                         f"see why: gridx jobs status {job_id}")
    try:
        return socket.create_connection((endpoint["address"], endpoint["port"]), timeout=JOB_CONNECT_TIMEOUT_S)
    except OSError as error:
        raise GridxError(f"job {job_id}'s port {endpoint['port']} does not answer on its worker: "
                         f"{error.strerror or error}", f"gridx jobs logs {job_id}") from None


def pump(read, write, after=None):
    """Copy read()'s chunks to write() until read() gives b"" or either
    fails; then after() (a half-close), whatever went wrong."""
    try:
        while True:
            data = read(RELAY_CHUNK)
            if not data:
                break
            write(data)
    except OSError:
        pass
    if after:
        try:
            after()
        except OSError:
            pass


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def relay_stdio(sock):
    """`jobs connect`: this process's input to the job's socket (its end, a
    half-close), the socket to this process's output; over when the job's
    side ends. serve's session input is the data here, so the session's
    end is the end of this input (no watch_session_end)."""
    import socket
    import threading

    sock.settimeout(None)
    threading.Thread(target=pump, args=(lambda n: os.read(0, n), sock.sendall,
                                        lambda: sock.shutdown(socket.SHUT_WR)), daemon=True).start()
    try:
        pump(sock.recv, lambda data: write_all(1, data))
    finally:
        sock.close()


def relay_sockets(client, upstream):
    """On the hub: one forwarded connection, both ways, until the job's side ends."""
    import socket
    import threading

    upstream.settimeout(None)
    going = threading.Thread(target=pump, args=(client.recv, upstream.sendall,
                                                lambda: upstream.shutdown(socket.SHUT_WR)), daemon=True)
    going.start()
    pump(upstream.recv, client.sendall)
    for end in (client, upstream):
        end.close()


def parse_listen(value):
    """`jobs forward`'s [[ADDR:]LOCAL_PORT] -> (address, port or None: the
    job's; 0: any free one). The address is 127.0.0.1 unless given ([::1]
    for IPv6)."""
    import ipaddress

    hint = "for example: 8888, 127.0.0.1:18888 or [::1]:8888"
    if value is None or value == "":
        return "127.0.0.1", None
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise usage_error(f"invalid local address {value!r}: an IPv6 address goes in brackets", hint)
    if host == "localhost":
        host = "127.0.0.1"
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise usage_error(f"invalid local address {value!r}: [[ADDRESS:]PORT], the address an IP of this "
                          "machine", hint) from None
    return host, 0 if port == "0" else valid_port(port)


def listen_socket(host, port):
    """The forward's listening socket; a port taken here is exit 2."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        why = "is in use here" if error.errno == errno.EADDRINUSE else f"cannot be used: {error.strerror}"
        raise usage_error(f"{host}:{port} {why}", "give another local port, e.g. gridx jobs forward JOB 18888") \
            from None
    listener.listen(64)
    return listener


class HubWay:
    """A forward on the hub: each connection goes straight to the worker."""

    def probe(self, job_id):
        return job_endpoint(job_id)

    def still_there(self, job_id):
        try:
            return self.probe(job_id)
        except GridxError as error:
            if error.code == EXIT_USAGE:  # gone
                return None
            warn(f"cannot check job {job_id}: {error.message}")
            return True

    def relay(self, job_id, conn, children):
        import threading

        def one():
            try:
                upstream = connect_job(job_id)
            except GridxError as error:
                warn(error.message)
                conn.close()
                return
            relay_sockets(conn, upstream)

        threading.Thread(target=one, daemon=True).start()


class SSHWay:
    """A forward through the hub's SSH (serve for a member, root's shell for
    root@HUB): each connection is a session running `gridx jobs connect`,
    the connection itself its input and output."""

    def __init__(self, docker_host):
        self.docker_host, self.control = docker_host, ssh_control_dir()

    def argv(self, words):
        return hub_gridx_argv(self.docker_host, words, self.control)

    def ask(self, job_id):
        """(exit status, the endpoint or None); serve's own words go to stderr."""
        import json
        import subprocess

        process = start(self.argv(["jobs", "connect", "--probe", "--", job_id]), stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE)
        out = process.communicate()[0]
        try:
            return process.returncode, json.loads(out) if process.returncode == 0 else None
        except ValueError:
            return EXIT_FAILED, None

    def probe(self, job_id):
        code, endpoint = self.ask(job_id)
        if code == 255:
            raise precondition(f"cannot reach the hub over SSH ({urlsplit_user(self.docker_host)})",
                               "check the VPN and --manager / GRIDX_MANAGER")
        if code or endpoint is None:
            raise ForwardedExit(code or EXIT_FAILED)  # the hub said why
        return endpoint

    def still_there(self, job_id):
        code, endpoint = self.ask(job_id)
        if code == EXIT_USAGE:
            return None
        return endpoint or True  # the hub did not answer this time: the next check asks again

    def relay(self, job_id, conn, children):
        children.append(start(self.argv(["jobs", "connect", "--", job_id]), stdin=conn.fileno(),
                              stdout=conn.fileno()))
        conn.close()  # ssh holds it now


def urlsplit_user(docker_host):
    import urllib.parse

    parts = urllib.parse.urlsplit(docker_host)
    return f"{parts.username}@{parts.hostname}"


def forward_way(args):
    """HubWay on the hub, SSHWay with --manager / GRIDX_MANAGER."""
    manager = getattr(args, "manager", None) or os.environ.get("GRIDX_MANAGER")
    if not manager:
        need("docker")
        return HubWay()
    docker_host = valid_manager(manager)
    need("ssh")
    check_manager_reachable(docker_host)
    return SSHWay(docker_host)


class Forward:
    """`jobs forward`: a listening socket here, each connection relayed to
    the job's port (way.relay), until Ctrl-C or the job is gone or over (a
    check every FORWARD_CHECK_S, in a thread: a slow answer never holds up a
    connection)."""

    def __init__(self, way, job_id, listen):
        import threading

        self.way, self.job_id = way, job_id
        self.listener = listen_socket(*listen)
        self.children, self.ended, self.over = [], None, threading.Event()

    def check(self):
        while not self.over.wait(FORWARD_CHECK_S):
            endpoint = self.way.still_there(self.job_id)
            if endpoint is None:
                self.ended = f"job {self.job_id} is gone"
            elif isinstance(endpoint, dict) and endpoint["state"] in ("complete", "failed"):
                self.ended = f"job {self.job_id} is {endpoint['state']}"

    def run(self):
        import socket
        import threading

        threading.Thread(target=self.check, daemon=True).start()
        self.listener.settimeout(0.5)
        try:
            while self.ended is None:
                try:
                    conn, _ = self.listener.accept()
                except socket.timeout:
                    conn = None
                if conn is not None:
                    conn.settimeout(None)
                    self.way.relay(self.job_id, conn, self.children)
                self.children = [child for child in self.children if child.poll() is None]
        finally:
            self.over.set()
            self.listener.close()
            for child in self.children:
                child.terminate()
            for child in self.children:
                child.wait()
        info(f"{self.ended}: the forward ends")


def local_url(host, port, token=None):
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def forward_job(way, job_id, listen, as_json=False, endpoint=None):
    """Listen, say where (stdout: the local URL, with Jupyter's token), relay."""
    endpoint = endpoint or way.probe(job_id)
    host, port = listen[0], endpoint["port"] if listen[1] is None else listen[1]
    forward = Forward(way, job_id, (host, port))
    port = forward.listener.getsockname()[1]  # the one chosen, for 0
    url = local_url(host, port, endpoint.get("token"))
    if as_json:
        print_json({"id": job_id, "local": f"{host}:{port}", "url": url})
    else:
        print(url)
    sys.stdout.flush()
    info(f"forwarding {host}:{port} to job {job_id}'s port {endpoint['port']}; Ctrl-C ends it")
    if not host.startswith("127.") and host != "::1":
        warn(f"{host}:{port} is not a loopback address: others who reach this machine reach the job too")
    forward.run()
    return EXIT_OK


def jupyter_through_hub(docker_host, args):
    """`jobs jupyter --forward` with --manager: the hub's gridx starts it
    (serve for a member, root's shell for root@HUB) and says its job and
    URL; {"id", "url"}. Its progress passes through on stderr."""
    import json
    import subprocess

    words = ["jobs", "jupyter", f"--cpus={args.cpus}", f"--memory={args.memory}", f"--gpus={args.gpus}",
             f"--port={args.port}", f"--timeout={args.timeout}", "--json"]
    words += [f"--{flag}={getattr(args, flag)}" for flag in ("image", "name", "notify") if getattr(args, flag)]
    process = start(hub_gridx_argv(docker_host, words, ssh_control_dir()), stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE)
    try:
        try:
            process.stdin.write(SESSION_HELLO)  # stdin stays open: its end tells serve this side is gone
            process.stdin.flush()
        except BrokenPipeError:
            pass
        out = process.stdout.read()
        code = process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        raise
    if code == 255:
        raise precondition(f"cannot run the command on the hub over SSH ({urlsplit_user(docker_host)})",
                           "check the VPN and --manager / GRIDX_MANAGER")
    try:
        started = json.loads(out) if code == 0 else None
    except ValueError:
        started = None
    if not isinstance(started, dict) or "id" not in started:
        raise ForwardedExit(code or EXIT_FAILED)
    return started


# ---------------------------------------------------------------------------
# Commands: hub
# ---------------------------------------------------------------------------


# -- hub init -----------------------------------------------------------------


def cmd_hub_init(args):
    """Validate, then (under the state lock) make or check the VPN, firewall, swarm, SSH key, users and registry."""
    public_ip = valid_public_ip(args.ip)
    port = valid_port(args.port)
    subnet = valid_subnet(args.subnet)
    interface = valid_interface(args.interface)
    require_root()
    need("wg", "wg-quick", "docker", "ssh-keygen", "iptables", "iptables-restore", "ip")
    check_engine_version()
    with StateLock():
        existing = load_hub_config(required=False)
        if existing:
            wanted = (public_ip, port, subnet, interface)
            have = (existing.public_ip, existing.port, existing.subnet, existing.interface)
            if wanted != have:
                raise usage_error(
                    f"the hub is already initialised with --ip {existing.public_ip} --port {existing.port} "
                    f"--subnet {existing.subnet} --interface {existing.interface}",
                    "re-run init with those settings, or start over: gridx hub reset (every worker must "
                    "join again)",
                )
        elif os.path.exists(wg_conf_path(interface)) and CONFIG_MARKER not in read_text(wg_conf_path(interface)):
            raise precondition(
                f"{wg_conf_path(interface)} exists and is not Grid-X's",
                "choose another --interface, or move that file away",
            )
        changes = init_hub(existing, public_ip, port, subnet, interface)
    if not changes:
        info("the hub is already initialised: nothing changed")
    else:
        for change in changes:
            info(change)
    config = load_hub_config()
    print(f"Hub ready: VPN {config.hub_ip} on {config.interface}, WireGuard {config.endpoint}, "
          f"swarm manager {config.manager}")
    print("Next: gridx hub add-peer NAME   (writes a join bundle for a volunteer)")
    return EXIT_OK


def init_hub(existing, public_ip, port, subnet, interface):
    """Bring every piece of the hub to its wanted state; list what changed.

    One ensure_* step per piece, in this order, each returning the lines of
    what it changed (like join.sh's step_* functions)."""
    ensure_dir(config_dir())
    ensure_dir(os.path.join(config_dir(), "clients"))
    public, changes = ensure_server_key()
    if existing:
        config = existing
        config.public_key = public
    else:
        pool = choose_address_pool(subnet, local_ipv4_networks())
        config = HubConfig(interface, public_ip, port, subnet, hub_ip_of(subnet), public, pool, _now(), {})
    changes += ensure_hub_wg_conf(config)
    if not os.path.exists(hub_config_path()) or existing is None:
        save_hub_config(config)
    for step in (ensure_firewall, ensure_vpn_up, ensure_boot_order, ensure_swarm, ensure_job_network,
                 ensure_hub_ssh_key, ensure_users, ensure_registry):
        changes += step(config)
    return changes


def ensure_server_key():
    """The hub's WireGuard key, made once: (its public key, changes)."""
    key_path = server_key_path()
    if os.path.exists(key_path):
        return wg_pubkey(read_text(key_path).strip()), []
    private, public = wg_genkey()
    write_new_file(key_path, private + "\n", 0o600)
    return public, ["created the WireGuard server key"]


def ensure_hub_wg_conf(config):
    path = wg_conf_path(config.interface)
    ensure_dir(wg_dir())
    if write_if_changed(path, render_hub_wg_conf(config, read_text(server_key_path()).strip()), 0o600):
        return [f"wrote {path}"]
    return []


def ensure_firewall(config):
    if apply_firewall(config):
        return [f"firewall: swarm ports {', '.join(f'{p}/{q}' for q, p in SWARM_PORTS)} "
                f"answer on {config.interface} only"]
    return []


def ensure_vpn_up(config):
    if wg_interface_up(config.interface):
        return []
    run(["wg-quick", "up", config.interface], timeout=60)
    return [f"brought up {config.interface} ({config.hub_ip})"]


def ensure_boot_order(config):
    """With systemd: the VPN at boot, Docker after it, hub watch."""
    if not systemd_running():
        return []
    changes = []
    unit = f"wg-quick@{config.interface}"
    if run(["systemctl", "is-enabled", unit], check=False).stdout.strip() != "enabled":
        run(["systemctl", "enable", unit])
        changes.append(f"enabled {unit} at boot")
    if install_docker_ordering(config.interface):
        changes.append(f"Docker starts after {unit} at boot (the swarm listens on {config.hub_ip})")
    if install_watch_service():
        changes.append("installed gridx-watch.service (re-runs the jobs of workers that go down)")
    return changes


def ensure_swarm(config):
    """This Docker is the swarm's manager on the hub's VPN address."""
    hub_ip = config.hub_ip
    swarm = swarm_info()
    state = swarm.get("LocalNodeState", "inactive")
    if state == "inactive":
        run([
            "docker", "swarm", "init",
            "--advertise-addr", hub_ip,
            "--listen-addr", f"{hub_ip}:2377",
            "--data-path-addr", hub_ip,
            "--default-addr-pool", config.address_pool,
            "--default-addr-pool-mask-length", "24",
        ], timeout=60)
        return [f"initialised the swarm on {hub_ip}:2377 (address pool {config.address_pool})"]
    if state == "active" and swarm.get("NodeAddr") != hub_ip:
        raise precondition(
            f"Docker is already in a swarm on {swarm.get('NodeAddr')}, not on the VPN address {hub_ip}",
            "leave it first (docker swarm leave --force) or run the hub on another machine",
        )
    if state == "error" and "cannot assign requested address" in swarm.get("Error", ""):
        # Docker started before the VPN interface existed (a reboot without
        # the systemd ordering of ensure_boot_order): the manager never listened.
        raise precondition(
            f"Docker's swarm manager could not listen on {hub_ip}: Docker started before {config.interface} was up",
            "restart Docker now that the VPN is up (systemctl restart docker, or service docker restart)",
        )
    if state != "active":
        raise precondition(f"Docker's swarm state is {state!r}", "fix the swarm, then run init again")
    return []


def ensure_job_network(config):
    if run(["docker", "network", "inspect", JOB_NETWORK], check=False).returncode == 0:
        return []
    run([
        "docker", "network", "create", "--driver", "overlay", "--attachable",
        "--opt", f"com.docker.network.driver.mtu={OVERLAY_MTU}",
        "--label", "gridx=1", JOB_NETWORK,
    ])
    return [f"created the overlay network {JOB_NETWORK} (MTU {OVERLAY_MTU - VXLAN_OVERHEAD} inside)"]


def ensure_hub_ssh_key(config):
    return [f"created the hub's SSH key {ssh_key_path()}"] if ensure_ssh_key() else []


def ensure_users(config):
    """The users' account and files, when the hub has users already (see Accounts)."""
    return user_account_ready(config) if config.users else []


def ensure_registry(config):
    """The image registry: read-only on HUB_VPN_IP:5000, its writer on the hub's loopback (see Registry)."""
    return registry_ready(config)


DOCKER_DROPIN = "/etc/systemd/system/docker.service.d/gridx-vpn.conf"
DOCKER_ORDERING = """# Grid-X: the swarm manager listens on the VPN address, which exists only
# once the WireGuard interface is up; Docker started first would never listen.
[Unit]
Wants=wg-quick@{interface}.service
After=wg-quick@{interface}.service
"""


def install_docker_ordering(interface):
    """Docker starts after the VPN at boot; True when the drop-in changed."""
    os.makedirs(os.path.dirname(DOCKER_DROPIN), mode=0o755, exist_ok=True)
    if not write_if_changed(DOCKER_DROPIN, DOCKER_ORDERING.format(interface=interface), 0o644):
        return False
    run(["systemctl", "daemon-reload"])
    return True


WATCH_UNIT = """[Unit]
Description=Grid-X: run again the jobs of workers that went down
After=docker.service
Requires=docker.service

[Service]
ExecStart={program} hub watch
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def install_watch_service():
    """A systemd unit running `gridx hub watch`; True when it changed."""
    path = "/etc/systemd/system/gridx-watch.service"
    if not write_if_changed(path, WATCH_UNIT.format(program=own_program()), 0o644):
        return False
    run(["systemctl", "daemon-reload"])
    run(["systemctl", "enable", "--now", "gridx-watch.service"])
    return True


# -- hub add-peer · remove-peer · list-peers · status · join-info · refresh-bundle ---


def cmd_hub_add_peer(args):
    """Allocate an address, add the peer live (wg set), write its config and join bundle."""
    name = valid_name(args.name)
    pubkey = valid_wg_key(args.pubkey) if args.pubkey is not None else None
    if args.ip is not None:
        import ipaddress

        try:
            ipaddress.IPv4Address(args.ip)
        except ValueError:
            raise usage_error(f"invalid --ip {args.ip!r}: give an IPv4 address of the VPN subnet") from None
    out_dir = os.path.abspath(args.out) if args.out else None
    if out_dir:
        check_bundle_target(bundle_path(name, out_dir))
    require_root()
    need("wg", "docker")
    with StateLock():
        config = load_hub_config()
        if name in config.peers:
            raise usage_error(f"peer {name!r} already exists ({config.peers[name].ip})",
                              f"pick another name, or remove it first: gridx hub remove-peer {name}")
        if pubkey and any(p.public_key == pubkey for p in config.peers.values()):
            raise usage_error("that --pubkey already belongs to another peer", "each worker needs its own key")
        refuse_taken_name(config, name, pubkey)  # nor a user's name or key
        ip = allocate_ip(config, args.ip)
        if pubkey:
            private = None
        else:
            private, pubkey = wg_genkey()
        peer = Peer(name, ip, pubkey, private is not None, _now())
        token = worker_join_token()
        ssh_key = ssh_public_key()
        worker_conf = render_worker_wg_conf(config, peer, private, ssh_key)
        ensure_dir(os.path.join(config_dir(), "clients"))
        atomic_write(client_conf_path(name), worker_conf, 0o600)
        folder = bundle_path(name)
        try:
            write_bundle(folder, bundle_files(config, peer, worker_conf, token, ssh_key, private is not None))
            run(["wg", "set", config.interface, "peer", pubkey, "allowed-ips", f"{ip}/32"])
        except BaseException:
            remove_bundle(name)
            raise
        config.peers[name] = peer
        save_hub_config(config)
        write_hub_wg_conf(config)
        copied = refresh_bundle(config, name, token, ssh_key, out_dir) if out_dir else None
    return print_added(args, "peer", peer, copied or folder, [
        "Next: copy the bundle to the volunteer's machine and run there:",
        f"  cd gridx-{name}-bundle && sudo ./join.sh" + ("" if private else " --private-key private.key")])


def print_added(args, kind, member, folder, next_lines):
    """add-peer's and add-user's result: --json, or lines and the next step."""
    if args.json:
        print_json({kind: member.to_dict(), "bundle": folder, "archive": folder + ".tar.gz"})
        return EXIT_OK
    print(f"Added {kind} {member.name}: VPN address {member.ip}")
    print(f"Bundle: {folder}/  (and {folder}.tar.gz)")
    for line in next_lines:
        print(line)
    return EXIT_OK


def cmd_hub_remove_peer(args):
    """Remove the peer from the VPN and the swarm, re-run its jobs, rotate the join token."""
    name = valid_name(args.name)
    require_root()
    need("wg", "docker")
    with StateLock():
        config = load_hub_config()
        peer = registered(config.peers, name, "peer")
        run(["wg", "set", config.interface, "peer", peer.public_key, "remove"])
        # every identity the peer had in the swarm (a re-join leaves the old one)
        nodes = [n for n in all_swarm_nodes() if n.address == peer.ip and not n.manager]
        # Swarm orphans the tasks of a removed node and, with restart
        # condition none, never runs them again: Grid-X does.
        lost = jobs_on_nodes({n.id for n in nodes}) if nodes else []
        for node in nodes:
            run(["docker", "node", "rm", "--force", "--", node.id])
        run_again(lost)
        token = worker_join_token(rotate=True)
        del config.peers[name]
        save_hub_config(config)
        write_hub_wg_conf(config)
        remove_bundle(name)
        forget_host_key(peer.ip)
        archives = new_token_in_bundles(config, token)
    info(f"removed peer {name} ({peer.ip}) from the VPN" + (" and the swarm" if nodes else ""))
    if lost:
        info(f"jobs that ran on it run again elsewhere: {', '.join(lost)}")
    info("rotated the worker join token: the removed bundle no longer joins; the bundles on the hub have the new one"
         + (f" (their .tar.gz went: gridx hub refresh-bundle NAME makes one again: {', '.join(archives)})"
            if archives else ""))
    if config.peers:
        info("a copy of a bundle given out before now needs the new token: "
             "gridx hub refresh-bundle NAME, then give it again")
    return EXIT_OK


def new_token_in_bundles(config, token):
    """After a rotation: the hub's bundles see the new token through their
    shared token file (one write); their .tar.gz, which hold the old one,
    go (an unlink each); a bundle older than the shared file is rewritten
    once. Returns the peers whose archive went."""
    store_join_token(token)
    legacy = [name for name in sorted(config.peers)
              if os.path.isdir(bundle_path(name)) and not linked_to_hub_token(bundle_path(name))]
    if legacy:
        refresh_unused_bundles(config, token, legacy)
    gone = []
    for name in sorted(config.peers):
        archive = bundle_path(name) + ".tar.gz"
        if name not in legacy and os.path.lexists(archive):
            os.unlink(archive)
            gone.append(name)
    return gone


def refresh_unused_bundles(config, token, names=None):
    """Every bundle still on the hub (or those of names) written again with
    the token and the hub's settings (allow-jobs changed them). Returns
    their peers' names."""
    names = sorted(config.peers) if names is None else names
    if not any(os.path.isdir(bundle_path(name)) for name in names):
        return []
    ssh_key = ssh_public_key()
    refreshed = []
    for name in names:
        if os.path.isdir(bundle_path(name)):
            try:
                refresh_bundle(config, name, token, ssh_key)
                refreshed.append(name)
            except GridxError as error:
                warn(f"bundle {name} keeps the old token: {error.message} (then: gridx hub refresh-bundle {name})")
    return refreshed


def peer_rows(config):
    """Everything list-peers and status show: one wg and two docker calls."""
    _, live = wg_dump(config.interface)
    try:
        nodes = swarm_nodes()
    except GridxError:
        nodes = []
    by_address = {}
    for node in nodes:
        current = by_address.get(node.address)
        if current is None or (current.state != "ready" and node.state == "ready"):
            by_address[node.address] = node
    rows = []
    for peer in sorted(config.peers.values(), key=lambda p: _ip_sort_key(p.ip)):
        wg = live.get(peer.public_key, {})
        node = by_address.get(peer.ip)
        rows.append({
            "name": peer.name,
            "ip": peer.ip,
            "public_key": peer.public_key,
            "live": peer.public_key in live,
            "endpoint": wg.get("endpoint"),
            "handshake_age": wg.get("handshake_age"),
            "node": node.hostname if node else None,
            "node_state": node.state if node else None,
            "shared": node.shared_dict() if node else None,
            # False: the worker declined the hub's SSH (join.sh --no-hub-ssh)
            "hub_ssh": node.hub_ssh if node else None,
        })
    return rows, nodes


def cmd_hub_list_peers(args):
    """Every peer with its handshake, swarm node, shares and whether the hub may SSH in."""
    require_root()
    need("wg", "docker")
    config = load_hub_config()
    rows, _ = peer_rows(config)
    if printed_as_json_or_none(args.json, "peers", rows, "No peers yet. Add one: gridx hub add-peer NAME"):
        return EXIT_OK
    table = []
    for row in rows:
        shared = row["shared"]
        table.append([
            row["name"], row["ip"], row["public_key"][:10] + "…", row["endpoint"] or "-",
            human_age(row["handshake_age"]), row["node_state"] or "not joined",
            format_shared(shared) if shared else "-",
            {True: "yes", False: "declined", None: "-"}[row["hub_ssh"]],
        ])
    print_table(["NAME", "VPN IP", "KEY", "ENDPOINT", "HANDSHAKE", "NODE", "SHARED", "HUB SSH"], table)
    return EXIT_OK


def format_shared(shared):
    text = f"{shared['cpus']} CPU, {human_mib(shared['memory_mib'])}"
    return text + (f", {len(shared['gpus'])} GPU" if shared["gpus"] else "")


def cmd_hub_status(args):
    """VPN and swarm health; exit 1 when a peer is silent or a node is not Ready (for cron)."""
    require_root()
    need("wg", "docker")
    config = load_hub_config()
    problems = []
    interface_up = wg_interface_up(config.interface)
    if not interface_up:
        problems.append(f"the VPN interface {config.interface} is down (start it: wg-quick up {config.interface})")
    swarm = swarm_info()
    swarm_state = swarm.get("LocalNodeState", "inactive")
    if swarm_state != "active" or not swarm.get("ControlAvailable"):
        problems.append(f"the swarm is {swarm_state} on this machine, not an active manager")
    rows, nodes = peer_rows(config) if swarm_state == "active" else ([], [])
    for row in rows:
        age = row["handshake_age"]
        if age is None:
            problems.append(f"peer {row['name']} ({row['ip']}) never shook hands")
        elif age > HANDSHAKE_SILENT_S:
            problems.append(f"peer {row['name']} ({row['ip']}) silent for {human_age(age)}")
        if row["node_state"] != "ready":
            problems.append(f"peer {row['name']}'s swarm node is {row['node_state'] or 'missing'}")
    healthy = not problems
    if args.json:
        print_json({
            "healthy": healthy,
            "interface": {"name": config.interface, "up": interface_up, "address": config.hub_ip},
            "swarm": {"state": swarm_state, "manager": bool(swarm.get("ControlAvailable")),
                      "nodes": len(nodes)},
            "peers": rows,
            "problems": problems,
        })
    else:
        ready = sum(1 for r in rows if r["node_state"] == "ready")
        print(f"VPN {config.interface} {'up' if interface_up else 'DOWN'} ({config.hub_ip}, {config.endpoint})")
        print(f"Swarm {swarm_state}, {len(nodes)} nodes; peers: {len(rows)}, {ready} Ready")
        print("healthy" if healthy else "degraded")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return EXIT_OK if healthy else EXIT_FAILED


def cmd_hub_join_info(args):
    """Print a peer's WireGuard config and the swarm join command, for joining by hand."""
    name = valid_name(args.name)
    require_root()
    config = load_hub_config()
    peer = registered(config.peers, name, "peer")
    need("docker")
    token = worker_join_token()
    try:
        conf = read_text(client_conf_path(name))
    except FileNotFoundError:
        raise GridxError(f"{client_conf_path(name)} is missing",
                         f"re-add the peer: gridx hub remove-peer {name}, then add-peer") from None
    if args.json:
        print_json({"name": name, "ip": peer.ip, "manager": config.manager, "token": token,
                    "wg_config": conf, "hub_ssh_key": ssh_public_key(), "bundle": bundle_path(name)})
        return EXIT_OK
    print(f"# Worker {name}: save the config below as {name}.conf on the worker, then run:")
    print(f"#   sudo gridx worker join --wg-config {name}.conf --token {token}")
    print(f"# or by hand: wg-quick up ./{name}.conf && docker swarm join --token {token} "
          f"--advertise-addr {peer.ip} --data-path-addr {peer.ip} {config.manager}")
    print(f"# The bundle with join.sh is {bundle_path(name)}/")
    print(conf, end="" if conf.endswith("\n") else "\n")
    return EXIT_OK


def cmd_hub_refresh_bundle(args):
    """Rewrite a peer's bundle with the current join token (and copy it to --out)."""
    name = valid_name(args.name)
    out_dir = os.path.abspath(args.out) if args.out else None
    if out_dir:
        check_bundle_target(bundle_path(name, out_dir))
    require_root()
    need("docker")
    with StateLock():
        config = load_hub_config()
        registered(config.peers, name, "peer")
        token, ssh_key = worker_join_token(), ssh_public_key()
        folder = refresh_bundle(config, name, token, ssh_key)
        if out_dir:
            folder = refresh_bundle(config, name, token, ssh_key, out_dir)
    print(f"Rewrote the bundle of {name} with the current join token: {folder}/  (and {folder}.tar.gz)")
    print("Next: copy it to the volunteer's machine again and run there:")
    print(f"  cd gridx-{name}-bundle && sudo ./join.sh"
          + ("" if config.peers[name].key_on_hub else " --private-key private.key"))
    return EXIT_OK


# -- hub ssh · ssh-pubkey · watch ---------------------------------------------


def hub_ssh_declined():
    """VPN addresses of the swarm nodes whose engine says they declined the
    hub's SSH (LABEL_HUB_SSH=no). One docker call when none did, a second
    for the addresses of those that did; a swarm that does not answer
    declines nothing (ssh then says what it finds)."""
    try:
        ids = run(docker("node", "ls", "-q", "--filter", f"label={LABEL_HUB_SSH}=no")).stdout.split()
        if not ids:
            return set()
        # an identity left Down by a re-join says nothing of the new one
        listed = run(docker("node", "inspect", "--format", "{{.Status.Addr}} {{.Status.State}}", "--", *ids)).stdout
        return {address for address, _, state in (line.partition(" ") for line in listed.splitlines())
                if state.strip() != "down"}
    except GridxError:
        return set()


def cmd_hub_ssh(args):
    """SSH into a worker over the VPN with the hub's key; CMD's exit status passes through."""
    name = valid_name(args.name)
    require_root()
    need("ssh")
    config = load_hub_config()
    peer = registered(config.peers, name, "peer")
    if peer.ip in hub_ssh_declined():
        raise precondition(f"worker {name} ({peer.ip}) declined the hub's SSH when it joined (--no-hub-ssh)",
                           "ask its owner to run the command, or to join again without --no-hub-ssh")
    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    if len(command) > 1:
        # ssh joins words with spaces for the remote shell; quote them so
        # `-- sh -c 'exit 7'` runs as typed. One word stays a shell line.
        import shlex

        command = [shlex.join(command)]
    return run_streaming(ssh_argv(peer.ip, command, tty=not command and sys.stdin.isatty()))


def cmd_hub_ssh_pubkey(args):
    """Print the hub's SSH public key."""
    require_root()
    print(ssh_public_key())
    return EXIT_OK


def cmd_hub_watch(args):
    """Run lost jobs again: the swarm alone leaves them on a Down node."""
    interval = parse_count(args.interval, "--interval", 1, WATCH_MAX_S)
    grace = parse_count(args.down_after, "--down-after", 0, WATCH_MAX_S)
    require_root()
    need("docker")
    down_since, seen_waiting, passes = {}, {}, 0  # down_since by node ID
    collector, owners = Background(collect_and_say), Background(owner_chores)  # see Work folders, Owner activity
    recorder, notifier = UsageRecorder(), Notifier(background=not args.once)  # see Usage, Notifications
    listen_to_owners()
    info(f"watching for workers that go down (every {interval}s, after {grace}s down their jobs run elsewhere)")
    while True:
        passes += 1
        try:
            nodes = all_swarm_nodes()  # every identity: a rejoined worker's old one holds lost tasks too
            now = time.monotonic()
            down = {n.id for n in nodes if n.state == "down"}
            for node_id in list(down_since):
                if node_id not in down:
                    del down_since[node_id]
            for node_id in down:
                down_since.setdefault(node_id, now)
            expired = {node_id for node_id, since in down_since.items() if now - since >= grace}
            services = list_job_services()
            tasks = list_tasks(services, nodes)
            if expired:
                lost = jobs_on_nodes(expired, tasks)
                run_again_from_checkpoint(services, lost)
                if lost:
                    names = node_names(nodes)
                    info(f"worker(s) {', '.join(sorted(names[i] for i in expired))} down: ran again {', '.join(lost)}")
            # Due once two passes in a row saw it waiting to run again: a
            # `jobs run --wait` that polls far more often has not run it again itself.
            waiting = jobs_that_run_again(services, tasks)
            due = sorted(job for job, ids in waiting.items() if args.once or seen_waiting.get(job) == ids)
            run_again_from_checkpoint(services, due)
            seen_waiting = {job: ids for job, ids in waiting.items() if job not in due}
            if due:
                info(f"ran again {', '.join(due)}: Docker rejected them ({ENFORCER_REJECTION})")
            collector.start(services, tasks, nodes)
            owners.start(services, tasks, nodes)
            recorder.record(services, tasks, nodes)
            notifier.notice(services, tasks, nodes, recorder.ledger)  # sent by a thread of its own
            if passes % WATCH_SWEEP_EVERY == 1:
                sweep_work_layers()
        except GridxError as error:
            warn(error.message)
        if args.once:
            collector.join()
            owners.join()
            notifier.drain()
            return EXIT_OK
        time.sleep(interval)


# -- hub allow-jobs -------------------------------------------------------------
# Jobs reach the internet and nothing private (the worker's jobnet.sh); the
# admin opens private destinations for every job here. The list lives in
# hub_config.json and every bundle's settings (GRIDX_JOB_ALLOW); joined
# workers get it at once over the hub's SSH.

JOBNET_SCRIPT = "/var/lib/gridx/jobnet/jobnet.sh"  # same as join.sh's copy (lib.sh's JOB_NET_DIR)


def cmd_hub_allow_jobs(args):
    """Show, or set, what every job may reach on private networks; apply it to the joined workers."""
    entries = [] if args.none else valid_job_allow(list(args.entries))
    require_root()
    need("docker", "ssh")
    if not entries and not args.none:
        config = load_hub_config()
        if args.json:
            print_json({"job_allow": config.job_allow})
        else:
            print(" ".join(config.job_allow) if config.job_allow else "(none: jobs reach the internet only)")
        return EXIT_OK
    with StateLock():
        config = load_hub_config()
        config.job_allow = entries
        save_hub_config(config)
        refreshed = refresh_unused_bundles(config, worker_join_token())
    shown = " ".join(entries) or "nothing private"
    info(f"jobs may reach: {shown}" + (f"; rewrote the bundles on the hub ({', '.join(refreshed)})"
                                        if refreshed else ""))
    return apply_job_allow(config, entries)


def apply_job_allow(config, entries):
    """jobnet.sh allow LIST on every joined worker at once, over the hub's SSH;
    exit 1 when one that allows the hub's SSH could not take it."""
    import shlex
    import subprocess

    declined = hub_ssh_declined()
    nodes = {n.address: n for n in swarm_nodes() if not n.manager and n.state == "ready"}
    targets = sorted((peer for peer in config.peers.values() if peer.ip in nodes), key=lambda p: _ip_sort_key(p.ip))
    remote = shlex.join([JOBNET_SCRIPT, "allow", " ".join(entries)])
    running = [(peer, start(ssh_argv(peer.ip, [remote]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
               for peer in targets if peer.ip not in declined]
    failed = []
    for peer, process in running:
        said = process.stderr.read().decode("utf-8", "replace").strip().splitlines()
        if process.wait():
            failed.append(peer.name)
            warn(f"{peer.name}: {said[-1] if said else 'jobnet.sh allow failed'}")
    applied = [peer.name for peer, _ in running if peer.name not in failed]
    if applied:
        info(f"applied on {', '.join(applied)}")
    for peer in targets:
        if peer.ip in declined:
            warn(f"{peer.name} declined the hub's SSH: its volunteer runs sudo ./jobnet.sh allow in the bundle "
                 f"(gridx hub refresh-bundle {peer.name} writes it)")
    return EXIT_FAILED if failed else EXIT_OK


# -- hub add-user · set-user · set-defaults · remove-user · list-users --------


def cmd_hub_add_user(args):
    """Add a member: VPN address and peer, SSH key forced to `gridx serve NAME`, limits, bundle."""
    name = valid_user_name(args.name)
    ssh_key = valid_user_ssh_key(args.pubkey) if args.pubkey is not None else None
    wg_key = valid_wg_key(args.wg_pubkey, "--wg-pubkey") if args.wg_pubkey is not None else None
    limits = limits_from_args(args)
    refuse_hub_login(name)
    require_root()
    need("wg", "docker", "ssh-keygen")
    with StateLock():
        config = load_hub_config()
        refuse_taken_name(config, name, wg_key, "user")
        if ssh_key and any(u.ssh_key == ssh_key for u in config.users.values()):
            raise usage_error("that --pubkey already belongs to another user", "each user needs their own key")
        host_key = host_key_line(config)
        ip = allocate_ip(config)
        changes = ensure_user_account()
        private_wg = None
        if not wg_key:
            private_wg, wg_key = wg_genkey()
        private_ssh = None
        if not ssh_key:
            private_ssh, ssh_key = new_ssh_keypair(name)
        user = User(name, ip, wg_key, ssh_key, {k: v for k, v in limits.items() if v is not ...}, _now())
        folder = user_bundle_path(name)
        write_bundle(folder, user_bundle_files(config, user, private_wg, private_ssh, host_key))
        config.users[name] = user
        try:
            write_user_access(config)
            apply_firewall(config)
            run(["wg", "set", config.interface, "peer", wg_key, "allowed-ips", f"{ip}/32"])
        except BaseException:
            del config.users[name]
            write_user_access(config)
            remove_user_bundle(name)
            raise
        save_hub_config(config)
        write_hub_wg_conf(config)
        signing_key(name)  # their events' key, ready to hand over (see Notifications)
    for change in changes:
        info(change)
    return print_added(args, "user", user, folder, [
        "Next: give the bundle to them; its README.txt says what to run (wg-quick up, then",
        f"  gridx jobs run … --manager {USER_ACCOUNT}@{config.hub_ip})"])


def remove_user_bundle(name):
    import shutil

    folder = user_bundle_path(name)
    shutil.rmtree(folder, ignore_errors=True)
    if os.path.exists(folder + ".tar.gz"):
        os.unlink(folder + ".tar.gz")


def cmd_hub_set_user(args):
    """Change a member's own limits (none, a number, or default: the hub's)."""
    name = valid_name(args.name, "user name")
    limits = limits_from_args(args)
    notify = notify_setting(args.notify) if args.notify is not None else ...
    if not limits and notify is ...:
        raise usage_error("give a limit (or --notify) to change", "for example: gridx hub set-user alice --max-gpus 1")
    require_root()
    with StateLock():
        config = load_hub_config()
        user = registered(config.users, name, "user")
        if notify is not ...:  # see Notifications
            settings = load_notify_settings()
            settings["users"][name] = notify
            save_notify_settings(settings)
            info(f"{name}'s jobs made from now on notify " + (shown_target(notify["url"].partition("+")[2])
                                                             if notify else "no one (unless their --notify says)"))
        if not limits:
            return EXIT_OK
        own = dict(user.limits)
        for key, value in limits.items():
            if value is ...:
                own.pop(key, None)
            else:
                own[key] = value
        config.users[name] = User(user.name, user.ip, user.public_key, user.ssh_key, own, user.added)
        save_hub_config(config)
        write_user_access(config)
    shown = effective_limits(config, config.users[name])
    print(f"{name}: " + ", ".join(f"{k.replace('_mib', '')} {show_limit(k, v)}" for k, v in shown.items()))
    return EXIT_OK


def cmd_hub_set_defaults(args):
    """Change the limits of members who have none of their own."""
    limits = limits_from_args(args, allow_default=False)
    notify = notify_setting(args.notify) if args.notify is not None else ...
    allow = valid_notify_allow(args.notify_allow) if args.notify_allow else None
    if not limits and notify is ... and allow is None:
        raise usage_error("give a limit (or --notify, --notify-allow) to change",
                          "for example: gridx hub set-defaults --max-cpus 8")
    require_root()
    with StateLock():
        config = load_hub_config()
        if notify is not ... or allow is not None:  # see Notifications
            settings = load_notify_settings()
            settings["default"] = settings["default"] if notify is ... else notify
            settings["allow"] = settings["allow"] if allow is None else allow
            save_notify_settings(settings)
            info("jobs made from now on notify " + (shown_target(settings["default"]["url"].partition("+")[2])
                                                    if settings["default"] else "no one by default")
                 + "; members' targets may also be on: " + (", ".join(settings["allow"]) or "nothing private"))
        if not limits:
            return EXIT_OK
        config.user_defaults.update(limits)
        # an unset submit limit is no limit already; a store limit's "none" must be kept to mean it
        config.user_defaults = {k: v for k, v in config.user_defaults.items()
                                if v is not None or k not in SUBMIT_LIMITS}
        save_hub_config(config)
        if config.users:
            write_user_access(config)
    shown = {key: config.user_defaults.get(key, STORE_DEFAULTS.get(key)) for key in USER_LIMITS + HUB_LIMITS}
    print("defaults: " + ", ".join(f"{k.replace('_mib', '')} {show_limit(k, v)}" for k, v in shown.items()))
    return EXIT_OK


def cmd_hub_remove_user(args):
    """Take a member's SSH key and VPN peer away at once (--stop-jobs: and their jobs)."""
    name = valid_name(args.name, "user name")
    require_root()
    need("wg", "docker")
    with StateLock():
        config = load_hub_config()
        user = registered(config.users, name, "user")
        del config.users[name]
        # first what lets them in: the SSH line, then the VPN peer
        write_user_access(config)
        run(["wg", "set", config.interface, "peer", user.public_key, "remove"])
        save_hub_config(config)
        write_hub_wg_conf(config)
        apply_firewall(config)
        remove_user_bundle(name)
        forget_signing_key(name)  # a new member of that name gets a key of their own
    info(f"removed user {name} ({user.ip}): their SSH key and VPN peer are gone")
    ids = sorted(s["Spec"]["Name"] for s in list_job_services() if owner_of(s) == name)
    if ids and args.stop_jobs:
        return cmd_jobs_delete(argparse.Namespace(job_ids=ids, manager=None, keep_results=False))
    if ids:
        info(f"their jobs keep running: {', '.join(ids)} (stop them: gridx jobs delete ID…)")
    return EXIT_OK


def user_rows(config, with_use=True):
    """Everything list-users shows: one wg call, three docker calls."""
    _, live = wg_dump(config.interface)
    use = None
    if with_use:
        try:
            services, tasks, _, _ = jobs_overview()
            use = use_by_owner(services, tasks)
        except GridxError as error:
            warn(f"what users use now is unknown: {error.message}")
    week = usage_of_members(7)  # see Usage
    rows = []
    for user in sorted(config.users.values(), key=lambda u: _ip_sort_key(u.ip)):
        wg = live.get(user.public_key, {})
        rows.append({
            "name": user.name, "ip": user.ip, "public_key": user.public_key, "live": user.public_key in live,
            "endpoint": wg.get("endpoint"), "handshake_age": wg.get("handshake_age"),
            "limits": effective_limits(config, user), "own_limits": dict(user.limits),
            "use": None if use is None else use.get(user.name, empty_use()),
            "usage_7d": week.get(user.name, {"cpu_hours": 0.0, "gpu_hours": 0.0, "memory_gib_hours": 0.0}),
            "added": user.added,
        })
    return rows


def cmd_hub_list_users(args):
    """Every member: address, handshake, limits and what their unfinished jobs reserve."""
    require_root()
    need("wg", "docker")
    config = load_hub_config()
    rows = user_rows(config)
    defaults = {key: config.user_defaults.get(key, STORE_DEFAULTS.get(key)) for key in USER_LIMITS + HUB_LIMITS}
    if args.json:
        print_json({"users": rows, "defaults": defaults})
        return EXIT_OK
    if not rows:
        print("No users yet. Add one: gridx hub add-user NAME")
        return EXIT_OK
    table = []
    for row in rows:
        limits, use = row["limits"], row["use"]
        table.append([
            row["name"], row["ip"], human_age(row["handshake_age"]),
            "/".join(show_limit(k, limits[k]) for k in SUBMIT_LIMITS),
            "?" if use is None else f"{use['cpus']}/{human_mib(use['memory_mib'])}/{use['gpus']}/{use['jobs']}",
            show_hours(row["usage_7d"]),
        ])
    print_table(["NAME", "VPN IP", "HANDSHAKE", "LIMITS c/m/g/jobs", "USES c/m/g/jobs", "USED 7d cpu-h/gpu-h/GiB-h"],
                table)
    return EXIT_OK


# -- hub reset ----------------------------------------------------------------


def cmd_hub_reset(args):
    """Undo hub init: VPN, swarm, peers, keys, users' access, the watch service; the registry stops."""
    require_root()
    if not args.yes:
        raise usage_error("hub reset removes the VPN, the swarm and every peer", "confirm with --yes")
    import shutil

    with StateLock():
        config = load_hub_config()
        if wg_interface_up(config.interface):
            run(["wg-quick", "down", config.interface], check=False)
        run(["docker", "swarm", "leave", "--force"], check=False)
        if systemd_running() and os.path.exists("/etc/systemd/system/gridx-watch.service"):
            run(["systemctl", "disable", "--now", "gridx-watch.service"], check=False)
            os.unlink("/etc/systemd/system/gridx-watch.service")
        if os.path.exists(DOCKER_DROPIN):
            os.unlink(DOCKER_DROPIN)
            if systemd_running():
                run(["systemctl", "daemon-reload"], check=False)
        for parent, chain in (("INPUT", FIREWALL_CHAIN), ("OUTPUT", OUTPUT_CHAIN)):
            run(["iptables", "-D", parent, "-j", chain], check=False)
            run(["iptables", "-F", chain], check=False)
            run(["iptables", "-X", chain], check=False)
        reset_users()  # their SSH lines and firewall chain: see Accounts
        reset_registry()  # stopped; the CA and the images stay: see Registry
        for path in (wg_conf_path(config.interface), hub_config_path(), server_key_path()):
            if os.path.exists(path):
                os.unlink(path)
        for folder in ("clients", "bundles", "ssh"):
            shutil.rmtree(os.path.join(config_dir(), folder), ignore_errors=True)
    info("the hub is reset: no VPN, no swarm, no peers")
    return EXIT_OK


# ---------------------------------------------------------------------------
# Commands: worker
# ---------------------------------------------------------------------------
# They run the bundle scripts: the worker side has one implementation.


def parse_worker_conf(text):
    """Settings a bundle needs, read from a worker config written by the hub.

    Every value that goes into settings.env is checked here (join.sh checks
    the config's lines itself)."""
    import ipaddress

    values, comments = {}, {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# gridx-") and "=" in line:
            key, _, value = line[2:].partition("=")
            comments[key.strip()] = value.strip()
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key.strip().lower(), value.strip())
    try:
        interface = ipaddress.ip_interface(values["address"].split(",")[0].strip())
        endpoint = values["endpoint"]
        values["publickey"]
    except (KeyError, ValueError):
        raise usage_error(
            "the WireGuard config lacks Address, Endpoint or PublicKey",
            "use the file the hub admin gave you (gridx hub join-info --name NAME)",
        ) from None
    manager = comments.get("gridx-manager")
    if manager is not None:
        host, _, port = manager.rpartition(":")
        try:
            ipaddress.IPv4Address(host)
            valid_port(port)
        except (ValueError, GridxError):
            raise usage_error(f"invalid '# gridx-manager = {manager}' in the WireGuard config: "
                              "use the hub's VPN IPv4 address and port",
                              "use the file the hub admin gave you") from None
    if not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):[0-9]{1,5}", endpoint):
        raise usage_error(f"invalid 'Endpoint = {endpoint}' in the WireGuard config: use HOST:PORT",
                          "use the file the hub admin gave you")
    name = comments.get("gridx-name")
    if name is not None:
        valid_name(name, "'# gridx-name' in the WireGuard config")
    ssh_key = comments.get("gridx-hub-ssh-key", "")
    if ssh_key:
        valid_ssh_public_key(ssh_key, "'# gridx-hub-ssh-key' in the WireGuard config")
    # The hub's VPN address: the manager's host, else the subnet's first
    # host (same as join.sh check_bundle: ${MANAGER%:*} when GRIDX_HUB_VPN_IP
    # is absent).
    hub_ip = manager.rpartition(":")[0] if manager else str(next(interface.network.hosts()))
    key = values.get("privatekey", "")
    settings = worker_settings(
        name or os.uname().nodename.split(".")[0].lower(), DEFAULT_INTERFACE, str(interface.ip), hub_ip, endpoint,
        str(interface.network), manager or f"{hub_ip}:2377", key in ("", PRIVATE_KEY_PLACEHOLDER))
    return settings, ssh_key


def materialise_bundle(settings=None, conf=None, token=None, ssh_key=""):
    """The bundle (bundle_contents: the scripts, and the values when given)
    in a private temp folder, for `gridx worker` to run its scripts."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="gridx-bundle-")  # 0700
    try:
        write_files(folder, bundle_contents(settings, conf, token, ssh_key))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def run_bundle_script(folder, script, arguments):
    import shutil

    need("bash")
    try:
        return run_streaming(["bash", os.path.join(folder, script), *arguments])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def share_flags(args):
    """join.sh's flags: --flag=VALUE, so that no value reads as an option
    there (join.sh checks each value itself)."""
    flags = []
    for flag in ("cpus", "memory", "gpus", "gpu_ids", "private_key", "handshake_timeout", "share", "hours"):
        value = getattr(args, flag, None)
        if value is not None:
            if flag == "private_key":
                value = os.path.abspath(value)
            flags.append(f"--{flag.replace('_', '-')}={value}")
    for flag in ("yes", "install_deps", "no_hub_ssh", "no_containment"):
        if getattr(args, flag, False):
            flags.append(f"--{flag.replace('_', '-')}")
    return flags


def read_token(value):
    token = (value or "").strip()
    # the shape Docker gives it; same as join.sh's check of swarm-token
    if not re.fullmatch(r"SWMTKN-[0-9]+-[a-z0-9]+-[a-z0-9]+", token):
        raise usage_error("invalid --token: a swarm join token looks like SWMTKN-1-…-…",
                          "ask the hub admin: gridx hub join-info --name NAME")
    return token


def read_wg_config(path):
    """--wg-config FILE: a small UTF-8 text file (not a binary, a folder, a
    device that never ends)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(WG_CONFIG_MAX_BYTES + 1)
    except OSError as error:
        raise usage_error(f"cannot read --wg-config {path}: {error.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if len(data) > WG_CONFIG_MAX_BYTES or "\0" in text:
        raise usage_error(f"--wg-config {path} is not a WireGuard config (not a small text file)",
                          "give the .conf file the hub admin gave you (gridx hub join-info --name NAME)")
    return text


def cmd_worker_setup(args):
    """Ask for the config and the token, then join as `worker join` does."""
    if not sys.stdin.isatty():
        raise usage_error("setup asks questions and needs a terminal",
                          "without one use: gridx worker join --wg-config FILE --token TOKEN --yes")
    print("Paste the WireGuard config the hub admin gave you, then an empty line:")
    lines = []
    while True:
        line = input()
        if not line.strip() and lines:
            break
        lines.append(line)
    conf = "\n".join(lines) + "\n"
    settings, ssh_key = parse_worker_conf(conf)
    token = read_token(input("Swarm join token (SWMTKN-…): "))
    folder = materialise_bundle(settings, conf, token, ssh_key)
    return run_bundle_script(folder, "join.sh", share_flags(args))


def cmd_worker_join(args):
    """Join with a WireGuard config and a token: the bundle's join.sh, materialised here."""
    conf = read_wg_config(args.wg_config)
    token = read_token(args.token)
    ssh_key = valid_ssh_public_key(args.ssh_key) if args.ssh_key is not None else None
    settings, conf_ssh_key = parse_worker_conf(conf)
    folder = materialise_bundle(settings, conf, token, ssh_key or conf_ssh_key)
    return run_bundle_script(folder, "join.sh", share_flags(args))


def cmd_worker_status(args):
    """The bundle's status.sh: link, handshake, swarm, shares."""
    return run_bundle_script(materialise_bundle(), "status.sh", ["--json"] if args.json else [])


def cmd_worker_leave(args):
    """The bundle's leave.sh: leave the swarm and the VPN, restore what join changed."""
    return run_bundle_script(materialise_bundle(), "leave.sh", ["--yes"] if args.yes else [])


# ---------------------------------------------------------------------------
# Commands: jobs
# ---------------------------------------------------------------------------


# -- submitting (run, jupyter, train) -----------------------------------------


def new_job_name(args, prefix="job"):
    if args.name:
        return valid_name(args.name, "job name")
    return new_job_id(prefix)


def output_labels(output, layer_image):
    labels = []
    if output:
        labels += [(LABEL_OUTPUT, output[0]), (LABEL_OUTPUT_LIMIT, str(output[1]))]
    if layer_image:
        labels.append((LABEL_BASE_IMAGE, layer_image))
    return labels


def placeable_nodes(output):
    """The nodes a job may run on: with --output, those the hub's SSH reaches."""
    nodes = swarm_nodes()
    if not output:
        return nodes
    reachable = [n for n in nodes if n.hub_ssh]
    if worker_nodes(nodes) and not any(n.shared.cpus for n in worker_nodes(reachable)):
        raise precondition("no worker lets the hub collect a job's results: every one joined with --no-hub-ssh",
                           "run it without --output/--workdir, or ask a volunteer to join without --no-hub-ssh")
    return reachable


def submit_job(args, job_id, image, request, output, checkpoint, **create):
    """Create the job (output: job_output's, checkpoint: job_checkpoint's,
    both read before anything is made). With a work layer, the job is created first, held (its
    name and its owner's limits taken before anything is made), then the
    layer is made and the job moved onto it by digest; a layer that cannot be
    made takes the job away with it: a refused submit leaves nothing."""
    refuse_work_layer_image(image)
    refuse_kept_name(job_id)
    layer = args.layer
    extra = list(create.pop("extra_args", ()))
    if output or checkpoint:  # the hub copies them out over its SSH
        extra.append(f"--constraint={HUB_SSH_CONSTRAINT}")
    labels = output_labels(output, image if layer else None) + list(getattr(args, "notify_labels", ()))
    if checkpoint:
        labels += [(LABEL_CHECKPOINT, checkpoint[0]), (LABEL_CHECKPOINT_EVERY, str(checkpoint[1]))]
        create["env"] = [*create.get("env", ()), f"GRIDX_CHECKPOINT_DIR={checkpoint[0]}"]
    if not layer:
        create_job(job_id, image, request, extra_args=extra,
                   extra_labels=[*labels, *([(LABEL_RUN_IMAGE, image)] if checkpoint else [])], **create)
        return
    hold = f"--constraint={HOLD_CONSTRAINT}=={layer.tag}"
    create_job(job_id, image, request, extra_args=[*extra, hold], extra_labels=[*labels, (LABEL_LAYER, layer.tag)],
               **create)
    try:
        target = layer.build(image)
        run_image = [f"--label-add={LABEL_RUN_IMAGE}={target}"] if checkpoint else []  # a re-run's base
        run(docker("service", "update", "--detach", "--quiet", "--no-resolve-image", f"--image={target}",
                   f"--constraint-rm={hold.partition('=')[2]}", *run_image, "--", job_id))
    except BaseException:
        run(docker("service", "rm", "--", job_id), check=False)
        if layer.pushed:
            remove_work_layer(layer.tag, layer.pushed[1])
        raise


def finish_waited_job(job_id, code, output):
    """--wait: the results come to ./JOB/ (the job's status stays the exit status)."""
    if not output or OWNER is not None:  # serve: the user's gridx fetches them (forward_to_serve)
        return code
    dest = results_destination(None, job_id)
    if DOCKER_HOST:
        written, files = fetch_results_over_ssh(DOCKER_HOST, job_id, dest)
    else:
        service = list_job_services([job_id])[0]
        record = collect_results(service, list_tasks([service]))
        say_results_problems(job_id, record)
        written, files = results_here(service["ID"], dest, record)
    info(f"results: {human_bytes(written)} in {files} file(s) in {dest}/")
    return code


def say_results_problems(job_id, record):
    """One warning per replica whose output did not come (never silent)."""
    for s in (record or {}).get("tasks", {}).values():
        if s.get("state") != "collected":
            where = f" (replica {s['folder']})" if s.get("folder") else ""
            warn(f"job {job_id}{where}: results {s['state']}: {s.get('error', '')}")


# -- jobs run · jupyter · train -----------------------------------------------


def cmd_jobs_run(args):
    """Submit a batch job (a swarm replicated-job); --wait follows it to its exit status."""
    image = valid_image(args.image)
    request = JobRequest(args.cpus, args.memory, args.gpus)
    env = parse_env(args.env)
    replicas = parse_count(args.replicas, "--replicas", 1)
    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    command_argv, command_text = job_command(command)
    job_id = args.job_name = new_job_name(args)
    output = job_output(args)
    checkpoint = job_checkpoint(args)
    args.notify_labels = notify_labels(args.notify)  # see Notifications
    args.layer = work_layer(args, job_id)  # the folder is read (and its size checked) now
    if args.wait and output:
        results_destination(None, job_id)
    set_manager(args)
    check_fits(request, placeable_nodes(output))
    submit_job(args, job_id, image, request, output, checkpoint, kind="run", command_argv=command_argv,
               command_text=command_text, mode="replicated-job", replicas=replicas, env=env)
    if not args.wait:
        if args.json:
            print_json({"id": job_id})
        else:
            print(job_id)
            info(f"follow it: gridx jobs logs {job_id} -f   ·   gridx jobs status {job_id}")
        return EXIT_OK
    info(f"job {job_id} submitted ({request.describe()}); waiting for it to finish")
    return finish_waited_job(job_id, wait_for_job(job_id, replicas), output)


def cmd_jobs_jupyter(args):
    """Start a Jupyter server as a service and print its URL once it answers."""
    image = valid_image(args.image or JUPYTER_IMAGE, "--image")
    request = JobRequest(args.cpus, args.memory, args.gpus)
    port = valid_port(args.port)
    timeout = parse_count(args.timeout, "--timeout", 1, JUPYTER_MAX_WAIT_S)
    job_id = new_job_name(args, "jupyter")
    notify = notify_labels(args.notify)  # see Notifications
    listen = parse_listen(args.forward) if args.forward is not None else None
    manager = args.manager or os.environ.get("GRIDX_MANAGER")
    if listen and manager:  # the hub's gridx starts it, this one listens (see Remote)
        way = forward_way(args)
        started = jupyter_through_hub(way.docker_host, args)
        return forward_job(way, started["id"], listen, args.json)
    set_manager(args)
    check_fits(request, swarm_nodes())
    import secrets

    token = secrets.token_hex(16)
    command = [
        "jupyter", "notebook", "--ip=0.0.0.0", f"--port={port}", "--no-browser", "--allow-root",
    ]
    create_job(
        job_id, image, request, kind="jupyter", command_argv=command, command_text=" ".join(command),
        mode="replicated", replicas=1, env=[f"JUPYTER_TOKEN={token}"], restart="any",
        extra_args=["--replicas", "1", "--publish", f"mode=host,target={port},published={port}"],
        extra_labels=[(LABEL_TOKEN, token), (LABEL_PORT, str(port)), *notify],
    )
    info(f"job {job_id}: starting Jupyter (this can take a while the first time)")
    url = wait_for_jupyter(job_id, port, token, timeout)
    if listen:
        info(f"Jupyter answers at {url}")
        return forward_job(HubWay(), job_id, listen, args.json)
    if args.json:
        print_json({"id": job_id, "url": url})
    else:
        print(url)
        info(f"stop it: gridx jobs delete {job_id}")
    return EXIT_OK


def wait_for_jupyter(job_id, port, token, timeout):
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    addresses = {}
    while time.monotonic() < deadline:
        history = tasks_of(job_id)
        tasks = [t for t in history if t.state == "running"]
        failed = [t for t in history if t.state in ("failed", "rejected") and t.error]
        if not tasks and len(failed) >= JUPYTER_FAILURES:
            # The swarm restarts it forever; a server that cannot start
            # (no such image or command) is said now, not at the timeout.
            raise GridxError(f"Jupyter ({job_id}) failed {len(failed)} times: {failed[0].error}",
                             f"check --image, then: gridx jobs delete {job_id}")
        if tasks:
            if tasks[0].node_id not in addresses:
                addresses = {n.id: n.address for n in all_swarm_nodes()}
            address = addresses.get(tasks[0].node_id)
            url = f"http://{address}:{port}/?token={token}"
            try:
                with urllib.request.urlopen(f"http://{address}:{port}/api/status?token={token}", timeout=3):
                    return url
            except (OSError, urllib.error.URLError):
                pass
        time.sleep(1)
    raise GridxError(f"Jupyter ({job_id}) did not answer within {timeout} s",
                     f"see why: gridx jobs status {job_id}; gridx jobs logs {job_id}")


def cmd_jobs_train(args):
    """Run a training script (URL, local file as a swarm config, or in --workdir) on a framework image."""
    framework_image = FRAMEWORK_IMAGES[args.framework]
    image = valid_image(args.image or framework_image, "--image")
    request = JobRequest(args.cpus, args.memory, args.gpus)
    env = parse_env(args.env)
    script = args.script
    is_url = script.startswith(("http://", "https://"))
    job_id = args.job_name = new_job_name(args, "train")
    output = job_output(args)
    checkpoint = job_checkpoint(args)
    args.notify_labels = notify_labels(args.notify)  # see Notifications
    args.layer = work_layer(args, job_id)
    args.script_in_workdir = script_in_workdir(args) if args.layer and not is_url else None
    content = None
    if getattr(args, "upload", None) is not None and not args.layer:  # serve: the file the user's gridx sent
        content = args.upload.spool.read(CONFIG_MAX_BYTES + 1)
    elif not is_url and not args.script_in_workdir:
        try:
            with open(script, "rb") as handle:
                content = handle.read(CONFIG_MAX_BYTES + 1)
        except OSError as error:
            raise usage_error(f"cannot read the script {script}: {error.strerror}",
                              "give a local file or an http(s):// URL") from None
        if len(content) > CONFIG_MAX_BYTES:
            raise usage_error(
                f"the script {script} is over {CONFIG_MAX_BYTES // 1024} KiB, the swarm config limit",
                "send its folder with --workdir DIR, serve it over http(s), or build it into the image",
            )
        args.script_file = (os.path.basename(script), content)  # what a user's gridx sends to serve
    if args.wait and output:
        results_destination(None, job_id)
    set_manager(args)
    check_fits(request, placeable_nodes(output))
    import shlex

    extra = []
    if is_url:
        fetch = ("import sys, urllib.request; "
                 "urllib.request.urlretrieve(sys.argv[1], '/tmp/gridx-train.py')")
        shell = f"python -c {shlex.quote(fetch)} {shlex.quote(script)} && exec python /tmp/gridx-train.py"
    elif args.script_in_workdir:
        shell = f"exec python {shlex.quote(args.script_in_workdir)}"  # from /work, the layer's WORKDIR
    else:
        config_name = f"{job_id}-script"
        run_naming(docker("config", "create", f"--label={LABEL_JOB}={job_id}", "--", config_name, "-"), job_id,
                   input=content.decode("utf-8", "surrogateescape"))
        extra = [f"--config=source={config_name},target=/gridx/train.py,mode=0444"]
        shell = "exec python /gridx/train.py"
    try:
        submit_job(args, job_id, image, request, output, checkpoint, kind="train", command_argv=["sh", "-c", shell],
                   command_text=f"train {script} ({args.framework})", mode="replicated-job", replicas=1,
                   env=env, extra_args=extra)
    except GridxError:
        if content is not None:
            run(docker("config", "rm", "--", f"{job_id}-script"), check=False)
        raise
    if not args.wait:
        print(job_id)
        info(f"follow it: gridx jobs logs {job_id} -f")
        return EXIT_OK
    return finish_waited_job(job_id, wait_for_job(job_id), output)


def script_in_workdir(args):
    """train --workdir: the local script's path in the folder (it runs from
    the layer, /work/PATH); exit 2 when it is outside or left out."""
    upload = getattr(args, "upload", None)
    if upload is not None:  # serve: as the user's gridx found it
        relative = upload.header.get("script")
        if not isinstance(relative, str) or posixpath.normpath(relative) != relative \
                or relative.startswith(("/", "../")) or relative == "..":
            raise usage_error("the training script's path in the work folder did not arrive",
                              "send it with gridx jobs train SCRIPT --workdir DIR")
        return relative
    folder = args.layer.folder
    relative = os.path.relpath(os.path.abspath(args.script), folder.path).replace(os.sep, "/")
    if relative.startswith("../") or relative == "..":
        raise usage_error(f"with --workdir the script must be in that folder: {args.script} is not in {args.workdir}",
                          f"move it into {args.workdir}, or give --workdir the folder that holds it")
    if relative not in folder.entries:
        raise usage_error(f"{args.script} is left out of the work folder by its {folder.rules.source}",
                          f"take it out of {folder.rules.source}")
    return relative


# -- jobs list · status · logs · delete ---------------------------------------


def cmd_jobs_list(args):
    """Every job with its owner, state and nodes, from the swarm's labels (--mine, --user)."""
    check_owner_filter(args)  # --user NAME, before anything runs
    set_manager(args)
    _, _, jobs, _ = jobs_overview()
    jobs = filter_jobs(jobs, args)  # --mine, --user
    jobs.sort(key=lambda j: j["created"])
    if printed_as_json_or_none(args.json, "jobs", jobs,
                               "No jobs. Submit one: gridx jobs run python:3.11 \"python -c 'print(2**100)'\""):
        return EXIT_OK
    rows = []
    for job in jobs:
        nodes = sorted({t["node"] for t in job["tasks"] if t["node"]})
        exit_code = "" if job["exit_code"] is None else str(job["exit_code"])
        rows.append([job["id"], job["owner"], job["kind"], job["image"], job["state"], exit_code,
                     ",".join(nodes) or "-", (job["command"] or "")[:40]])
    print_table(["ID", "OWNER", "KIND", "IMAGE", "STATE", "EXIT", "NODE", "COMMAND"], rows)
    return EXIT_OK


def cmd_jobs_status(args):
    """One job: placement, state, exit code, why it waits, and its results."""
    job_id = valid_name(args.job_id, "job ID")
    set_manager(args)
    services, tasks, jobs, nodes = jobs_overview([job_id])
    job = jobs[0]
    if job["state"] == "pending":
        all_services, all_tasks, _, _ = jobs_overview()
        job["reason"] = pending_reason(job, services[0], nodes, reserved_by_node(all_services, all_tasks))
    if job["tasks"]:
        add_task_details(job, tasks, nodes)
    add_results(job, services[0], tasks, nodes)
    add_checkpoint(job, services[0])
    sent = notify_status(services[0]["ID"])  # see Notifications
    if sent:
        job["notify"] = sent
    if args.json:
        print_json(job)
        return EXIT_OK
    say(f"Job:      {job['id']} ({job['kind']})")
    say(f"Owner:    {job['owner']}")
    say(f"Image:    {job['image']}")
    if job["command"]:
        say(f"Command:  {job['command']}")
    gpus = f", {job['gpus']} GPU" if job["gpus"] else ""
    say(f"Asks:     {job['cpus']:g} CPU, {human_mib(job['memory_mib'])}{gpus}")
    say(f"State:    {job['state']}" + ("" if job["exit_code"] is None else f" (exit {job['exit_code']})"))
    if job.get("reason"):
        say(f"Why:      {job['reason']}")
    for task in job["tasks"]:
        where = f"{task['node']} ({task.get('address', '')})" if task["node"] else "not placed"
        line = f"  {task['name']}: {task['state']} {task['since']} on {where}"
        if task.get("exit_code") is not None:
            line += f", exit {task['exit_code']}"
        if task.get("gpus"):
            line += f", GPUs {','.join(task['gpus'])}"
        if task["error"]:
            line += f" — {task['error']}"
        say(line)
    print_results(job)
    print_checkpoint(job)
    if job.get("notify"):
        say(f"Notify:   {notify_summary(job['notify'])}")
    return EXIT_OK


def add_results(job, service, tasks, nodes):
    """jobs status of a job with --output: its results record (collected
    now, on the hub as root), or None when the hub cannot say."""
    if LABEL_OUTPUT not in service["Spec"].get("Labels", {}):
        return
    record = hub_results(job["id"]) if DOCKER_HOST else collect_results(service, tasks, nodes)
    job["results"] = dict(record, path=record.get("path") or results_files_path(service["ID"])) if record else None


def add_checkpoint(job, service):
    """jobs status of a job with --checkpoint: its latest checkpoint on the
    hub ({path, at, age_s, bytes, files, node}), or None when there is none yet
    (through --manager root@HUB the hub's files are not here: not said)."""
    labels = service["Spec"].get("Labels", {})
    if LABEL_CHECKPOINT not in labels or DOCKER_HOST:
        return
    record = checkpoint_record(service["ID"])
    job["checkpoint"] = None if record is None else dict(
        record, every_s=int(labels.get(LABEL_CHECKPOINT_EVERY) or DEFAULT_CHECKPOINT_EVERY_S),
        age_s=max(0, int(time.time()) - record.get("at", 0)))
    job.setdefault("checkpoint_path", labels[LABEL_CHECKPOINT])


def print_checkpoint(job):
    if "checkpoint_path" not in job:
        return
    kept = job["checkpoint"]
    if kept is None:
        say(f"Checkpoint: {job['checkpoint_path']}: none yet")
        return
    say(f"Checkpoint: {job['checkpoint_path']}: {human_bytes(kept['bytes'])} in {kept['files']} file(s), "
        f"taken {human_age(kept['age_s'])} from {kept['node']}")


def print_results(job):
    if "results" not in job:
        return
    if job["results"] is None:
        say("Results:  unknown: the hub's gridx did not say (is gridx on the hub's PATH?)")
        return
    say(f"Results:  {results_summary(job['results'])}")
    if job["results"]["tasks"]:
        say(f"          on the hub in {job['results']['path']}; fetch: gridx jobs results {job['id']}")


def add_task_details(job, tasks, nodes):
    """jobs status: each task's container exit code, GPUs and its node's address."""
    by_id = {t.id: t for t in tasks}
    addresses = {n.id: n.address for n in nodes}
    for task in job["tasks"]:
        found = by_id.get(task["id"], Task())
        # A rejected or shut-down task's container may never have run:
        # its ExitCode 0 would read as success.
        if task["state"] in ("complete", "failed") and found.container_exit is not None:
            task["exit_code"] = found.container_exit
        task["gpus"] = found.gpus
        task["address"] = addresses.get(task["node_id"], "")
    job["exit_code"] = job_exit_code(t["exit_code"] for t in job["tasks"])


def cmd_jobs_logs(args):
    """A job's output from every node that ran it (-f: until a batch job ends)."""
    job_id = valid_name(args.job_id, "job ID")
    tail = [] if args.tail is None else [f"--tail={parse_count(args.tail, '--tail', 0)}"]
    set_manager(args)
    services = list_job_services([job_id])
    check_owner(services, "read the logs of")  # through serve: see Jobs, owners
    mode = services[0]["Spec"]["Mode"]
    sources, lost = log_sources(job_id)
    if lost:
        warn(f"the logs of {job_id} on {', '.join(lost.values())} cannot be read: "
             f"{'that node is' if len(lost) == 1 else 'those nodes are'} down; showing the rest")
    if args.follow and "ReplicatedJob" in mode:
        # A batch job's log ends with the job, as `kubectl logs -f` does.
        wait_for_job(job_id, job_replicas(mode), log_args=tail, may_run_again=False, log_sources=sources,
                     unreadable_nodes=set(lost))
        return EXIT_OK
    if args.follow:
        # A service (Jupyter) runs until deleted: follow until Ctrl-C.
        followers = [start(logs_argv(source, tail, follow=True)) for source in sources]
        try:
            return max([follower.wait() for follower in followers] or [0])
        finally:
            for follower in followers:
                follower.terminate()
    codes = [read_job_logs(job_id, source, tail) for source in sources]
    return max(codes or [0])


def cmd_jobs_delete(args):
    """Stop a job's containers on every worker, remove it, its configs, its
    work layer and (unless kept) its results."""
    ids = [valid_name(job_id, "job ID") for job_id in args.job_ids]
    set_manager(args)
    services = list_job_services(ids)
    check_owner(services, "delete")  # through serve: see Jobs, owners
    tasks = list_tasks(services)
    with_results = [service for service in services if LABEL_OUTPUT in service["Spec"].get("Labels", {})]
    if args.keep_results:
        check_kept_limit(len(with_results))
    stop_running_jobs(services, tasks)
    leftovers = output_containers(services, tasks, keep=args.keep_results)  # see Work folders and results
    for service in with_results:
        if args.keep_results:
            keep_results(service)
        elif DOCKER_HOST:  # while the job is still there to be found by name
            run(hub_gridx_argv(DOCKER_HOST, ["jobs", "results", "--delete", "--", service["Spec"]["Name"]]),
                check=False)
    run(docker("service", "rm", "--", *ids))
    remove_containers(leftovers)
    remove_job_configs(ids)
    if not DOCKER_HOST and os.geteuid() == 0:  # else (--manager, serve) hub watch's sweep removes them
        for tag in filter(None, (s["Spec"].get("Labels", {}).get(LABEL_LAYER) for s in services)):
            remove_work_layer(tag)
    if not DOCKER_HOST and not args.keep_results:
        for service in with_results:
            remove_results(service["ID"])
    if not DOCKER_HOST:  # else hub watch's sweep takes them
        for service in services:
            remove_checkpoint(service["ID"])
    kept = {service["Spec"]["Name"] for service in with_results} if args.keep_results else set()
    for job_id in ids:
        print(f"deleted {job_id}" + (f" (its results stay on the hub: gridx jobs results {job_id})"
                                     if job_id in kept else ""))
    return EXIT_OK


def stop_running_jobs(services, tasks):
    """Docker 20.10 leaves the container of a running replicated-job behind
    when its service is removed (moby#44312): stop its tasks first by moving
    the job to a constraint no node meets, and wait (30 s at most)."""
    modes = {s["Spec"]["Name"]: s["Spec"]["Mode"] for s in services}
    running_jobs = sorted({t.service for t in tasks
                           if t.active and is_current(t) and "ReplicatedJob" in modes.get(t.service, {})})
    for job_id in running_jobs:
        run(docker("service", "update", "--detach", "--force",
                   "--constraint-add", "node.labels.gridx-deleted==true", "--", job_id))
    deadline = time.monotonic() + 30
    while running_jobs and time.monotonic() < deadline:
        live = [t for t in list_tasks([s for s in services if s["Spec"]["Name"] in running_jobs])
                if t.state in ("running", "starting", "preparing")]
        if not live:
            break
        time.sleep(0.5)


def remove_job_configs(ids):
    """The swarm configs of the jobs (train's script). Several label=K=V
    filters on `config ls` do not mean "any of these": list every job's
    config and pick the deleted jobs' here."""
    listed = run(docker("config", "ls", "--filter", f"label={LABEL_JOB}",
                        "--format", '{{.ID}}\t{{.Label "%s"}}' % LABEL_JOB)).stdout
    configs = [config_id for config_id, _, job_id in (line.partition("\t") for line in listed.splitlines())
               if job_id in ids]
    if configs:
        removed = run(docker("config", "rm", "--", *configs), check=False)
        if removed.returncode != 0:
            said = (removed.stderr.strip().splitlines() or ["docker config rm failed"])[-1]
            warn(f"the jobs' script configs were not all removed: {said}")


# -- jobs results -------------------------------------------------------------


def cmd_jobs_results(args):
    """Copy a job's collected --output files here (or --tar, --json, --delete)."""
    job_id = valid_name(args.job_id, "job ID")
    modes = [flag for flag in ("tar", "json", "delete") if getattr(args, flag)]
    if len(modes) > 1 or (modes and args.dest):
        raise usage_error("give DEST, --tar, --json or --delete: one of them", f"gridx jobs results {job_id} ./here")
    dest = None if modes else results_destination(args.dest, job_id)
    set_manager(args)  # a user's: forward_to_serve fetches into dest and exits
    if DOCKER_HOST:  # root@HUB: the hub's gridx collects and answers
        if not modes:
            written, files = fetch_results_over_ssh(DOCKER_HOST, job_id, dest)
            print(dest)
            info(f"{human_bytes(written)} in {files} file(s)")
            return EXIT_OK
        return run_streaming(hub_gridx_argv(DOCKER_HOST, ["jobs", "results", f"--{modes[0]}", "--", job_id]))
    if OWNER is None:
        require_root()  # serve runs as the gridx account, which owns the results (see results_owner)
    service, tasks, record, key = job_or_results(job_id)
    if args.delete:
        remove_results(key)
        if service is None:
            forget_kept(job_id)  # the name is free again
        print(f"removed the results of {job_id}")
        return EXIT_OK
    state = job_summary(service, tasks)["state"] if service else "deleted"
    if args.json:
        print_json(dict(record, state=state, path=results_files_path(key)))
        return EXIT_OK
    if not record["tasks"]:
        raise precondition(f"job {job_id} is {state}: its results are collected onto the hub when its task ends",
                           f"wait for it: gridx jobs logs {job_id} -f, then run this again")
    say_results_problems(job_id, record)
    if args.tar:
        sys.stdout.flush()
        write_results_tar(key, sys.stdout.buffer)
        return EXIT_OK
    written, files = results_here(key, dest, record)
    print(dest)
    info(f"{human_bytes(written)} in {files} file(s)")
    return EXIT_OK


def job_or_results(job_id):
    """(service or None, tasks, record, key) of a job, or of a deleted job
    whose results were kept (key: the service ID they are filed under); exit
    2 when neither exists, it is another member's, or it has no --output."""
    services = list_job_services([job_id], missing_ok=True)
    if not services:
        kept = kept_results(job_id)
        record = load_results_record(kept["service"]) if kept and kept["service"] else None
        if record is None:
            raise usage_error(f"no job {job_id!r}, and no results of one", "list the jobs: gridx jobs list")
        owner = kept["owner"]
        if OWNER is not None and (owner != OWNER or record.get("owner") != OWNER):
            raise usage_error(f"job {job_id} was {owner}'s: {OWNER} can fetch only their own results")
        return None, [], record, kept["service"]
    check_owner(services, "fetch the results of")  # through serve: see Jobs, owners
    tasks = list_tasks(services)
    record = collect_results(services[0], tasks)
    if OWNER is not None and record is not None:
        record = wait_for_watch(services[0], tasks, record)
    if record is None:
        raise usage_error(f"job {job_id} has no results: it was submitted without --output or --workdir",
                          f"its output is in its logs: gridx jobs logs {job_id}")
    return services[0], tasks, record, services[0]["ID"]


RESULTS_WATCH_WAIT_S = WATCH_DEFAULT_INTERVAL_S * 3  # serve: how long hub watch may take to collect


def wait_for_watch(service, tasks, record):
    """serve: the gridx account cannot reach the workers; hub watch (root)
    collects a task's output within its interval: wait for it, bounded."""
    deadline = time.monotonic() + RESULTS_WATCH_WAIT_S
    while True:
        if all(t.id in record["tasks"] for t in ended_tasks(tasks)):  # tried at least once
            return record
        if time.monotonic() > deadline:
            raise precondition(f"the results of {service['Spec']['Name']} were not collected within "
                               f"{RESULTS_WATCH_WAIT_S} s of the job's end",
                               "the hub admin checks gridx hub watch (systemctl status gridx-watch)")
        time.sleep(1)
        record = load_results_record(service["ID"]) or record


def hub_results(job_id):
    """jobs status/delete through --manager root@HUB: the record from the
    hub's gridx (None when it cannot say)."""
    import json

    result = run(hub_gridx_argv(DOCKER_HOST, ["jobs", "results", "--json", "--", job_id]), check=False)
    try:
        return json.loads(result.stdout) if result.returncode == 0 else None
    except ValueError:
        return None


# -- jobs forward · connect · usage -------------------------------------------


def cmd_jobs_forward(args):
    """Listen here and relay each connection to a job's published port (Jupyter), through the hub."""
    job_id = valid_name(args.job_id, "job ID")
    listen = parse_listen(args.local)
    return forward_job(forward_way(args), job_id, listen, args.json)  # see Remote


def cmd_jobs_connect(args):
    """The hub's side of a forward (not in --help): this session's input and
    output to the job's published port, as `ssh -W` does; --probe says where it is."""
    job_id = valid_name(args.job_id, "job ID")
    need("docker")
    if args.probe:
        print_json(job_endpoint(job_id))
        return EXIT_OK
    relay_stdio(connect_job(job_id))
    return EXIT_OK


def cmd_jobs_usage(args):
    """CPU-, GPU- and memory-hours each member used (by kind) and each node gave, from hub watch's ledger."""
    since = parse_since(args.since)
    if args.user not in (None, ADMIN_OWNER):
        valid_name(args.user, "--user")
    manager = args.manager or os.environ.get("GRIDX_MANAGER")
    if manager:
        docker_host = valid_manager(manager)
        forward_to_serve(docker_host, args)  # a member's runs on the hub (see Remote)
        need("ssh")
        words = ["usage", f"--since={args.since}"] + [f"--user={args.user}"] * bool(args.user) + ["--json"] * args.json
        return run_streaming(hub_gridx_argv(docker_host, words))  # root@HUB: the hub's gridx reads its ledger
    report = usage_since(since, user=args.user)
    if args.json:
        print_json(report)
        return EXIT_OK
    days = (report["until"] - report["since"]) / 86400
    running = f"; {report['running']} task(s) still running, counted until now" if report["running"] else ""
    print(f"Usage since {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(report['since']))} "
          f"({days:.1f} days{running}), from the resources jobs reserved")
    if not report["users"]:
        print("Nothing used in that time (hub watch writes the ledger: is it running?)")
        return EXIT_OK
    print()
    print_table(["MEMBER", "KIND", "CPU-H", "GPU-H", "MEM GiB-H", "TASKS"],
                [[member["name"], kind, f"{hours['cpu_hours']:.2f}", f"{hours['gpu_hours']:.2f}",
                  f"{hours['memory_gib_hours']:.2f}", hours["tasks"]]
                 for member in report["users"] for kind, hours in member["kinds"].items()])
    print()
    print_table(["GIVEN BY", "NODE ID", "CPU-H", "GPU-H", "MEM GiB-H", "TASKS"],
                [[node["hostname"], node["node_id"][:12], f"{node['cpu_hours']:.2f}", f"{node['gpu_hours']:.2f}",
                  f"{node['memory_gib_hours']:.2f}", node["tasks"]] for node in report["nodes"]])
    return EXIT_OK


# -- cluster ------------------------------------------------------------------


def cmd_cluster(args):
    """Every node: what it shares, what jobs reserve, what is free; totals and owners."""
    set_manager(args)
    services, tasks, _, nodes = jobs_overview()
    reserved = reserved_by_node(services, tasks)
    rows, document = [], []
    total, total_used = Resources(), Resources()
    for node in sorted(nodes, key=lambda n: (not n.manager, n.address)):
        used = reserved.get(node.id, Resources())
        free = node.shared - used
        document.append({
            "id": node.id, "hostname": node.hostname, "address": node.address, "state": node.state,
            "availability": node.availability, "manager": node.manager, "owner": owner_document(node.owner),
            "shared": dict(node.shared.to_dict(), gpu_ids=node.gpu_ids),
            "reserved": used.to_dict(),
            "free": free.to_dict(),
        })
        if node.state == "ready":
            total, total_used = total + node.shared, total_used + used
        said = describe_owner(node.owner) if node.state == "ready" else ""
        rows.append([
            node.hostname, node.address, "manager" if node.manager else "worker",
            node.state + (f", {said}" if said else ""), node.shared.cpus, human_mib(node.shared.memory_mib),
            node.shared.gpus, used.show(), free.show(),
        ])
    if args.json:
        totals = dict(total.to_dict(), **{f"used_{key}": value for key, value in total_used.to_dict().items()})
        print_json({"nodes": document, "totals": totals, "users": use_by_owner(services, tasks)})
        return EXIT_OK
    rows.append(["TOTAL (ready)", "", "", "", total.cpus, human_mib(total.memory_mib), total.gpus,
                 total_used.show(), (total - total_used).show()])
    print_table(["NODE", "VPN IP", "ROLE", "STATE", "CPUS", "MEMORY", "GPUS", "RESERVED c/m/g", "FREE c/m/g"], rows)
    owners_table(use_by_owner(services, tasks))  # per member
    return EXIT_OK


# ---------------------------------------------------------------------------
# Commands: image
# ---------------------------------------------------------------------------
# The hub's registry (see Registry).


def image_manager(args):
    """--manager / GRIDX_MANAGER of an image command, checked first (exit 2):
    the registry is the admin's, so only root@HUB, never a user's account."""
    import urllib.parse

    manager = getattr(args, "manager", None) or os.environ.get("GRIDX_MANAGER")
    if not manager:
        return None
    docker_host = valid_manager(manager)
    user = urllib.parse.urlsplit(docker_host).username
    if user not in (None, "root"):
        raise usage_error(f"gridx image commands are for the hub's admin, not through {user}@ (gridx serve)",
                          "ask the hub admin for an image's name (gridx image ls on the hub), then: "
                          "gridx jobs run 10.0.0.1:5000/NAME:TAG … --manager " + manager)
    return manager


def image_registry(args):
    """(registry address, CA path) of the reader, which image ls reads: on
    the hub from its config; with --manager root@HUB, HUB:5000 and the CA
    this machine's Docker has for it in /etc/docker/certs.d."""
    import urllib.parse

    manager = image_manager(args)
    if manager:
        host = urllib.parse.urlsplit(valid_manager(manager)).hostname
        address = f"{host}:{REGISTRY_PORT}"
        trust = registry_trust_path(address)
        if not os.path.exists(trust):
            raise precondition(
                f"this machine's Docker does not trust the hub's registry: {trust} is missing",
                f"copy the hub's CA: ssh {manager} cat {registry_paths()['ca.crt']} | sudo install -D -m 0644 "
                f"/dev/stdin {trust}")
        return address, trust
    config = load_hub_config()
    address = registry_address(config.hub_ip)
    trust = registry_trust_path(address)
    if not os.path.exists(trust):
        raise precondition(f"the hub has no image registry yet ({trust} is missing)",
                           "install docker-registry and openssl, then run gridx hub init again")
    return address, trust


def pushed_digest(writer_name):
    """The digest the hub's Docker recorded for its push of writer_name."""
    import json

    path = writer_name.rsplit(":", 1)[0]
    found = run(docker("image", "inspect", "--format={{json .RepoDigests}}", "--", writer_name), check=False)
    for entry in (json.loads(found.stdout or "null") or []) if found.returncode == 0 else []:
        name, _, digest = entry.partition("@")
        if name == path:
            return digest
    return None


def check_served(target, writer_name, address, ca_path):
    """On the hub: the reader serves the tag just pushed through the writer
    with the same digest (one storage), or the pushed name would not run."""
    _, path, tag, _ = split_image(target)
    served, _ = registry_manifest(address, ca_path, path, tag, method="HEAD")
    pushed = pushed_digest(writer_name)
    if served is None or (pushed and served != pushed):
        raise GridxError(f"the registry's read-only side {address} serves {served or 'nothing'} for {path}:{tag}, "
                         f"not the {pushed or 'image'} pushed to {registry_writer()}",
                         f"do both use one storage? gridx hub init rewrites their configs ({registry_storage()})")


def cmd_image_push(args):
    """Push an image of the hub's Docker through the registry's writer; print the name workers pull."""
    image = valid_image(args.image)
    manager = image_manager(args)
    if split_image(image)[3]:
        pushed_name(image, "")  # by digest: exit 2 before anything
    writer = registry_writer()
    if manager:
        set_manager(args)  # the push runs in the hub's Docker (docker over SSH): the writer is its loopback
        address, ca_path = hub_registry(), None
    else:
        need("docker")
        address, ca_path = image_registry(args)
        if not registry_answers(writer, None):
            registry_request(writer, None, "/v2/")  # exit 3 with the reason and a hint
    target, writer_name = pushed_name(image, address), pushed_name(image, writer)
    if run(docker("image", "inspect", "--format={{.Id}}", "--", image), check=False).returncode != 0:
        where = f"the hub's Docker ({manager})" if manager else "this machine's Docker"
        hint = (f"copy it there: docker save {image} | docker --host {DOCKER_HOST} load" if manager
                else "build or pull it first (docker images lists what is here)")
        raise usage_error(f"there is no image {image!r} in {where}", hint)
    run(docker("tag", "--", image, writer_name))
    info(f"pushing {image} to the hub's registry (through its writer {writer}, on the hub's loopback)")
    push = docker("push", "--", writer_name)
    code = run_streaming(push) if sys.stderr.isatty() else None  # Docker's progress on a terminal
    if code is None:
        result = run(push, check=False, timeout=3600)
        code = result.returncode
        if code:
            raise command_error(push, result)
    elif code:
        raise GridxError(f"docker push {writer_name} failed (exit {code})", "see Docker's message above")
    if ca_path:
        check_served(target, writer_name, address, ca_path)
    if writer_name != image:
        run(docker("image", "rm", "--", writer_name), check=False)  # only the name: the image stays
    print(target)
    info(f"run it: gridx jobs run {target} …   ·   list: gridx image ls")
    return EXIT_OK


def cmd_image_ls(args):
    """The registry's images with their size and digest."""
    image_manager(args)
    address, ca_path = image_registry(args)
    images, stored = registry_images(address, ca_path)
    if args.json:
        print_json({"registry": address, "images": images, "stored_bytes": stored})
        return EXIT_OK
    if not images:
        print(f"No images in the hub's registry {address}. Push one: gridx image push IMAGE")
        return EXIT_OK
    print_table(["IMAGE", "SIZE", "DIGEST"],
                [[i["name"], human_bytes(i["size_bytes"]), i["digest"][:19]] for i in images])
    info(f"{len(images)} image(s); their layers take {human_bytes(stored)} (layers shared count once); "
         f"on disk: du -sh {registry_storage()}")
    return EXIT_OK


def folder_bytes(path):
    """What the files under path take (the registry's storage)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def cmd_image_rm(args):
    """Delete an image's manifest through the registry's writer, then collect its unused layers."""
    image = valid_image(args.name, "image name")
    _, path, tag, digest = split_image(image)
    if not tag and not digest:
        raise usage_error(f"give the tag to remove: {image}:TAG", "gridx image ls lists the tags")
    if os.environ.get("GRIDX_MANAGER"):
        raise usage_error("gridx image rm runs on the hub (it deletes through the registry's writer, which "
                          "only the hub reaches, and collects its storage)",
                          f"ssh {os.environ['GRIDX_MANAGER']} gridx image rm {image}")
    require_root()
    need("docker-registry", "setpriv")
    config = load_hub_config()
    address, writer = registry_address(config.hub_ip), registry_writer()
    repository, reference = registry_reference(image, address)
    digest, _ = registry_manifest(writer, None, repository, reference, method="HEAD")
    if digest is None:
        raise usage_error(f"the hub's registry has no {address}/{repository}:{reference}",
                          "gridx image ls lists what it has")
    also = [tag for tag in registry_tags(writer, None, repository)
            if tag != reference and registry_manifest(writer, None, repository, tag, "HEAD")[0] == digest]
    import urllib.parse

    path = f"/v2/{urllib.parse.quote(repository)}/manifests/{digest}"
    status, _, body = registry_request(writer, None, path, method="DELETE")
    if status not in (200, 202):
        raise GridxError(f"the registry refused to delete {repository}@{digest} ({status}): {body[:200]}")
    info(f"removed {address}/{repository}:{reference} ({digest[:19]})"
         + (f", and the tags with the same image: {', '.join(also)}" if also else ""))
    storage = registry_storage()
    before = folder_bytes(storage)
    collect_registry_garbage(config)
    freed = max(0, before - folder_bytes(storage))
    print(f"removed {address}/{repository}:{reference}; garbage collection freed {human_bytes(freed)}")
    return EXIT_OK


# ---------------------------------------------------------------------------
# Commands: serve
# ---------------------------------------------------------------------------


def cmd_serve(args):
    """`command="gridx serve NAME"` in the gridx account's authorized_keys:
    parse SSH_ORIGINAL_COMMAND with gridx's own parser, allow jobs commands
    and cluster only, and run them for NAME."""
    global OWNER, SERVE_LIMITS
    name = valid_user_name(args.name)
    words = serve_words(os.environ.get("SSH_ORIGINAL_COMMAND"))
    parser, _ = build_parser(words)
    try:
        parsed = parser.parse_args(words)
    except SystemExit as exited:  # argparse printed its usage line and why
        return EXIT_USAGE if exited.code else EXIT_OK
    check_serve_args(parsed, words)
    SERVE_LIMITS = load_serve_limits(name)
    OWNER = name
    if getattr(parsed, "workdir", None) is not None:  # the folder comes on stdin (see send_upload)
        limit = capped_size(parsed.workdir_limit, "--workdir-limit", "workdir_mib", DEFAULT_WORKDIR_LIMIT)
        parsed.upload = read_upload(sys.stdin.buffer, limit)
    elif parsed.command_path == ("jobs", "train") and not parsed.script.startswith(("http://", "https://")):
        # a local script comes on stdin as the work folder does (never a file of the hub's)
        parsed.upload = read_upload(sys.stdin.buffer, CONFIG_MAX_BYTES, "the training script")
    if parsed.command_path != ("jobs", "connect"):  # connect's input is the data it relays
        watch_session_end(armed=getattr(parsed, "upload", None) is not None)
    return parsed.handler(parsed)


# ---------------------------------------------------------------------------
# Argument parser
# ---------------------------------------------------------------------------

EXIT_CODES_HELP = """exit status: 0 ok, 1 the operation failed, 2 bad usage or input,
  3 a precondition is missing (not root, tool not installed, Docker not running,
  hub not initialised, manager unreachable), 130 interrupted"""


def add_json(parser):
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def add_manager(parser):
    parser.add_argument("--manager", metavar="USER@HOST",
                        help="run against this swarm manager over SSH (default: $GRIDX_MANAGER, else local)")


def add_resources(parser, default_gpus="0"):
    parser.add_argument("--cpus", default=f"{DEFAULT_JOB_CPUS:g}", help="CPUs to reserve (default 1)")
    parser.add_argument("--memory", default=DEFAULT_JOB_MEMORY, help="memory to reserve, e.g. 512M, 8G (default 1G)")
    parser.add_argument("--gpus", default=default_gpus, help="GPUs to reserve (default 0)")


def add_share_flags(parser):
    parser.add_argument("--cpus", help="CPUs to share (asked when missing)")
    parser.add_argument("--memory", help="memory to share, e.g. 8G (asked when missing)")
    parser.add_argument("--gpus", help="GPUs to share (asked when missing)")
    parser.add_argument("--gpu-ids", help="which GPUs to share: GPU-…,GPU-…")
    parser.add_argument("--private-key", help="the worker's WireGuard private key file (bundles made with --pubkey)")
    parser.add_argument("--handshake-timeout", help="seconds to wait for the hub's handshake (default 30)")
    parser.add_argument("--share", help="idle (only while the owner is away) or always (asked when missing)")
    parser.add_argument("--hours", help="share only within these hours, HH:MM-HH:MM in local time")
    parser.add_argument("--yes", "-y", action="store_true", help="accept the defaults, ask nothing")
    parser.add_argument("--install-deps", action="store_true", help="install missing packages")
    parser.add_argument("--no-hub-ssh", action="store_true",
                        help="do not let the hub SSH in as root over the VPN (`gridx hub ssh` then says so)")
    parser.add_argument("--no-containment", action="store_true",
                        help="no user-namespace remapping or no-new-privileges in Docker: the hub could then "
                             "read and write every file here as root")


def add_work_flags(parser):
    parser.add_argument("--workdir", metavar="DIR",
                        help=f"send this folder with the job: it starts in {WORK_DIR} with the folder's files "
                             f"(less what {IGNORE_FILES[0]} or {IGNORE_FILES[1]} leaves out)")
    parser.add_argument("--workdir-limit", metavar="SIZE",
                        help=f"refuse a bigger folder (default {DEFAULT_WORKDIR_LIMIT}, or your limit on the hub)")
    parser.add_argument("--output", metavar="PATH",
                        help=f"collect this path of the job's container onto the hub when it ends "
                             f"(default {DEFAULT_OUTPUT} with --workdir); --wait copies it to ./JOB/")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help=f"the job's checkpoints (GRIDX_CHECKPOINT_DIR): copied to the hub every "
                             f"--checkpoint-every and when it is preempted, and put back when it runs again "
                             f"(default {DEFAULT_CHECKPOINT} with --workdir)")
    parser.add_argument("--checkpoint-every", metavar="TIME",
                        help=f"how often (default {DEFAULT_CHECKPOINT_EVERY_S // 60}m; 30s, 10m, 2h)")
    parser.add_argument("--output-limit", metavar="SIZE",
                        help=f"collect at most this much per replica (default {DEFAULT_OUTPUT_LIMIT}, "
                             "or your limit on the hub)")


def add_notify(parser):
    parser.add_argument("--notify", metavar="URL",
                        help="when the job ends, POST an event there (signed as Standard Webhooks; text+URL: "
                             "the line alone, for ntfy; Slack and Discord webhooks found by their URL); "
                             "none: not even to the defaults")


def add_limit_flags(parser, what):
    parser.add_argument("--max-cpus", metavar="N", help=f"CPUs {what} (none: no limit)")
    parser.add_argument("--max-memory", metavar="SIZE", help=f"memory {what}, e.g. 16G (none: no limit)")
    parser.add_argument("--max-gpus", metavar="N", help=f"GPUs {what} (none: no limit)")
    parser.add_argument("--max-jobs", metavar="N", help="unfinished jobs at once (none: no limit)")
    parser.add_argument("--max-workdir", metavar="SIZE", help="a --workdir folder sent to the hub (default 2G)")
    parser.add_argument("--max-output", metavar="SIZE", help="a task's --output collected onto the hub (default 2G)")
    parser.add_argument("--max-output-files", metavar="N", help="files of a task's --output (default 10000)")
    parser.add_argument("--max-kept", metavar="N", help="deleted jobs' results kept on the hub (default 20)")


def args_name(p):
    p.add_argument("name", help="the peer's name")


def args_yes(p):
    p.add_argument("--yes", "-y", action="store_true", help="confirm, ask nothing")


def args_json_manager(p):
    add_json(p)
    add_manager(p)


def args_job_id(p):
    p.add_argument("job_id")
    add_json(p)
    add_manager(p)


# -- one per command, in COMMANDS' order --------------------------------------


def args_hub_init(p):
    p.add_argument("--ip", required=True, help="the hub's public IP (workers dial it)")
    p.add_argument("--port", default=str(DEFAULT_PORT), help=f"WireGuard UDP port (default {DEFAULT_PORT})")
    p.add_argument("--subnet", default=DEFAULT_SUBNET, help=f"VPN subnet (default {DEFAULT_SUBNET})")
    p.add_argument("--interface", default=DEFAULT_INTERFACE, help=f"VPN interface (default {DEFAULT_INTERFACE})")


def args_hub_add_peer(p):
    p.add_argument("name", help="the worker's name (a DNS label)")
    p.add_argument("--ip", help="VPN address to give it (default: the next free one)")
    p.add_argument("--pubkey", help="the worker's WireGuard public key: its private key never exists on the hub")
    p.add_argument("--out", help="also copy the bundle into this folder")
    add_json(p)


def args_hub_join_info(p):
    p.add_argument("--name", required=True, help="the peer's name")
    add_json(p)


def args_hub_refresh_bundle(p):
    p.add_argument("name", help="the peer's name")
    p.add_argument("--out", help="also copy the bundle into this folder")


def args_hub_ssh(p):
    p.add_argument("name", help="the peer's name")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD… to run (exit status passed through)")


def args_hub_allow_jobs(p):
    p.add_argument("entries", nargs="*", metavar="ENTRY",
                   help="ADDRESS[/PREFIX][:tcp|udp[/PORT[-PORT]]] (IPv6 in brackets); none given: show the list")
    p.add_argument("--none", action="store_true", help="open nothing private (the default)")
    add_json(p)


def args_hub_watch(p):
    p.add_argument("--interval", default=str(WATCH_DEFAULT_INTERVAL_S),
                   help=f"seconds between checks (default {WATCH_DEFAULT_INTERVAL_S})")
    p.add_argument("--down-after", default="30", help="seconds a worker is down before its jobs move (default 30)")
    p.add_argument("--once", action="store_true", help="check once and exit")


def args_hub_add_user(p):
    p.add_argument("name", help="the user's name (a DNS label, not a peer's)")
    p.add_argument("--pubkey", metavar="SSH_KEY",
                   help="the user's SSH public key line: their private key never exists on the hub")
    p.add_argument("--wg-pubkey", metavar="KEY", help="the user's WireGuard public key (default: made here)")
    add_limit_flags(p, "their running and pending jobs reserve at most (default: the hub's defaults)")
    add_json(p)


def args_hub_set_user(p):
    p.add_argument("name", help="the user's name")
    add_limit_flags(p, "their running and pending jobs reserve at most (default: back to the hub's default)")
    p.add_argument("--notify", metavar="URL", help="where their jobs made from now on send events unless their "
                                                   "--notify says (none: the hub's default)")


def args_hub_set_defaults(p):
    add_limit_flags(p, "each user's jobs reserve at most, unless set for them")
    p.add_argument("--min-free", metavar="SIZE",
                   help="the hub keeps this much disk free: results are not collected below it (default 1G)")
    p.add_argument("--notify", metavar="URL",
                   help="where jobs made from now on send events unless their owner has a target (none: nowhere)")
    p.add_argument("--notify-allow", metavar="NET", nargs="+",
                   help="addresses or networks members' --notify may reach although private (none: nothing)")


def args_hub_remove_user(p):
    p.add_argument("name", help="the user's name")
    p.add_argument("--stop-jobs", action="store_true", help="also delete their jobs (default: they run on)")


def args_worker_join(p):
    p.add_argument("--wg-config", required=True, help="the WireGuard config from the hub admin")
    p.add_argument("--token", required=True, help="the swarm join token")
    p.add_argument("--ssh-key", help="the hub's SSH public key (default: from the config)")
    add_share_flags(p)


def args_jobs_run(p):
    p.add_argument("image")
    p.add_argument("command", nargs="*", help="one string runs under sh -c; after --, words run as given")
    add_resources(p)
    p.add_argument("--name", help="job ID (default job-XXXXXX)")
    p.add_argument("--env", action="append", metavar="K=V", help="environment variable (repeatable)")
    p.add_argument("--replicas", default="1", help="how many copies run to completion (default 1)")
    p.add_argument("--wait", action="store_true", help="stream the logs, exit with the job's status")
    add_work_flags(p)
    add_notify(p)
    add_json(p)
    add_manager(p)


def args_jobs_jupyter(p):
    add_resources(p)
    p.add_argument("--port", default="8888", help="port on the worker's VPN address (default 8888)")
    p.add_argument("--image", help=f"image with Jupyter (default {JUPYTER_IMAGE})")
    p.add_argument("--name", help="job ID (default jupyter-XXXXXX)")
    p.add_argument("--timeout", default="600", help="seconds to wait for it to answer (default 600)")
    p.add_argument("--forward", nargs="?", const="", metavar="[ADDR:]PORT",
                   help="then forward it here (default 127.0.0.1 and its port), print the local URL and relay "
                        "until Ctrl-C, as jobs forward does")
    add_notify(p)
    add_json(p)
    add_manager(p)


def args_jobs_train(p):
    p.add_argument("script", help="an http(s) URL or a local file (sent as a swarm config)")
    p.add_argument("--framework", required=True, choices=sorted(FRAMEWORK_IMAGES))
    p.add_argument("--image", help="image to run it in (default: the framework's)")
    add_resources(p)
    p.add_argument("--name", help="job ID (default train-XXXXXX)")
    p.add_argument("--env", action="append", metavar="K=V", help="environment variable (repeatable)")
    p.add_argument("--wait", action="store_true", help="stream the logs, exit with the job's status")
    add_work_flags(p)
    add_notify(p)
    add_manager(p)


def args_jobs_list(p):
    p.add_argument("--mine", action="store_true", help="only your jobs")
    p.add_argument("--user", metavar="NAME", help="only this user's jobs (root: the admin's)")
    add_json(p)
    add_manager(p)


def args_jobs_logs(p):
    p.add_argument("job_id")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--tail", help="only the last N lines")
    add_manager(p)


def args_jobs_delete(p):
    p.add_argument("job_ids", nargs="+", metavar="job_id")
    p.add_argument("--keep-results", action="store_true", help="keep the jobs' results on the hub")
    add_manager(p)


def args_jobs_results(p):
    p.add_argument("job_id")
    p.add_argument("dest", nargs="?", help="an empty or new folder (default ./JOB_ID)")
    p.add_argument("--tar", action="store_true", help="write them to stdout as a tar stream instead")
    p.add_argument("--json", action="store_true", help="say where they are and what they weigh; copy nothing")
    p.add_argument("--delete", action="store_true", help="remove them from the hub")
    add_manager(p)


def args_jobs_forward(p):
    p.add_argument("job_id")
    p.add_argument("local", nargs="?", metavar="[ADDR:]LOCAL_PORT",
                   help="where to listen (default 127.0.0.1 and the job's port)")
    add_json(p)
    add_manager(p)


def args_jobs_connect(p):
    p.add_argument("job_id")
    p.add_argument("--probe", action="store_true", help="say where the job's port is (JSON), connect nothing")


def args_usage(p):
    p.add_argument("--since", default=USAGE_DEFAULT_SINCE,
                   help=f"an age (7d, 12h, 30m) or a date (2026-12-01) (default {USAGE_DEFAULT_SINCE})")
    p.add_argument("--user", metavar="NAME", help="only this member's use (and what nodes gave them)")
    add_json(p)
    add_manager(p)


def args_image_push(p):
    p.add_argument("image", help="an image of the hub's Docker (docker images there), e.g. team/app:1")
    add_manager(p)


def args_image_ls(p):
    add_json(p)
    add_manager(p)


def args_image_rm(p):
    p.add_argument("name", help="IMAGE:TAG as gridx image ls shows it (with or without the registry's address)")


# -- the command table --------------------------------------------------------

# group -> (help, example, {command: (handler, help, example, add_arguments)})
COMMANDS = {
    "hub": ("the central server: VPN, swarm manager, peers, SSH", "sudo gridx hub init --ip 203.0.113.7", {
        "init": (cmd_hub_init, "set up the VPN, the swarm manager, SSH key and firewall",
                 "sudo gridx hub init --ip 203.0.113.7 --subnet 10.0.0.0/24", args_hub_init),
        "add-peer": (cmd_hub_add_peer, "add a worker and write its join bundle",
                     "sudo gridx hub add-peer laptop-anna --out .", args_hub_add_peer),
        "remove-peer": (cmd_hub_remove_peer, "remove a worker from the VPN and the swarm, rotate the join token",
                        "sudo gridx hub remove-peer laptop-anna", args_name),
        "list-peers": (cmd_hub_list_peers, "every peer: address, handshake, node, shares",
                       "sudo gridx hub list-peers --json", add_json),
        "status": (cmd_hub_status, "VPN and swarm health: exit 0 healthy, 1 degraded (for cron)",
                   "sudo gridx hub status || alert", add_json),
        "join-info": (cmd_hub_join_info, "print what a worker needs to join by hand",
                      "sudo gridx hub join-info --name laptop-anna > laptop-anna.conf", args_hub_join_info),
        "refresh-bundle": (cmd_hub_refresh_bundle, "rewrite a peer's bundle with the current join token",
                           "sudo gridx hub refresh-bundle laptop-anna --out .", args_hub_refresh_bundle),
        "ssh": (cmd_hub_ssh, "SSH into a worker over the VPN with the hub's key",
                "sudo gridx hub ssh laptop-anna -- nvidia-smi", args_hub_ssh),
        "ssh-pubkey": (cmd_hub_ssh_pubkey, "print the hub's SSH public key",
                       "gridx hub ssh-pubkey >> ~/.ssh/authorized_keys", None),
        "watch": (cmd_hub_watch, "keep jobs alive: run again the jobs of workers that went down",
                  "sudo gridx hub watch --interval 10 --down-after 30", args_hub_watch),
        "allow-jobs": (cmd_hub_allow_jobs, "what every job may reach on private networks (default: nothing)",
                       "sudo gridx hub allow-jobs 10.0.0.1:tcp/8080 192.168.1.20:tcp/2049", args_hub_allow_jobs),
        "add-user": (cmd_hub_add_user, "add a person who submits jobs (not a worker) and write their bundle",
                     "sudo gridx hub add-user alice --max-gpus 1", args_hub_add_user),
        "set-user": (cmd_hub_set_user, "change a user's limits (none: no limit; default: the hub's)",
                     "sudo gridx hub set-user alice --max-cpus 8 --max-memory 16G", args_hub_set_user),
        "set-defaults": (cmd_hub_set_defaults, "the limits of users who have none of their own",
                         "sudo gridx hub set-defaults --max-gpus 1 --max-jobs 4", args_hub_set_defaults),
        "remove-user": (cmd_hub_remove_user, "take a user's SSH key and VPN peer away at once",
                        "sudo gridx hub remove-user alice --stop-jobs", args_hub_remove_user),
        "list-users": (cmd_hub_list_users, "every user: address, handshake, limits, what they use now",
                       "sudo gridx hub list-users --json", add_json),
        "reset": (cmd_hub_reset, "remove the VPN, the swarm and every peer", "sudo gridx hub reset --yes", args_yes),
    }),
    "worker": ("a volunteer's machine: join, status, leave",
               "sudo gridx worker join --wg-config w1.conf --token SWMTKN-… --cpus 4 --memory 8G --yes", {
        "setup": (cmd_worker_setup, "interactive: paste the config, answer the questions",
                  "sudo gridx worker setup", add_share_flags),
        "join": (cmd_worker_join, "join with a config file and a token",
                 "sudo gridx worker join --wg-config w1.conf --token SWMTKN-… --cpus 4 --memory 8G --gpus 0 --yes",
                 args_worker_join),
        "status": (cmd_worker_status, "link, handshake, swarm, shares: exit 0 healthy",
                   "sudo gridx worker status --json", add_json),
        "leave": (cmd_worker_leave, "leave and restore everything join changed", "sudo gridx worker leave", args_yes),
    }),
    "jobs": ("submit and follow jobs on the pooled cluster", "gridx jobs run python:3.11 true --wait", {
        "run": (cmd_jobs_run, "run a batch job to completion",
                "gridx jobs run python:3.11 \"python -c 'print(2**100)'\" --cpus 2 --memory 4G --wait", args_jobs_run),
        "jupyter": (cmd_jobs_jupyter, "start a Jupyter server; prints its URL",
                    "gridx jobs jupyter --cpus 2 --memory 4G --port 8888", args_jobs_jupyter),
        "train": (cmd_jobs_train, "run a training script (URL or local file)",
                  "gridx jobs train train.py --framework pytorch --gpus 1 --wait", args_jobs_train),
        "list": (cmd_jobs_list, "every job and its owner, from the swarm", "gridx jobs list --mine --json",
                 args_jobs_list),
        "status": (cmd_jobs_status, "placement, state, exit code, why it waits",
                   "gridx jobs status job-3f9a1c", args_job_id),
        "logs": (cmd_jobs_logs, "a job's output", "gridx jobs logs job-3f9a1c -f", args_jobs_logs),
        "delete": (cmd_jobs_delete, "stop a job on every worker and remove it (and its results)",
                   "gridx jobs delete job-3f9a1c", args_jobs_delete),
        "results": (cmd_jobs_results, "copy a job's collected --output files here",
                    "gridx jobs results job-3f9a1c ./out", args_jobs_results),
        "forward": (cmd_jobs_forward, "relay a port here to a job's published port (Jupyter), through the hub",
                    "gridx jobs forward jupyter-3f9a1c 8888", args_jobs_forward),
        "connect": (cmd_jobs_connect, None, "gridx jobs connect jupyter-3f9a1c", args_jobs_connect),  # not in --help
        "usage": (cmd_jobs_usage, "CPU/GPU/memory-hours per member and per volunteer node",
                  "gridx jobs usage --since 30d --json", args_usage),
        "cluster": (cmd_cluster, "every node: shared, reserved, free; totals",
                    "gridx jobs cluster --json", args_json_manager),
    }),
}
COMMANDS["image"] = ("the hub's image registry (HUB_VPN_IP:5000): push, list, remove",
                     "sudo gridx image push team/app:1", {
    "push": (cmd_image_push, "push an image of the hub's Docker to its registry; prints the name jobs use",
             "sudo gridx image push team/app:1   (then: gridx jobs run 10.0.0.1:5000/team/app:1 …)",
             args_image_push),
    "ls": (cmd_image_ls, "the registry's images: name, size, digest",
           "sudo gridx image ls --json", args_image_ls),
    "rm": (cmd_image_rm, "remove an image from the registry and free its space (garbage collection)",
           "sudo gridx image rm 10.0.0.1:5000/team/app:1", args_image_rm),
})
CLUSTER_SHORTCUT = (cmd_cluster, "shortcut for `gridx jobs cluster`", "gridx cluster", args_json_manager)
USAGE_SHORTCUT = (cmd_jobs_usage, "shortcut for `gridx jobs usage`: who used, and which node gave, how much",
                  "gridx usage --since 7d --user alice", args_usage)


def _selected(argv):
    """The first two words of argv that are not options: group, command."""
    words = [word for word in argv if not word.startswith("-")]
    return (words + [None, None])[:2]


def add_serve_parser(groups, full):
    """`gridx serve NAME`: internal (authorized_keys runs it), not in --help."""
    parser = groups.add_parser("serve")  # no help=: argparse then lists it nowhere
    if full:
        parser.set_defaults(handler=cmd_serve, command_path=("serve",))
        parser.add_argument("name", help="the user the command runs for")
    return parser


def build_parser(argv=()):
    """The argument parser, built only as deep as argv needs.

    Building every subcommand's arguments costs more than Python's own
    start-up; `gridx --help` and `gridx hub init` need one branch each.
    """
    formatter = argparse.RawDescriptionHelpFormatter

    def command(subparsers, path, handler, help_text, example, add_arguments, full):
        name = path[-1]
        listed = {"help": help_text} if help_text else {}  # no help=: argparse lists it nowhere
        if not full:
            return subparsers.add_parser(name, **listed)
        parser = subparsers.add_parser(
            name, description=help_text, formatter_class=formatter,
            epilog=f"example:\n  {example}\n\n{EXIT_CODES_HELP}", **listed,
        )
        parser.set_defaults(handler=handler, command_path=path)
        if add_arguments:
            add_arguments(parser)
        return parser

    parser = argparse.ArgumentParser(
        prog="gridx",
        description="Grid-X: pool the idle CPUs and GPUs of a group's computers "
                    "(WireGuard VPN + Docker Swarm).",
        epilog="examples:\n"
               "  sudo gridx hub init --ip 203.0.113.7\n"
               "  sudo gridx hub add-peer laptop-anna\n"
               "  gridx jobs run python:3.11 \"python -c 'print(2**100)'\" --wait\n"
               "  gridx cluster\n\n" + EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"gridx {VERSION}")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each command before it runs")
    groups = parser.add_subparsers(dest="group", metavar="{hub,worker,jobs,image,cluster,usage}")
    wanted_group, wanted_command = _selected(argv)
    group_parsers = {}
    for group, (help_text, example, commands) in COMMANDS.items():
        full = group == wanted_group
        group_parser = command(groups, (group,), None, help_text, example, None, full)
        group_parsers[group] = group_parser
        if full:
            subcommands = group_parser.add_subparsers(dest="command", metavar="COMMAND")
            for name, (handler, sub_help, sub_example, add_arguments) in commands.items():
                command(subcommands, (group, name), handler, sub_help, sub_example, add_arguments,
                        name == wanted_command)
    command(groups, ("cluster",), *CLUSTER_SHORTCUT, wanted_group == "cluster")
    command(groups, ("usage",), *USAGE_SHORTCUT, wanted_group == "usage")
    add_serve_parser(groups, wanted_group == "serve")
    return parser, group_parsers


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def _interrupt_once(signum, frame):
    """Ctrl-C reaches a frozen gridx twice (from the terminal and forwarded by
    its bootloader): the second must not interrupt the clean-up of the first."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv=None):
    global VERBOSE
    if argv is None:
        argv = sys.argv[1:]
    INVOCATION[:] = argv  # what --manager gridx@HUB forwards (see Remote)
    parser, groups = build_parser(argv)
    args = parser.parse_args(argv)
    VERBOSE = args.verbose
    handler = getattr(args, "handler", None)
    if handler is None:
        (groups.get(args.group) or parser).print_help(sys.stderr)
        return EXIT_USAGE
    import signal

    signal.signal(signal.SIGINT, _interrupt_once)
    try:
        return handler(args)
    except GridxError as error:
        print(f"{_tag('error', '1;31')} {printable(error.message)}", file=sys.stderr)
        if error.hint:
            print(f"{_tag('hint', '1;36')} {printable(error.hint)}", file=sys.stderr)
        return error.code
    except ForwardedExit as done:  # the command ran on the hub (see Remote)
        return done.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
