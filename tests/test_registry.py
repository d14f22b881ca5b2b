"""Unit tests of the hub's image registry (gridx.py's Registry section and the
image commands): the two configs (a read-only reader on the VPN with TLS, a
writer on loopback) and their systemd units, the two accounts and the files
they may read, the storage handed over from the single root registry of
before, the CA and server certificate made once with the right modes and
subjectAltName (real openssl), who may push (the writer's address, the
firewall), image names, the argv of push and rm, and the API read through
curl from fake registries on 127.0.0.1 (no Docker needed)."""

import http.server
import json
import os
import shutil
import ssl
import stat
import subprocess
import sys
import threading
import time

import pytest
from fakes import make_config

import gridx

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# --- the two configs: one storage, who may write --------------------------------


def test_the_reader_is_read_only_on_the_vpn_address_with_tls(hub_dirs):
    text = gridx.render_reader_config("10.0.0.1")
    folder = hub_dirs / "gridx-registry" / "reader"
    assert "  addr: 10.0.0.1:5000\n" in text
    assert f"    rootdirectory: {hub_dirs / 'storage'}\n" in text
    assert "  maintenance:\n    readonly:\n      enabled: true\n" in text
    assert "    uploadpurging:\n      enabled: false\n" in text  # the writer purges; the reader writes nothing
    assert "  delete:\n    enabled: false\n" in text
    assert f"    certificate: {folder / 'server.crt'}\n    key: {folder / 'server.key'}\n" in text
    assert "cache" not in text  # no blob descriptor cache: stale after the other side's collection
    assert text.startswith(gridx.CONFIG_MARKER)


def test_the_writer_is_on_loopback_only_plain_http_with_deletion(hub_dirs):
    text = gridx.render_writer_config()
    assert "  addr: 127.0.0.1:5001\n" in text and gridx.registry_writer() == "127.0.0.1:5001"
    assert f"    rootdirectory: {hub_dirs / 'storage'}\n" in text
    assert "  delete:\n    enabled: true\n" in text
    assert "readonly" not in text and "tls" not in text and "cache" not in text
    # one storage: what the writer stores, the reader serves
    reader = gridx.render_reader_config("10.0.0.1")
    assert [line for line in text.splitlines() if "rootdirectory" in line] == \
        [line for line in reader.splitlines() if "rootdirectory" in line]


def test_both_configs_are_yaml_the_registry_reads():
    """Parsed as YAML where PyYAML is at hand (the registry's own parser is
    Go's yaml.v2; this catches indentation slips)."""
    yaml = pytest.importorskip("yaml")
    reader = yaml.safe_load(gridx.render_reader_config("10.0.0.1"))
    writer = yaml.safe_load(gridx.render_writer_config())
    assert reader["storage"]["maintenance"] == {"readonly": {"enabled": True}, "uploadpurging": {"enabled": False}}
    assert reader["storage"]["delete"] == {"enabled": False} and writer["storage"]["delete"] == {"enabled": True}
    assert reader["http"]["addr"] == "10.0.0.1:5000" and "tls" in reader["http"]
    assert writer["http"] == {"addr": "127.0.0.1:5001", "headers": {"X-Content-Type-Options": ["nosniff"]}}
    assert reader["storage"]["filesystem"] == writer["storage"]["filesystem"]


@pytest.mark.parametrize("name,pushed", [
    ("10.0.0.1:5000/team/app:1", "127.0.0.1:5001/team/app:1"),
    ("10.0.0.1:5000/gridx/work:job-1", "127.0.0.1:5001/gridx/work:job-1"),
    ("10.0.0.1:5000/python", "127.0.0.1:5001/python:latest"),
])
def test_a_name_workers_pull_is_pushed_at_the_writer(name, pushed):
    assert gridx.writer_reference(name) == pushed


def test_the_firewall_keeps_the_registry_port_on_the_vpn_and_loopback_on_lo():
    rules = gridx.firewall_rules(make_config()).splitlines()
    vpn = rules.index("-A GRIDX-INPUT -i gridx0 -j RETURN")
    assert rules.index("-A GRIDX-INPUT -p tcp --dport 5000 -j DROP") > vpn
    # the writer's 127.0.0.1:5001 from any other interface (route_localnet on): dropped before the VPN's RETURN
    assert rules.index("-A GRIDX-INPUT -d 127.0.0.0/8 ! -i lo -j DROP") < vpn
    # and on the hub itself, root's alone: not the reader's account, nor the users' gridx account
    assert rules.index(":GRIDX-OUTPUT - [0:0]") < rules.index(
        "-A GRIDX-OUTPUT -o lo -d 127.0.0.1/32 -p tcp --dport 5001 -m owner ! --uid-owner 0 "
        "-j REJECT --reject-with tcp-reset")
    postup = gridx.firewall_postup(make_config())
    assert "iptables -C OUTPUT -j GRIDX-OUTPUT 2>/dev/null || iptables -I OUTPUT 1 -j GRIDX-OUTPUT" in postup


def test_init_hooks_the_output_chain_once(hub_dirs, monkeypatch):
    hooked = set()

    def run(argv, **kw):
        if argv[1] == "-C":
            return subprocess.CompletedProcess(argv, 0 if argv[2] in hooked else 1, "", "")
        if argv[1] == "-I":
            hooked.add(argv[2])
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(gridx, "run", run)
    assert gridx.apply_firewall(make_config()) is True
    assert hooked == {"INPUT", "FORWARD", "OUTPUT"}
    assert gridx.apply_firewall(make_config()) is False
    hooked.discard("OUTPUT")  # unhooked by hand: init hooks it again
    assert gridx.apply_firewall(make_config()) is True and "OUTPUT" in hooked


# --- the units and the processes -------------------------------------------------


def test_the_reader_unit_runs_as_its_account_after_the_vpn(hub_dirs):
    unit = gridx.render_registry_unit("reader", "10.0.0.1", "gridx0", "/usr/bin/docker-registry")
    config = hub_dirs / "gridx-registry" / "reader" / "config.yml"
    assert f"ExecStart=/usr/bin/docker-registry serve {config}\n" in unit
    assert "User=gridx-registry-ro\nGroup=gridx-registry-ro\nSupplementaryGroups=gridx-registry\n" in unit
    assert "After=wg-quick@gridx0.service" in unit and "Wants=wg-quick@gridx0.service" in unit
    assert "NoNewPrivileges=yes\n" in unit and "ProtectSystem=strict\n" in unit and "CapabilityBoundingSet=\n" in unit
    assert "ReadWritePaths" not in unit  # it cannot write the storage, nor anything else
    assert "Restart=always" in unit and "WantedBy=multi-user.target" in unit and "UMask=0077\n" in unit


def test_the_writer_unit_writes_the_storage_only(hub_dirs):
    unit = gridx.render_registry_unit("writer", "10.0.0.1", "gridx0", "/usr/bin/docker-registry")
    config = hub_dirs / "gridx-registry" / "writer" / "config.yml"
    assert f"ExecStart=/usr/bin/docker-registry serve {config}\n" in unit
    assert "User=gridx-registry\nGroup=gridx-registry\nExecStart" in unit  # no supplementary group
    assert f"ReadWritePaths={hub_dirs / 'storage'}\n" in unit and "ProtectSystem=strict\n" in unit
    assert "UMask=0027\n" in unit  # its files readable by its group: the reader
    assert "wg-quick" not in unit  # loopback: it needs no VPN


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_reads_both_units_without_a_complaint(hub_dirs, tmp_path):
    for role in ("reader", "writer"):
        path = tmp_path / gridx.REGISTRY_ROLES[role][1]
        path.write_text(gridx.render_registry_unit(role, "10.0.0.1", "gridx0", "/bin/true"))
        result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                                capture_output=True, text=True)
        complaints = [line for line in result.stderr.splitlines()
                      if path.name in line and "wg-quick@" not in line]  # the VPN's unit is not here
        assert complaints == [], result.stderr


def test_each_process_drops_to_its_account_groups_and_no_new_privileges():
    reader, writer = gridx.as_account("reader"), gridx.as_account("writer")
    assert reader == ["setpriv", "--reuid=gridx-registry-ro", "--regid=gridx-registry-ro",
                      "--groups=gridx-registry", "--no-new-privs", "--reset-env", "--"]
    assert writer == ["setpriv", "--reuid=gridx-registry", "--regid=gridx-registry", "--clear-groups",
                      "--no-new-privs", "--reset-env", "--"]


def test_start_without_systemd_runs_setpriv_in_its_own_session(hub_dirs, monkeypatch, tmp_path):
    started = []

    class Process:
        pid = 4242

    monkeypatch.setitem(gridx.REGISTRY_ROLES, "writer", gridx.REGISTRY_ROLES["writer"][:2] +
                        (str(tmp_path / "writer.log"), 0o027))
    monkeypatch.setattr(gridx, "start", lambda argv, **kw: started.append((argv, kw)) or Process())
    gridx.ensure_dir(gridx.registry_dir())
    gridx.start_registry_process("/usr/bin/docker-registry", "writer")
    (argv, kw), = started
    assert argv == gridx.as_account("writer") + ["/usr/bin/docker-registry", "serve",
                                                 gridx.registry_config_path("writer")]
    assert kw["umask"] == 0o027 and kw["start_new_session"] is True
    assert (hub_dirs / "cfg" / "registry" / "writer.pid").read_text() == "4242\n"


def write(path, text):
    with open(path, "w") as handle:
        handle.write(text)


def sleeper(*words):
    """A process whose command line holds words (as the registry's holds its
    config), once it does: until the child has exec'd, /proc shows the
    parent's command line (a loaded machine showed it)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *words])
    for _ in range(100):
        with open(f"/proc/{process.pid}/cmdline", "rb") as handle:
            cmdline = handle.read().split(b"\0")  # read once: a second read is at the end
        if all(word.encode() in cmdline for word in words):
            break
        time.sleep(0.05)
    return process


def test_stop_ends_only_a_process_of_its_config(hub_dirs):
    gridx.ensure_dir(gridx.registry_dir())
    pid_file = gridx.registry_paths()["reader.pid"]
    other = sleeper("/somewhere/else.yml")
    try:
        write(pid_file, f"{other.pid}\n")  # a reused pid: not the registry's
        assert gridx.registry_pid("reader") is None
        gridx.stop_registry("reader")
        assert other.poll() is None and not os.path.exists(pid_file)
    finally:
        other.kill()
        other.wait()
    mine = sleeper(gridx.registry_config_path("reader"))
    write(pid_file, f"{mine.pid}\n")
    assert gridx.registry_pid("reader") == mine.pid
    gridx.stop_registry("reader")
    assert mine.wait(timeout=10) == -15 and not os.path.exists(pid_file)


# --- the accounts and the files they read ----------------------------------------


class FakeAccounts:
    """pwd/grp and useradd/usermod, recorded."""

    def __init__(self, monkeypatch, users=(), members=()):
        import grp
        import pwd

        self.users, self.members, self.calls = set(users), set(members), []
        monkeypatch.setattr(pwd, "getpwnam", self.getpwnam)
        monkeypatch.setattr(grp, "getgrnam", lambda name: type("G", (), {"gr_mem": sorted(self.members),
                                                                          "gr_gid": 1000})())
        monkeypatch.setattr(gridx, "need", lambda *tools: None)
        monkeypatch.setattr(gridx, "run", self.run)

    def getpwnam(self, name):
        if name not in self.users:
            raise KeyError(name)
        return type("P", (), {"pw_uid": 1000, "pw_gid": 1000})()

    def run(self, argv, **kw):
        self.calls.append(argv)
        self.users.add(argv[-1])
        if "--groups" in argv:
            self.members.add(argv[-1])
        return subprocess.CompletedProcess(argv, 0, "", "")


def test_hub_init_makes_both_accounts_once(monkeypatch):
    fake = FakeAccounts(monkeypatch)
    changes = gridx.ensure_registry_accounts()
    common = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
              "--shell", "/usr/sbin/nologin", "--comment", "Grid-X image registry"]
    assert fake.calls == [common + ["--", "gridx-registry"],
                          common + ["--groups", "gridx-registry", "--", "gridx-registry-ro"]]
    assert len(changes) == 2 and "'gridx-registry-ro'" in changes[1]
    assert gridx.ensure_registry_accounts() == [] and len(fake.calls) == 2


def test_a_reader_account_outside_the_writers_group_is_put_back(monkeypatch):
    fake = FakeAccounts(monkeypatch, users=("gridx-registry", "gridx-registry-ro"))
    assert len(gridx.ensure_registry_accounts()) == 1
    assert fake.calls == [["usermod", "--append", "--groups", "gridx-registry", "--", "gridx-registry-ro"]]


@needs_root
def test_each_roles_files_are_roots_and_readable_by_its_group_only(hub_dirs, monkeypatch):
    monkeypatch.setattr(gridx, "registry_ids", lambda role: (0, 4321 if role == "reader" else 4322, []))
    assert gridx.install_registry_files("reader", {"config.yml": "c\n", "server.key": "KEY\n"}) is True
    folder = hub_dirs / "gridx-registry" / "reader"
    for path, want in ((folder, 0o750), (folder / "config.yml", 0o640), (folder / "server.key", 0o640)):
        info = os.stat(path)
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 4321, want), path
    assert mode(folder.parent) == 0o755
    assert gridx.install_registry_files("reader", {"config.yml": "c\n", "server.key": "KEY\n"}) is False
    os.chmod(folder / "server.key", 0o644)  # loosened by hand: put back, nothing rewritten
    assert gridx.install_registry_files("reader", {"config.yml": "c\n", "server.key": "KEY\n"}) is False
    assert mode(folder / "server.key") == 0o640


@needs_root
def test_the_storage_of_the_single_root_registry_is_handed_over_once(hub_dirs, monkeypatch, tmp_path):
    monkeypatch.setattr(gridx, "ancestors_open", lambda path: [])  # pytest's tmp_path is 0700
    monkeypatch.setattr(gridx, "registry_ids", lambda role: (4322, 4322, []))
    storage = hub_dirs / "storage"
    blob = storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / "ab" / "abc"
    blob.mkdir(parents=True, mode=0o700)
    (blob / "data").write_bytes(b"layer")
    os.chmod(blob / "data", 0o600)  # as the single registry wrote it (UMask=0077, root)
    outside = tmp_path / "outside"
    outside.write_text("not the registry's\n")
    os.chmod(outside, 0o600)
    (storage / "link").symlink_to(outside)
    assert gridx.own_registry_storage() is True
    for folder, folders, files in os.walk(storage):
        for name in folders + files + ["."]:
            info = os.lstat(os.path.join(folder, name))
            assert (info.st_uid, info.st_gid) == (4322, 4322)
            if not stat.S_ISLNK(info.st_mode):
                assert stat.S_IMODE(info.st_mode) == (0o750 if stat.S_ISDIR(info.st_mode) else 0o640)
    assert (blob / "data").read_bytes() == b"layer"  # the images are kept
    assert (os.stat(outside).st_uid, mode(outside)) == (0, 0o600)  # never through a link
    assert gridx.own_registry_storage() is False  # its top is the account's: done


def test_a_storage_the_accounts_cannot_reach_is_exit_3(hub_dirs, tmp_path):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    os.chmod(closed, 0o700)
    assert str(closed) in gridx.ancestors_open(str(closed / "registry"))
    open_ = tmp_path / "open"
    open_.mkdir()
    os.chmod(open_, 0o755)
    assert str(open_) not in gridx.ancestors_open(str(open_ / "registry"))


# --- hub init, migration, reset, garbage collection --------------------------------


@pytest.fixture
def registry_host(hub_dirs, monkeypatch):
    """A hub with no systemd whose processes are recorded, not started."""
    state = {"started": [], "running": set()}
    monkeypatch.setattr(gridx, "systemd_running", lambda: False)
    monkeypatch.setattr(shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(gridx, "need", lambda *tools: None)
    monkeypatch.setattr(gridx, "ensure_registry_accounts", lambda: [])
    monkeypatch.setattr(gridx, "registry_ids", lambda role: (os.geteuid(), os.getegid(), []))
    monkeypatch.setattr(gridx, "ancestors_open", lambda path: [])
    monkeypatch.setattr(gridx, "start_registry_process", lambda program, role: (
        state["started"].append(role), state["running"].add(role)))
    monkeypatch.setattr(gridx, "registry_pid", lambda role: 1 if role in state["running"] else None)
    monkeypatch.setattr(gridx, "registry_answers", lambda address, ca, timeout=2: (
        ("writer" if ca is None else "reader") in state["running"]))
    real_stop = gridx.stop_registry
    monkeypatch.setattr(gridx, "stop_registry", lambda *roles: (
        state["running"].difference_update(roles or ("writer", "reader")), real_stop(*roles)))
    return state


@needs_openssl
def test_init_without_systemd_starts_both_once_then_changes_nothing(registry_host, hub_dirs):
    config = make_config()
    changes = gridx.registry_ready(config)
    assert registry_host["started"] == ["writer", "reader"]
    assert any("registry's reader on 10.0.0.1:5000 as gridx-registry-ro" in c for c in changes)
    assert any("registry's writer on 127.0.0.1:5001 as gridx-registry" in c for c in changes)
    trust = hub_dirs / "certs.d" / "10.0.0.1:5000" / "ca.crt"
    assert trust.read_bytes() == open(gridx.registry_paths()["ca.crt"], "rb").read() and mode(trust) == 0o644
    reader = hub_dirs / "gridx-registry" / "reader"
    assert (reader / "server.key").read_bytes() == open(gridx.registry_paths()["server.key"], "rb").read()
    assert mode(reader / "server.key") == 0o640 and mode(reader) == 0o750
    assert (reader / "config.yml").read_text() == gridx.render_reader_config("10.0.0.1")
    assert (hub_dirs / "gridx-registry" / "writer" / "config.yml").read_text() == gridx.render_writer_config()
    assert (hub_dirs / "storage").is_dir()
    assert gridx.registry_ready(config) == [] and registry_host["started"] == ["writer", "reader"]
    registry_host["running"].discard("writer")  # it stopped (a container restart): init starts it alone
    assert len(gridx.registry_ready(config)) == 1 and registry_host["started"][-1] == "writer"


@needs_openssl
def test_init_moves_a_hub_off_the_single_root_registry(registry_host, hub_dirs):
    gridx.ensure_dir(gridx.registry_dir())
    paths = gridx.registry_paths()
    write(paths["config.yml"], "# the single registry of before\n")
    old = sleeper("serve", paths["config.yml"])  # `docker-registry serve /etc/gridx/registry/config.yml`
    write(paths["registry.pid"], f"{old.pid}\n")
    try:
        changes = gridx.registry_ready(make_config())
        assert old.wait(timeout=10) == -15  # stopped before anything took its port or storage
    finally:
        old.kill()
    assert "stopped the single registry of before (it ran as root, writable over the VPN)" in changes
    assert not os.path.exists(paths["config.yml"]) and not os.path.exists(paths["registry.pid"])
    assert registry_host["started"] == ["writer", "reader"]
    assert "single registry" not in " ".join(gridx.registry_ready(make_config()))


@needs_openssl
def test_reset_stops_both_and_keeps_the_ca_and_the_images(registry_host, hub_dirs):
    gridx.registry_ready(make_config())
    (hub_dirs / "storage" / "blob").write_text("kept\n")
    gridx.reset_registry()
    assert registry_host["running"] == set()
    assert not (hub_dirs / "gridx-registry").exists()  # configs and the key's copy
    assert sorted(os.listdir(gridx.registry_dir())) == ["ca.crt", "ca.key"]
    assert (hub_dirs / "storage" / "blob").read_text() == "kept\n"


def test_with_systemd_each_unit_is_written_enabled_and_restarted_once(hub_dirs, monkeypatch, tmp_path):
    calls, answering = [], set()
    monkeypatch.setattr(gridx, "systemd_running", lambda: True)
    monkeypatch.setattr(gridx, "registry_unit_path", lambda role: str(tmp_path / gridx.REGISTRY_ROLES[role][1]))
    monkeypatch.setattr(gridx, "registry_answers", lambda address, ca, timeout=2: address in answering)
    monkeypatch.setattr(gridx, "run", lambda argv, **kw: calls.append(argv) or answering.update(
        ["127.0.0.1:5001", "10.0.0.1:5000"] if argv[:2] == ["systemctl", "restart"] else []))
    config = make_config()
    changes = gridx.ensure_registry_process(config, "/usr/bin/docker-registry", "writer", False)
    assert calls == [["systemctl", "daemon-reload"], ["systemctl", "enable", "gridx-registry-writer.service"],
                     ["systemctl", "restart", "gridx-registry-writer.service"]]
    assert changes == ["started the registry's writer on 127.0.0.1:5001 (gridx-registry-writer.service, "
                       "as gridx-registry)"]
    assert (tmp_path / "gridx-registry-writer.service").read_text() == gridx.render_registry_unit(
        "writer", "10.0.0.1", "gridx0", "/usr/bin/docker-registry")
    assert gridx.ensure_registry_process(config, "/usr/bin/docker-registry", "writer", False) == []
    assert len(calls) == 3
    assert len(gridx.ensure_registry_process(config, "/usr/bin/docker-registry", "writer", True)) == 1
    assert calls[-1] == ["systemctl", "restart", "gridx-registry-writer.service"]  # its config changed


def test_with_systemd_the_single_registrys_unit_is_stopped_before_the_move(hub_dirs, monkeypatch, tmp_path):
    calls = []
    unit = tmp_path / "gridx-registry.service"
    monkeypatch.setattr(gridx, "systemd_running", lambda: True)
    monkeypatch.setattr(gridx, "registry_unit_path", lambda role: str(tmp_path / gridx.REGISTRY_ROLES[role][1]))
    monkeypatch.setattr(gridx, "run", lambda argv, **kw: calls.append(argv))
    unit.write_text("[Service]\nExecStart=/usr/bin/docker-registry serve /etc/gridx/registry/config.yml\n")
    assert gridx.stop_single_registry() is True
    assert calls == [["systemctl", "stop", "gridx-registry.service"]]
    unit.write_text(gridx.render_registry_unit("reader", "10.0.0.1", "gridx0", "/usr/bin/docker-registry"))
    assert gridx.stop_single_registry() is False and len(calls) == 1  # the reader's own unit: left alone


def test_init_without_docker_registry_warns_and_goes_on(hub_dirs, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    assert gridx.registry_ready(make_config()) == []
    assert "apt install docker-registry openssl" in capsys.readouterr().err


def test_bundles_carry_the_ca_and_its_address_once_the_hub_has_one(hub_dirs):
    config = make_config()
    assert gridx.registry_bundle_files() == {} and gridx.registry_bundle_settings(config) == {}
    gridx.ensure_dir(gridx.registry_dir())
    (hub_dirs / "cfg" / "registry" / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    assert gridx.registry_bundle_files() == {"registry-ca.crt": ("-----BEGIN CERTIFICATE-----\n", 0o644)}
    assert gridx.registry_bundle_settings(config) == {"GRIDX_REGISTRY": "10.0.0.1:5000"}


# --- the CA and the server certificate (real openssl) ---------------------------


@needs_openssl
def test_the_ca_is_made_once_private_and_never_again(hub_dirs):
    paths = gridx.registry_paths()
    assert gridx.ensure_registry_ca() is True
    assert mode(gridx.registry_dir()) == 0o700
    assert mode(paths["ca.key"]) == 0o600 and mode(paths["ca.crt"]) == 0o644
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", paths["ca.crt"]],
                          capture_output=True, text=True, check=True).stdout
    assert "CA:TRUE" in text and "Certificate Sign" in text
    before = (open(paths["ca.key"], "rb").read(), open(paths["ca.crt"], "rb").read())
    assert gridx.ensure_registry_ca() is False
    assert (open(paths["ca.key"], "rb").read(), open(paths["ca.crt"], "rb").read()) == before


@needs_openssl
def test_half_a_ca_is_refused_not_replaced(hub_dirs):
    gridx.ensure_registry_ca()
    os.unlink(gridx.registry_paths()["ca.key"])
    with pytest.raises(gridx.GridxError) as error:
        gridx.ensure_registry_ca()
    assert error.value.code == 3 and "half a CA" in error.value.message


@needs_openssl
def test_the_server_cert_names_the_vpn_address_and_is_signed_by_the_ca(hub_dirs):
    paths = gridx.registry_paths()
    gridx.ensure_registry_ca()
    assert gridx.ensure_registry_cert("10.0.0.1") is True
    assert mode(paths["server.key"]) == 0o600
    assert gridx.certificate_ips(paths["server.crt"]) == {"10.0.0.1"}
    verify = subprocess.run(["openssl", "verify", "-CAfile", paths["ca.crt"], paths["server.crt"]],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    cert = open(paths["server.crt"], "rb").read()
    assert gridx.ensure_registry_cert("10.0.0.1") is False
    assert open(paths["server.crt"], "rb").read() == cert
    # another VPN address (hub reset, init --subnet): a new cert, the same CA
    ca = open(paths["ca.crt"], "rb").read()
    assert gridx.ensure_registry_cert("10.9.0.1") is True
    assert gridx.certificate_ips(paths["server.crt"]) == {"10.9.0.1"}
    assert open(paths["ca.crt"], "rb").read() == ca
    assert sorted(os.listdir(gridx.registry_dir())) == ["ca.crt", "ca.key", "server.crt", "server.key"]


# --- names ----------------------------------------------------------------------


@pytest.mark.parametrize("image,pushed", [
    ("python:3.11", "10.0.0.1:5000/python:3.11"),
    ("team/app", "10.0.0.1:5000/team/app:latest"),
    ("registry.example:5000/team/app:1.0", "10.0.0.1:5000/team/app:1.0"),
    ("localhost/x", "10.0.0.1:5000/x:latest"),
])
def test_pushed_name_keeps_path_and_tag_under_the_hub(image, pushed):
    assert gridx.pushed_name(image, "10.0.0.1:5000") == pushed


def test_push_by_digest_and_rm_of_another_registry_are_exit_2():
    with pytest.raises(gridx.GridxError) as error:
        gridx.pushed_name("team/app@sha256:" + "0" * 64, "10.0.0.1:5000")
    assert error.value.code == 2
    with pytest.raises(gridx.GridxError) as error:
        gridx.registry_reference("10.9.9.9:5000/team/app:1", "10.0.0.1:5000")
    assert error.value.code == 2
    assert gridx.registry_reference("10.0.0.1:5000/team/app:1", "10.0.0.1:5000") == ("team/app", "1")
    assert gridx.registry_reference("team/app:1", "10.0.0.1:5000") == ("team/app", "1")


@pytest.mark.parametrize("argv", [
    ["image", "push", "--", "-x"], ["image", "push", "UPPER/Case:1"], ["image", "push", "--manager=-x", "a:1"],
    ["image", "rm", "--", "--mount=x"], ["image", "rm", "team/app"], ["image", "ls", "--manager=-oProxy=x"],
])
def test_bad_input_is_exit_2_before_anything(argv, hub_dirs, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(gridx, "run", lambda *a, **kw: ran.append(a))
    monkeypatch.setattr(gridx, "require_root", lambda: ran.append("root"))
    assert gridx.main(argv) == 2
    assert ran == []
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "hint: " in err


@pytest.mark.parametrize("argv", [["image", "ls", "--manager=gridx@10.0.0.1"],
                                  ["image", "push", "--manager=alice@10.0.0.1", "team/app:1"]])
def test_image_commands_are_the_admins_not_a_users(argv, hub_dirs, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(gridx, "run", lambda *a, **kw: ran.append(a))
    assert gridx.main(argv) == 2 and ran == []
    assert "for the hub's admin" in capsys.readouterr().err


def test_gridx_manager_of_the_environment_is_checked_before_anything(hub_dirs, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(gridx, "run", lambda *a, **kw: ran.append(a))
    monkeypatch.setattr(gridx, "need", lambda *tools: ran.append(tools))
    monkeypatch.setenv("GRIDX_MANAGER", "-oProxyCommand=x")
    assert gridx.main(["image", "push", "team/app:1"]) == 2 and ran == []


def test_a_registry_that_does_not_answer_is_exit_3_with_a_hint(hub_dirs, monkeypatch, capsys):
    gridx.save_hub_config(make_config())
    trust = hub_dirs / "certs.d" / "10.0.0.1:5000"
    trust.mkdir(parents=True)
    (trust / "ca.crt").write_text("x\n")
    monkeypatch.setattr(gridx, "run", lambda argv, **kw: subprocess.CompletedProcess(
        argv, 7, "", "curl: (7) Failed to connect to 10.0.0.1 port 5000: Connection refused\n"))
    assert gridx.main(["image", "ls"]) == 3
    err = capsys.readouterr().err
    assert "does not answer: curl: (7) Failed to connect" in err and "hint: on the hub: gridx hub init" in err


# --- the API, from a fake HTTPS registry on 127.0.0.1 (real curl, real TLS) ------

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
MANIFEST_A = {"schemaVersion": 2, "mediaType": gridx.MANIFEST_TYPES[0],
              "config": {"digest": "sha256:c1", "size": 1000},
              "layers": [{"digest": "sha256:base", "size": 50_000_000}, {"digest": "sha256:app", "size": 2000}]}
MANIFEST_B = {"schemaVersion": 2, "mediaType": gridx.MANIFEST_TYPES[0],
              "config": {"digest": "sha256:c2", "size": 500},
              "layers": [{"digest": "sha256:base", "size": 50_000_000}]}


class FakeRegistry(http.server.BaseHTTPRequestHandler):
    """Two repositories, the catalog in pages of one; records deletes."""
    deleted = []

    def log_message(self, *args):
        pass

    def answer(self, code, document=None, headers=()):
        body = json.dumps(document).encode() if document is not None else b""
        self.send_response(code)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        path = self.path
        if path == "/v2/":
            return self.answer(200, {})
        if path.startswith("/v2/_catalog") and "last=" not in path:
            return self.answer(200, {"repositories": ["python"]},
                               [("Link", '</v2/_catalog?last=python&n=1>; rel="next"')])
        if path.startswith("/v2/_catalog"):
            return self.answer(200, {"repositories": ["team/app"]})
        if path.startswith("/v2/python/tags/list"):
            return self.answer(200, {"name": "python", "tags": ["3.11"]})
        if path.startswith("/v2/team/app/tags/list"):
            return self.answer(200, {"name": "team/app", "tags": ["1", "latest"]})
        if "/manifests/" in path:
            assert gridx.MANIFEST_TYPES[0] in self.headers.get("Accept", "")
            ref = path.rsplit("/", 1)[1]
            manifest, digest = (MANIFEST_B, DIGEST_B) if path.startswith("/v2/python/") else (MANIFEST_A, DIGEST_A)
            if ref not in ("3.11", "1", "latest", digest):
                return self.answer(404, {"errors": [{"code": "MANIFEST_UNKNOWN"}]})
            return self.answer(200, manifest, [("Docker-Content-Digest", digest)])
        return self.answer(404, {})

    do_HEAD = do_GET

    def do_DELETE(self):
        FakeRegistry.deleted.append(self.path)
        self.answer(202)


@pytest.fixture
def fake_registry(hub_dirs):
    """A TLS registry on 127.0.0.1 whose cert the hub's CA signed (openssl)."""
    if shutil.which("openssl") is None or shutil.which("curl") is None:
        pytest.skip("openssl or curl not installed")
    gridx.ensure_registry_ca()
    gridx.ensure_registry_cert("127.0.0.1")
    paths = gridx.registry_paths()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeRegistry)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(paths["server.crt"], paths["server.key"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    # shutdown() waits for serve_forever's next poll (0.5 s by default)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    FakeRegistry.deleted = []
    yield f"127.0.0.1:{server.server_address[1]}", paths["ca.crt"]
    server.shutdown()


def test_ls_reads_every_page_tag_and_size_over_tls(fake_registry):
    address, ca = fake_registry
    images, stored = gridx.registry_images(address, ca)
    assert [(i["name"], i["digest"], i["size_bytes"]) for i in images] == [
        (f"{address}/python:3.11", DIGEST_B, 50_000_500),
        (f"{address}/team/app:1", DIGEST_A, 50_003_000),
        (f"{address}/team/app:latest", DIGEST_A, 50_003_000),
    ]
    assert stored == 50_000_000 + 1000 + 2000 + 500  # the shared base layer once


def test_the_registry_is_checked_against_the_hubs_ca(fake_registry, tmp_path):
    address, _ = fake_registry
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-keyout", str(other / "k"), "-out", str(other / "c"),
                    "-days", "1", "-subj", "/CN=other"], check=True, capture_output=True)
    with pytest.raises(gridx.GridxError) as error:
        gridx.registry_images(address, str(other / "c"))
    assert error.value.code == 3


@pytest.fixture
def fake_writer(hub_dirs, monkeypatch):
    """The writer as the hub reaches it: plain HTTP on 127.0.0.1 (any port)."""
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeRegistry)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    FakeRegistry.deleted = []
    address = f"127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(gridx, "registry_writer", lambda: address)
    yield address
    server.shutdown()


def test_rm_deletes_through_the_writer_then_collects_with_only_the_writer_stopped(fake_writer, hub_dirs,
                                                                                  monkeypatch, capsys):
    storage = hub_dirs / "storage"
    storage.mkdir()
    (storage / "blob").write_bytes(b"x" * 3000)
    calls = []
    real_run = gridx.run

    def run(argv, **kw):
        if argv[0] == "curl":
            assert "--cacert" not in argv and argv[-1].startswith(f"http://{fake_writer}/")
            return real_run(argv, **kw)
        calls.append(argv)
        if "garbage-collect" in argv:
            (storage / "blob").unlink()
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(gridx, "run", run)
    monkeypatch.setattr(gridx, "require_root", lambda: None)
    monkeypatch.setattr(gridx, "need", lambda *tools: None)
    monkeypatch.setattr(gridx, "load_hub_config", make_config)
    order = []
    monkeypatch.setattr(gridx, "stop_registry", lambda *roles: order.append(("stop",) + roles))
    monkeypatch.setattr(gridx, "registry_ready", lambda config: order.append(("ready",)) or [])
    assert gridx.main(["image", "rm", "10.0.0.1:5000/team/app:1"]) == 0
    assert FakeRegistry.deleted == [f"/v2/team/app/manifests/{DIGEST_A}"]
    assert calls == [gridx.as_account("writer") + ["docker-registry", "garbage-collect",
                                                   gridx.registry_config_path("writer")]]
    assert order == [("stop", "writer"), ("ready",)]  # the reader goes on serving pulls
    out, err = capsys.readouterr()
    assert out == "removed 10.0.0.1:5000/team/app:1; garbage collection freed 2.9 KiB\n"
    assert "the tags with the same image: latest" in err


def test_rm_of_a_tag_the_registry_lacks_is_exit_2(fake_writer, monkeypatch):
    monkeypatch.setattr(gridx, "require_root", lambda: None)
    monkeypatch.setattr(gridx, "need", lambda *tools: None)
    monkeypatch.setattr(gridx, "load_hub_config", make_config)
    assert gridx.main(["image", "rm", "team/app:nope"]) == 2
    assert FakeRegistry.deleted == []


def test_rm_runs_on_the_hub_only(hub_dirs, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(gridx, "run", lambda *a, **kw: ran.append(a))
    monkeypatch.setenv("GRIDX_MANAGER", "root@10.0.0.1")
    assert gridx.main(["image", "rm", "team/app:1"]) == 2 and ran == []
    assert "hint: ssh root@10.0.0.1 gridx image rm team/app:1" in capsys.readouterr().err


class FakeDocker:
    """docker and curl as image push meets them; the reader serves `served`."""

    def __init__(self, monkeypatch, served=DIGEST_A, pushed=DIGEST_A, have=True):
        self.calls, self.served, self.pushed, self.have = [], served, pushed, have
        monkeypatch.setattr(gridx, "run", self.run)
        monkeypatch.setattr(gridx, "need", lambda *tools: None)

    def run(self, argv, **kw):
        if argv[0] == "curl":
            self.calls.append(["curl", argv[-1]])
            head = f"HTTP/1.1 200 OK\nDocker-Content-Digest: {self.served}\n\n" if self.served else "HTTP/1.1 404 x\n\n"
            return subprocess.CompletedProcess(argv, 0, head, "")
        self.calls.append(argv)
        if "--format={{.Id}}" in argv and not self.have:
            return subprocess.CompletedProcess(argv, 1, "", "No such image")
        if "--format={{json .RepoDigests}}" in argv:
            return subprocess.CompletedProcess(argv, 0, json.dumps([f"127.0.0.1:5001/team/app@{self.pushed}"]), "")
        return subprocess.CompletedProcess(argv, 0, "", "")


def test_push_on_the_hub_goes_through_the_writer_and_prints_the_name_workers_pull(hub_dirs, monkeypatch, capsys):
    fake = FakeDocker(monkeypatch)
    monkeypatch.setattr(gridx, "image_registry", lambda args: ("10.0.0.1:5000", "/ca.crt"))
    monkeypatch.setattr(gridx, "registry_answers", lambda address, ca: address == "127.0.0.1:5001" and ca is None)
    assert gridx.main(["image", "push", "team/app:1"]) == 0
    assert fake.calls == [
        ["docker", "image", "inspect", "--format={{.Id}}", "--", "team/app:1"],
        ["docker", "tag", "--", "team/app:1", "127.0.0.1:5001/team/app:1"],
        ["docker", "push", "--", "127.0.0.1:5001/team/app:1"],
        ["curl", "https://10.0.0.1:5000/v2/team/app/manifests/1"],  # the reader serves it, same digest
        ["docker", "image", "inspect", "--format={{json .RepoDigests}}", "--", "127.0.0.1:5001/team/app:1"],
        ["docker", "image", "rm", "--", "127.0.0.1:5001/team/app:1"],  # the writer's name only
    ]
    assert capsys.readouterr().out == "10.0.0.1:5000/team/app:1\n"


def test_push_whose_tag_the_reader_serves_otherwise_fails(hub_dirs, monkeypatch, capsys):
    FakeDocker(monkeypatch, served=DIGEST_B)
    monkeypatch.setattr(gridx, "image_registry", lambda args: ("10.0.0.1:5000", "/ca.crt"))
    monkeypatch.setattr(gridx, "registry_answers", lambda address, ca: True)
    assert gridx.main(["image", "push", "team/app:1"]) == 1
    err = capsys.readouterr().err
    assert f"serves {DIGEST_B} for team/app:1, not the {DIGEST_A} pushed to 127.0.0.1:5001" in err


def test_push_when_the_writer_does_not_answer_is_exit_3(hub_dirs, monkeypatch, capsys):
    monkeypatch.setattr(gridx, "image_registry", lambda args: ("10.0.0.1:5000", "/ca.crt"))
    monkeypatch.setattr(gridx, "need", lambda *tools: None)
    monkeypatch.setattr(gridx, "run", lambda argv, **kw: subprocess.CompletedProcess(
        argv, 7, "", "curl: (7) Failed to connect to 127.0.0.1 port 5001: Connection refused\n"))
    assert gridx.main(["image", "push", "team/app:1"]) == 3
    err = capsys.readouterr().err
    assert "127.0.0.1:5001 does not answer" in err and "systemctl status gridx-registry-writer" in err


def test_push_with_manager_runs_in_the_hubs_docker(hub_dirs, monkeypatch, capsys):
    fake = FakeDocker(monkeypatch)
    monkeypatch.setattr(gridx, "set_manager", lambda args: setattr(gridx, "DOCKER_HOST", "ssh://root@10.0.0.1"))
    monkeypatch.setattr(gridx, "DOCKER_HOST", None)
    monkeypatch.setattr(gridx, "hub_registry", lambda: "10.0.0.1:5000")
    assert gridx.main(["image", "push", "--manager=root@10.0.0.1", "team/app:1"]) == 0
    host = "--host=ssh://root@10.0.0.1"
    assert fake.calls == [
        ["docker", host, "image", "inspect", "--format={{.Id}}", "--", "team/app:1"],
        ["docker", host, "tag", "--", "team/app:1", "127.0.0.1:5001/team/app:1"],
        ["docker", host, "push", "--", "127.0.0.1:5001/team/app:1"],  # the writer is the hub's loopback
        ["docker", host, "image", "rm", "--", "127.0.0.1:5001/team/app:1"],
    ]
    assert capsys.readouterr().out == "10.0.0.1:5000/team/app:1\n"


def test_push_with_manager_of_an_image_the_hub_lacks_says_how_to_copy_it(hub_dirs, monkeypatch, capsys):
    FakeDocker(monkeypatch, have=False)
    monkeypatch.setattr(gridx, "set_manager", lambda args: setattr(gridx, "DOCKER_HOST", "ssh://root@10.0.0.1"))
    monkeypatch.setattr(gridx, "DOCKER_HOST", None)
    monkeypatch.setattr(gridx, "hub_registry", lambda: "10.0.0.1:5000")
    assert gridx.main(["image", "push", "--manager=root@10.0.0.1", "team/app:1"]) == 2
    err = capsys.readouterr().err
    assert "no image 'team/app:1' in the hub's Docker" in err
    assert "hint: copy it there: docker save team/app:1 | docker --host ssh://root@10.0.0.1 load" in err


def test_ls_with_manager_uses_its_host_and_the_local_trust(hub_dirs, monkeypatch):
    with pytest.raises(gridx.GridxError) as error:
        gridx.image_registry(type("A", (), {"manager": "root@10.0.0.1"})())
    assert error.value.code == 3 and "ca.crt" in error.value.hint
    trust = hub_dirs / "certs.d" / "10.0.0.1:5000"
    trust.mkdir(parents=True)
    (trust / "ca.crt").write_text("x\n")
    assert gridx.image_registry(type("A", (), {"manager": "root@10.0.0.1"})()) == (
        "10.0.0.1:5000", str(trust / "ca.crt"))


def test_parse_http_response_and_link_pages():
    status, headers, body = gridx.parse_http_response(
        "HTTP/1.1 200 OK\r\nDocker-Content-Digest: sha256:x\r\nLink: </v2/_catalog?last=a&n=1>; rel=\"next\"\r\n\r\n{}")
    assert status == 200 and headers["docker-content-digest"] == "sha256:x" and body == "{}"
    assert gridx.parse_link_next(headers) == "/v2/_catalog?last=a&n=1"
    assert gridx.parse_link_next({}) is None
    with pytest.raises(gridx.GridxError):
        gridx.parse_http_response("garbage")
