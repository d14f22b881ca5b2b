"""Unit tests of work folders and results (gridx.py's "Work folders and
results" section): .gridxignore/.dockerignore rules, the folder read once
with its limit, the build context gridx writes (its own Dockerfile, the
files under work/ owned by root), the framed upload through serve and the
tar a user may send there, the hub's unpacking of a job's output (paths kept
inside, links left out, the limit), and what serve and DEST refuse. No root,
no Docker (the e2e tests in tests/e2e/test_results_lab.py run it for real)."""

import io
import os
import tarfile

import pytest
from fakes import JOB_SERVICE, NODE, fake_hub, run_main, serve

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
    (root / "data").mkdir()
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


# -- the build context ------------------------------------------------------------------


def test_the_build_context_is_gridx_dockerfile_and_the_folder_under_work(tmp_path):
    folder = make_folder(tmp_path)
    (folder / ".gridxignore").write_text("skip\n")
    work = gridx.WorkFolder(str(folder), 10**6)
    out = io.BytesIO()
    gridx.write_work_context(out, "python:3.11", work.members())
    out.seek(0)
    with tarfile.open(fileobj=out) as archive:
        members = {m.name: m for m in archive.getmembers()}
        dockerfile = archive.extractfile("Dockerfile").read().decode()
        assert archive.extractfile("work/data/in.bin").read() == b"x" * 1000
    assert dockerfile == "FROM python:3.11\nCOPY work/ /work/\nWORKDIR /work\n"
    assert "RUN" not in dockerfile  # nothing of the user's runs while building
    assert members["work/link.py"].issym() and members["work/link.py"].linkname == "main.py"
    assert not any(name.startswith("work/skip") for name in members)
    assert "work/pipe" not in members
    assert {(m.uid, m.gid) for m in members.values()} == {(0, 0)}


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
    for damaged in (b"", b"hello", gridx.SESSION_HELLO + gridx.UPLOAD_MAGIC + b"{}\nzz\n",
                    gridx.SESSION_HELLO + gridx.UPLOAD_MAGIC + b"[1]\n0\n",
                    gridx.SESSION_HELLO + gridx.UPLOAD_MAGIC + b"{}\n10\nabc"):
        usage(gridx.read_upload, io.BytesIO(damaged), 10**6)


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
