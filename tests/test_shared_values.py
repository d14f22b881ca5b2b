"""The values gridx.py and the bundle's shell scripts share, read on both
sides: a "same as" note in either file is a promise this test keeps.

Where a value is a rule (a name, a version range, a token's shape), the
shell's own function is cut out of its script and run under bash on the
same samples as gridx.py's, so a change on one side alone fails here."""

import re
import subprocess
from pathlib import Path

import pytest
from fakes import KEY_A, KEY_B, ROOT, make_config

import gridx

TEMPLATES = Path(ROOT) / "bundle_templates"


def script(name):
    return (TEMPLATES / name).read_text()


def shell_function(name, *scripts):
    """The text of a bash function NAME() { … } from the scripts (the first
    that defines it), as written there."""
    for source in scripts:
        text = script(source)
        one_line = re.search(rf"^{name}\(\) {{.*}}$", text, re.M)
        if one_line:
            return one_line.group(0)
        block = re.search(rf"^{name}\(\) {{.*?\n}}$", text, re.M | re.S)
        if block:
            return block.group(0)
    raise AssertionError(f"no function {name} in {scripts}")


def bash(program, *args):
    return subprocess.run(["bash", "-c", program, "bash", *args], capture_output=True, text=True)


def shell_accepts(function, value, *helpers):
    """Whether the shell predicate FUNCTION (with its helpers) holds for VALUE."""
    program = "\n".join([*helpers, function, f'{function.split("(")[0]} "$1"'])
    return bash(program, value).returncode == 0


def python_accepts(validate, value):
    try:
        validate(value)
        return True
    except gridx.GridxError:
        return False


def assignment(source, variable):
    match = re.search(rf"^{variable}=(\S+)$", script(source), re.M)
    assert match, f"{variable}= not found in {source}"
    return match.group(1)


def test_handshake_age_of_a_silent_peer():
    assert int(assignment("status.sh", "HANDSHAKE_MAX_AGE")) == gridx.HANDSHAKE_SILENT_S


def test_the_hubs_port_for_the_agents_reports():
    assert int(assignment("lib.sh", "AGENT_PORT_DEFAULT")) == gridx.AGENT_PORT != gridx.REGISTRY_WRITER_PORT


def test_hub_ssh_label():
    assert assignment("join.sh", "HUB_SSH_LABEL") == f"{gridx.LABEL_HUB_SSH}=no"


def test_generic_resource_names():
    program = "\n".join([shell_function("resource_list", "join.sh"),
                         "SHARED_CPUS=4 SHARED_MEM_MIB=8192 SHARED_GPUS=(GPU-a GPU-b)",
                         "resource_list", 'printf "%s\\n" "${RESOURCES[@]}"'])
    assert bash(program).stdout.split() == [f"{gridx.RES_CPU}=4", f"{gridx.RES_MEM}=8192",
                                            f"{gridx.RES_GPU}=GPU-a", f"{gridx.RES_GPU}=GPU-b"]


INTERFACES = ["gridx0", "wg0", "a", "x" * 15, "x" * 16, "-x", ".", "..", "a.b", "a b", "gr/x", "", "a=b+c_d", "é"]


@pytest.mark.parametrize("name", INTERFACES)
def test_interface_names(name):
    assert shell_accepts(shell_function("is_interface", "lib.sh"), name) == \
        python_accepts(gridx.valid_interface, name)


NAMES = ["laptop-anna", "a", "a" * 63, "a" * 64, "-a", "a-", "A", "a_b", "a.b", "", "9lives", "alice\n", "é"]


@pytest.mark.parametrize("name", NAMES)
def test_peer_names_are_dns_labels_on_both_sides(name):
    assert shell_accepts(shell_function("is_dns_label", "lib.sh"), name) == \
        python_accepts(gridx.valid_name, name)


VERSIONS = ["20.10.24", "23.0.1", "23.0.2", "23.0.17", "24.0.0", "24.0.9", "25.0.2", "25.0.3", "26.1.5",
            "27.5.1", "28.5.2", "29.0.0", "23.1.0"]


@pytest.mark.parametrize("version", VERSIONS)
def test_refused_engine_versions(version):
    program = "\n".join([
        'docker() { printf "%s\\n" "$FAKE_VERSION"; }', "warn() { :; }", "fatal() { exit 3; }",
        shell_function("check_engine_version", "join.sh"), f"FAKE_VERSION={version}", "check_engine_version"])
    assert (bash(program).returncode == 3) == gridx.engine_refused(version)


TOKENS = ["SWMTKN-1-abc123-def456", "SWMTKN-1-abc-", "SWMTKN-x-a-b", "swmtkn-1-a-b", "SWMTKN-1-a-b-c",
          "SWMTKN-1-A-b", " SWMTKN-1-a-b"]


@pytest.mark.parametrize("token", TOKENS)
def test_swarm_join_token_shape(token):
    shell_rule = re.search(r"\[\[ \$token =~ (\S+) \]\]", script("join.sh")).group(1)
    in_shell = bash(f"[[ $1 =~ {shell_rule} ]]", token).returncode == 0
    # read_token strips surrounding blanks (a pasted token); join.sh reads a file's line with read -r
    assert in_shell == python_accepts(gridx.read_token, token.strip()) or token != token.strip()


@pytest.mark.parametrize("manager", ["10.0.0.1:2377", "10.0.0.9:2377"])
def test_hub_address_from_the_manager(manager):
    """join.sh check_bundle's line, and `gridx worker join` reading a config."""
    line = "HUB_VPN_IP=${S[GRIDX_HUB_VPN_IP]:-${MANAGER%:*}}"
    assert line in script("join.sh")
    in_shell = bash('declare -A S=(); MANAGER=$1; ' + line + '; printf %s "$HUB_VPN_IP"', manager).stdout
    config = make_config()
    conf = gridx.render_worker_wg_conf(config, gridx.Peer("w1", "10.0.0.2", KEY_B, True, ""), KEY_A)
    conf = conf.replace("# gridx-manager = 10.0.0.1:2377", f"# gridx-manager = {manager}")
    assert in_shell == gridx.parse_worker_conf(conf)[0]["GRIDX_HUB_VPN_IP"]


ALLOW_ENTRIES = ["10.0.0.1", "10.0.0.0/24:tcp/5000", "[fd00::5]:tcp/443", "[fd00::/64]", "1.2.3.4:udp/1-100",
                 "10.0.0.1/16", "1.2.3.4:tcp/0", "fd00::5", "10.0.0.1:5000", "1.2.3.4:tcp/70000", "[fd00::5]/64",
                 "1.2.3.4:tcp/10-5", "10.0.0.0/7", "[fd00::/15]", "1.2.3.4:icmp", "1.2.3.4:tcp/080", "256.1.1.1",
                 "1.2.3.4:tcp/", "-1.2.3.4", "[::1]:udp/53", "1.2.3.4:TCP/80"]


@pytest.mark.parametrize("entry", ALLOW_ENTRIES)
def test_the_jobs_allow_list_grammar(entry):
    """gridx hub allow-jobs validates what the workers' jobnet.sh applies."""
    program = f'. "{TEMPLATES}/lib.sh"; job_allow_parse "$1"'
    assert (bash(program, entry).returncode == 0) == python_accepts(lambda e: gridx.valid_job_allow([e]), entry)


def test_the_allow_lists_length():
    program = f'. "{TEMPLATES}/lib.sh"; printf %s "$JOB_ALLOW_MAX"'
    assert int(bash(program).stdout) == gridx.JOB_ALLOW_MAX
