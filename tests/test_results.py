"""Unit tests of work folders and results (gridx.py's "Work folders and
results" section): .gridxignore/.dockerignore rules, the folder read once
with its limit, the build context gridx writes (its own Dockerfile, the
files under work/ owned by root), the framed upload through serve and the
tar a user may send there, the hub's unpacking of a job's output (paths kept
inside, links left out, the limit), and what serve and DEST refuse. No root,
no Docker (the e2e tests in tests/e2e/test_results_lab.py run it for real)."""

import io
import json
import os
import re
import tarfile
import time

import pytest
from fakes import JOB_SERVICE, NODE, fake_hub, make_config, run_main, serve

import gridx


def usage(call, *args):
    with pytest.raises(gridx.GridxError) as error:
        call(*args)
    assert error.value.code == 2, error.value.message
    return error.value.message


# -- ignore rules -------------------------------------------------------------------


@pytest.mark.parametrize("patterns,path,ignored", [
    ("*.log", "a.log", True),
    ("*.log", "sub/a.log", False),  # * stops at '/', as in Docker
    ("**/*.log", "sub/deep/a.log", True),
    ("**/*.log", "a.log", True),
    ("data", "data/big/file.bin", True),  # a folder leaves out what it holds
    ("/data", "data", True),
    ("data/*.tmp", "data/x.tmp", True),
    ("data/*.tmp", "data/keep.bin", False),
    ("*.log\n!keep.log", "keep.log", False),
    ("*.log\n!keep.log", "other.log", True),
    ("# a comment\n\n  ", "anything", False),
    ("file?.txt", "file1.txt", True),
    ("file[0-9].txt", "filex.txt", False),
    ("file[!0-9].txt", "filex.txt", True),
    ("cache/**", "cache/a/b", True),
])
def test_ignore_rules_read_as_docker_reads_them(patterns, path, ignored):
    assert gridx.IgnoreRules(patterns).ignored(path) is ignored


def make_folder(root):
    (root / "data").mkdir(parents=True)
    (root / "data" / "in.bin").write_bytes(b"x" * 1000)
    (root / "skip").mkdir()
    (root / "skip" / "big.bin").write_bytes(b"y" * 5000)
    (root / "main.py").write_text("print(1)\n")
    (root / "debug.log").write_text("log\n")
    (root / "link.py").symlink_to("main.py")
    os.mkfifo(root / "pipe")
    return root


def test_a_work_folder_is_read_once_with_its_gridxignore(tmp_path):
    folder = make_folder(tmp_path)
    (folder / ".dockerignore").write_text("main.py\n")  # .gridxignore comes first
    (folder / ".gridxignore").write_text("skip\n*.log\n")
    work = gridx.WorkFolder(str(folder), 10**6)
    assert sorted(work.entries) == [".dockerignore", ".gridxignore", "data", "data/in.bin", "link.py", "main.py"]
    assert work.skipped == 1  # the fifo
    assert work.bytes == 1000 + len("print(1)\n") + len("main.py\n") + len("skip\n*.log\n")
    assert "less what .gridxignore leaves out" in work.describe()


def test_a_folder_over_the_limit_is_exit_2_with_a_hint(tmp_path):
    folder = make_folder(tmp_path)
    message = usage(gridx.WorkFolder, str(folder), 2000)
    assert "over the 2.0 KiB limit" in message


def test_jobs_run_with_a_big_folder_runs_nothing(tmp_path, monkeypatch):
    tools = fake_hub(tmp_path, monkeypatch)
    (tmp_path / "work").mkdir()
    folder = make_folder(tmp_path / "work")
    code = run_main(["jobs", "run", "--workdir", str(folder), "--workdir-limit", "4K", "python:3.11", "true"])
    assert code == 2
    assert tools.calls == []


def test_a_missing_folder_and_a_bad_output_are_exit_2(tmp_path):
    usage(gridx.WorkFolder, str(tmp_path / "nothing"), 10)
    for bad in ("out", "/work/../etc", "/", "/work/o ut", "/work/$(id)", "-x", ""):
        usage(gridx.valid_output_path, bad)
    assert gridx.valid_output_path("/work/out/") == "/work/out"


# -- the work layer: no build, gridx's own tar headers ------------------------------------


def test_the_layer_is_the_folder_under_work_with_headers_gridx_wrote(tmp_path):
    folder = make_folder(tmp_path)
    (folder / ".gridxignore").write_text("skip\n")
    os.chmod(folder / "main.py", 0o4755)  # setuid: not carried into the layer
    work = gridx.WorkFolder(str(folder), 10**6)
    out = io.BytesIO()
    gridx.write_work_tar(out, work.members(), prefix="work/")
    out.seek(0)
    with tarfile.open(fileobj=out) as archive:
        members = {m.name: m for m in archive.getmembers()}
        assert archive.extractfile("work/data/in.bin").read() == b"x" * 1000
    assert sorted(members)[0] == "work" and "Dockerfile" not in members
    assert members["work/link.py"].issym() and members["work/link.py"].linkname == "main.py"
    assert members["work/main.py"].mode == 0o755
    assert not any(name.startswith("work/skip") for name in members)
    assert "work/pipe" not in members
    assert {(m.uid, m.gid, m.uname) for m in members.values()} == {(0, 0, "root")}
    assert all(not m.pax_headers for m in members.values())


def test_a_members_pax_headers_never_reach_the_hubs_docker(tmp_path):
    """A hand-made client's tar whose PAX `path` renames a file to the
    context's root (a Dockerfile of its own, once): re-written by gridx."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("notes.txt")
        info.pax_headers = {"path": "../Dockerfile", "SCHILY.xattr.security.capability": "x", "uid": "0"}
        info.size = 4
        archive.addfile(info, io.BytesIO(b"FROM"))
    raw.seek(0)
    upload = gridx.Upload(raw, 4, {})
    out = io.BytesIO()
    with pytest.raises(gridx.GridxError):  # tarfile applies `path`: the name is outside the folder
        gridx.write_work_tar(out, gridx.upload_members(upload), prefix="work/")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("notes.txt")
        info.pax_headers = {"SCHILY.xattr.security.capability": "x", "comment": "hello"}
        info.size = 4
        archive.addfile(info, io.BytesIO(b"text"))
    raw.seek(0)
    out = io.BytesIO()
    gridx.write_work_tar(out, gridx.upload_members(gridx.Upload(raw, 4, {})), prefix="work/")
    assert b"SCHILY" not in out.getvalue() and b"comment" not in out.getvalue()
    out.seek(0)
    with tarfile.open(fileobj=out) as archive:
        assert [(m.name, m.pax_headers) for m in archive.getmembers()] == [("work", {}), ("work/notes.txt", {})]


def test_the_container_gets_a_command_only_when_the_image_has_none():
    """The commit keeps the container's config: the image's own, unless it
    had no command at all (docker create needs one)."""
    assert gridx.create_command({"Entrypoint": ["/init"], "Cmd": None}) == []
    assert gridx.create_command({"Entrypoint": None, "Cmd": ["python3"]}) == []
    assert gridx.create_command({"Entrypoint": None, "Cmd": None}) == [gridx.NO_COMMAND]


def hub_making_layers(tmp_path, monkeypatch, pushed):
    """fake_hub whose Docker has python:3.11, makes container c0ffee and
    prints PUSHED for a push; and a work folder. (tools, folder)."""
    tools = fake_hub(tmp_path, monkeypatch)
    answer = tools.answer_docker

    def docker(rest):
        if rest[:2] == ["image", "inspect"]:
            return '"sha256:' + "1" * 64 + '" {"Entrypoint":null,"Cmd":["python3"]}'
        if rest[:1] == ["create"]:
            return "c0ffee"
        if rest[:1] == ["push"]:
            return pushed
        return answer(rest)

    monkeypatch.setattr(tools, "answer_docker", docker)
    return tools, make_folder(tmp_path / "wd")


def test_a_work_layer_holds_the_job_first_then_runs_by_digest(tmp_path, monkeypatch):
    """create (held: the name and the limits taken), then create/cp/commit/
    push the layer (no docker build), then move the job onto it by digest."""
    tools, folder = hub_making_layers(tmp_path, monkeypatch, "layer: digest: sha256:" + "d" * 64 + " size: 1234")
    assert run_main(["jobs", "run", "--name", "wd1", "--workdir", str(folder), "python:3.11", "true"]) == 0
    calls = [c[1:] for c in tools.calls if c[0] == "docker"]
    verbs = [" ".join(c[:2]) for c in calls if c[:2] != ["info", "--format"]]
    create = next(c for c in calls if c[:2] == ["service", "create"])
    update = next(c for c in calls if c[:2] == ["service", "update"])
    assert verbs.index("service create") < verbs.index("create --network=none") < verbs.index("service update")
    assert not any(c[:1] == ["build"] for c in calls)
    tag = next(a for a in create if a.startswith("--label=gridx.layer=")).partition("=")[2].partition("=")[2]
    assert re.fullmatch(r"wd1-[0-9a-f]{32}", tag)
    assert f"--constraint=node.labels.gridx.hold=={tag}" in create
    assert f"--image=10.0.0.1:5000/gridx/work:{tag}@sha256:{'d' * 64}" in update
    assert f"--constraint-rm=node.labels.gridx.hold=={tag}" in update
    assert ["rm", "--force", "--", "c0ffee"] in calls  # the container is gone, the hub keeps no image
    # committed and pushed at the registry's writer (the hub's loopback), run from its read-only side
    assert ["commit", "--change=WORKDIR /work", "--", "c0ffee", f"127.0.0.1:5001/gridx/work:{tag}"] in calls
    assert ["push", "--", f"127.0.0.1:5001/gridx/work:{tag}"] in calls
    assert ["image", "rm", "--", f"127.0.0.1:5001/gridx/work:{tag}"] in calls


def test_a_layer_that_cannot_be_made_takes_its_held_job_with_it(tmp_path, monkeypatch):
    tools, folder = hub_making_layers(tmp_path, monkeypatch, "")  # no digest: the push failed
    assert run_main(["jobs", "run", "--name", "wd2", "--workdir", str(folder), "python:3.11", "true"]) == 3
    calls = [c[1:] for c in tools.calls if c[0] == "docker"]
    assert ["service", "rm", "--", "wd2"] in calls and not any(c[:2] == ["service", "update"] for c in calls)


def test_a_member_cannot_run_a_work_layer_by_name(monkeypatch):
    monkeypatch.setattr(gridx, "OWNER", "bob")
    for image in ("10.0.0.1:5000/gridx/work:job-1-" + "a" * 32, "10.0.0.1:5000/gridx/work@sha256:" + "b" * 64):
        with pytest.raises(gridx.GridxError) as error:
            gridx.refuse_work_layer_image(image)
        assert error.value.code == 2
    gridx.refuse_work_layer_image("10.0.0.1:5000/gridx/workbench:1")
    monkeypatch.setattr(gridx, "OWNER", None)
    gridx.refuse_work_layer_image("10.0.0.1:5000/gridx/work:job-1-" + "a" * 32)  # the admin may


# -- the upload through serve ------------------------------------------------------------


def uploaded(tmp_path, header=None, limit=10**6):
    folder = make_folder(tmp_path)
    stream = io.BytesIO()
    gridx.send_upload(stream, gridx.WorkFolder(str(folder), 10**6), header or {"script": None})
    stream.seek(0)
    return gridx.read_upload(stream, limit)


def test_an_upload_arrives_whole_and_only_once(tmp_path):
    upload = uploaded(tmp_path, {"script": "main.py"})
    assert upload.header == {"script": "main.py"}
    names = [info.name for info, handle in gridx.upload_members(upload) if not handle or handle.read() is not None]
    assert sorted(names) == sorted(["data", "debug.log", "link.py", "main.py", "skip", "data/in.bin",
                                    "skip/big.bin"])


def test_an_upload_over_the_limit_or_damaged_is_exit_2(tmp_path):
    assert "limit" in usage(uploaded, tmp_path, None, 100)
    start = gridx.SESSION_HELLO + gridx.UPLOAD_MAGIC
    for damaged in (b"", b"hello", start + b"{}\nzz\n", start + b"[1]\n0\n", start + b"{}\n10\nabc",
                    start + b"{}\n-1\n", start + b"{}\n+10\n" + b"x" * 16 + b"0\n", start + b"{}\n0x10\n",
                    start + b"{}\n 10\n", start + b"{}\n10 \n", start + b"{}\n1_0\n", start + b"{}\nA\n",
                    start + b"{}\n%x\n" % (gridx.FRAME_MAX + 1), start + b"{}\n000000001\n"):
        usage(gridx.read_upload, io.BytesIO(damaged + b"x" * 64), 10**6)


def test_frames_are_cut_at_their_maximum(tmp_path):
    stream = io.BytesIO()
    frames = gridx.FrameWriter(stream)
    frames.write(b"y" * (gridx.FRAME_MAX * 2 + 5))
    frames.end()
    stream.seek(0)
    lengths = []
    while True:
        length = gridx.frame_length(stream.readline(16))
        if not length:
            break
        lengths.append(length)
        stream.read(length)
    assert lengths == [gridx.FRAME_MAX, gridx.FRAME_MAX, 5]


def tar_of(*members):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = data
                archive.addfile(info)
            elif kind == tarfile.DIRTYPE:
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    out.seek(0)
    return out


@pytest.mark.parametrize("name", ["../escape", "/etc/cron.d/x", "a/../../b", ".."])
def test_a_users_tar_with_a_path_outside_the_folder_is_exit_2(name):
    upload = gridx.Upload(tar_of((name, tarfile.REGTYPE, b"x")), 1, {})
    with pytest.raises(gridx.GridxError) as error:
        list(gridx.upload_members(upload))
    assert error.value.code == 2


def test_serve_refuses_results_into_a_folder_of_the_hub(serve_env, monkeypatch):  # noqa: F811
    assert serve(monkeypatch, "jobs results job-1 /root/.ssh") == 2
    assert serve(monkeypatch, "jobs results job-1") == 2
    assert serve_env == []


# -- results on the hub ---------------------------------------------------------------------


def test_the_hubs_unpacking_keeps_paths_inside_and_leaves_links_out(tmp_path):
    stream = tar_of(("out", tarfile.DIRTYPE, None), ("out/model.pt", tarfile.REGTYPE, b"m" * 100),
                    ("out/../../escape", tarfile.REGTYPE, b"e"), ("/etc/evil", tarfile.REGTYPE, b"e"),
                    ("out/shadow", tarfile.SYMTYPE, "/etc/shadow"), ("out/sub/more.txt", tarfile.REGTYPE, b"t"))
    dest = tmp_path / "dest"
    dest.mkdir()
    written, files, over, left_out = gridx.safe_extract(stream, str(dest), 10**6, strip=1)
    found = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    assert found == ["model.pt", "sub", "sub/more.txt"]
    assert not (tmp_path / "escape").exists() and not (dest / "escape").exists()
    assert (written, files, over, left_out) == (101, 2, False, 3)


def test_the_hubs_unpacking_stops_at_the_limit(tmp_path):
    stream = tar_of(("out/a", tarfile.REGTYPE, b"a" * 60), ("out/b", tarfile.REGTYPE, b"b" * 60))
    written, files, over, _ = gridx.safe_extract(stream, str(tmp_path), 100, strip=1)
    assert (written, files, over) == (60, 1, True)
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_results_never_overwrite_a_folder_with_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job-1").mkdir()
    assert gridx.results_destination(None, "job-1") == str(tmp_path / "job-1")  # empty: fine
    (tmp_path / "job-1" / "mine.txt").write_text("mine")
    usage(gridx.results_destination, None, "job-1")
    (tmp_path / "file").write_text("x")
    usage(gridx.results_destination, "file", "job-1")


def test_status_says_missing_and_over_limit_results():
    record = {"tasks": {"t1": {"state": "missing", "error": "/work/out is not in the job's container",
                               "bytes": 0, "files": 0, "node": "w1", "folder": "1"},
                        "t2": {"state": "over-limit", "error": "over the 1.0 KiB limit: kept what fit",
                               "bytes": 900, "files": 2, "node": "w2", "folder": "2"}}}
    line = gridx.results_summary(record)
    assert "replica 1: missing: /work/out is not in the job's container" in line
    assert "replica 2: over-limit" in line and "900 B in 2 file(s)" in line
    assert "none yet" in gridx.results_summary({"tasks": {}})


# -- results to the submitter -------------------------------------------------------------


def test_the_hubs_gridx_is_asked_in_one_quoted_word_after_the_host():
    argv = gridx.hub_gridx_argv("ssh://root@10.0.0.1", ["jobs", "results", "--tar", "--", "job-1"])
    assert argv[-3:] == ["--", "root@10.0.0.1", "gridx jobs results --tar -- job-1"]


def test_a_users_waited_job_gets_its_id_here_so_its_results_can_follow(tmp_path, monkeypatch):
    """--manager gridx@HUB: the ID is chosen on the user's side and sent as
    --name; the folder goes after the hello; the results come back by a
    second call (jobs results --tar), into ./JOB."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "in.txt").write_text("input")
    sent, argvs = [], []

    class Ssh:
        def __init__(self, argv, stdin=None, stdout=None, **kw):
            argvs.append(argv)
            self.stdin = io.BytesIO()
            self.stdin.close = lambda: None
            out = io.BytesIO()
            if stdout is not None:  # the second call: the results as a tar
                with tarfile.open(fileobj=out, mode="w") as archive:
                    info = tarfile.TarInfo("model.txt")
                    info.size = 2
                    archive.addfile(info, io.BytesIO(b"42"))
                out.seek(0)
            self.stdout = out

        def wait(self, timeout=None):
            sent.append(self.stdin.getvalue())
            return 0

    monkeypatch.setattr(gridx, "start", lambda argv, **kw: Ssh(argv, **kw))
    monkeypatch.setattr(gridx, "check_manager_reachable", lambda host: None)
    monkeypatch.setattr(gridx, "need", lambda *tools: None)
    monkeypatch.setattr(gridx, "ssh_control_dir", lambda: None)
    argv = ["jobs", "run", "--workdir", "w", "--wait", "python:3.11", "cat in.txt", "--manager", "gridx@10.0.0.1"]
    assert run_main(argv) == 0
    words = argvs[0][-1].split()
    job = next(w for w in words if w.startswith("--name=")).split("=", 1)[1]
    assert words[:3] == ["jobs", "run", f"--name={job}"]
    assert sent[0].startswith(gridx.SESSION_HELLO + gridx.UPLOAD_MAGIC)
    assert argvs[1][-1] == f"gridx jobs results --tar -- {job}"
    assert (tmp_path / job / "model.txt").read_text() == "42"


def test_a_job_with_output_runs_only_where_the_hubs_ssh_reaches(monkeypatch):
    declined = dict(NODE, Description=dict(NODE["Description"], Engine={"Labels": {gridx.LABEL_HUB_SSH: "no"}}))
    reachable = dict(NODE, ID="n2", Status={"State": "ready", "Addr": "10.0.0.5"},
                     Description=dict(NODE["Description"], Hostname="worker4"))
    nodes = [gridx.Node.from_docker(declined), gridx.Node.from_docker(reachable)]
    monkeypatch.setattr(gridx, "swarm_nodes", lambda: nodes)
    assert [n.hostname for n in gridx.placeable_nodes(None)] == ["worker3", "worker4"]
    assert [n.hostname for n in gridx.placeable_nodes(("/work/out", 10))] == ["worker4"]
    monkeypatch.setattr(gridx, "swarm_nodes", lambda: nodes[:1])
    with pytest.raises(gridx.GridxError) as error:
        gridx.placeable_nodes(("/work/out", 10))
    assert error.value.code == 3 and "--no-hub-ssh" in error.value.message


def test_an_output_that_is_one_file_comes_as_itself(tmp_path):
    stream = tar_of(("model.pt", tarfile.REGTYPE, b"w" * 10))  # docker cp of a file: its name alone
    assert gridx.safe_extract(stream, str(tmp_path), 100, strip=1) == (10, 1, False, 0)
    assert (tmp_path / "model.pt").read_bytes() == b"w" * 10


def test_an_unreachable_workers_output_is_tried_a_bounded_number_of_times():
    task = gridx.Task(id="t1", name="job.1", node_id="n1", node="w1", state="failed", desired="shutdown")
    record = {"tasks": {"t1": {"state": "unreachable", "attempts": 1}}}
    assert gridx.uncollected(record, [task]) == [task]
    record["tasks"]["t1"]["attempts"] = gridx.RESULTS_ATTEMPTS
    assert gridx.uncollected(record, [task]) == []
    record["tasks"]["t1"] = {"state": "collected", "attempts": 1}
    assert gridx.uncollected(record, [task]) == []


def test_remove_user_stop_jobs_deletes_through_the_same_delete(tmp_path, monkeypatch):
    """remove-user --stop-jobs calls cmd_jobs_delete with its own arguments
    (it once lacked --keep-results' and failed with a traceback)."""
    tools = fake_hub(tmp_path, monkeypatch)
    assert run_main(["hub", "add-user", "u1"]) == 0
    owned = dict(JOB_SERVICE, Spec=dict(JOB_SERVICE["Spec"], Labels=dict(JOB_SERVICE["Spec"]["Labels"],
                                                                         **{gridx.LABEL_OWNER: "u1"})))
    monkeypatch.setattr(gridx, "list_job_services", lambda ids=None, missing_ok=False: [owned])
    tools.calls.clear()
    assert run_main(["hub", "remove-user", "u1", "--stop-jobs"]) == 0
    assert any(call[1:3] == ["service", "rm"] for call in tools.calls), tools.calls


def test_a_dockerignore_with_a_byte_order_mark_keeps_its_first_pattern(tmp_path):
    """Windows editors save a BOM; Docker trims it, and so does gridx (issue 19)."""
    (tmp_path / ".env").write_text("SECRET=1\n")
    (tmp_path / "run.py").write_text("print(1)\n")
    (tmp_path / ".dockerignore").write_bytes(b"\xef\xbb\xbf.env\n")
    folder = gridx.WorkFolder(str(tmp_path), 10**6)
    assert ".env" not in folder.entries and "run.py" in folder.entries


def test_a_deeply_nested_upload_header_is_exit_2_not_a_traceback():
    stream = io.BytesIO(gridx.SESSION_HELLO + gridx.UPLOAD_MAGIC + b"[" * 4000 + b"\n0\n")
    with pytest.raises(gridx.GridxError) as error:
        gridx.read_upload(stream, 10**6)
    assert error.value.code == 2 and "damaged header" in error.value.message


# -- results belong to the job that made them (issue 19) ------------------------------------


def kept_on_the_hub(tmp_path, tools, name="job-out", owner="alice", service="s-old"):
    """A deleted job's kept results: the marker in the swarm, the files on the hub."""
    tools.kept[gridx.kept_marker(name)] = {gridx.LABEL_KEPT: name, gridx.LABEL_OWNER: owner,
                                          gridx.LABEL_SERVICE: service}
    results = tmp_path / "results"
    (results / service).mkdir(parents=True)
    (results / service / "model.pt").write_text("alice's model\n")
    (results / f"{service}.json").write_text(json.dumps({
        "job": name, "service": service, "owner": owner, "output": "/work/out",
        "tasks": {"t0": {"state": "collected", "bytes": 14, "files": 1, "folder": ""}}}))


def test_a_name_whose_results_are_kept_is_refused_until_they_are_deleted(tmp_path, monkeypatch, capsys):
    tools = fake_hub(tmp_path, monkeypatch)
    kept_on_the_hub(tmp_path, tools)
    assert run_main(["jobs", "run", "--name", "job-out", "python:3.11", "true"]) == 2
    assert "are kept on the hub" in capsys.readouterr().err
    assert not [c for c in tools.calls if "create" in c]


def test_kept_results_go_to_their_owner_only(tmp_path, monkeypatch):
    tools = fake_hub(tmp_path, monkeypatch)
    kept_on_the_hub(tmp_path, tools)
    monkeypatch.setattr(gridx, "list_job_services", lambda ids=None, missing_ok=False: [])
    monkeypatch.setattr(gridx, "OWNER", "bob")
    with pytest.raises(gridx.GridxError) as error:
        gridx.job_or_results("job-out")
    assert error.value.code == 2 and "alice's" in error.value.message
    monkeypatch.setattr(gridx, "OWNER", "alice")
    service, _, record, key = gridx.job_or_results("job-out")
    assert (service, key, record["owner"]) == (None, "s-old", "alice")


def test_a_new_job_of_the_same_name_never_sees_old_results(tmp_path, monkeypatch):
    """Results are filed under the service ID: a live job-out (service s2)
    finds its own record, never the one of s-old."""
    tools = fake_hub(tmp_path, monkeypatch)
    kept_on_the_hub(tmp_path, tools, owner="root")
    monkeypatch.setattr(gridx, "collect_results", lambda service, tasks, nodes=None: gridx.load_results_record(
        service["ID"]) or {"job": "job-out", "service": service["ID"], "owner": "root", "tasks": {}})
    service, _, record, key = gridx.job_or_results("job-out")
    assert key == "s2" and service["ID"] == "s2" and record["tasks"] == {}
    assert gridx.results_files_path(key) == str(tmp_path / "results" / "s2")


def test_delete_keep_results_leaves_a_marker_delete_without_removes_by_service_id(tmp_path, monkeypatch):
    tools = fake_hub(tmp_path, monkeypatch)
    (tmp_path / "results" / "s2").mkdir(parents=True)
    (tmp_path / "results" / "s2.json").write_text('{"tasks": {}}')
    monkeypatch.setattr(gridx, "output_containers", lambda services, tasks, keep=False: {})
    assert run_main(["jobs", "delete", "--keep-results", "job-out"]) == 0
    create = next(c for c in tools.calls if c[1:3] == ["config", "create"])
    assert "--label=gridx.service=s2" in create and create[-2:] == ["gridx-kept-job-out", "-"]
    assert (tmp_path / "results" / "s2").exists()
    assert run_main(["jobs", "delete", "job-out"]) == 0
    assert not (tmp_path / "results" / "s2").exists() and not (tmp_path / "results" / "s2.json").exists()


# -- what a member's jobs put on the hub is bounded by the admin (issue 19) ---------------------


def as_member(monkeypatch, **limits):
    monkeypatch.setattr(gridx, "OWNER", "alice")
    monkeypatch.setattr(gridx, "SERVE_LIMITS", limits)


def test_a_members_flag_lowers_a_limit_never_raises_it(monkeypatch):
    as_member(monkeypatch, workdir_mib=1024, output_mib=None)
    assert gridx.capped_size(None, "--workdir-limit", "workdir_mib", "2G") == 1024**3
    assert gridx.capped_size("512M", "--workdir-limit", "workdir_mib", "2G") == 512 * 1024**2
    with pytest.raises(gridx.GridxError) as error:
        gridx.capped_size("2G", "--workdir-limit", "workdir_mib", "2G")
    assert error.value.code == 2 and "over your limit on this hub, 1G" in error.value.message
    assert gridx.capped_size("50G", "--output-limit", "output_mib", "2G") == 50 * 1024**3  # admin said none
    as_member(monkeypatch)  # an older users.json: the built-in limits
    assert gridx.capped_size(None, "--output-limit", "output_mib", "2G") == 2 * 1024**3
    monkeypatch.setattr(gridx, "OWNER", None)  # the admin: the flag, else the default
    assert gridx.capped_size("50G", "--workdir-limit", "workdir_mib", "2G") == 50 * 1024**3


def test_serve_refuses_a_workdir_limit_over_the_members_before_reading_the_upload(serve_env, monkeypatch):
    users = json.loads(open(os.path.join(os.environ["GRIDX_USERS_HOME"], "users.json")).read())
    users["users"]["alice"]["workdir_mib"] = 100
    open(os.path.join(os.environ["GRIDX_USERS_HOME"], "users.json"), "w").write(json.dumps(users))
    read = []
    monkeypatch.setattr(gridx, "read_upload", lambda stream, limit: read.append(limit))
    assert serve(monkeypatch, "jobs run --workdir . --workdir-limit 1G python:3.11 true") == 2
    assert read == [] and serve_env == []


def test_collection_takes_the_owners_limits_and_the_label(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_USERS_HOME", str(tmp_path))
    (tmp_path / "users.json").write_text(json.dumps({
        "users": {"alice": {"output_mib": 10, "output_files": 50}}, "hub": {"free_mib": 300}}))
    service = {"ID": "s9", "Spec": {"Name": "j", "Labels": {gridx.LABEL_OUTPUT: "/work/out",
                                                           gridx.LABEL_OUTPUT_LIMIT: str(2 * 1024**3),
                                                           gridx.LABEL_OWNER: "alice"}}}
    assert gridx.collection_limits(service) == (10 * 1024**2, 50, 300 * 1024**2)
    service["Spec"]["Labels"][gridx.LABEL_OWNER] = "root"  # the admin's job: its own --output-limit
    assert gridx.collection_limits(service) == (2 * 1024**3, None, 300 * 1024**2)


def test_the_hubs_unpacking_stops_at_the_file_limit(tmp_path):
    stream = tar_of(*[(f"out/f{i}", tarfile.REGTYPE, b"") for i in range(100)])
    written, files, over, _ = gridx.safe_extract(stream, str(tmp_path), 10**6, strip=1, max_files=10)
    assert (files, over) == (10, True) and len(os.listdir(tmp_path)) == 10


def task_row(task_id="t1", node="w1"):
    return gridx.Task(id=task_id, name="j.1", service="j", node_id="id-" + node, node=node, state="complete",
                      since="1 second ago", desired="complete", container="c" + task_id)


def test_a_silent_worker_is_given_up_on_at_the_deadline(tmp_path, monkeypatch):
    """copy_out kills the copy past RESULTS_COPY_TIMEOUT_S: a worker that
    never answers holds up nothing for long (and no lock is held meanwhile)."""
    monkeypatch.setattr(gridx, "RESULTS_COPY_TIMEOUT_S", 1)
    monkeypatch.setattr(gridx, "ssh_argv", lambda address, command=(), tty=False: ["sleep", "60"])
    monkeypatch.setattr(gridx, "load_hub_config", lambda required=True: make_config())
    node = gridx.Node.__new__(gridx.Node)
    node.address, node.hostname = "10.0.0.9", "w9"
    started = time.monotonic()
    got = gridx.copy_out(node, "c1", "/work/out", str(tmp_path), (10**6, None))
    assert time.monotonic() - started < 10
    assert got["state"] == "unreachable" and "took over 1 s" in got["error"]


def test_a_task_claimed_by_a_live_collector_is_not_copied_twice(monkeypatch):
    other = os.getppid()  # alive: pytest's parent
    record = {"tasks": {}, "collecting": {"t1": {"pid": other, "until": time.time() + 60},
                                           "t2": {"pid": 999999999, "until": time.time() + 60}}}
    tasks = [task_row("t1"), task_row("t2"), task_row("t3")]
    monkeypatch.setattr(gridx, "ended_tasks", lambda tasks: tasks)
    mine = gridx.claim_due(record, tasks)
    assert [t.id for t in mine] == ["t2", "t3"]  # t2's collector is gone: taken over
    assert set(record["collecting"]) == {"t1", "t2", "t3"} and record["collecting"]["t3"]["pid"] == os.getpid()


def test_a_full_hub_stops_collection_without_using_up_the_attempts(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDX_RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(gridx, "hub_room", lambda floor, folder=None: -1)
    service = {"ID": "s1", "Spec": {"Name": "j", "Labels": {gridx.LABEL_OUTPUT: "/work/out"}}}
    node = gridx.Node.__new__(gridx.Node)
    node.id, node.hostname, node.address = "id-w1", "w1", "10.0.0.2"
    copied = gridx.copy_tasks(service, [task_row()], [node])
    collected, fresh = copied["t1"]
    assert collected["state"] == "hub-full" and "of its disk free" in collected["error"]
    record = {"tasks": {}}
    gridx.file_results(record, "s1", task_row(), False, collected, fresh)
    assert record["tasks"]["t1"]["attempts"] == 0 and gridx.uncollected(record, [task_row()])


def test_keeping_results_past_the_members_limit_is_exit_2_before_anything(tmp_path, monkeypatch, capsys):
    tools = fake_hub(tmp_path, monkeypatch)
    answer = tools.answer_docker
    monkeypatch.setattr(tools, "answer_docker", lambda rest: "alice\nbob\nalice" if rest[:2] == ["config", "ls"]
                        else answer(rest))
    service = json.loads(json.dumps(JOB_SERVICE))
    service["Spec"]["Labels"].update({gridx.LABEL_OWNER: "alice", gridx.LABEL_OUTPUT: "/work/out"})
    monkeypatch.setattr(gridx, "list_job_services", lambda ids=None, missing_ok=False: [service])
    as_member(monkeypatch, kept=2)
    assert run_main(["jobs", "delete", "--keep-results", "job-1"]) == 2
    assert "keeps the results of 2 deleted job(s)" in capsys.readouterr().err
    assert not [c for c in tools.calls if c[1:3] in (["service", "rm"], ["service", "update"], ["config", "create"])]


def test_watch_collects_in_a_thread_of_its_own_one_at_a_time(monkeypatch):
    import threading

    release, calls = threading.Event(), []
    monkeypatch.setattr(gridx, "collect_due_results", lambda s, t, n: calls.append(1) or release.wait(10) and [])
    collector = gridx.Background(gridx.collect_and_say)
    assert collector.start([], [], []) is True
    assert collector.start([], [], []) is False  # still copying: the pass goes on without it
    release.set()
    collector.join()
    assert collector.start([], [], []) is True and calls == [1, 1]
    collector.join()


@pytest.mark.parametrize("answer", [
    "Error: No such config: gridx-kept-job-1\n",  # Docker 20.10
    "Error response from daemon: config gridx-kept-job-1 not found\n",  # Docker 28.5
])
def test_no_kept_results_whatever_docker_says_the_marker_is_missing(answer, monkeypatch):
    import subprocess

    monkeypatch.setattr(gridx, "run", lambda argv, **kw: subprocess.CompletedProcess(argv, 1, "", answer))
    assert gridx.kept_results("job-1") is None


def test_another_failure_to_read_the_kept_marker_is_not_taken_for_none(monkeypatch):
    import subprocess

    answer = "Error response from daemon: config gridx-kept-job-2 not found\n"  # another job's marker
    monkeypatch.setattr(gridx, "run", lambda argv, **kw: subprocess.CompletedProcess(argv, 1, "", answer))
    with pytest.raises(gridx.GridxError):
        gridx.kept_results("job-1")
