"""The README's install of the gridx binary works where sudo's secure_path
leaves /usr/local out (Debian forky's sudo, RHEL's): its block, run as
written by an admin account whose sudo has forky's secure_path, gives a
`gridx` and a `sudo gridx` that run (issue 20). On every suite's node: the
path is set by a sudoers drop-in where the suite's own sudo has another.

The binary is dist/gridx when it is built and newer than its sources (make
binary; CI builds it first); otherwise a stand-in script, which shows the
same thing about PATH. (join.sh finding jq and nvidia-smi in /usr/local/bin
under that sudo: test_workers.py's terminal join.)
"""

import os
import re
import subprocess

from e2e_helpers import ROOT, container, node_exec, ok, sudo_path_as_forky

BINARY = os.environ.get("GRIDX_BINARY") or str(ROOT / "dist" / "gridx")
STAND_IN = '#!/bin/sh\necho "gridx stand-in (no dist/gridx) $*"\n'
ADMIN = "hubadmin"


def readme_install_block():
    """The first sh block of the README's "Install the binary" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Install the binary"):]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def fresh_binary():
    if not os.path.exists(BINARY):
        return None
    sources = [ROOT / "gridx.py", *(ROOT / "bundle_templates").iterdir()]
    return BINARY if os.path.getmtime(BINARY) >= max(p.stat().st_mtime for p in sources) else None


def test_the_readmes_install_gives_a_sudo_gridx_under_forkys_secure_path(lab, fresh_node):
    block = readme_install_block()
    download = [line for line in block.splitlines() if line.startswith("curl ")]
    assert len(download) == 1 and "/usr/local/bin" not in block, block
    steps = "\n".join(line for line in block.splitlines() if not line.startswith("curl "))
    assert "sudo gridx" in steps, steps

    sudo_path_as_forky(fresh_node)
    home = f"/home/{ADMIN}"
    ok(node_exec(fresh_node, f"useradd -m -s /bin/bash {ADMIN} && "
                             f"echo '{ADMIN} ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/{ADMIN} && "
                             f"chmod 0440 /etc/sudoers.d/{ADMIN} && visudo -c -q"), "an admin account")
    # the restriction holds here: a program in /usr/local/bin is not found under sudo
    ok(node_exec(fresh_node, "printf '#!/bin/sh\\necho probe\\n' > /usr/local/bin/gridx-probe && "
                             "chmod 755 /usr/local/bin/gridx-probe"), "a probe in /usr/local/bin")
    probe = node_exec(fresh_node, ["runuser", "-u", ADMIN, "--", "sudo", "gridx-probe"])
    assert probe.returncode != 0 and "command not found" in probe.stderr, (probe.returncode, probe.stderr)

    # what the download line would have fetched, in the admin's home
    binary = fresh_binary()
    if binary:
        ok(subprocess.run(["docker", "cp", binary, f"{container(fresh_node)}:{home}/gridx"],
                          capture_output=True, text=True), "docker cp dist/gridx")
    else:
        ok(node_exec(fresh_node, f"cat > {home}/gridx", input=STAND_IN), "the stand-in")
    ok(node_exec(fresh_node, f"cd {home} && chown {ADMIN}: gridx && sha256sum gridx > gridx.sha256 && "
                             f"chown {ADMIN}: gridx.sha256"), "gridx.sha256")

    proc = node_exec(fresh_node, ["runuser", "-u", ADMIN, "--", "bash", "-euc", f"cd {home}\n{steps}"])
    out = ok(proc, "the README's install steps as an admin with forky's secure_path")
    versions = [line for line in out.splitlines() if "gridx" in line and "OK" not in line]
    assert len(versions) == 2 and versions[0] == versions[1], out  # gridx --version, sudo gridx --version
    if binary:
        assert re.fullmatch(r"gridx \S+", versions[0]), versions
    where = ok(node_exec(fresh_node, ["runuser", "-u", ADMIN, "--", "sudo", "sh", "-c", "command -v gridx"]),
               "command -v gridx under sudo")
    assert where.strip() == "/usr/bin/gridx", where
