"""Unit tests of the hub's image registry (gridx.py's Registry section and the
image commands): the config and systemd unit rendered, the CA and server
certificate made once with the right modes and subjectAltName (real
openssl), image names, the argv of push and rm, and the API read through
curl from a fake HTTPS registry on 127.0.0.1 (no root, no Docker needed)."""

import http.server
import json
import os
import shutil
import ssl
import stat
import subprocess
import threading

import pytest
from fakes import make_config

import gridx

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


# --- rendering ----------------------------------------------------------------


def test_registry_config_listens_on_the_vpn_address_only_with_tls_and_deletion(hub_dirs):
    text = gridx.render_registry_config("10.0.0.1")
    assert "  addr: 10.0.0.1:5000\n" in text
    assert f"    rootdirectory: {hub_dirs / 'storage'}\n" in text
    assert "  delete:\n    enabled: true\n" in text
    assert f"    certificate: {hub_dirs / 'cfg' / 'registry' / 'server.crt'}\n" in text
    assert f"    key: {hub_dirs / 'cfg' / 'registry' / 'server.key'}\n" in text
    assert "cache" not in text  # no blob descriptor cache: stale after a garbage collection
    assert text.startswith(gridx.CONFIG_MARKER)


def test_registry_unit_starts_after_the_vpn_and_restarts(hub_dirs):
    unit = gridx.render_registry_unit("10.0.0.1", "gridx0", "/usr/bin/docker-registry")
    assert f"ExecStart=/usr/bin/docker-registry serve {hub_dirs / 'cfg' / 'registry' / 'config.yml'}\n" in unit
    assert "After=wg-quick@gridx0.service" in unit and "Wants=wg-quick@gridx0.service" in unit
    assert "Restart=always" in unit and "WantedBy=multi-user.target" in unit


def test_the_firewall_keeps_the_registry_port_on_the_vpn():
    rules = gridx.firewall_rules(make_config())
    vpn = rules.index("-A GRIDX-INPUT -i gridx0 -j RETURN")
    assert rules.index("-A GRIDX-INPUT -p tcp --dport 5000 -j DROP") > vpn


def test_bundles_carry_the_ca_and_its_address_once_the_hub_has_one(hub_dirs):
    config = make_config()
    assert gridx.registry_bundle_files() == {} and gridx.registry_bundle_settings(config) == {}
    gridx.ensure_dir(gridx.registry_dir())
    (hub_dirs / "cfg" / "registry" / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    assert gridx.registry_bundle_files() == {"registry-ca.crt": ("-----BEGIN CERTIFICATE-----\n", 0o644)}
    assert gridx.registry_bundle_settings(config) == {"GRIDX_REGISTRY": "10.0.0.1:5000"}


# --- the CA and the server certificate (real openssl) ---------------------------


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


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


@needs_openssl
def test_init_without_systemd_renders_and_starts_once_then_changes_nothing(hub_dirs, monkeypatch):
    started, answering = [], [False]
    monkeypatch.setattr(gridx, "systemd_running", lambda: False)
    monkeypatch.setattr(shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(gridx, "start_registry_process", lambda program: (started.append(program),
                                                                          answering.__setitem__(0, True)))
    monkeypatch.setattr(gridx, "registry_answers", lambda address, ca, timeout=2: answering[0])
    config = make_config()
    changes = gridx.registry_ready(config)
    assert started == ["/usr/bin/docker-registry"]
    assert any("started the registry on 10.0.0.1:5000" in c for c in changes)
    trust = hub_dirs / "certs.d" / "10.0.0.1:5000" / "ca.crt"
    assert trust.read_bytes() == open(gridx.registry_paths()["ca.crt"], "rb").read() and mode(trust) == 0o644
    assert (hub_dirs / "storage").is_dir()
    assert gridx.registry_ready(config) == [] and started == ["/usr/bin/docker-registry"]
    answering[0] = False  # it stopped (a container restart): init starts it again
    monkeypatch.setattr(gridx, "start_registry_process", lambda program: (started.append(program),
                                                                          answering.__setitem__(0, True)))
    assert len(gridx.registry_ready(config)) == 1 and len(started) == 2


def test_init_without_docker_registry_warns_and_goes_on(hub_dirs, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    assert gridx.registry_ready(make_config()) == []
    assert "apt install docker-registry openssl" in capsys.readouterr().err


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
    threading.Thread(target=server.serve_forever, daemon=True).start()
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


def test_rm_deletes_by_digest_then_collects_with_the_registry_stopped(fake_registry, hub_dirs, monkeypatch, capsys):
    address, ca = fake_registry
    storage = hub_dirs / "storage"
    storage.mkdir()
    (storage / "blob").write_bytes(b"x" * 3000)
    calls = []
    real_run = gridx.run

    def run(argv, **kw):
        if argv[0] == "curl":
            return real_run(argv, **kw)
        calls.append(argv)
        if argv[:2] == ["docker-registry", "garbage-collect"]:
            (storage / "blob").unlink()
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(gridx, "run", run)
    monkeypatch.setattr(gridx, "require_root", lambda: None)
    monkeypatch.setattr(gridx, "need", lambda *tools: None)
    monkeypatch.setattr(gridx, "image_registry", lambda args: (address, ca))
    monkeypatch.setattr(gridx, "load_hub_config", make_config)
    order = []
    monkeypatch.setattr(gridx, "stop_registry", lambda: order.append("stop"))
    monkeypatch.setattr(gridx, "registry_ready", lambda config: order.append("start") or [])
    assert gridx.main(["image", "rm", f"{address}/team/app:1"]) == 0
    assert FakeRegistry.deleted == [f"/v2/team/app/manifests/{DIGEST_A}"]
    assert calls == [["docker-registry", "garbage-collect", gridx.registry_paths()["config.yml"]]]
    assert order == ["stop", "start"]
    out, err = capsys.readouterr()
    assert "garbage collection freed 2.9 KiB" in out
    assert "the tags with the same image: latest" in err


def test_rm_of_a_tag_the_registry_lacks_is_exit_2(fake_registry, monkeypatch):
    address, ca = fake_registry
    monkeypatch.setattr(gridx, "require_root", lambda: None)
    monkeypatch.setattr(gridx, "need", lambda *tools: None)
    monkeypatch.setattr(gridx, "image_registry", lambda args: (address, ca))
    assert gridx.main(["image", "rm", "team/app:nope"]) == 2
    assert FakeRegistry.deleted == []


def test_push_tags_and_pushes_with_dashdash(hub_dirs, monkeypatch, capsys):
    calls = []

    def run(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(gridx, "run", run)
    monkeypatch.setattr(gridx, "need", lambda *tools: None)
    monkeypatch.setattr(gridx, "image_registry", lambda args: ("10.0.0.1:5000", "/ca.crt"))
    monkeypatch.setattr(gridx, "registry_answers", lambda address, ca: True)
    assert gridx.main(["image", "push", "team/app:1"]) == 0
    assert calls == [
        ["docker", "image", "inspect", "--format={{.Id}}", "--", "team/app:1"],
        ["docker", "tag", "--", "team/app:1", "10.0.0.1:5000/team/app:1"],
        ["docker", "push", "--", "10.0.0.1:5000/team/app:1"],
    ]
    assert capsys.readouterr().out == "10.0.0.1:5000/team/app:1\n"


def test_push_with_manager_uses_its_host_and_the_local_trust(hub_dirs, monkeypatch):
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
