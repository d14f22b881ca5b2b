"""The worker's bundle scripts (bundle_templates/*.sh), run for real with fake
system commands.

Each test builds a bundle in a temporary folder and a bin folder holding tiny
shell stubs for wg, wg-quick, ip, docker, iptables, systemctl, service, nproc
(and nvidia-smi / nvidia-container-runtime when a test wants GPUs) that log
their argv to $FAKE/log and keep their state under $FAKE, plus links to the
few real tools the scripts need. PATH is that folder alone, so the scripts run
as on a volunteer's machine without Python (python3 and jq are linked in only
by the tests that want them). Every path the scripts touch is pointed into
the temporary folder through the GRIDX_* overrides; the real /etc is never
read or written.
"""

import base64
import hashlib
import json
import os
import pty
import select
import shutil
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(ROOT, "bundle_templates")
SCRIPTS = ["join.sh", "leave.sh", "status.sh", "jobnet.sh", "lib.sh"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the scripts re-run themselves under sudo when not root")

# Real tools the scripts (and the stubs) use; nothing else is on PATH.
REAL_TOOLS = [
    "bash",
    "env",
    "cat",
    "cp",
    "mv",
    "rm",
    "rmdir",
    "mkdir",
    "mktemp",
    "chmod",
    "sleep",
    "date",
    "sha256sum",
    "tail",
    "touch",
    "ls",
    "stat",
    "uname",
    "grep",
    "basename",
]

PRIVATE_KEY = base64.b64encode(bytes(range(32))).decode()
HUB_PUBKEY = base64.b64encode(bytes(range(32, 64))).decode()
HUB_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFake gridx-hub"
TOKEN = "SWMTKN-1-fake0123456789abcdefghijklmnopqrstuvwxyz-secretpart"
KEY_LINE = 'from="10.0.0.1",no-agent-forwarding,no-X11-forwarding ' + HUB_KEY

STUBS = {
    "wg": r"""
echo "wg $*" >>"$FAKE/log"
if [[ $1 == show && $3 == latest-handshakes ]]; then
    [[ -f $FAKE/links/$2 ]] || { echo "Unable to access interface: No such device" >&2; exit 1; }
    h=0
    if [[ -f $FAKE/handshake ]]; then h=$(<"$FAKE/handshake"); fi
    [[ $h == now ]] && h=$(date +%s)
    printf 'HUBPUBKEY=\t%s\n' "$h"
elif [[ $1 == show && $3 == public-key ]]; then
    echo WORKERPUBKEY=
fi
""",
    "wg-quick": r"""
echo "wg-quick $*" >>"$FAKE/log"
while IFS= read -r l; do [[ $l == SigIgn:* ]] && echo "$l" >"$FAKE/wg-quick-$1.sigign"; done </proc/$$/status
[[ -f $FAKE/fail/wg-quick-$1 ]] && { echo "fake wg-quick $1 failure" >&2; exit 1; }
conf=$2 iface=${2##*/}
iface=${iface%.conf}
[[ -f $conf ]] || { echo "wg-quick: \`$conf' does not exist" >&2; exit 1; }
hook() {  # run the config's PreUp/PostUp/PostDown lines as wg-quick does (a failing one stops it)
    local line
    while IFS= read -r line; do
        if [[ $line == "$1 = "* ]]; then line=${line#"$1 = "}; bash -c "${line//%i/$iface}" || return 1; fi
    done <"$conf"
}
case $1 in
up) [[ -f $FAKE/links/$iface ]] && { echo "wg-quick: \`$iface' already exists" >&2; exit 1; }
    hook PreUp || exit 1
    : >"$FAKE/links/$iface"; hook PostUp || { rm -f "$FAKE/links/$iface"; exit 1; } ;;
down) [[ -f $FAKE/links/$iface ]] || { echo "wg-quick: \`$iface' is not a WireGuard interface" >&2; exit 1; }
    rm -f "$FAKE/links/$iface"; hook PostDown ;;
esac
""",
    "ip": r"""
echo "ip $*" >>"$FAKE/log"
iface=${@: -1}
case "$*" in
"link show dev "* | "-o link show dev "*)
    if [[ -f $FAKE/links/$iface ]]; then
        echo "5: $iface: <POINTOPOINT,NOARP,UP,LOWER_UP> mtu 1420 qdisc noqueue state UNKNOWN mode DEFAULT"
    else
        echo "Device \"$iface\" does not exist." >&2; exit 1
    fi ;;
"link delete dev "*) rm -f "$FAKE/links/$iface" ;;
"-4 route show" | "-6 route show")  # the lines of routes / routes6, with bash alone
    f=$FAKE/routes
    [[ $1 == -6 ]] && f=$FAKE/routes6
    if [[ -f $f ]]; then while IFS= read -r l || [[ -n $l ]]; do echo "$l"; done <"$f"; fi ;;
esac
""",
    "docker": r"""
echo "docker $*" >>"$FAKE/log"
# bash alone where it can (no cat, grep): a join calls this stub 7 times
state=inactive
[[ -f $FAKE/swarm_state ]] && read -r state <"$FAKE/swarm_state"
case $1 in
version) v=20.10.24+dfsg1; [[ -f $FAKE/docker_version ]] && read -r v <"$FAKE/docker_version"; echo "$v" ;;
info)
    [[ -f $FAKE/fail/docker-info ]] && { echo "Cannot connect to the Docker daemon" >&2; exit 1; }
    case "$*" in
    *LocalNodeState*) echo "$state" ;;
    *NodeAddr*) echo 10.0.0.2 ;;
    *LiveRestoreEnabled*) v=false; [[ -f $FAKE/live_restore ]] && read -r v <"$FAKE/live_restore"; echo "$v" ;;
    *SecurityOptions*)
        # as a restarted engine would: remapped when daemon.json says so
        opts="name=seccomp,profile=default "
        daemon=$GRIDX_DOCKER_DAEMON_JSON
        if [[ ! -f $FAKE/fail/remap && -f $daemon && $(<"$daemon") == *'"userns-remap"'* ]]; then
            opts+="name=userns "
        fi
        echo "$opts" ;;
    *) echo "Server Version: 20.10.fake" ;;
    esac ;;
swarm)
    case $2 in
    join)
        [[ -f $FAKE/fail/swarm-join ]] && { echo "Error response from daemon: invalid join token" >&2; exit 1; }
        echo active >"$FAKE/swarm_state"; echo "This node joined a swarm as a worker." ;;
    leave) echo inactive >"$FAKE/swarm_state"; echo "Node left the swarm." ;;
    esac ;;
esac
""",
    "iptables": r"""
# iptables and ip6tables (a link to this stub): rules as "CHAIN args" lines.
# bash alone, no grep, touch or mv: a join and a leave call it about 100 times
tool=${0##*/}
[[ $1 == -w ]] && shift 2  # the lock wait changes nothing here
echo "$tool $*" >>"$FAKE/log"
if [[ $tool == ip6tables && -f $FAKE/fail/ip6tables ]]; then
    echo "ip6tables: can't initialize ip6tables table 'filter'" >&2
    exit 3
fi
rules=$FAKE/${tool}_rules chains=$FAKE/${tool}_chains
: >>"$rules"
: >>"$chains"
op=$1 chain=$2
shift 2
[[ $op == -I && ${1:-} =~ ^[0-9]+$ ]] && shift
rule="$chain $*"
builtin() {
    [[ $1 == INPUT || $1 == FORWARD || $1 == OUTPUT ]] && return 0
    [[ $1 == DOCKER-USER && $tool == iptables ]]  # Docker's, where Docker manages iptables
}
has_line() { local l; while IFS= read -r l; do [[ $l == "$1" ]] && return 0; done <"$2"; return 1; }
exists() { builtin "$1" || has_line "$1" "$chains"; }
lines=()
while IFS= read -r l; do [[ -n $l ]] && lines+=("$l"); done <"$rules"
write_rules() { if (($#)); then printf '%s\n' "$@" >"$rules"; else : >"$rules"; fi; }
case $op in
-C)
    # Docker's own jump, there unless a test says Docker runs without iptables
    if [[ $rule == "FORWARD -j DOCKER-USER" && $tool == iptables ]]; then [[ ! -f $FAKE/fail/no-docker-jump ]]; exit; fi
    has_line "$rule" "$rules" ;;
-I | -A)
    exists "$chain" || { echo "$tool: No chain/target/match by that name." >&2; exit 1; }
    target=${rule##* -j }
    [[ $rule == *" -j "* ]] && ! exists "${target%% *}" && [[ ! ${target%% *} =~ ^(RETURN|DROP|ACCEPT|REJECT)$ ]] &&
        { echo "$tool: No chain/target/match by that name." >&2; exit 1; }
    if [[ $op == -I ]]; then write_rules "$rule" "${lines[@]}"; else echo "$rule" >>"$rules"; fi ;;
-N)
    if exists "$chain"; then echo "$tool: Chain already exists." >&2; exit 1; fi
    echo "$chain" >>"$chains" ;;
-F)
    exists "$chain" || { echo "$tool: No chain by that name." >&2; exit 1; }
    kept=()
    for l in "${lines[@]}"; do [[ $l == "$chain "* ]] || kept+=("$l"); done
    write_rules "${kept[@]}" ;;
-X)
    has_line "$chain" "$chains" || { echo "$tool: No chain by that name." >&2; exit 1; }
    for l in "${lines[@]}"; do [[ $l == "$chain "* ]] && { echo "$tool: Directory not empty." >&2; exit 1; }; done
    for l in "${lines[@]}"; do [[ $l == *" -j $chain" ]] && { echo "$tool: Too many links." >&2; exit 1; }; done
    kept=()
    while IFS= read -r l; do [[ -z $l || $l == "$chain" ]] || kept+=("$l"); done <"$chains"
    if ((${#kept[@]})); then printf '%s\n' "${kept[@]}" >"$chains"; else : >"$chains"; fi ;;
-S)
    exists "$chain" || { echo "$tool: No chain/target/match by that name." >&2; exit 1; }
    if builtin "$chain"; then echo "-P $chain ACCEPT"; else echo "-N $chain"; fi
    for l in "${lines[@]}"; do [[ $l == "$chain "* ]] && echo "-A $l"; done; true ;;
-D)
    has_line "$rule" "$rules" || { echo "$tool: Bad rule" >&2; exit 1; }
    gone=0 kept=()
    for l in "${lines[@]}"; do
        if [[ $gone == 0 && $l == "$rule" ]]; then gone=1; else kept+=("$l"); fi
    done
    write_rules "${kept[@]}" ;;
esac
""",
    "iptables-restore": r"""
# iptables-restore and ip6tables-restore --noflush: each declared chain is
# made or emptied, then the -A lines appended (all or nothing)
tool=${0##*/}
tool=${tool%-restore}
echo "$tool-restore $*" >>"$FAKE/log"
input=$(cat)
printf '%s\n' "$input" >"$FAKE/${tool}_restore_input"
[[ -f $FAKE/fail/$tool-restore ]] && { echo "$tool-restore: line 3 failed" >&2; exit 1; }
[[ " $* " == *" --noflush "* ]] || { echo "the stub knows only --noflush" >&2; exit 1; }
rules=$FAKE/${tool}_rules chains=$FAKE/${tool}_chains
touch "$rules" "$chains"
while IFS= read -r line; do
    case $line in
    :*) chain=${line#:}; chain=${chain%% *}
        grep -qxF -- "$chain" "$chains" || echo "$chain" >>"$chains"
        grep -v -- "^$chain " "$rules" >"$rules.new" || true
        mv "$rules.new" "$rules" ;;
    "-A "*) echo "${line#-A }" >>"$rules" ;;
    '*filter' | COMMIT | '') ;;
    *) echo "$tool-restore: unexpected line: $line" >&2; exit 1 ;;
    esac
done <<<"$input"
""",
    "systemctl": r"""
echo "systemctl $*" >>"$FAKE/log"
[[ $1 == is-enabled ]] && exit 1
[[ $1 == restart && -f $FAKE/fail/docker-restart ]] && exit 1
exit 0
""",
    "service": r"""
echo "service $*" >>"$FAKE/log"
[[ -f $FAKE/fail/docker-restart ]] && exit 1
exit 0
""",
    # what each sync was handed (no fsync: the scripts' atomic writes, checked
    # by test_state_is_written_new_synced_then_renamed, without waiting on the disk)
    "sync": r"""
printf '%s\n' "$*" >>"$FAKE/synced"
""",
    "nproc": r"""
n=4; [[ -f $FAKE/nproc ]] && read -r n <"$FAKE/nproc"; echo "$n"
""",
}

NVIDIA_SMI = r"""
echo "nvidia-smi $*" >>"$FAKE/log"
cat "$FAKE/gpus"
"""

# What join.sh merges into every daemon.json besides the resources.
CONTAINED = {"userns-remap": "default", "no-new-privileges": True, "userland-proxy": False}

MEMINFO = "MemTotal:        8040708 kB\nMemFree:         1000000 kB\n"  # 7852 MiB
MACHINE_MIB = 8040708 // 1024

NVIDIA_TOML = """#accept-nvidia-visible-devices-as-volume-mounts = false
disable-require = false
#swarm-resource = "DOCKER_RESOURCE_GPU"

[nvidia-container-cli]
#root = "/run/nvidia/driver"
ldconfig = "@/sbin/ldconfig.real"
"""


# The swarm ports' INPUT chain, as the worker config's PostUp installs it.
WORKER_CHAIN_RULES = [
    "GRIDX-WORKER -i gridx0 -j RETURN",
    "GRIDX-WORKER -i lo -j RETURN",
    "GRIDX-WORKER -p tcp --dport 2377 -j DROP",
    "GRIDX-WORKER -p tcp --dport 7946 -j DROP",
    "GRIDX-WORKER -p udp --dport 7946 -j DROP",
    "GRIDX-WORKER -p udp --dport 4789 -j DROP",
    "INPUT -j GRIDX-WORKER",
]


# The jobs' network (lib.sh): the chains, and their jumps as join.sh inserts
# them (each at the top: the rules file lists the last one first).
JOB_CHAINS = ("GRIDX-JOBS", "GRIDX-JOBS-HOST")
JOB_JUMPS4 = [
    "DOCKER-USER -i docker0 -j GRIDX-JOBS",
    "INPUT -i docker0 -j GRIDX-JOBS-HOST",
    "DOCKER-USER -i docker_gwbridge -j GRIDX-JOBS",
    "INPUT -i docker_gwbridge -j GRIDX-JOBS-HOST",
]
JOB_JUMPS6 = [
    "DOCKER-USER -i docker0 -j GRIDX-JOBS",
    "INPUT -i docker0 -j GRIDX-JOBS-HOST",
    "FORWARD -i docker0 -j GRIDX-JOBS",
    "DOCKER-USER -i docker_gwbridge -j GRIDX-JOBS",
    "INPUT -i docker_gwbridge -j GRIDX-JOBS-HOST",
    "FORWARD -i docker_gwbridge -j GRIDX-JOBS",
]
PRIVATE4 = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10"]
REJECT4 = "-j REJECT --reject-with icmp-admin-prohibited"
REJECT6 = "-j REJECT --reject-with icmp6-adm-prohibited"
REPLIES = "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"


def job_chains4(opens=("-d 192.168.1.1/32 -p udp --dport 53", "-d 192.168.1.1/32 -p tcp --dport 53"),
                closed=(*PRIVATE4, "10.0.0.0/24")):
    """GRIDX-JOBS then GRIDX-JOBS-HOST, rule by rule: replies, then what is
    open (by default the fake machine's name server, 192.168.1.1), then what
    is closed (by default the private ranges and the VPN subnet)."""
    rules = []
    for chain in JOB_CHAINS:
        rules.append(f"{chain} {REPLIES}")
        rules += [f"{chain} {o} -j RETURN" for o in opens]
        if chain == "GRIDX-JOBS":
            rules += [f"{chain} -d {net} {REJECT4}" for net in closed]
        else:
            rules.append(f"{chain} {REJECT4}")
    return rules


def job_chains6(opens=(), closed=("fc00::/7", "fe80::/10")):
    rules = []
    for chain in JOB_CHAINS:
        rules.append(f"{chain} {REPLIES}")
        rules += [f"{chain} {o} -j RETURN" for o in opens]
        if chain == "GRIDX-JOBS":
            rules += [f"{chain} -d {net} {REJECT6}" for net in closed]
        else:
            rules.append(f"{chain} {REJECT6}")
    return rules


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Lab:
    """One fake machine: bundle, bin folder, fake state, overridden paths."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.bundle = tmp / "gridx-worker1-bundle"
        self.bin = tmp / "bin"
        # what /usr/local/bin is to the scripts (GRIDX_LOCAL_BIN): off PATH
        self.local_bin = tmp / "usr-local-bin"
        self.fake = tmp / "fake"
        self.etc = tmp / "etc"
        self.home = tmp / "root"
        self.state = tmp / "var" / "lib" / "gridx"
        self.wg_dir = self.etc / "wireguard"
        self.wg_conf = self.wg_dir / "gridx0.conf"
        self.daemon_json = self.etc / "docker" / "daemon.json"
        self.nvidia_toml = self.etc / "nvidia-container-runtime" / "config.toml"
        self.auth_keys = self.home / ".ssh" / "authorized_keys"
        for d in (self.bundle, self.bin, self.local_bin, self.fake / "links", self.fake / "fail", self.etc, self.home):
            d.mkdir(parents=True)
        self.settings = {
            "GRIDX_NAME": "worker1",
            "GRIDX_INTERFACE": "gridx0",
            "GRIDX_VPN_IP": "10.0.0.2",
            "GRIDX_HUB_VPN_IP": "10.0.0.1",
            "GRIDX_HUB_ENDPOINT": "203.0.113.7:51820",
            "GRIDX_SUBNET": "10.0.0.0/24",
            "GRIDX_MANAGER": "10.0.0.1:2377",
            "GRIDX_NEEDS_PRIVATE_KEY": "0",
            "GRIDX_VERSION": "0.1.0",
        }
        self.write_bundle()
        for name, body in STUBS.items():
            self.stub(name, body)
        for family in ("ip6tables", "ip6tables-restore"):  # the same stubs, their own rules
            (self.bin / family).symlink_to(self.bin / family.replace("ip6", "ip"))
        for tool in REAL_TOOLS:
            self.link(tool)
        (self.fake / "handshake").write_text("now")
        (self.tmp / "meminfo").write_text(MEMINFO)
        # the volunteer's router answers DNS, as on most home networks
        (self.etc / "resolv.conf").write_text("# from DHCP\nnameserver 192.168.1.1\noptions edns0\n")

    # -- setup helpers
    def write_bundle(self, private_key=PRIVATE_KEY):
        for s in SCRIPTS:
            shutil.copy(os.path.join(TEMPLATES, s), self.bundle / s)
        lines = ["%s='%s'" % kv for kv in self.settings.items()]
        (self.bundle / "settings.env").write_text("\n".join(lines) + "\n")
        (self.bundle / "gridx0.conf").write_text(
            "# Managed by gridx (worker). Written by the hub for peer worker1.\n"
            "# gridx-name = worker1\n# gridx-manager = 10.0.0.1:2377\n"
            "[Interface]\nPrivateKey = %s\nAddress = %s/%s\nMTU = 1420\n\n[Peer]\n"
            "PublicKey = %s\nEndpoint = %s\nAllowedIPs = %s\n"
            "PersistentKeepalive = 25\n"
            % (private_key, self.settings["GRIDX_VPN_IP"], self.settings["GRIDX_SUBNET"].split("/")[1], HUB_PUBKEY,
               self.settings["GRIDX_HUB_ENDPOINT"], self.settings["GRIDX_SUBNET"])
        )
        (self.bundle / "swarm-token").write_text(TOKEN + "\n")
        (self.bundle / "hub_ssh.pub").write_text(HUB_KEY + "\n")

    def stub(self, name, body):
        path = self.bin / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(0o755)

    def link(self, tool, target=None):
        target = target or shutil.which(tool)
        assert target, tool
        dest = self.bin / tool
        if not dest.exists():
            dest.symlink_to(target)

    def with_python3(self):
        self.link("python3", sys.executable)

    def with_jq(self):
        if not shutil.which("jq"):
            pytest.skip("jq not installed")
        self.link("jq")

    def with_gpus(self, *uuids):
        (self.fake / "gpus").write_text("".join(u + "\n" for u in uuids))
        self.stub("nvidia-smi", NVIDIA_SMI)

    def fail(self, what):
        (self.fake / "fail" / what).touch()

    def unfail(self, what):
        (self.fake / "fail" / what).unlink()

    # -- running
    def env(self, **extra):
        env = {
            "PATH": str(self.bin),
            "GRIDX_LOCAL_BIN": str(self.local_bin),
            "HOME": str(self.home),
            "FAKE": str(self.fake),
            "GRIDX_WG_DIR": str(self.wg_dir),
            "GRIDX_DOCKER_DAEMON_JSON": str(self.daemon_json),
            "GRIDX_NVIDIA_CONFIG": str(self.nvidia_toml),
            "GRIDX_AUTHORIZED_KEYS": str(self.auth_keys),
            "GRIDX_STATE_DIR": str(self.state),
            "GRIDX_MEMINFO": str(self.tmp / "meminfo"),
            "GRIDX_RESOLV_CONF": str(self.etc / "resolv.conf"),
            "GRIDX_RESOLVED_CONF": str(self.tmp / "run" / "systemd" / "resolve" / "resolv.conf"),
            "GRIDX_SYSTEMD_RUN_DIR": str(self.tmp / "no-systemd"),
            "GRIDX_DOCKER_WAIT": "3",
        }
        env.update(extra)
        return env

    def run(self, script, *args, env=None):
        return subprocess.run(
            [str(self.bundle / script), *args],
            env=env or self.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def join(self, *args, ok=True):
        args = args or ("--cpus", "2", "--memory", "1G", "--yes")
        r = self.run("join.sh", *args)
        if ok:
            assert r.returncode == 0, r.stderr
        return r

    # -- looking
    def log(self):
        p = self.fake / "log"
        return p.read_text().splitlines() if p.exists() else []

    def iptables_rules(self):
        p = self.fake / "iptables_rules"
        return [x for x in p.read_text().splitlines() if x] if p.exists() else []

    def iptables_chains(self):
        p = self.fake / "iptables_chains"
        return [x for x in p.read_text().splitlines() if x] if p.exists() else []

    def rules(self, tool="iptables", only=(), but=()):
        """The rules (as "CHAIN args") that name one of only's chains (all when
        empty), and none of but's, in the order iptables keeps them."""
        p = self.fake / f"{tool}_rules"
        out = [x for x in p.read_text().splitlines() if x] if p.exists() else []
        def names(rule, chains):
            return any(rule.startswith(c + " ") or rule.endswith(" -j " + c) for c in chains)
        return [r for r in out if (not only or names(r, only)) and not names(r, but)]

    def chains(self, tool="iptables"):
        p = self.fake / f"{tool}_chains"
        return [x for x in p.read_text().splitlines() if x] if p.exists() else []

    def docker_user_rules(self):
        return [r for r in self.iptables_rules() if r.startswith("DOCKER-USER ")]

    def link_up(self):
        return (self.fake / "links" / "gridx0").exists()

    def swarm_state(self):
        p = self.fake / "swarm_state"
        return p.read_text().strip() if p.exists() else "inactive"

    def snapshot(self):
        """Every file under the fake /etc and home, with its bytes' hash and mode."""
        out = {}
        for base in (self.etc, self.home):
            for dirpath, _dirnames, filenames in os.walk(base):
                out[dirpath] = "dir %o" % stat.S_IMODE(os.stat(dirpath).st_mode)
                for f in filenames:
                    p = os.path.join(dirpath, f)
                    out[p] = "%s %o" % (sha(p), stat.S_IMODE(os.stat(p).st_mode))
        return out


@pytest.fixture
def lab(tmp_path):
    return Lab(tmp_path)


CHANGING = ("wg-quick", "docker swarm join", "docker swarm leave", "systemctl", "service", "iptables -I", "iptables -D",
            "iptables -N", "iptables -F", "iptables -X", "iptables-restore", "ip6tables -I", "ip6tables -D",
            "ip6tables -N", "ip6tables -F", "ip6tables -X", "ip6tables-restore")


def assert_nothing_changed(lab, before):
    assert lab.snapshot() == before
    assert not [c for c in lab.log() if c.startswith(CHANGING)]
    assert not lab.link_up()
    assert lab.swarm_state() == "inactive"
    assert lab.iptables_rules() == [] and lab.iptables_chains() == []
    assert lab.rules("ip6tables") == [] and lab.chains("ip6tables") == []


# ---------------------------------------------------------------- lint ----


@pytest.fixture(scope="module")
def shellchecks():
    """shellcheck of every script, all started at once (about a second of
    CPU each: two cores run them side by side)."""
    runs = {script: subprocess.Popen(["shellcheck", "-S", "style", "-x", script], cwd=TEMPLATES, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for script in SCRIPTS}
    return {script: (run.communicate(timeout=300)[0], run.returncode) for script, run in runs.items()}


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed")
@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script, shellchecks):
    out, code = shellchecks[script]
    assert code == 0, out


def test_scripts_are_strict_and_documented():
    for s in SCRIPTS:
        text = open(os.path.join(TEMPLATES, s)).read()
        assert text.split("\n")[2].startswith("# %s - " % s), s
        if s != "lib.sh":
            assert "set -euo pipefail" in text and "export LC_ALL=C" in text, s
            assert text.rstrip().endswith('main "$@"'), s
            assert os.access(os.path.join(TEMPLATES, s), os.X_OK), s


@pytest.mark.parametrize("script", ["join.sh", "leave.sh", "status.sh", "jobnet.sh"])
def test_help(lab, script):
    r = lab.run(script, "--help")
    assert r.returncode == 0
    assert "Usage:" in r.stdout and "Exit status" in r.stdout
    assert lab.log() == []


# ------------------------------------------------------ input validation ----


@pytest.mark.parametrize(
    "args, says",
    [
        (["--cpus", "0"], "--cpus 0"),
        (["--cpus", "8X"], "--cpus '8X'"),
        (["--cpus", "5"], "only 4 CPUs"),
        (["--cpus", "-1"], "--cpus '-1'"),
        (["--memory", "8X"], "--memory '8X'"),
        (["--memory", "8"], "needs a unit"),
        (["--memory", "0G"], "more than 0"),
        (["--memory", "9G"], "only %d MiB" % MACHINE_MIB),
        (["--gpus", "two"], "--gpus 'two'"),
        (["--gpus", "1"], "no GPU found"),
        (["--gpu-ids", "GPU-a,,GPU-b"], "--gpu-ids"),
        (["--handshake-timeout", "0"], "--handshake-timeout"),
        (["--frobnicate"], "unknown option '--frobnicate'"),
        (["--cpus"], "--cpus needs a value"),
    ],
)
def test_bad_input_exits_2_and_changes_nothing(lab, args, says):
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text('{"log-level": "warn"}\n')
    before = lab.snapshot()
    full = {"--cpus": "2", "--memory": "1G"}
    for i, a in enumerate(args):
        if a in full and i + 1 < len(args):
            full.pop(a)
    rest = [x for kv in full.items() for x in kv]
    r = lab.run("join.sh", *rest, *args, "--yes")
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], r.stderr
    assert_nothing_changed(lab, before)


@pytest.mark.parametrize(
    "args, flag",
    [
        ([], "--cpus"),
        (["--cpus", "2"], "--memory"),
        (["--cpus", "2", "--memory", "1G"], "--yes"),
    ],
)
def test_no_terminal_missing_answer_names_the_flag(lab, args, flag):
    before = lab.snapshot()
    r = lab.run("join.sh", *args)
    assert r.returncode == 2
    assert "no terminal" in r.stderr and "pass " + flag in r.stderr, r.stderr
    assert_nothing_changed(lab, before)


def test_no_terminal_gpus_asked_when_machine_has_gpus(lab):
    lab.with_gpus("GPU-1111", "GPU-2222")
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes")
    assert r.returncode == 2 and "pass --gpus" in r.stderr, r.stderr


def test_missing_prerequisites_listed_at_once_with_install_commands(lab):
    for tool in ("wg", "wg-quick", "docker", "iptables"):
        (lab.bin / tool).unlink()
    before = lab.snapshot()
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes")
    assert r.returncode == 3
    assert "missing: wg/wg-quick docker iptables" in r.stderr
    assert "apt-get install -y wireguard-tools docker.io iptables" in r.stderr
    assert "pacman -S --needed wireguard-tools docker iptables" in r.stderr
    assert "dnf install -y wireguard-tools moby-engine iptables" in r.stderr
    assert "--install-deps" in r.stderr
    assert "sshd is not installed" in r.stderr  # optional: a warning only
    assert lab.snapshot() == before


def test_install_deps_installs_what_is_missing(lab):
    stash = lab.tmp / "stash"
    stash.mkdir()
    for tool in ("wg", "wg-quick"):
        (lab.bin / tool).rename(stash / tool)
    lab.stub(
        "apt-get",
        'echo "apt-get $*" >>"$FAKE/log"\n'
        '[[ $1 == install ]] && mv %s/wg %s/wg-quick "$(dirname "$0")"/\nexit 0\n' % (stash, stash),
    )
    lab.link("dirname")
    r = lab.join("--cpus", "1", "--memory", "1G", "--install-deps", "--yes")
    assert "[#] apt-get update" in r.stderr
    assert "[#] env DEBIAN_FRONTEND=noninteractive apt-get install -y wireguard-tools" in r.stderr
    assert lab.link_up()


def test_docker_not_running_is_a_precondition(lab):
    lab.fail("docker-info")
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes")
    assert r.returncode == 3 and "Docker is installed but not running" in r.stderr


# ----------------------------------------------------------- refusals ----


def test_refuses_when_already_joined(lab):
    lab.join()
    r = lab.join(ok=False)
    assert r.returncode == 3 and "leave.sh" in r.stderr


def test_refuses_when_interface_exists(lab):
    (lab.fake / "links" / "gridx0").touch()
    r = lab.join(ok=False)
    assert r.returncode == 3 and "interface named gridx0 already exists" in r.stderr
    assert not lab.state.exists()


def test_refuses_when_docker_already_in_a_swarm(lab):
    (lab.fake / "swarm_state").write_text("active\n")
    r = lab.join(ok=False)
    assert r.returncode == 3 and "docker swarm leave" in r.stderr
    assert not lab.state.exists()


def test_refuses_other_wireguard_config_and_leaves_it_alone(lab):
    lab.wg_dir.mkdir(mode=0o700)
    lab.wg_conf.write_text("[Interface]\nPrivateKey = someone-elses\n")
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 3 and "already exists with other content" in r.stderr
    assert_nothing_changed(lab, before)


# ----------------------------------------------------------------- join ----


def test_join_with_flags(lab):
    (lab.wg_dir).mkdir(mode=0o700)
    other = lab.wg_dir / "wg0.conf"
    other.write_text("[Interface]\n# someone else's VPN\n")
    r = lab.join("--cpus", "2", "--memory", "1536M", "--yes")
    # WireGuard config: 0600, the bundle's with the firewall hooks; wg0 untouched
    conf = lab.wg_conf.read_text()
    assert stat.S_IMODE(lab.wg_conf.stat().st_mode) == 0o600
    assert "PrivateKey = " + PRIVATE_KEY in conf and "Endpoint = 203.0.113.7:51820" in conf
    assert "PostUp = iptables -N DOCKER-USER 2>/dev/null || true; iptables -I DOCKER-USER" in conf
    assert other.read_text() == "[Interface]\n# someone else's VPN\n"
    # daemon.json advertises what is shared
    assert json.loads(lab.daemon_json.read_text()) == {"node-generic-resources": ["gridx_cpu=2", "gridx_mem=1536"],
                                                       **CONTAINED}
    log = lab.log()
    assert "wg-quick up %s" % lab.wg_conf in log
    # a userspace wireguard-go must outlive the terminal: SIGHUP (bit 0) ignored
    assert int((lab.fake / "wg-quick-up.sigign").read_text().split()[1], 16) & 1
    assert "service docker restart" in log
    assert (
        "docker swarm join --token %s --advertise-addr 10.0.0.2 --listen-addr 10.0.0.2:2377 "
        "--data-path-addr 10.0.0.2 -- 10.0.0.1:2377" % TOKEN
    ) in log
    assert TOKEN not in r.stderr + r.stdout  # echoed as <hidden>
    assert "[#] docker swarm join --token <hidden>" in r.stderr
    # restart before join: the swarm must see the resources
    assert log.index("service docker restart") < [i for i, c in enumerate(log) if "swarm join" in c][0]
    # the hub's key, from its VPN address only; ~/.ssh 0700, file 0600
    assert lab.auth_keys.read_text() == KEY_LINE + "\n"
    assert stat.S_IMODE(lab.auth_keys.stat().st_mode) == 0o600
    assert stat.S_IMODE(lab.auth_keys.parent.stat().st_mode) == 0o700
    # published ports answer over the VPN only, and so do the swarm's ports
    assert lab.rules(but=JOB_CHAINS) == [
        "INPUT -j GRIDX-WORKER",
        "DOCKER-USER -m conntrack --ctstate DNAT --ctdir ORIGINAL ! -i gridx0 -m comment --comment gridx -j DROP",
    ] + WORKER_CHAIN_RULES[:-1]
    # jobs reach nothing private (test_job_network_* for the rules)
    assert lab.rules(only=JOB_CHAINS) == JOB_JUMPS4[::-1] + job_chains4()
    assert lab.iptables_chains() == ["GRIDX-JOBS", "GRIDX-JOBS-HOST", "GRIDX-WORKER"]
    # state, as shell values and as JSON
    assert stat.S_IMODE(lab.state.stat().st_mode) == 0o700
    env = (lab.state / "state.env").read_text()
    assert "SHARED_CPUS='2'" in env and "COMPLETE='1'" in env
    cfg = json.loads((lab.state / "worker_config.json").read_text())
    assert cfg["name"] == "worker1" and cfg["vpn_ip"] == "10.0.0.2" and cfg["manager"] == "10.0.0.1:2377"
    assert cfg["shared_cpus"] == 2 and cfg["shared_memory_mib"] == 1536 and cfg["shared_gpu_ids"] == []
    assert cfg["complete"] is True and cfg["swarm_joined"] is True
    assert cfg["daemon_json_backup"] == "absent"
    # the Done block says what is shared and what to run next
    assert "Done." in r.stdout and "status.sh" in r.stdout and "leave.sh" in r.stdout
    assert "1536 MiB" in r.stdout
    assert "no systemd here" in r.stderr


def test_join_under_systemd_uses_systemctl_and_enables_boot_unit(lab):
    (lab.tmp / "systemd").mkdir()
    env = lab.env(GRIDX_SYSTEMD_RUN_DIR=str(lab.tmp / "systemd"))
    r = lab.run("join.sh", "--cpus", "1", "--memory", "1G", "--yes", env=env)
    assert r.returncode == 0, r.stderr
    log = lab.log()
    assert "systemctl restart docker" in log and "systemctl enable wg-quick@gridx0" in log
    assert not [c for c in log if c.startswith("service")]
    r = lab.run("leave.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert "systemctl disable wg-quick@gridx0" in lab.log()


def test_join_waits_for_handshake_then_says_what_to_check(lab):
    (lab.fake / "handshake").unlink()
    # a VPN on loopback addresses: the nudge packet stays here
    lab.settings.update(GRIDX_HUB_VPN_IP="127.0.0.1", GRIDX_VPN_IP="127.0.0.2", GRIDX_SUBNET="127.0.0.0/24",
                        GRIDX_MANAGER="127.0.0.1:2377")
    lab.write_bundle()
    before = lab.snapshot()
    t = time.time()
    r = lab.join("--cpus", "1", "--memory", "1G", "--yes", "--handshake-timeout", "1", ok=False)
    assert r.returncode == 1
    assert time.time() - t < 15
    assert "no handshake with the hub within 1 s" in r.stderr
    assert "Endpoint = 203.0.113.7:51820" in r.stderr and "UDP port 51820" in r.stderr
    assert "firewall" in r.stderr
    assert "rolled back" in r.stderr
    assert "wg-quick down %s" % lab.wg_conf in lab.log()
    assert lab.snapshot() == before
    assert not lab.link_up() and lab.iptables_rules() == []


def test_prompts_on_a_terminal(lab):
    """Answers typed at the prompts; a wrong answer is asked again."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execve(str(lab.bundle / "join.sh"), [str(lab.bundle / "join.sh")], lab.env())
    out = b""
    answers = [
        (b"How many CPUs", b"0\n"),
        (b"share at least 1 CPU", b"3\n"),
        (b"How much memory", b"2G\n"),
        (b"Continue", b"\n"),
    ]
    deadline = time.time() + 30
    while time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        if answers and answers[0][0] in out:
            os.write(fd, answers.pop(0)[1])
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert not answers, text
    assert "[4]" in text  # the machine's CPUs offered as the default
    assert json.loads(lab.daemon_json.read_text())["node-generic-resources"] == ["gridx_cpu=3", "gridx_mem=2048"]


# ------------------------------------------------------- daemon.json merge ----

EXISTING = (
    b'{\n    "log-driver": "json-file",\n    "node-generic-resources": ["other=1", "gridx_cpu=9"],\n'
    b'    "runtimes": {"crun": {"path": "/usr/bin/crun"}}\n}'
)


@pytest.mark.parametrize("tool", ["python3", "jq"])
def test_merge_keeps_existing_keys_and_leave_restores_bytes(lab, tool):
    getattr(lab, "with_" + tool)()
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_bytes(EXISTING)
    lab.daemon_json.chmod(0o640)
    before = lab.snapshot()
    lab.join("--cpus", "3", "--memory", "2G", "--yes")
    merged = json.loads(lab.daemon_json.read_text())
    assert merged == {
        "log-driver": "json-file",
        "node-generic-resources": ["other=1", "gridx_cpu=3", "gridx_mem=2048"],
        "runtimes": {"crun": {"path": "/usr/bin/crun"}},
        **CONTAINED,
    }
    assert stat.S_IMODE(lab.daemon_json.stat().st_mode) == 0o640
    assert (lab.state / "backup" / "daemon.json").read_bytes() == EXISTING
    r = lab.run("leave.sh")
    assert r.returncode == 0, r.stderr
    assert lab.daemon_json.read_bytes() == EXISTING
    assert lab.snapshot() == before
    assert lab.log().count("service docker restart") == 2


@pytest.mark.parametrize("tool", ["python3", "jq"])
def test_merge_already_there_means_no_restart(lab, tool):
    getattr(lab, "with_" + tool)()
    lab.daemon_json.parent.mkdir()
    original = (b'{"node-generic-resources": ["gridx_cpu=2", "gridx_mem=1024"], "debug": false,'
                b' "userns-remap": "default", "no-new-privileges": true, "userland-proxy": false}')
    lab.daemon_json.write_bytes(original)
    r = lab.join()
    assert "Docker is not restarted" in r.stderr
    assert lab.daemon_json.read_bytes() == original
    assert not [c for c in lab.log() if "restart" in c]


@pytest.mark.parametrize("tool", ["python3", "jq"])
def test_merge_refuses_invalid_json_before_changing_anything(lab, tool):
    getattr(lab, "with_" + tool)()
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text('{"log-driver": ')
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 3 and "daemon.json" in r.stderr
    assert_nothing_changed(lab, before)


def test_no_python_no_jq_and_a_nonempty_file_stops_and_explains(lab):
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text('{"log-level": "warn"}\n')
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 3
    assert "neither python3 nor jq" in r.stderr
    assert '"node-generic-resources": ["gridx_cpu=2", "gridx_mem=1024"]' in r.stderr
    assert_nothing_changed(lab, before)


def test_no_python_no_jq_keys_added_by_hand_are_accepted(lab):
    lab.daemon_json.parent.mkdir()
    text = ('{"log-level": "warn",\n "node-generic-resources": ["gridx_cpu=2", "gridx_mem=1024"],\n'
            ' "userns-remap": "default", "no-new-privileges": true, "userland-proxy": false}\n')
    lab.daemon_json.write_text(text)
    lab.join()
    assert lab.daemon_json.read_text() == text
    assert not [c for c in lab.log() if "restart" in c]


def test_no_python_no_jq_empty_object_is_written(lab):
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text("{ }\n")
    lab.join()
    assert json.loads(lab.daemon_json.read_text()) == {"node-generic-resources": ["gridx_cpu=2", "gridx_mem=1024"],
                                                       **CONTAINED}
    assert lab.run("leave.sh").returncode == 0
    assert lab.daemon_json.read_text() == "{ }\n"


# --------------------------------------------------------------- rollback ----


def test_rollback_when_swarm_join_fails(lab):
    lab.with_python3()
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_bytes(EXISTING)
    lab.auth_keys.parent.mkdir(mode=0o700)
    lab.auth_keys.write_bytes(b"ssh-rsa AAAAB3Nza... alice@laptop\nssh-ed25519 AAAAC3... bob")  # no final newline
    lab.auth_keys.chmod(0o600)
    sums = (sha(lab.daemon_json), sha(lab.auth_keys))
    before = lab.snapshot()
    lab.fail("swarm-join")
    r = lab.join(ok=False)
    assert r.returncode == 1
    assert "could not join the swarm" in r.stderr and "rolled back" in r.stderr
    assert (sha(lab.daemon_json), sha(lab.auth_keys)) == sums
    assert not lab.wg_conf.exists() and not lab.state.exists()
    log = lab.log()
    assert "wg-quick down %s" % lab.wg_conf in log
    assert log.count("service docker restart") == 2  # the change, and its undo
    assert lab.snapshot() == before
    assert not lab.link_up() and lab.iptables_rules() == []


def test_rollback_when_docker_does_not_come_back(lab):
    """The files go back at once; the restart that would apply them stays
    pending in the record until leave.sh manages it."""
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text("{}")
    before = lab.snapshot()
    lab.fail("docker-restart")
    r = lab.join(ok=False)
    assert r.returncode == 1 and "leave.sh" in r.stderr
    assert lab.daemon_json.read_text() == "{}" and not lab.wg_conf.exists() and not lab.link_up()
    assert "DOCKER_RESTART_PENDING='1'" in (lab.state / "state.env").read_text()
    lab.unfail("docker-restart")
    r = lab.run("leave.sh")
    assert r.returncode == 0, r.stderr
    assert lab.log().count("service docker restart") == 3  # join's, the rollback's, leave's
    assert lab.snapshot() == before


def test_failed_rollback_is_finished_by_leave(lab):
    """A join whose rollback fails too keeps its record; leave.sh finishes it."""
    lab.auth_keys.parent.mkdir(mode=0o700)
    lab.auth_keys.write_text("ssh-rsa AAAA alice\n")
    before = lab.snapshot()
    lab.fail("swarm-join")
    lab.fail("wg-quick-down")
    r = lab.join(ok=False)
    assert r.returncode == 1 and "leave.sh" in r.stderr
    assert lab.link_up() and (lab.state / "state.env").exists()
    again = lab.join(ok=False)
    assert again.returncode == 3 and "stopped midway" in again.stderr
    lab.unfail("wg-quick-down")
    r = lab.run("leave.sh")
    assert r.returncode == 0, r.stderr
    assert "stopped midway" in r.stderr
    assert lab.snapshot() == before and not lab.link_up()


# ------------------------------------------------------------------ leave ----


def test_leave_restores_everything_byte_for_byte(lab):
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text("")  # present but empty: restored as such
    lab.auth_keys.parent.mkdir(mode=0o755)
    lab.auth_keys.write_bytes(b"# keys\nssh-rsa AAAA alice\n")
    lab.auth_keys.chmod(0o644)
    before = lab.snapshot()
    lab.join()
    assert lab.auth_keys.read_bytes() == b"# keys\nssh-rsa AAAA alice\n" + KEY_LINE.encode() + b"\n"
    r = lab.run("leave.sh")
    assert r.returncode == 0, r.stderr
    assert "Done." in r.stdout
    assert lab.snapshot() == before
    log = lab.log()
    assert "docker swarm leave --force" in log and "wg-quick down %s" % lab.wg_conf in log
    assert lab.swarm_state() == "inactive" and not lab.link_up() and lab.iptables_rules() == []


def test_leave_removes_what_join_created(lab):
    before = lab.snapshot()  # no ~/.ssh, no /etc/docker, no /etc/wireguard
    lab.join()
    assert lab.auth_keys.exists() and lab.daemon_json.exists() and lab.wg_conf.exists()
    assert lab.run("leave.sh").returncode == 0
    assert lab.snapshot() == before


def test_leave_keeps_lines_added_after_join(lab):
    lab.auth_keys.parent.mkdir(mode=0o700)
    lab.auth_keys.write_text("ssh-rsa AAAA alice\n")
    lab.join()
    with open(lab.auth_keys, "a") as f:
        f.write("ssh-ed25519 BBBB carol\n")
    assert lab.run("leave.sh").returncode == 0
    assert lab.auth_keys.read_text() == "ssh-rsa AAAA alice\nssh-ed25519 BBBB carol\n"


def test_leave_twice_and_without_join_exit_0(lab):
    r = lab.run("leave.sh")
    assert r.returncode == 0 and "not joined, nothing to do" in r.stderr
    lab.join()
    assert lab.run("leave.sh", "--yes").returncode == 0  # gridx worker leave --yes passes it on
    n = len(lab.log())
    r = lab.run("leave.sh")
    assert r.returncode == 0 and "not joined, nothing to do" in r.stderr
    assert len(lab.log()) == n


def test_leave_tolerates_steps_already_undone(lab):
    lab.join()
    # someone already took the link down and left the swarm by hand
    (lab.fake / "links" / "gridx0").unlink()
    (lab.fake / "swarm_state").write_text("inactive\n")
    r = lab.run("leave.sh")
    assert r.returncode == 0, r.stderr
    assert not lab.wg_conf.exists() and not lab.state.exists()
    assert lab.iptables_rules() == []  # removed even though PostDown never ran
    assert "docker swarm leave --force" not in lab.log()


def test_join_leave_join_again(lab):
    lab.join()
    assert lab.run("leave.sh").returncode == 0
    lab.join("--cpus", "4", "--memory", "2G", "--yes")
    assert json.loads(lab.daemon_json.read_text())["node-generic-resources"] == ["gridx_cpu=4", "gridx_mem=2048"]


# ---------------------------------------------------------------- status ----


def test_status_healthy_and_json(lab):
    lab.join()
    r = lab.run("status.sh")
    assert r.returncode == 0, r.stderr
    assert "healthy" in r.stdout and "active" in r.stdout and "2 CPUs" in r.stdout
    assert "\x1b[" not in r.stdout + r.stderr
    r = lab.run("status.sh", "--json")
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert doc["healthy"] is True and doc["joined"] is True and doc["link_up"] is True
    assert doc["swarm_state"] == "active" and doc["problems"] == []
    assert 0 <= doc["handshake_age_s"] < 5
    assert doc["shared"] == {"cpus": 2, "memory_mib": 1024, "gpu_ids": []}
    assert doc["vpn_ip"] == "10.0.0.2" and doc["manager"] == "10.0.0.1:2377"


def test_status_unhealthy_reasons(lab):
    lab.join()
    (lab.fake / "handshake").write_text(str(int(time.time()) - 300))
    (lab.fake / "swarm_state").write_text("pending\n")
    r = lab.run("status.sh", "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["healthy"] is False and doc["handshake_age_s"] >= 300 and doc["swarm_state"] == "pending"
    assert "more than 180 s" in r.stderr and "swarm state is pending" in r.stderr
    (lab.fake / "links" / "gridx0").unlink()
    r = lab.run("status.sh")
    assert r.returncode == 1 and "link gridx0 is down" in r.stderr


def test_status_not_joined(lab):
    r = lab.run("status.sh", "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["joined"] is False and doc["healthy"] is False


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


# ----------------------------------------------------------- private key ----


def test_bundle_made_with_pubkey_needs_private_key(lab):
    lab.settings["GRIDX_NEEDS_PRIVATE_KEY"] = "1"
    lab.write_bundle(private_key="GRIDX_PRIVATE_KEY_PLACEHOLDER")
    r = lab.join(ok=False)
    assert r.returncode == 2 and "pass --private-key FILE" in r.stderr
    keyfile = lab.tmp / "private.key"
    keyfile.write_text("not a key\n")
    r = lab.join("--cpus", "1", "--memory", "1G", "--private-key", str(keyfile), "--yes", ok=False)
    assert r.returncode == 2 and "does not hold a WireGuard private key" in r.stderr
    keyfile.write_text(PRIVATE_KEY + "\n")
    keyfile.chmod(0o600)
    lab.join("--cpus", "1", "--memory", "1G", "--private-key", str(keyfile), "--yes")
    conf = lab.wg_conf.read_text()
    assert "PrivateKey = " + PRIVATE_KEY in conf and "PLACEHOLDER" not in conf


def test_private_key_refused_for_a_bundle_that_has_one(lab):
    keyfile = lab.tmp / "private.key"
    keyfile.write_text(PRIVATE_KEY + "\n")
    r = lab.join("--cpus", "1", "--memory", "1G", "--private-key", str(keyfile), "--yes", ok=False)
    assert r.returncode == 2 and "already holds its WireGuard key" in r.stderr


# ------------------------------------------------------------- settings ----


def test_settings_are_read_as_data_never_run(lab):
    (lab.bundle / "settings.env").write_text("GRIDX_NAME=$(touch %s/pwned)\n" % lab.tmp)
    r = lab.join(ok=False)
    assert r.returncode == 2 and "is not a KEY='value' line" in r.stderr
    assert not (lab.tmp / "pwned").exists()


# ------------------------------------------------------------ containment ----


def test_containment_on_by_default_and_said_at_the_confirmation(lab):
    r = lab.join()
    d = json.loads(lab.daemon_json.read_text())
    assert d["userns-remap"] == "default" and d["no-new-privileges"] is True
    assert "Docker runs with user-namespace remapping and no-new-privileges" in r.stderr
    # what the volunteer grants, before anything changed
    grant = r.stderr[r.stderr.index("What you grant the hub (10.0.0.1):"):r.stderr.index("[#]")]
    assert "within what you share" in grant
    assert "root only inside its container" in grant and "cannot change your files" in grant
    assert "your images and containers are not visible" in grant and "./leave.sh" in grant
    assert "SSH in as root, from 10.0.0.1 only" in grant and "--no-hub-ssh" in grant
    state = (lab.state / "state.env").read_text()
    assert "CONTAINMENT='1'" in state and "HUB_SSH='1'" in state
    doc = json.loads(lab.run("status.sh", "--json").stdout)
    assert doc["contained"] is True and doc["healthy"] is True


def test_no_containment_warns_what_the_hub_can_do(lab):
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text("{}")
    before = lab.snapshot()
    r = lab.join("--cpus", "1", "--memory", "1G", "--no-containment", "--yes")
    assert "--no-containment" in r.stderr and "bind-mount / and read and write every file" in r.stderr
    d = json.loads(lab.daemon_json.read_text())
    assert "userns-remap" not in d and "no-new-privileges" not in d and d["userland-proxy"] is False
    assert "CONTAINMENT='0'" in (lab.state / "state.env").read_text()
    assert lab.run("leave.sh").returncode == 0
    assert lab.snapshot() == before


def test_engine_that_does_not_remap_after_the_restart_is_rolled_back(lab):
    before = lab.snapshot()
    lab.fail("remap")
    r = lab.join(ok=False)
    assert r.returncode == 1 and "without user-namespace remapping" in r.stderr and "rolled back" in r.stderr
    assert "docker swarm join" not in " ".join(lab.log())
    assert lab.snapshot() == before


@pytest.mark.parametrize("tool", ["python3", "jq"])
def test_a_userns_remap_of_the_volunteers_is_kept(lab, tool):
    getattr(lab, "with_" + tool)()
    lab.daemon_json.parent.mkdir()
    original = b'{"userns-remap": "alice:alice", "no-new-privileges": false}\n'
    lab.daemon_json.write_bytes(original)
    r = lab.join()
    d = json.loads(lab.daemon_json.read_text())
    assert d["userns-remap"] == "alice:alice" and d["no-new-privileges"] is True
    assert "(yours: alice:alice)" in r.stderr
    assert lab.run("leave.sh").returncode == 0
    assert lab.daemon_json.read_bytes() == original


@pytest.mark.parametrize("where", ["engine", "daemon.json"])
def test_live_restore_is_refused(lab, where):
    lab.daemon_json.parent.mkdir()
    if where == "engine":
        (lab.fake / "live_restore").write_text("true\n")
        lab.daemon_json.write_text("{}")
    else:
        lab.daemon_json.write_text('{"live-restore": true}\n')
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 3 and "live-restore on, which swarm mode refuses" in r.stderr, r.stderr
    assert_nothing_changed(lab, before)


@pytest.mark.parametrize("version, refused", [
    ("20.10.24+dfsg1", False), ("23.0.1", False), ("23.0.2", True), ("24.0.7", True), ("24.0.9", True),
    ("25.0.2", True), ("25.0.3", False), ("26.1.5+dfsg1", False), ("28.5.2+dfsg4", False), ("29.1.2", False),
])
def test_engine_versions_with_the_inverted_resource_check_are_refused(lab, version, refused):
    (lab.fake / "docker_version").write_text(version + "\n")
    before = lab.snapshot()
    r = lab.join(ok=not refused)
    if refused:
        assert r.returncode == 3 and "Docker %s cannot run Grid-X jobs" % version in r.stderr
        assert "23.0.2 to 25.0.2" in r.stderr and "moby/swarmkit#3162" in r.stderr
        assert "hint: upgrade Docker to 25.0.3 or newer" in r.stderr
        assert_nothing_changed(lab, before)
    else:
        assert ("Docker    %s:" % version) in r.stderr


def test_docker_without_its_iptables_jump_is_refused(lab):
    """join.sh's PostUp creates DOCKER-USER itself: only Docker's jump counts."""
    lab.fail("no-docker-jump")
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 3 and "no jump to DOCKER-USER" in r.stderr
    assert "iptables -C FORWARD -j DOCKER-USER" in lab.log()
    assert_nothing_changed(lab, before)


# ---------------------------------------------------------------- hub SSH ----


@pytest.mark.parametrize("tool", [None, "python3", "jq"])
def test_no_hub_ssh_adds_no_key_and_labels_the_engine(lab, tool):
    if tool:
        getattr(lab, "with_" + tool)()
        lab.daemon_json.parent.mkdir()
        lab.daemon_json.write_text('{"labels": ["site=home", "gridx.hub-ssh=yes"]}\n')
    lab.auth_keys.parent.mkdir(mode=0o700)
    lab.auth_keys.write_text("ssh-rsa AAAA alice\n")
    before = lab.snapshot()
    r = lab.join("--cpus", "1", "--memory", "1G", "--no-hub-ssh", "--yes")
    assert lab.auth_keys.read_text() == "ssh-rsa AAAA alice\n"
    labels = json.loads(lab.daemon_json.read_text())["labels"]
    # same label as gridx.py's LABEL_HUB_SSH
    assert labels == (["site=home"] if tool else []) + ["gridx.hub-ssh=no"]
    assert "The hub may not SSH in" in r.stderr and "SSH       trust" not in r.stderr
    assert "HUB_SSH='0'" in (lab.state / "state.env").read_text()
    assert lab.run("leave.sh").returncode == 0
    assert lab.snapshot() == before


def test_hub_ssh_label_of_an_earlier_join_is_dropped(lab):
    lab.with_python3()
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text('{"labels": ["gridx.hub-ssh=no"]}\n')
    lab.join()
    assert json.loads(lab.daemon_json.read_text())["labels"] == []


# ------------------------------------------------ the bundle is data ----

WG_ATTACKS = [
    ("PostUp = touch {pwned}", "'PostUp' is not a key Grid-X writes"),
    ("postup = touch {pwned}", "'postup' is not a key Grid-X writes"),
    ("PreUp = touch {pwned}", "'PreUp' is not a key"),
    ("PreDown = touch {pwned}", "'PreDown' is not a key"),
    ("PostDown = touch {pwned}", "'PostDown' is not a key"),
    ("DNS = 1.1.1.1", "'DNS' is not a key"),
    ("Table = off", "'Table' is not a key"),
    ("SaveConfig = true", "'SaveConfig' is not a key"),
    ("FwMark = 51820", "'FwMark' is not a key"),
    ("Address = 10.0.0.9/24", "Address must be this bundle's VPN address 10.0.0.2/24"),
    ("MTU = 1420; touch {pwned}", "MTU '1420; touch"),
]


@pytest.mark.parametrize("line, says", WG_ATTACKS)
def test_wg_config_with_keys_grid_x_does_not_write_is_exit_2_and_nothing_runs(lab, line, says):
    pwned = lab.tmp / "pwned"
    conf = lab.bundle / "gridx0.conf"
    text = conf.read_text()
    key = line.split("=")[0].strip().lower()
    if key in ("address", "mtu"):  # replaces the bundle's own line
        text = "\n".join(x for x in text.splitlines() if not x.lower().startswith(key)) + "\n"
    conf.write_text(text.replace("[Interface]\n", "[Interface]\n" + line.format(pwned=pwned) + "\n"))
    n = conf.read_text().splitlines().index(line.format(pwned=pwned)) + 1
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: gridx0.conf line %d: " % n) and says in errors[0], r.stderr
    assert not pwned.exists()
    assert lab.log() == []  # not even docker or ip was asked anything
    assert_nothing_changed(lab, before)


@pytest.mark.parametrize("old, new, says", [
    ("AllowedIPs = 10.0.0.0/24", "AllowedIPs = 0.0.0.0/0", "AllowedIPs '0.0.0.0/0' is not inside the VPN subnet"),
    ("AllowedIPs = 10.0.0.0/24", "AllowedIPs = 10.0.0.0/24, 192.168.1.0/24", "'192.168.1.0/24' is not inside"),
    ("AllowedIPs = 10.0.0.0/24", "AllowedIPs = 10.0.0.0/16", "'10.0.0.0/16' is not inside"),
    ("Endpoint = 203.0.113.7:51820", "Endpoint = 198.51.100.1:51820", "is not the hub's"),
    ("PublicKey = ", "PresharedKey = x\nPublicKey = ", "'PresharedKey' is not a key"),
    ("[Peer]", "[Peer]\nPublicKey = %s\n[Peer]" % HUB_PUBKEY, "[Peer] must follow the one [Interface]"),
    ("PersistentKeepalive = 25", "PersistentKeepalive = 25\npersistentkeepalive = 5",
     "'persistentkeepalive' is given twice"),
    ("[Peer]", "[Wat]", "unknown section [Wat]"),
    ("[Interface]", "Address = 10.0.0.2/24\n[Interface]", "comes before [Interface]"),
    ("PersistentKeepalive = 25", "PersistentKeepalive = -1", "PersistentKeepalive '-1'"),
])
def test_wg_config_values_are_checked(lab, old, new, says):
    conf = lab.bundle / "gridx0.conf"
    conf.write_text(conf.read_text().replace(old, new, 1))
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert_nothing_changed(lab, before)


def test_wg_config_comments_and_trailing_comments_are_accepted(lab):
    conf = lab.bundle / "gridx0.conf"
    conf.write_text(conf.read_text().replace("MTU = 1420", "MTU = 1420   # the tunnel's\n\n# a note"))
    lab.join()
    assert "# a note" in lab.wg_conf.read_text()


@pytest.mark.parametrize("key, value", [
    ("GRIDX_NAME", "-rf"), ("GRIDX_NAME", "Worker_1"), ("GRIDX_INTERFACE", "-gridx0"),
    ("GRIDX_INTERFACE", "gridx0-much-too-long"), ("GRIDX_VPN_IP", "-10.0.0.2"), ("GRIDX_VPN_IP", "10.0.0.256"),
    ("GRIDX_HUB_VPN_IP", "--help"), ("GRIDX_MANAGER", "--host=tcp://evil:2375"), ("GRIDX_MANAGER", "10.0.0.1"),
    ("GRIDX_MANAGER", "hub.example:2377"), ("GRIDX_HUB_ENDPOINT", "-oProxyCommand=x:1"),
    ("GRIDX_HUB_ENDPOINT", "203.0.113.7"), ("GRIDX_SUBNET", "-10.0.0.0/24"), ("GRIDX_SUBNET", "10.0.0.1/24"),
    ("GRIDX_NEEDS_PRIVATE_KEY", "-1"), ("GRIDX_VERSION", "--version"),
])
def test_settings_values_are_validated_before_anything(lab, key, value):
    lab.settings[key] = value
    lab.write_bundle()
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: settings.env: %s '%s' is not" % (key, value)), r.stderr
    assert lab.log() == []
    assert_nothing_changed(lab, before)


def test_vpn_address_outside_the_subnet_is_refused(lab):
    lab.settings["GRIDX_SUBNET"] = "10.0.1.0/24"
    lab.write_bundle()
    r = lab.join(ok=False)
    assert r.returncode == 2 and "GRIDX_VPN_IP 10.0.0.2 is not in GRIDX_SUBNET 10.0.1.0/24" in r.stderr


@pytest.mark.parametrize("token", ["--help", "SWMTKN-1-abc def-ghi", "not-a-token"])
def test_swarm_token_is_checked(lab, token):
    (lab.bundle / "swarm-token").write_text(token + "\n")
    r = lab.join(ok=False)
    assert r.returncode == 2 and "does not hold a swarm join token" in r.stderr
    assert lab.log() == []


def test_gpu_ids_beginning_with_a_dash_are_refused(lab):
    r = lab.join("--cpus", "1", "--memory", "1G", "--gpu-ids", "-x", "--yes", ok=False)
    assert r.returncode == 2 and "'-x' is not a GPU id" in r.stderr


# -------------------------------------------------------- the state ----


def test_state_is_in_a_root_only_folder(lab):
    lab.join()
    assert stat.S_IMODE(lab.state.stat().st_mode) == 0o700
    for f in ("state.env", "worker_config.json"):
        assert stat.S_IMODE((lab.state / f).stat().st_mode) == 0o600
    assert not (lab.home / ".gridx").exists()


def test_state_is_written_new_synced_then_renamed(lab):
    """Every write of the state (and of the WireGuard config and daemon.json)
    is a new file beside it, synced, then renamed over it: nothing is left
    beside the files, and each sync named the two temporary files of a save."""
    lab.join()
    synced = (lab.fake / "synced").read_text().splitlines()
    saves = [line.split() for line in synced if "/.state.env.gridx-" in line]
    assert len(saves) >= 8, synced  # a record before each step
    for paths in saves:
        names = sorted(os.path.basename(p) for p in paths)
        assert len(names) == 2 and names[0].startswith(".state.env.gridx-"), names
        assert names[1].startswith(".worker_config.json.gridx-"), names
    assert any(os.path.basename(line).startswith(".gridx0.conf.gridx-") for line in synced), synced
    assert any(os.path.basename(line).startswith(".daemon.json.gridx-") for line in synced), synced
    left = [p for d in (lab.state, lab.wg_dir, lab.daemon_json.parent) for p in os.listdir(d) if ".gridx-" in p]
    assert left == [], left


@pytest.mark.parametrize("script", ["leave.sh", "status.sh"])
@pytest.mark.parametrize("what", ["folder mode", "file owner", "backup owner", "link"])
def test_state_someone_else_could_write_is_refused(lab, script, what):
    lab.with_python3()
    lab.daemon_json.parent.mkdir()
    lab.daemon_json.write_text('{"debug": true}\n')
    lab.join()
    if what == "folder mode":
        lab.state.chmod(0o777)
        named = lab.state
    elif what == "file owner":
        os.chown(lab.state / "state.env", 65534, 65534)
        named = lab.state / "state.env"
    elif what == "backup owner":
        named = lab.state / "backup" / "daemon.json"
        os.chown(named, 65534, 0)
    else:
        real = lab.tmp / "elsewhere.env"
        shutil.move(lab.state / "state.env", real)
        (lab.state / "state.env").symlink_to(real)
        named = lab.state / "state.env"
    n = len(lab.log())
    r = lab.run(script)
    assert r.returncode == 3, r.stderr
    assert str(named) in r.stderr and ("someone other than root" in r.stderr or "symbolic link" in r.stderr)
    assert lab.link_up() and lab.swarm_state() == "active"  # nothing undone
    assert not [c for c in lab.log()[n:] if c.startswith(CHANGING)]


def test_leave_acts_only_on_the_paths_join_uses(lab):
    lab.join()
    victim = lab.tmp / "precious"
    victim.write_text("keep me\n")
    env = lab.state / "state.env"
    env.write_text(env.read_text().replace("WG_CONFIG='%s'" % lab.wg_conf, "WG_CONFIG='%s'" % victim))
    r = lab.run("leave.sh")
    assert r.returncode == 3 and "WG_CONFIG is '%s', not what join.sh records" % victim in r.stderr
    assert victim.read_text() == "keep me\n" and lab.link_up()


def test_leave_after_an_older_join_with_state_in_roots_home(lab):
    """A machine joined by the join.sh before 2026-12 (state in ~/.gridx)."""
    if os.path.exists("/var/lib/gridx/state.env"):
        pytest.skip("this machine is a Grid-X worker itself")
    old = {}
    for s in SCRIPTS:
        r = subprocess.run(["git", "-C", ROOT, "show", "2bb9f75:bundle_templates/" + s], capture_output=True)
        if r.returncode != 0:
            pytest.skip("the older scripts are not in this checkout's history")
        old[s] = r.stdout
    lab.auth_keys.parent.mkdir(mode=0o700)
    lab.auth_keys.write_text("ssh-rsa AAAA alice\n")
    before = lab.snapshot()
    for s, body in old.items():
        (lab.bundle / s).write_bytes(body)
    legacy = lab.home / ".gridx"
    r = lab.run("join.sh", "--cpus", "1", "--memory", "1G", "--yes", env=lab.env(GRIDX_STATE_DIR=str(legacy)))
    assert r.returncode == 0, r.stderr
    assert (legacy / "state.env").exists() and lab.link_up()
    lab.write_bundle()  # the new scripts, as a new bundle or gridx worker leave brings them
    env = lab.env(GRIDX_ROOT_HOME=str(lab.home))
    del env["GRIDX_STATE_DIR"]
    r = lab.run("join.sh", "--cpus", "1", "--memory", "1G", "--yes", env=env)
    assert r.returncode == 3 and "joined by an older join.sh" in r.stderr
    r = lab.run("status.sh", env=env)
    assert r.returncode == 0 and "older join.sh" in r.stderr, r.stderr
    r = lab.run("leave.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert "older join.sh" in r.stderr
    assert lab.snapshot() == before and not lab.link_up() and lab.swarm_state() == "inactive"
    assert lab.iptables_rules() == []


# ------------------------------------------------------------- firewall ----


def test_swarm_ports_chain_comes_with_the_link_and_goes_with_it(lab):
    lab.join()
    assert "GRIDX-WORKER" in lab.iptables_chains()
    conf = lab.wg_conf.read_text()
    assert "PostUp = iptables -N GRIDX-WORKER 2>/dev/null || iptables -F GRIDX-WORKER; " in conf
    assert "iptables -A GRIDX-WORKER -p udp --dport 4789 -j DROP" in conf
    assert "PostDown = iptables -D INPUT -j GRIDX-WORKER || true; iptables -F GRIDX-WORKER || true;" in conf
    assert "WORKER_CHAIN='GRIDX-WORKER'" in (lab.state / "state.env").read_text()
    assert lab.run("leave.sh").returncode == 0
    assert lab.iptables_rules() == [] and lab.iptables_chains() == []


def test_leave_removes_the_chain_when_the_link_went_without_postdown(lab):
    lab.join()
    (lab.fake / "links" / "gridx0").unlink()
    r = lab.run("leave.sh")
    assert r.returncode == 0, r.stderr
    assert "[#] iptables -D INPUT -j GRIDX-WORKER" in r.stderr and "[#] iptables -X GRIDX-WORKER" in r.stderr
    assert lab.iptables_rules() == [] and lab.iptables_chains() == []


def test_status_says_when_the_swarm_ports_chain_is_gone(lab):
    lab.join()
    rules = lab.fake / "iptables_rules"
    rules.write_text("".join(x + "\n" for x in lab.iptables_rules() if x != "INPUT -j GRIDX-WORKER"))
    r = lab.run("status.sh")
    assert r.returncode == 1 and "no jump to GRIDX-WORKER" in r.stderr


@pytest.mark.parametrize("route, refused", [
    ("10.0.0.0/16 dev wlan0 proto kernel scope link src 10.0.3.5", True),
    ("10.0.0.128/25 dev eth0 proto kernel scope link src 10.0.0.130", True),
    ("10.0.0.7 dev tun0 scope link", True),
    ("unreachable 10.0.0.0/24", True),
    ("192.168.1.0/24 dev eth0 proto kernel scope link src 192.168.1.20", False),
    ("10.0.1.0/24 via 192.168.1.1 dev eth0", False),
])
def test_vpn_subnet_overlapping_a_route_is_refused(lab, route, refused):
    (lab.fake / "routes").write_text("default via 192.168.1.1 dev eth0\n" + route + "\n")
    before = lab.snapshot()
    r = lab.join(ok=not refused)
    if refused:
        assert r.returncode == 3 and "overlaps this machine's route '%s'" % route in r.stderr, r.stderr
        assert "gridx hub init --subnet" in r.stderr
        assert_nothing_changed(lab, before)


def test_rotated_token_hint_names_refresh_bundle(lab):
    lab.fail("swarm-join")
    r = lab.join(ok=False)
    assert r.returncode == 1 and "gridx hub refresh-bundle worker1" in r.stderr


# ------------------------------------------------------ prerequisites ----


def test_dockerd_without_the_docker_command_asks_for_docker_cli(lab):
    (lab.bin / "docker").unlink()
    lab.stub("dockerd", "exit 0\n")
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes")
    assert r.returncode == 3
    assert "missing: docker (the command; dockerd is installed)" in r.stderr
    assert "apt-get install -y docker-cli" in r.stderr


@pytest.mark.parametrize("apt_knows, packages", [(True, "docker.io docker-cli"), (False, "docker.io")])
def test_no_docker_at_all_asks_for_docker_cli_where_apt_has_it(lab, apt_knows, packages):
    (lab.bin / "docker").unlink()
    lab.stub("apt-cache", 'echo "apt-cache $*" >>"$FAKE/log"\n[[ $3 == docker-cli ]] && exit %d\nexit 100\n'
             % (0 if apt_knows else 100))
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes")
    assert r.returncode == 3
    assert "Debian/Ubuntu: sudo apt-get install -y %s\n" % packages in r.stderr, r.stderr


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


# ------------------------------------------------ the hub registry's CA ----

FAKE_CA = ("-----BEGIN CERTIFICATE-----\n"
           + "".join(base64.b64encode(bytes(range(i, i + 48))).decode() + "\n" for i in range(0, 192, 48))
           + "-----END CERTIFICATE-----\n")


def with_registry(lab, ca=FAKE_CA):
    """A bundle of a hub with a registry: GRIDX_REGISTRY and registry-ca.crt
    (as gridx.py's registry_bundle_settings/registry_bundle_files write
    them); the CA goes under the fake /etc. Returns the env to run with."""
    lab.settings["GRIDX_REGISTRY"] = "10.0.0.1:5000"
    lab.write_bundle()
    if ca is not None:
        (lab.bundle / "registry-ca.crt").write_text(ca)
    lab.certs = lab.etc / "docker" / "certs.d"
    return lab.env(GRIDX_DOCKER_CERTS_DIR=str(lab.certs))


def test_join_installs_the_registry_ca_records_it_and_leave_removes_it(lab):
    env = with_registry(lab)
    before = lab.snapshot()
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes", env=env)
    assert r.returncode == 0, r.stderr
    ca = lab.certs / "10.0.0.1:5000" / "ca.crt"
    assert ca.read_text() == FAKE_CA and stat.S_IMODE(ca.stat().st_mode) == 0o644
    assert "registry  trust the hub's image registry 10.0.0.1:5000" in r.stderr
    state = (lab.state / "state.env").read_text()
    assert "REGISTRY='10.0.0.1:5000'" in state and "REGISTRY_CA_BACKUP='absent'" in state
    assert "REGISTRY_DIRS_CREATED='2'" in state
    assert json.loads((lab.state / "worker_config.json").read_text())["registry_dirs_created"] == 2
    assert not [c for c in lab.log() if c.startswith("service docker restart")][1:]  # no restart for the CA
    status = lab.run("status.sh", "--json", env=env)
    assert json.loads(status.stdout)["registry_ca"] is True, status.stderr
    r = lab.run("leave.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert not lab.certs.exists()
    assert lab.snapshot() == before


def test_a_ca_already_there_is_put_back_byte_for_byte(lab):
    env = with_registry(lab)
    folder = lab.certs / "10.0.0.1:5000"
    folder.mkdir(parents=True)
    (folder / "ca.crt").write_bytes(b"the volunteer's own CA\n")
    (folder / "client.cert").write_bytes(b"theirs too\n")
    before = lab.snapshot()
    assert lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes", env=env).returncode == 0
    assert (folder / "ca.crt").read_text() == FAKE_CA
    assert "REGISTRY_DIRS_CREATED='0'" in (lab.state / "state.env").read_text()
    r = lab.run("leave.sh", env=env)
    assert r.returncode == 0, r.stderr
    assert lab.snapshot() == before


def test_status_says_when_the_registry_ca_went_missing(lab):
    env = with_registry(lab)
    assert lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes", env=env).returncode == 0
    (lab.certs / "10.0.0.1:5000" / "ca.crt").unlink()
    r = lab.run("status.sh", env=env)
    assert r.returncode == 1
    assert "registry        10.0.0.1:5000 (CA missing)" in r.stdout
    assert "the hub registry's CA" in r.stderr and "is missing" in r.stderr
    assert lab.run("leave.sh", env=env).returncode == 0  # the file gone already: leave still finishes


@pytest.mark.parametrize("ca, says", [
    (None, "registry-ca.crt is missing"),
    ("hello\n", "line 1: not a PEM certificate"),
    (FAKE_CA.replace("CERTIFICATE", "PRIVATE KEY"), "line 1: not a PEM certificate"),
    (FAKE_CA + "PostUp = rm -rf /\n", "line 7: not a PEM certificate"),
    (FAKE_CA.replace("\n-----END CERTIFICATE-----\n", "\n"), "is not a PEM certificate"),
    (FAKE_CA.replace("AAEC", "A$(x)"), "line 2: not a PEM certificate"),
], ids=["missing", "text", "a-key", "a-line-after", "no-end", "a-command"])
def test_a_bundle_ca_that_is_not_a_pem_certificate_is_exit_2_and_nothing_changes(lab, ca, says):
    env = with_registry(lab, ca)
    before = lab.snapshot()
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes", env=env)
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], r.stderr
    assert lab.log() == []
    assert_nothing_changed(lab, before)


@pytest.mark.parametrize("value", ["-10.0.0.1:5000", "10.0.0.1", "hub.example:5000", "10.0.0.1:5000 x"])
def test_the_registry_setting_is_validated(lab, value):
    env = with_registry(lab)
    lab.settings["GRIDX_REGISTRY"] = value
    lab.write_bundle()
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes", env=env)
    assert r.returncode == 2 and "settings.env: GRIDX_REGISTRY" in r.stderr, r.stderr
    assert lab.log() == []


def test_the_registry_ca_is_trusted_only_for_the_hubs_address(lab):
    """A bundle whose GRIDX_REGISTRY is another machine's address would make
    Docker trust the hub's CA there (issue 19): exit 2, nothing changes."""
    env = with_registry(lab)
    lab.settings["GRIDX_REGISTRY"] = "10.0.0.7:5000"
    lab.write_bundle()
    (lab.bundle / "registry-ca.crt").write_text(FAKE_CA)
    before = lab.snapshot()
    r = lab.run("join.sh", "--cpus", "2", "--memory", "1G", "--yes", env=env)
    assert r.returncode == 2 and "not at the hub's VPN address 10.0.0.1" in r.stderr, r.stderr
    assert lab.log() == []
    assert_nothing_changed(lab, before)


# -------------------------------------------------------- jobs' network ----
# What a job may reach (lib.sh "jobs' network", jobnet.sh). The e2e test
# test_jobnet_lab.py tries it from real jobs; here: the allow-list grammar,
# the rules rendered, and join / leave / jobnet.sh / status.sh around them.


def lib_sh(lab, code, *args):
    """bash with the bundle's lib.sh sourced and its paths set (the fake
    machine's), running CODE with ARGS as $1..."""
    head = 'GRIDX_PROG=test GRIDX_BUNDLE_DIR="$0"; . "$GRIDX_BUNDLE_DIR/lib.sh"; init_paths; '
    return subprocess.run([str(lab.bin / "bash"), "-c", head + code, str(lab.bundle), *args], env=lab.env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def allow_parse(lab, value):
    """job_allow_parse VALUE: (True, IPv4 matches, IPv6 matches) or (False, why)."""
    r = lib_sh(lab, 'if job_allow_parse "$1"; then printf "4 %s\\n" "${JOB_ALLOW4[@]}"; '
                    'printf "6 %s\\n" "${JOB_ALLOW6[@]}"; else echo "bad $REPLY"; fi', value)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    if r.stdout.startswith("bad "):
        return False, r.stdout[4:].strip()
    lines = r.stdout.splitlines()
    return True, [x[2:] for x in lines if x.startswith("4 ") and x[2:]], [x[2:] for x in lines
                                                                            if x.startswith("6 ") and x[2:]]


@pytest.mark.parametrize("value, v4, v6", [
    ("", [], []),
    ("   \n ", [], []),
    ("172.29.243.30/32 10.0.0.1/32:tcp/5000", ["-d 172.29.243.30/32", "-d 10.0.0.1/32 -p tcp --dport 5000"], []),
    ("203.0.113.7", ["-d 203.0.113.7/32"], []),
    ("192.168.5.0/24:udp/5000-5010", ["-d 192.168.5.0/24 -p udp --dport 5000:5010"], []),
    ("10.0.0.1:tcp", ["-d 10.0.0.1/32 -p tcp"], []),
    ("10.0.0.0/8", ["-d 10.0.0.0/8"], []),
    ("[fd00::5]:tcp/443 [2001:DB8::/32]", [], ["-d fd00::5/128 -p tcp --dport 443", "-d 2001:DB8::/32"]),
    ("[fd00:1:2:3:4:5:6:7]:udp/53", [], ["-d fd00:1:2:3:4:5:6:7/128 -p udp --dport 53"]),
])
def test_allow_list_grammar_accepts(lab, value, v4, v6):
    assert allow_parse(lab, value) == (True, v4, v6)


@pytest.mark.parametrize("value, says", [
    ("10.0.0.1:5000", "name the protocol before the port"),
    ("10.0.0.1/24", "bits set beyond it"),
    ("10.0.0.1/33", "not a prefix"),
    ("10.0.0.010", "not an IPv4 address"),
    ("10.0.0.256:tcp/1", "not an IPv4 address"),
    ("0.0.0.0/0", "broader than /8"),
    ("10.0.0.0/7", "broader than /8"),
    ("10.0.0.1:icmp", "tcp or udp, not 'icmp'"),
    ("10.0.0.1:TCP/80", "not ADDRESS"),
    ("10.0.0.1:tcp/0", "not a port"),
    ("10.0.0.1:tcp/0080", "not a port"),
    ("10.0.0.1:tcp/65536", "not a port"),
    ("10.0.0.1:tcp/6000-5000", "goes down"),
    ("10.0.0.1:tcp/-5", "not ADDRESS"),
    ("fd00::5", "goes in brackets"),
    ("[fd00::5%eth0]", "not ADDRESS"),
    ("[fd00::1/64]", "bits set beyond it"),
    ("[fd00::/8]", "broader than /16"),
    ("[1::2::3]", "not an IPv6 address"),
    ("[::ffff:1.2.3.4]", "not ADDRESS"),
    ("-j ACCEPT", "'-j' is not ADDRESS"),
    ("10.0.0.1;reboot", "not ADDRESS"),
    ("$(reboot)", "not ADDRESS"),
    ("hub.example:tcp/80", "not ADDRESS"),
    (" ".join(["10.0.0.%d" % i for i in range(1, 66)]), "65 entries: at most 64"),
])
def test_allow_list_grammar_refuses_with_the_reason(lab, value, says):
    parsed = allow_parse(lab, value)
    assert parsed[0] is False and says in parsed[1], parsed


def rendered(lab, family, allow="", dns=(), onlink=(), subnet="10.0.0.0/24"):
    code = ('ST[VPN_SUBNET]=$1; job_allow_parse "$2"; read -r -a JOB_DNS%s <<<"$3"; read -r -a JOB_ONLINK%s <<<"$4"; '
            'job_rules %s; printf "%%s\\n" "${JOB_RULES[@]}"' % (family, family, family))
    r = lib_sh(lab, code, subnet, allow, " ".join(dns), " ".join(onlink))
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_rules_rendered_for_iptables_restore(lab):
    got = rendered(lab, 4, allow="172.29.243.30 10.0.0.1:tcp/5000", dns=["192.168.1.1"],
                   onlink=["130.237.5.0/24"], subnet="44.1.2.0/24")
    opens = ["-d 192.168.1.1/32 -p udp --dport 53", "-d 192.168.1.1/32 -p tcp --dport 53",
             "-d 172.29.243.30/32", "-d 10.0.0.1/32 -p tcp --dport 5000"]
    # a VPN subnet outside the private ranges, and a LAN of public addresses, closed too
    want = job_chains4(opens, (*PRIVATE4, "44.1.2.0/24", "130.237.5.0/24"))
    assert got == ["*filter", ":GRIDX-JOBS - [0:0]", ":GRIDX-JOBS-HOST - [0:0]"] + [
        "-A " + r for r in want] + ["COMMIT"]
    # replies first, in both chains: a port a job publishes on the VPN still answers
    assert got[3] == "-A GRIDX-JOBS " + REPLIES
    got6 = rendered(lab, 6, allow="[fd00::5]:tcp/443 10.0.0.1", dns=["fd00::53"], onlink=["2001:db8:5::/64"])
    want6 = job_chains6(["-d fd00::53/128 -p udp --dport 53", "-d fd00::53/128 -p tcp --dport 53",
                         "-d fd00::5/128 -p tcp --dport 443"], ("fc00::/7", "fe80::/10", "2001:db8:5::/64"))
    assert got6 == ["*filter", ":GRIDX-JOBS - [0:0]", ":GRIDX-JOBS-HOST - [0:0]"] + [
        "-A " + r for r in want6] + ["COMMIT"]


def test_the_networks_the_machine_is_on_are_read_from_its_routes(lab):
    (lab.fake / "routes").write_text(
        "default via 192.168.1.1 dev wlan0 proto dhcp metric 600\n"
        "130.237.5.0/24 dev eth0 proto kernel scope link src 130.237.5.20\n"
        "192.168.1.0/24 dev wlan0 proto kernel scope link src 192.168.1.20\n"   # private: closed already
        "172.17.0.0/16 dev docker0 proto kernel scope link src 172.17.0.1 linkdown\n"
        "10.0.0.0/24 dev gridx0 proto kernel scope link src 10.0.0.2\n"
        "198.51.100.0/24 via 192.168.1.1 dev wlan0\n"                          # routed elsewhere: the internet
        "0.0.0.0/1 dev tun0 scope link\n"                                       # a full-tunnel VPN: not a LAN
        "203.0.113.9 dev ppp0 scope link\n")
    (lab.fake / "routes6").write_text(
        "2001:db8:5::/64 dev eth0 proto ra metric 100 expires 86000sec pref medium\n"
        "fd12:3456::/64 dev eth0 proto ra metric 100\n"
        "fe80::/64 dev eth0 proto kernel metric 256 pref medium\n"
        "::1 dev lo proto kernel metric 256 pref medium\n"
        "default via fe80::1 dev eth0 proto ra metric 100\n"
        "2001:db8::/16 dev eth0\n")
    r = lib_sh(lab, 'job_onlink; echo "${JOB_ONLINK4[*]}"; echo "${JOB_ONLINK6[*]}"')
    assert r.stdout.splitlines() == ["130.237.5.0/24 203.0.113.9/32", "2001:db8:5::/64"], r.stdout + r.stderr


@pytest.mark.parametrize("resolv, resolved, daemon, v4, v6", [
    ("nameserver 192.168.1.1\n", None, None, ["192.168.1.1"], []),
    ("# DHCP\nnameserver 10.1.1.1\nnameserver 1.1.1.1\nsearch lan\n", None, None, ["10.1.1.1", "1.1.1.1"], []),
    ("nameserver 127.0.0.53\noptions edns0 trust-ad\n", "nameserver 192.168.178.1\nnameserver fd00::1\n", None,
     ["192.168.178.1"], ["fd00::1"]),
    ("nameserver 127.0.0.53\n", None, None, [], []),                       # no upstream file: Docker's defaults
    ("nameserver 127.0.0.1\nnameserver ::1\n", None, None, [], []),       # a local cache: the container's own
    ("nameserver fe80::1%wlan0\nnameserver 192.168.1.1\n", None, None, ["192.168.1.1"], ["fe80::1"]),
    ("nameserver 192.168.1.1\n", None, '{"dns": ["10.9.9.9", "2001:db8::53"], "log-level": "warn"}',
     ["10.9.9.9"], ["2001:db8::53"]),
    ("nameserver 192.168.1.1\n", None, '{"log-level": "warn"}', ["192.168.1.1"], []),
    (None, None, None, [], []),
])
def test_name_servers_are_the_ones_docker_gives_containers(lab, resolv, resolved, daemon, v4, v6):
    conf = lab.etc / "resolv.conf"
    if resolv is None:
        conf.unlink()
    else:
        conf.write_text(resolv)
    if resolved is not None:
        path = lab.tmp / "run" / "systemd" / "resolve" / "resolv.conf"
        path.parent.mkdir(parents=True)
        path.write_text(resolved)
    if daemon is not None:
        lab.daemon_json.parent.mkdir(parents=True)
        lab.daemon_json.write_text(daemon)
    r = lib_sh(lab, 'job_resolvers; echo "${JOB_DNS4[*]}"; echo "${JOB_DNS6[*]}"')
    assert r.stdout.split("\n")[:2] == [" ".join(v4), " ".join(v6)], r.stdout + r.stderr


def test_join_closes_private_networks_to_jobs_opens_the_allow_list_and_says_so(lab):
    lab.settings["GRIDX_JOB_ALLOW"] = "172.29.243.30/32:tcp/8080 [fd00::5]:tcp/443"
    lab.write_bundle()
    r = lab.join()
    allow4 = "-d 172.29.243.30/32 -p tcp --dport 8080"
    dns = ["-d 192.168.1.1/32 -p udp --dport 53", "-d 192.168.1.1/32 -p tcp --dport 53"]
    assert lab.rules(only=JOB_CHAINS) == JOB_JUMPS4[::-1] + job_chains4([*dns, allow4])
    assert lab.rules("ip6tables") == JOB_JUMPS6[::-1] + job_chains6(["-d fd00::5/128 -p tcp --dport 443"])
    assert lab.chains("ip6tables") == ["DOCKER-USER", "GRIDX-JOBS", "GRIDX-JOBS-HOST"]
    # before Docker's restart and the swarm join: no job runs here without them
    log = lab.log()
    first = log.index("iptables-restore -w 10 --noflush")
    assert first < log.index("wg-quick up %s" % lab.wg_conf) < log.index("service docker restart")
    # the grant text, before anything changed
    grant = r.stderr[r.stderr.index("What you grant"):r.stderr.index("[#]")]
    assert "Jobs reach the internet and nothing private: not your networks" in grant
    assert "not this\n    machine, not the VPN (the hub, other workers), except DNS to your name servers" in grant
    assert "Name servers: 192.168.1.1." in grant
    assert "The hub's admin opened, for every job: 172.29.243.30/32:tcp/8080 [fd00::5]:tcp/443" in grant
    # recorded, and a root-only copy of the scripts for the config's PreUp
    env = (lab.state / "state.env").read_text()
    assert "JOB_ALLOW='172.29.243.30/32:tcp/8080 [fd00::5]:tcp/443'" in env and "VPN_SUBNET='10.0.0.0/24'" in env
    copy = lab.state / "jobnet"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o700
    for name in ("jobnet.sh", "lib.sh"):
        assert (copy / name).read_bytes() == (lab.bundle / name).read_bytes()
        assert stat.S_IMODE((copy / name).stat().st_mode) == 0o700
    assert "PreUp = bash '%s/jobnet.sh' apply\n" % copy in lab.wg_conf.read_text()


def test_without_name_servers_or_allow_list_the_grant_says_nothing_of_them(lab):
    (lab.etc / "resolv.conf").write_text("nameserver 127.0.0.11\n")
    r = lab.join()
    grant = r.stderr[r.stderr.index("What you grant"):r.stderr.index("[#]")]
    assert "not the VPN (the hub, other workers)." in grant
    assert "Name servers" not in grant and "admin opened" not in grant
    assert lab.rules(only=["GRIDX-JOBS"]) == [
        "DOCKER-USER -i docker_gwbridge -j GRIDX-JOBS", "DOCKER-USER -i docker0 -j GRIDX-JOBS",
        f"GRIDX-JOBS {REPLIES}"] + [f"GRIDX-JOBS -d {net} {REJECT4}" for net in (*PRIVATE4, "10.0.0.0/24")]


@pytest.mark.parametrize("value, says", [
    ("10.0.0.1:5000", "name the protocol before the port"),
    ("0.0.0.0/0", "broader than /8"),
    ("-j ACCEPT", "'-j' is not ADDRESS"),
])
def test_a_bad_allow_list_is_exit_2_and_nothing_changes(lab, value, says):
    lab.settings["GRIDX_JOB_ALLOW"] = value
    lab.write_bundle()
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: settings.env: GRIDX_JOB_ALLOW: ") and says in errors[0]
    assert lab.log() == []
    assert_nothing_changed(lab, before)


def volunteers_own_rules(lab):
    """Rules and chains of the volunteer's (and Docker's, for ip6tables)."""
    (lab.fake / "iptables_chains").write_text("MINE\n")
    (lab.fake / "iptables_rules").write_text(
        "INPUT -i eth0 -p tcp --dport 22 -j ACCEPT\nDOCKER-USER -s 192.168.9.0/24 -j DROP\nMINE -j LOG\n"
        "FORWARD -j MINE\n")
    (lab.fake / "ip6tables_chains").write_text("DOCKER-USER\n")
    (lab.fake / "ip6tables_rules").write_text("DOCKER-USER -j RETURN\nFORWARD -j DOCKER-USER\n")
    return {tool: (lab.rules(tool), lab.chains(tool)) for tool in ("iptables", "ip6tables")}


def test_leave_removes_exactly_the_rules_join_added(lab):
    before = volunteers_own_rules(lab)
    lab.join()
    # Docker's ip6tables chain was there: used, not made
    assert lab.chains("ip6tables") == ["DOCKER-USER", "GRIDX-JOBS", "GRIDX-JOBS-HOST"]
    assert "JOB_DOCKER_USER6" not in (lab.state / "state.env").read_text()
    r = lab.run("leave.sh")
    assert r.returncode == 0, r.stderr
    assert {tool: (lab.rules(tool), lab.chains(tool)) for tool in ("iptables", "ip6tables")} == before
    assert not (lab.state / "jobnet").exists()


def test_leave_removes_the_ip6tables_chain_join_made(lab):
    lab.join()
    assert "JOB_DOCKER_USER6='1'" in (lab.state / "state.env").read_text()
    assert lab.run("leave.sh").returncode == 0
    assert lab.chains("ip6tables") == [] and lab.rules("ip6tables") == []


def test_a_vpn_going_down_keeps_the_rules_and_preup_puts_them_back_after_a_reboot(lab):
    lab.join()
    rules = {tool: lab.rules(tool, only=JOB_CHAINS) for tool in ("iptables", "ip6tables")}
    env = lab.env()
    down = subprocess.run([str(lab.bin / "wg-quick"), "down", str(lab.wg_conf)], env=env, capture_output=True,
                          text=True)
    assert down.returncode == 0, down.stderr
    assert {tool: lab.rules(tool, only=JOB_CHAINS) for tool in ("iptables", "ip6tables")} == rules
    assert "GRIDX-WORKER" not in lab.iptables_chains()  # PostDown did run
    for f in ("iptables_rules", "iptables_chains", "ip6tables_rules", "ip6tables_chains"):
        (lab.fake / f).unlink()  # a reboot: no rules at all
    up = subprocess.run([str(lab.bin / "wg-quick"), "up", str(lab.wg_conf)], env=env, capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    assert {tool: lab.rules(tool, only=JOB_CHAINS) for tool in ("iptables", "ip6tables")} == rules
    log = lab.log()
    assert log.index("iptables-restore -w 10 --noflush", log.index("wg-quick up %s" % lab.wg_conf)) < len(log)
    assert lab.run("status.sh").returncode == 0


def test_preup_that_cannot_put_the_rules_back_keeps_the_vpn_down(lab):
    lab.join()
    env = lab.env()
    subprocess.run([str(lab.bin / "wg-quick"), "down", str(lab.wg_conf)], env=env, check=True, capture_output=True)
    lab.fail("iptables-restore")
    up = subprocess.run([str(lab.bin / "wg-quick"), "up", str(lab.wg_conf)], env=env, capture_output=True, text=True)
    assert up.returncode != 0 and "could not be put in place" in up.stderr, up.stderr
    assert not lab.link_up()


def test_jobnet_allow_replaces_the_list_in_one_restore_per_family(lab):
    lab.join()
    before_log = len(lab.log())
    r = lab.run("jobnet.sh", "allow", "203.0.113.7 10.0.0.1:tcp/8099")
    assert r.returncode == 0, r.stderr
    log = lab.log()[before_log:]
    assert [c for c in log if "-restore" in c] == ["iptables-restore -w 10 --noflush",
                                                    "ip6tables-restore -w 10 --noflush"]
    assert not [c for c in log if c.startswith(("iptables -I", "iptables -D", "ip6tables -I"))]  # jumps in place
    dns = ["-d 192.168.1.1/32 -p udp --dport 53", "-d 192.168.1.1/32 -p tcp --dport 53"]
    assert lab.rules(only=JOB_CHAINS) == JOB_JUMPS4[::-1] + job_chains4(
        [*dns, "-d 203.0.113.7/32", "-d 10.0.0.1/32 -p tcp --dport 8099"])
    assert "JOB_ALLOW='203.0.113.7 10.0.0.1:tcp/8099'" in (lab.state / "state.env").read_text()
    # the hub's way: the copy join.sh keeps, from anywhere
    r = subprocess.run([str(lab.bin / "bash"), str(lab.state / "jobnet" / "jobnet.sh"), "allow", ""], env=lab.env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert lab.rules(only=JOB_CHAINS) == JOB_JUMPS4[::-1] + job_chains4()
    assert "JOB_ALLOW=''" in (lab.state / "state.env").read_text()


def test_jobnet_allow_without_a_list_takes_the_bundles(lab):
    lab.join()
    lab.settings["GRIDX_JOB_ALLOW"] = "198.51.100.4:udp/9000-9009"
    lab.write_bundle()
    r = lab.run("jobnet.sh", "allow")
    assert r.returncode == 0, r.stderr
    assert "GRIDX-JOBS -d 198.51.100.4/32 -p udp --dport 9000:9009 -j RETURN" in lab.rules()


@pytest.mark.parametrize("args, code, says", [
    (["allow", "10.0.0.1:5000"], 2, "allow-list: '10.0.0.1:5000': name the protocol"),
    (["allow", "a", "b"], 2, "allow takes one argument"),
    (["apply", "x"], 2, "apply takes no argument"),
    (["open"], 2, "unknown action 'open'"),
    ([], 2, "say what to do"),
])
def test_jobnet_bad_usage_is_exit_2_and_changes_nothing(lab, args, code, says):
    lab.join()
    rules, state, n = lab.rules(), (lab.state / "state.env").read_text(), len(lab.log())
    r = lab.run("jobnet.sh", *args)
    assert r.returncode == code and says in r.stderr, r.stderr
    assert lab.rules() == rules and (lab.state / "state.env").read_text() == state and len(lab.log()) == n


def test_jobnet_on_a_machine_not_joined_or_joined_by_an_older_join(lab):
    r = lab.run("jobnet.sh", "apply")
    assert r.returncode == 3 and "has not joined" in r.stderr
    lab.join()
    env = lab.state / "state.env"
    env.write_text("".join(x + "\n" for x in env.read_text().splitlines() if not x.startswith("JOB_NET_DIR=")))
    r = lab.run("jobnet.sh", "apply")
    assert r.returncode == 3 and "kept no jobs' network" in r.stderr and "leave and join again" in r.stderr


def test_a_tampered_allow_list_in_the_state_is_refused(lab):
    lab.join()
    env = lab.state / "state.env"
    env.write_text(env.read_text().replace("JOB_ALLOW=''", "JOB_ALLOW='-j ACCEPT'"))
    n = len(lab.log())
    r = lab.run("jobnet.sh", "apply")
    assert r.returncode == 3 and "JOB_ALLOW" in r.stderr, r.stderr
    assert not [c for c in lab.log()[n:] if c.startswith(CHANGING)]


def test_a_copy_of_the_scripts_others_could_write_is_refused(lab):
    lab.join()
    (lab.state / "jobnet" / "lib.sh").chmod(0o722)
    r = lab.run("jobnet.sh", "apply")
    assert r.returncode == 3 and "can be written by someone other than root" in r.stderr, r.stderr


def test_without_ip6tables_the_ipv4_rules_still_hold(lab):
    lab.fail("ip6tables")
    lab.join()
    assert lab.rules(only=JOB_CHAINS) == JOB_JUMPS4[::-1] + job_chains4()
    assert lab.rules("ip6tables") == []
    assert lab.run("leave.sh").returncode == 0
    assert lab.rules() == [] and lab.chains() == []


def test_rules_that_cannot_be_put_in_place_roll_the_join_back(lab):
    lab.fail("iptables-restore")
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 1 and "jobs' network rules could not be put in place" in r.stderr, r.stderr
    assert "rolled back" in r.stderr
    assert lab.snapshot() == before and not lab.link_up() and lab.swarm_state() == "inactive"
    assert lab.rules() == [] and lab.chains() == [] and lab.rules("ip6tables") == []
    assert not lab.state.exists()


def test_a_custom_default_bridge_is_refused(lab):
    lab.with_python3()
    lab.daemon_json.parent.mkdir(parents=True)
    lab.daemon_json.write_text('{"bridge": "br-lan"}\n')
    before = lab.snapshot()
    r = lab.join(ok=False)
    assert r.returncode == 3 and '"bridge": "br-lan"' in r.stderr, r.stderr
    assert_nothing_changed(lab, before)


def test_status_says_when_the_jobs_rules_are_gone(lab):
    lab.join()
    assert lab.run("status.sh").returncode == 0
    (lab.fake / "iptables_rules").write_text("".join(
        x + "\n" for x in lab.iptables_rules() if x != "DOCKER-USER -i docker0 -j GRIDX-JOBS"))
    r = lab.run("status.sh", "--json")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert doc["jobs_network"] is False
    assert any("jobs could reach this machine's networks" in p and "jobnet.sh apply" in p for p in doc["problems"])
    assert lab.run("jobnet.sh", "apply").returncode == 0
    assert json.loads(lab.run("status.sh", "--json").stdout)["jobs_network"] is True


def test_jobnet_show_says_what_is_open(lab):
    lab.settings["GRIDX_JOB_ALLOW"] = "203.0.113.7"
    lab.write_bundle()
    lab.join()
    n = len(lab.log())
    r = lab.run("jobnet.sh", "show")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["allow-list   203.0.113.7", "name servers 192.168.1.1"], r.stdout
    assert "-A GRIDX-JOBS -d 203.0.113.7/32 -j RETURN" in lines
    assert f"-A GRIDX-JOBS-HOST {REJECT4}" in lines and f"-A GRIDX-JOBS-HOST {REJECT6}" in lines
    assert not [c for c in lab.log()[n:] if c.startswith(CHANGING)]
