"""A run or sweep folder's name, the record that lets --overwrite replace it, and its lock.

Real folders, the real moto S3 server, the real CLIs' `main` (exit code 2 and one
`error:` line for bad input). Two real sweeps of one name are in
tests/cluster/test_run_folder.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY_SWEEP, one_error_line

from raygpt import results, run_folder
from raygpt.errors import UserError
from raygpt.storage import resolve
from raygpt.sweep import cli as sweep_cli
from raygpt.train import cli as train_cli

TINY_RUN = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
    "--batch-size", "4", "--max-steps", "4", "--eval-interval", "2", "--eval-iters", "1",
    "--warmup-steps", "1", "--log-interval", "2", "--compile", "false", "--in-process", "true",
]  # fmt: skip


LONG = "n" * 300


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def neighbourhood(tmp_path) -> tuple[Path, Path, dict[str, str]]:
    """A storage root holding a file, and a folder `x` beside it holding another."""
    root, beside = tmp_path / "root", tmp_path / "x"
    root.mkdir()
    beside.mkdir()
    (root / "keep.txt").write_text("in the root")
    (beside / "notes.txt").write_text("beside the root")
    return root, beside, _tree(tmp_path)


@pytest.mark.parametrize(
    "name, problem",
    [
        ("", "is empty"),
        ("/", "path separator"),
        ("../x", "path separator"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        (".", "starts with '.'"),
        ("..", "starts with '.'"),
        (".hidden", "starts with '.'"),
        ("tab\there", "control character"),
        ("new\nline", "control character"),
        (LONG, "300 characters long"),
        ("é" * 101, "202 bytes long in UTF-8"),
    ],
)
def test_a_name_that_is_not_one_plain_folder_is_one_line(name, problem):
    with pytest.raises(UserError) as err:
        run_folder.check_name(name, "sweep name")
    text = str(err.value)
    assert text.startswith("sweep name ") and problem in text and "plain folder name" in text
    assert "\n" not in text and len(text) < 300


@pytest.mark.parametrize("name", ["run-1", "adamw_lr3e-3", "x.y", "a b", "n" * 200, "日本"])
def test_plain_names_pass(name):
    assert run_folder.check_name(name) == name


@pytest.mark.parametrize("name", ["../x", "/", LONG])
@pytest.mark.parametrize("cli", ["sweep", "train"])
def test_cli_refuses_a_name_outside_the_root(cli, name, neighbourhood, capsys):
    root, _, before = neighbourhood
    main = sweep_cli.main if cli == "sweep" else train_cli.main
    args = ["--storage-path", str(root), "--name", name, "--overwrite"]
    assert main([*(TINY_SWEEP if cli == "sweep" else TINY_RUN), *args]) == 2
    err = one_error_line(capsys)
    assert f"{cli if cli == 'sweep' else 'run'} name " in err and "plain folder name" in err
    assert _tree(root.parent) == before


def test_a_sweep_name_from_the_toml_is_checked(neighbourhood, tmp_path, capsys):
    root, _, before = neighbourhood
    toml = tmp_path / "exp.toml"
    toml.write_text('[sweep]\nname = "../x"\noverwrite = true\n')
    before[str(toml.relative_to(tmp_path))] = toml.read_text()
    assert sweep_cli.main([str(toml), *TINY_SWEEP, "--storage-path", str(root)]) == 2
    assert "sweep name '../x' contains a path separator" in one_error_line(capsys)
    assert _tree(tmp_path) == before


def test_export_and_data_prepare_refuse_a_name_that_is_not_plain(tmp_path, capsys):
    from raygpt import export
    from raygpt.data import cli as data_cli

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.txt").write_text("mine")
    before = _tree(tmp_path)
    target = tmp_path / "a" / ".."
    args = ["--checkpoint", "nothing", "--hf", str(target), "--overwrite"]
    assert export.main(args) == 2
    assert "folder name '..' starts with '.'" in one_error_line(capsys)
    text = tmp_path / "in.txt"
    text.write_text("hello\n")
    assert data_cli.main(["prepare", "--input", str(text), "--name", "../x"]) == 2
    assert "dataset name '../x'" in one_error_line(capsys)
    assert data_cli.main(["prepare", "--input", str(text), "--out", "/"]) == 2
    assert "--out /: folder name '/'" in one_error_line(capsys)
    assert _tree(tmp_path) == {**before, "in.txt": "hello\n"}


def _record(kind: str) -> dict:
    keys = ("config", "environment") if kind == "run" else ("sweep", "config")
    return {k: {} for k in keys}


def test_overwrite_replaces_only_a_folder_with_its_own_record(tmp_path):
    store = resolve(str(tmp_path))
    for name, record, kind, allowed in [
        ("a-run", results.RUN_FILE, "run", True),
        ("a-sweep", results.SWEEP_FILE, "sweep", True),
        ("sweep-as-run", results.SWEEP_FILE, "run", False),
        ("run-as-sweep", results.RUN_FILE, "sweep", False),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "part.txt").write_text("x")
        source_kind = "run" if record == results.RUN_FILE else "sweep"
        (folder / record).write_text(json.dumps(_record(source_kind)))
        if allowed:
            run_folder.prepare_run_dir(store, str(folder), False, True, kind)
            assert not folder.exists()
        else:
            with pytest.raises(UserError, match=f"holds a raygpt {source_kind}, not a {kind}"):
                run_folder.prepare_run_dir(store, str(folder), False, True, kind)
            assert (folder / "part.txt").exists()
    # A run.json that is not raygpt's record is no licence either; resume is refused too.
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / results.RUN_FILE).write_text('{"something": "else"}')
    for resume, overwrite in [(False, True), (True, False)]:
        with pytest.raises(UserError, match="files raygpt did not write"):
            run_folder.prepare_run_dir(store, str(odd), resume, overwrite, "run")
    assert (odd / results.RUN_FILE).exists()


@pytest.mark.parametrize("cli", ["sweep", "train"])
def test_overwrite_refuses_a_folder_raygpt_did_not_write(cli, data_dir, storage, capsys):
    docs = storage / "Documents"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    (docs / "sub").mkdir()
    (docs / "sub" / "run.json").write_text("{}")  # a record one level down proves nothing
    before = _tree(storage)
    main = sweep_cli.main if cli == "sweep" else train_cli.main
    args = ["--storage-path", str(storage), "--name", "Documents", "--overwrite"]
    assert main([*(TINY_SWEEP if cli == "sweep" else TINY_RUN), *args]) == 2
    err = one_error_line(capsys)
    assert "Documents holds files raygpt did not write" in err and "--name" in err
    assert _tree(storage) == before
    assert not (storage / run_folder.LOCKS_DIR).exists()  # the lock is released too


@pytest.fixture(params=["local", "s3"])
def lock_store(request, tmp_path, monkeypatch):
    monkeypatch.setenv(run_folder.SETTLE_ENV, "0.2")
    if request.param == "local":
        return resolve(str(tmp_path / "results"))
    return resolve(request.getfixturevalue("s3_storage"))


def _lease(store, name="exp") -> dict | None:
    try:
        return json.loads(store.read_bytes(store.path(run_folder.LOCKS_DIR, f"{name}.json")))
    except FileNotFoundError:
        return None


def test_lock_refuses_a_second_writer_naming_the_holder(lock_store):
    with run_folder.lock(lock_store, "exp", "sweep") as first:
        held = _lease(lock_store)
        assert held["token"] == first.token and held["pid"] == os.getpid()
        assert held["host"] == socket.gethostname() and held["started_at"] <= time.time()
        started = time.perf_counter()
        with pytest.raises(UserError) as err, run_folder.lock(lock_store, "exp", "sweep"):
            pass
        assert time.perf_counter() - started < 5
        assert lock_store.exists(lock_store.root)
        text = str(err.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in text
        assert "sweep 'exp'" in text and "wait for it to finish" in text and "\n" not in text
        assert _lease(lock_store)["token"] == first.token  # the refused one changed nothing
        with run_folder.lock(lock_store, "other", "run"):  # another name: its own lock
            pass
    assert _lease(lock_store) is None
    with run_folder.lock(lock_store, "exp", "run"):  # released: free again
        pass
    # The lease brought the (fresh) storage root into being; it leaves nothing behind.
    assert not lock_store.exists(lock_store.root)


def test_lock_is_released_on_error_and_interrupt(lock_store):
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), run_folder.lock(lock_store, "exp"):
            assert _lease(lock_store) is not None
            raise exc
        assert _lease(lock_store) is None


def test_a_stale_lease_is_taken_over_and_a_live_one_keeps_beating(lock_store, monkeypatch, capsys):
    monkeypatch.setenv(run_folder.STALE_ENV, "1.0")
    path = lock_store.path(run_folder.LOCKS_DIR, "exp.json")
    old = time.time() - 30
    record = {"host": "elsewhere", "pid": 4242, "token": "t" * 32}
    lock_store.write_bytes(
        path, json.dumps(record | {"started_at": old, "heartbeat_at": old}).encode()
    )
    with run_folder.lock(lock_store, "exp") as mine:
        out = capsys.readouterr().out
        assert "took over the lock on run 'exp' from host elsewhere, pid 4242" in out
        assert "no heartbeat for 30 s" in out
        first_beat = _lease(lock_store)["heartbeat_at"]
        time.sleep(1.3)  # > the stale timeout: only the heartbeats (every 1/3 s) keep it
        assert _lease(lock_store)["heartbeat_at"] > first_beat
        with pytest.raises(UserError, match="in use by host"), run_folder.lock(lock_store, "exp"):
            pass
        assert _lease(lock_store)["token"] == mine.token
    assert _lease(lock_store) is None


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(lock_store, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    now = time.time()
    record = {"host": socket.gethostname(), "pid": gone.pid, "token": "d" * 32}
    path = lock_store.path(run_folder.LOCKS_DIR, "exp.json")
    lock_store.write_bytes(
        path, json.dumps(record | {"started_at": now, "heartbeat_at": now}).encode()
    )
    with run_folder.lock(lock_store, "exp"):
        assert f"process {gone.pid} on this host is no longer running" in capsys.readouterr().out


def test_writers_racing_for_a_new_lock_leave_exactly_one_holder(lock_store):
    barrier = threading.Barrier(4)
    won: list[run_folder.Lease] = []
    refused: list[str] = []

    def contend() -> None:
        lease = run_folder.Lease(lock_store, "race", "sweep")
        barrier.wait()
        try:
            won.append(lease.acquire())
        except UserError as err:
            refused.append(str(err))

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(won) == 1 and len(refused) == 3, (won, refused)
    assert _lease(lock_store, "race")["token"] == won[0].token
    won[0].release()
    assert _lease(lock_store, "race") is None
