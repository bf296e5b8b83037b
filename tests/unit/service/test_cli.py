"""`python -m raygpt.service` and `python -m raygpt.sweep --service` on SQLite and on a
real PostgreSQL server: add-user prints a token once and the database keeps only its
hash; bad input is one line and exit 2; and the client, against the real app served by
Uvicorn on 127.0.0.1 over real HTTP, turns every refusal into the service's one line,
sends a sweep with its files, follows it to its end, and never shows a token. No Ray:
the runner has fixed cluster totals and starts no job (the Ray path is
tests/cluster/test_service.py's)."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import pytest
import sqlalchemy as sa
from service_http import FixedCluster, served_over_http

import raygpt.service
from raygpt.config.train import TrainConfig
from raygpt.errors import UserError
from raygpt.service import auth
from raygpt.service import db as schema
from raygpt.service.app import build_app
from raygpt.service.cli import main
from raygpt.service.client import Client
from raygpt.sweep import cli as sweep_cli
from raygpt.sweep import remote

EXPERIMENT = 'max_steps = 20\neval_interval = 10\n\n[sweep]\noptimizers = ["adamw"]\n'


@pytest.fixture(autouse=True)
def _no_service_in_the_environment(monkeypatch):
    monkeypatch.delenv(remote.SERVICE_ENV, raising=False)
    monkeypatch.delenv(remote.TOKEN_ENV, raising=False)


@pytest.fixture
def served(db, tmp_path):
    """The app on 127.0.0.1 through Uvicorn, in a thread: (URL, ada's token, bob's)."""
    ada, bob = auth.add_user(db, "ada"), auth.add_user(db, "bob")
    with served_over_http(build_app(db, FixedCluster(), str(tmp_path / "results"))) as url:
        yield url, ada, bob


def run(capsys, *argv: str, command=main) -> tuple[int, str, str]:
    code = command(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def every_value(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        return repr([conn.execute(sa.select(t)).all() for t in schema.metadata.sorted_tables])


def test_add_user_prints_the_token_once_and_keeps_only_its_hash(db_url, capsys):
    code, out, err = run(capsys, "add-user", "ada", "--gpu-quota", "2", "--cpu-quota", "16",
                         "--priority", "3", "--db", db_url)  # fmt: skip
    token = out.strip()
    assert code == 0 and out == f"{token}\n" and len(token) >= 43  # the token alone
    assert token not in err and err.startswith("user ada added (2 GPUs and 16 CPUs at once")
    engine = schema.connect(db_url)
    try:
        user = auth.verify(engine, token)
        assert (user.name, user.gpu_quota, user.cpu_quota, user.priority) == ("ada", 2, 16, 3)
        stored = every_value(engine)
        assert token not in stored and hashlib.sha256(token.encode()).hexdigest() in stored
        code, out, err = run(capsys, "issue-token", "ada", "--db", db_url)
        second = out.strip()
        assert code == 0 and out == f"{second}\n" and second != token and second not in err
        code, out, _ = run(capsys, "revoke", "ada", "--db", db_url)
        assert code == 0 and out.startswith("revoked 2 token(s) of ada")
        assert auth.verify(engine, token) is None and auth.verify(engine, second) is None
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "argv, said",
    [
        ([], "the following arguments are required: COMMAND; see --help"),
        (["launch"], "argument COMMAND: invalid choice: 'launch'"),
        (["add-user"], "the following arguments are required: NAME; see --help"),
        (["add-user", "ada", "--gpu-quota", "lots"], "--gpu-quota 'lots' is not a number"),
        (["add-user", "ada", "--cpu-quota", "-1"], "cpu_quota=-1.0 must be >= 0"),
        (["add-user", "../ada"], "user name '../ada'"),
        (["revoke", "nobody"], "no user 'nobody'; users: none yet"),
        (["show", "seven"], "sweep id 'seven' is not a whole number"),
        (["start", "--port", "http"], "--port 'http' is not a whole number"),
        (["list"], "no service: give --service URL or set $RAYGPT_SERVICE"),
        (["list", "--service", "ftp://x"], "--service ftp://x is not an http:// or https:// URL"),
        (["list", "--service", "http://127.0.0.1:9"], "the service needs your API token"),
        (
            ["query", "optimizer"],
            "filter 'optimizer' has no '='; give NAME=VALUE, e.g. optimizer=muon",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, said):
    if argv[:1] in (["add-user"], ["revoke"]):
        argv = [*argv, "--db", str(tmp_path / "service.db")]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ")
    assert said in err


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--token", "abc"], "error: --token goes with --service URL (or $RAYGPT_SERVICE)"),
        (["--follow"], "error: --follow goes with --service URL"),
        (["--service", "http://127.0.0.1:9"], "error: the service needs your API token"),
    ],
)
def test_the_sweep_command_s_service_flags_are_checked(capsys, argv, said):
    code, out, err = run(capsys, "--optimizers", "adamw", *argv, command=sweep_cli.main)
    assert code == 2 and out == "" and err.startswith(said) and err.count("\n") == 1
    assert "abc" not in err


def test_refusals_are_the_service_s_one_line(served, capsys, monkeypatch):
    url, ada, bob = served
    code, out, err = run(capsys, "list", "--service", url, "--token", "not-a-token")
    assert (code, out) == (2, "")
    assert err == "error: the token is unknown or revoked; ask an admin for a new one\n"
    monkeypatch.setenv(remote.TOKEN_ENV, ada)
    code, out, _ = run(capsys, "--optimizers", "adamw", "--name", "adas", "--service", url,
                       command=sweep_cli.main)  # fmt: skip
    assert code == 0
    assert (
        out == f"[service] sweep adas queued as 1 at {url}\n[service] page: {url}/sweeps/1/page\n"
    )
    code, out, err = run(capsys, "cancel", "1", "--service", url, "--token", bob)
    assert (code, out, err) == (2, "", "error: sweep 1 is ada's; only its owner cancels it\n")
    code, out, err = run(capsys, "show", "12", "--service", url)
    assert err == "error: no sweep 12; python -m raygpt.service list shows them\n"
    code, out, err = run(capsys, "--optimizers", "adamw", "--name", "adas", "--service", url,
                         command=sweep_cli.main)  # fmt: skip
    assert (code, err) == (
        2,
        "error: sweep name 'adas' is taken (sweep 1); choose another --name\n",
    )
    code, out, err = run(capsys, "cancel", "1", "--service", url)
    assert (code, out, err) == (0, "sweep 1 (adas) cancelled\n", "")
    code, out, err = run(capsys, "cancel", "1", "--service", url)
    assert err == "error: sweep 1 has ended (cancelled); nothing to cancel\n"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        closed = f"http://user:secret@127.0.0.1:{free.getsockname()[1]}"
    code, out, err = run(capsys, "list", "--service", closed)
    assert code == 2 and err.startswith(
        "error: cannot reach the service at http://user:***@127.0.0.1:"
    )
    assert "ssh -L" in err and "secret" not in err and ada not in err


def test_a_sweep_goes_to_the_service_with_its_files(served, db, tmp_path, capsys, monkeypatch):
    url, ada, _ = served
    data = tmp_path / "elsewhere" / "input.txt"
    data.parent.mkdir()
    data.write_text("to be or not to be\n" * 40)
    experiment = tmp_path / "exp.toml"
    experiment.write_text(EXPERIMENT)
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "exp.toml", "--data-file", str(data), "--name", "sent",
                         "--service", url, "--token", ada, command=sweep_cli.main)  # fmt: skip
    assert (code, err) == (0, "") and "queued as 1" in out
    with db.connect() as conn:
        row = conn.execute(sa.select(schema.sweeps)).mappings().one()
    # The experiment goes as text, the data file as a copy its flag names, and the
    # service's own flags (the token among them) stay behind.
    assert row["experiment_toml"] == EXPERIMENT
    assert row["flags"] == ["--name", "sent", "--data-file", "data_file/input.txt"]
    assert row["files"] == {"data_file/input.txt": data.read_text()}
    assert ada not in every_value(db)
    code, out, _ = run(capsys, "list", "--service", url, "--token", ada)
    assert out.splitlines()[0].split() == ["id", "name", "owner", "status", "trials", "best",
                                           "val", "GPU-h", "submitted"]  # fmt: skip
    assert out.splitlines()[1].split()[:4] == ["1", "sent", "ada", "queued"]
    code, out, _ = run(capsys, "show", "1", "--service", url, "--token", ada)
    shown = json.loads(out)
    assert (shown["name"], shown["files"]) == ("sent", ["data_file/input.txt"])
    code, out, err = run(capsys, "logs", "1", "--service", url, "--token", ada)
    assert (code, out, err) == (0, "", "sweep 1 has no log yet (queued)\n")
    code, out, _ = run(capsys, "query", "sweep=sent", "--service", url, "--token", ada)
    assert (code, out) == (0, "no trials match\n")


def test_follow_prints_why_it_waits_until_the_sweep_ends(served, db, capsys, monkeypatch):
    url, ada, _ = served
    monkeypatch.setattr(remote, "FOLLOW_S", 0.05)
    monkeypatch.setenv(remote.TOKEN_ENV, ada)

    def end_later(status: str) -> threading.Thread:
        """Once sweep f is queued and followed for a few polls, end it."""

        def end() -> None:
            queued = (schema.sweeps.c.name == "f") & (schema.sweeps.c.status == "queued")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with db.connect() as conn:
                    if conn.execute(sa.select(schema.sweeps.c.id).where(queued)).first():
                        break
                time.sleep(0.05)
            time.sleep(0.3)
            with db.begin() as conn:
                conn.execute(sa.update(schema.sweeps).where(queued).values(status=status))

        thread = threading.Thread(target=end)
        thread.start()
        return thread

    for n, (status, code) in enumerate([("failed", 1), ("succeeded", 0)]):
        with db.begin() as conn:  # the sweep before gives its name up
            conn.execute(sa.update(schema.sweeps).values(name=f"old-{n}", folder_uri=f"/old-{n}"))
        ended = end_later(status)
        got = sweep_cli.main(["--optimizers", "adamw", "--name", "f", "--service", url, "--follow"])
        ended.join()
        lines = capsys.readouterr().out.splitlines()
        assert got == code
        assert lines[-2] == "[service] sweep f is queued: waiting"  # said once, not per poll
        assert lines[-1] == f"[service] sweep f {status}"


def test_the_access_log_never_holds_a_token(served, caplog):
    url, ada, _ = served
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    opener = urllib.request.build_opener(remote._NoRedirect)
    for path, status in ((f"/?token={ada}", 303), (f"/sweeps?limit=3&token={ada}", 400)):
        with pytest.raises(urllib.error.HTTPError) as caught:
            opener.open(url + path, timeout=10)
        assert caught.value.code == status
    lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert any('"GET / HTTP/1.1" 303' in line for line in lines), lines
    assert any('"GET /sweeps?limit=3 HTTP/1.1" 400' in line for line in lines), lines
    assert ada not in caplog.text and "token" not in caplog.text


def test_the_client_reads_the_service_and_shows_no_token(served, monkeypatch):
    url, ada, bob = served
    monkeypatch.setenv(remote.SERVICE_ENV, url + "/")
    monkeypatch.setenv(remote.TOKEN_ENV, ada)
    client = Client.from_flags(None, None)  # both from the environment
    assert client.url == url and ada not in repr(client)
    assert client.sweeps() == []
    assert Client.from_flags(None, bob).sweeps(owner="bob", status="queued") == []
    with pytest.raises(UserError, match=r"^no sweep 3; "):
        client.cancel(3)
    with pytest.raises(UserError, match=r"^unknown filter 'colour'"):
        client.trials([("colour", "red")])


@pytest.fixture
def deployment(monkeypatch):
    """What start, stop and status were asked: a stand-in for raygpt.service.deployment
    (the real one runs Ray Serve; tests/cluster/test_service.py runs it)."""
    calls: list[tuple] = []
    fake = types.SimpleNamespace(
        start=lambda *args: calls.append(("start", *args)) or f"http://{args[2]}:{args[3]}",
        stop=lambda: calls.append(("stop",)),
        status=lambda: {"running": True, "url": "http://127.0.0.1:8000", "queued": 2},
    )
    monkeypatch.setitem(sys.modules, "raygpt.service.deployment", fake)
    monkeypatch.setattr(raygpt.service, "deployment", fake, raising=False)
    return calls


def test_start_stop_and_status_reach_the_deployment(deployment, capsys, monkeypatch):
    monkeypatch.setenv("RAYGPT_STORAGE_PATH", "s3://bucket/raygpt")
    code, out, err = run(capsys, "start", "--db", "/tmp/service.db")
    assert (code, err) == (0, "")  # loopback: no warning
    assert deployment == [
        ("start", "s3://bucket/raygpt", "/tmp/service.db", "127.0.0.1", 8000, False)
    ]
    assert out.splitlines()[0] == "[service] running at http://127.0.0.1:8000"
    assert "ssh -L 8000:localhost:8000" in out
    code, out, err = run(capsys, "start", "--host", "0.0.0.0", "--port", "8123", "--rebuild",
                         "--storage-path", "/data/results")  # fmt: skip
    assert code == 0 and deployment[-1] == ("start", "/data/results", None, "0.0.0.0", 8123, True)
    assert err.startswith("warning: --host 0.0.0.0 serves the service beyond this machine")
    assert err.count("\n") == 1
    assert run(capsys, "stop")[:2] == (
        0,
        "[service] stopped; running sweeps go on, and the next start takes them up\n",
    )
    assert deployment[-1] == ("stop",)
    code, out, _ = run(capsys, "status")
    assert out == "running: True\nurl: http://127.0.0.1:8000\nqueued: 2\n"


def test_a_submission_carries_the_flags_as_argparse_read_them(tmp_path, monkeypatch):
    """The experiment's path and the service's own flags (abbreviated, with '=', or bare)
    stay behind; every other flag goes with its value, a negative number included."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.toml").write_text(EXPERIMENT)
    argv = ["--serv", "http://x", "--name", "n", "-v", "exp.toml", "--token=abc", "--follow",
            "--max-steps", "-5", "--resume", "false"]  # fmt: skip
    sent = remote.submission(sweep_cli.build_parser(), argv, TrainConfig())
    assert sent == {
        "experiment_toml": EXPERIMENT,
        "flags": ["--name", "n", "-v", "--max-steps", "-5", "--resume", "false"],
        "files": {},
    }


def test_an_empty_service_runs_the_sweep_here(monkeypatch):
    monkeypatch.setenv(remote.SERVICE_ENV, "http://127.0.0.1:9/")
    monkeypatch.setenv(remote.TOKEN_ENV, "from-env")
    assert remote.service_options({"service": ""}) is None  # --service ''
    assert remote.service_options({}) == ("http://127.0.0.1:9", "from-env", False)
    assert remote.service_options({"token": "given", "follow": True})[1:] == ("given", True)
