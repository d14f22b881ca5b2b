"""The fake machine the worker's bundle scripts (bundle_templates/*.sh) run
on for real, shared by test_bundle_join, test_bundle_gpus,
test_bundle_safety and test_agent (the `lab` fixture is in conftest.py).

A Lab builds a bundle in a temporary folder and a bin folder holding tiny
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
import functools
import hashlib
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
    [[ $h == now ]] && printf -v h '%(%s)T' -1
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
hook() {  # the config's PreUp/PostUp/PostDown lines as wg-quick runs them, (eval "$hook") (a failing one stops it)
    local line
    while IFS= read -r line; do
        if [[ $line == "$1 = "* ]]; then line=${line#"$1 = "}; (eval "${line//%i/$iface}") || return 1; fi
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
    "iptables": r"""#!/bin/sh
# iptables and ip6tables (a link to this stub): rules as "CHAIN args" lines.
# POSIX sh and its builtins alone (no grep, touch or mv; sh starts in about
# half bash's time): a join and a leave call it about 100 times
tool=${0##*/}
[ "$1" = -w ] && shift 2  # the lock wait changes nothing here
printf '%s\n' "$tool $*" >>"$FAKE/log"
if [ "$tool" = ip6tables ] && [ -f "$FAKE/fail/ip6tables" ]; then
    echo "ip6tables: can't initialize ip6tables table 'filter'" >&2
    exit 3
fi
rules=$FAKE/${tool}_rules chains=$FAKE/${tool}_chains
: >>"$rules"
: >>"$chains"
op=$1 chain=$2
shift 2
if [ "$op" = -I ]; then case ${1:-x} in *[!0-9]*) ;; *) shift ;; esac; fi
rule="$chain $*"
nl='
'
is_builtin() {
    case $1 in INPUT | FORWARD | OUTPUT) return 0 ;; esac
    [ "$1" = DOCKER-USER ] && [ "$tool" = iptables ]  # Docker's, where Docker manages iptables
}
has_line() { while IFS= read -r l; do [ "$l" = "$1" ] && return 0; done <"$2"; return 1; }
exists() { is_builtin "$1" || has_line "$1" "$chains"; }
fail() { printf '%s\n' "$tool: $1" >&2; exit 1; }
# keep_rules PATTERN -> kept: the rules that do not match PATTERN (a case pattern), in order
keep_rules() {
    kept=''
    while IFS= read -r l; do
        [ -n "$l" ] || continue
        case $l in $1) ;; *) kept=$kept$l$nl ;; esac
    done <"$rules"
}
case $op in
-C)
    # Docker's own jump, there unless a test says Docker runs without iptables
    if [ "$rule" = "FORWARD -j DOCKER-USER" ] && [ "$tool" = iptables ]; then
        [ ! -f "$FAKE/fail/no-docker-jump" ]
        exit
    fi
    has_line "$rule" "$rules" ;;
-I | -A)
    exists "$chain" || fail "No chain/target/match by that name."
    case $rule in *" -j "*)
        target=${rule##* -j }
        target=${target%% *}
        exists "$target" || case $target in
            RETURN | DROP | ACCEPT | REJECT) ;;
            *) fail "No chain/target/match by that name." ;;
        esac ;;
    esac
    if [ "$op" = -I ]; then
        keep_rules ''
        printf '%s' "$rule$nl$kept" >"$rules"
    else
        printf '%s\n' "$rule" >>"$rules"
    fi ;;
-N)
    exists "$chain" && fail "Chain already exists."
    printf '%s\n' "$chain" >>"$chains" ;;
-F)
    exists "$chain" || fail "No chain by that name."
    keep_rules "$chain *"  # chain names hold no pattern characters
    printf '%s' "$kept" >"$rules" ;;
-X)
    has_line "$chain" "$chains" || fail "No chain by that name."
    while IFS= read -r l; do case $l in "$chain "*) fail "Directory not empty." ;; esac; done <"$rules"
    while IFS= read -r l; do case $l in *" -j $chain") fail "Too many links." ;; esac; done <"$rules"
    kept=''
    while IFS= read -r l; do [ -z "$l" ] || [ "$l" = "$chain" ] || kept=$kept$l$nl; done <"$chains"
    printf '%s' "$kept" >"$chains" ;;
-S)
    exists "$chain" || fail "No chain/target/match by that name."
    if is_builtin "$chain"; then echo "-P $chain ACCEPT"; else echo "-N $chain"; fi
    while IFS= read -r l; do case $l in "$chain "*) printf '%s\n' "-A $l" ;; esac; done <"$rules"
    true ;;
-D)
    has_line "$rule" "$rules" || fail "Bad rule"
    gone=0 kept=''
    while IFS= read -r l; do
        [ -n "$l" ] || continue
        if [ $gone = 0 ] && [ "$l" = "$rule" ]; then gone=1; else kept=$kept$l$nl; fi
    done <"$rules"
    printf '%s' "$kept" >"$rules" ;;
esac
""",
    "iptables-restore": r"""
# iptables-restore and ip6tables-restore --noflush: each declared chain is
# made or emptied, then the -A lines appended (all or nothing). bash alone
# (no cat, grep, touch or mv): a join runs it four times
tool=${0##*/}
tool=${tool%-restore}
echo "$tool-restore $*" >>"$FAKE/log"
input=''
while IFS= read -r line || [[ -n $line ]]; do input+=$line$'\n'; done
while [[ $input == *$'\n' ]]; do input=${input%$'\n'}; done  # as $(cat) would
printf '%s\n' "$input" >"$FAKE/${tool}_restore_input"
[[ -f $FAKE/fail/$tool-restore ]] && { echo "$tool-restore: line 3 failed" >&2; exit 1; }
[[ " $* " == *" --noflush "* ]] || { echo "the stub knows only --noflush" >&2; exit 1; }
rules=$FAKE/${tool}_rules chains=$FAKE/${tool}_chains
: >>"$rules"
: >>"$chains"
lines=() known=()
while IFS= read -r l; do [[ -n $l ]] && lines+=("$l"); done <"$rules"
while IFS= read -r l; do [[ -n $l ]] && known+=("$l"); done <"$chains"
while IFS= read -r line; do
    case $line in
    :*) chain=${line#:}; chain=${chain%% *}
        [[ " ${known[*]} " == *" $chain "* ]] || { known+=("$chain"); echo "$chain" >>"$chains"; }
        kept=()
        for l in "${lines[@]}"; do [[ $l == "$chain "* ]] || kept+=("$l"); done
        lines=("${kept[@]}") ;;
    "-A "*) lines+=("${line#-A }") ;;
    '*filter' | COMMIT | '') ;;
    *) echo "$tool-restore: unexpected line: $line" >&2; exit 1 ;;
    esac
done <<<"$input"
if ((${#lines[@]})); then printf '%s\n' "${lines[@]}" >"$rules"; else : >"$rules"; fi
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
    "nproc": r"""
n=4; [[ -f $FAKE/nproc ]] && read -r n <"$FAKE/nproc"; echo "$n"
""",
}

# sync: what each call was handed (no fsync), for the tests of the scripts'
# atomic writes (Lab.record_syncs); else sync is `true`: a join and a leave
# call it about 30 times, and a bash stub costs 1-2 ms of CPU each time.
SYNC_RECORDER = r"""
printf '%s\n' "$*" >>"$FAKE/synced"
"""

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


@functools.lru_cache(maxsize=None)
def which(tool):
    """shutil.which, once a session for each tool (every Lab links about 20:
    a fifth of its making)."""
    return shutil.which(tool)


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
        self.link("sync", which("true"))  # never waits on the disk
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
        """A stub: BODY, a bash script unless it names its interpreter."""
        path = self.bin / name
        path.write_text(body if body.startswith("#!") else "#!/bin/bash\n" + body)
        path.chmod(0o755)

    def link(self, tool, target=None):
        target = target or which(tool)
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

    def record_syncs(self):
        """sync writes what it was handed to $FAKE/synced."""
        (self.bin / "sync").unlink()
        self.stub("sync", SYNC_RECORDER)

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


# A daemon.json of the volunteer's own, which join merges into and leave restores.
EXISTING = (
    b'{\n    "log-driver": "json-file",\n    "node-generic-resources": ["other=1", "gridx_cpu=9"],\n'
    b'    "runtimes": {"crun": {"path": "/usr/bin/crun"}}\n}'
)


def answer_prompts(argv, env, answers, timeout=60):
    """Run argv on a terminal (a pty), typing each answer once its prompt
    shows, in order: (its exit status, all it printed). A prompt that never
    came is left in answers."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the script, on the terminal
        os.execve(argv[0], argv, env)
    out = b""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
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
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")
