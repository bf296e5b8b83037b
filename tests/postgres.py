"""A real PostgreSQL 15 server for the tests that need one: started once per session
from Debian's binaries on 127.0.0.1 with a password-protected role, stopped at the end,
and an empty database per test. tests/unit/service/ and tests/cluster/test_service.py use it.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system
user (runuser), in a folder of its own. Where it cannot be started (no binaries, no
such user) the tests that need it are skipped, naming why.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port

PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/local/bin")
PG_USER = "raygpt_test"


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        pw = self.password if password is None else password
        return f"postgresql://{self.user}:{pw}@{self.host}:{self.port}/{database}"


def _pg_bin(name: str) -> str | None:
    for folder in PG_BIN_DIRS:
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 for this session; skipped where none can start."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip(f"PostgreSQL's initdb/pg_ctl are not installed (looked in {PG_BIN_DIRS})")
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root and runuser is missing to run PostgreSQL as postgres")
        as_user = [runuser, "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="raygpt-pg-"))
    password = secrets.token_urlsafe(16)
    (root / "pw").write_text(password)
    if owner is not None:
        for path in (root, root / "pw"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    data, log = root / "data", root / "server.log"
    port = free_port()

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*as_user, *cmd], capture_output=True, text=True, timeout=120, cwd=root
        )

    init = run(
        initdb, "-D", str(data), "-U", PG_USER, f"--pwfile={root / 'pw'}",
        "--auth=scram-sha-256", "-E", "UTF8", "--no-sync",
    )  # fmt: skip
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {(init.stderr or init.stdout).strip().splitlines()[-1:]}")
    # Tests need no durability: fsync off keeps CREATE DATABASE and commits fast.
    options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off"
    start = run(pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
    if start.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:] if log.exists() else start.stderr
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {tail}")
    try:
        yield PostgresServer("127.0.0.1", port, PG_USER, password)
    finally:
        run(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


# Databases a finished test emptied, by server, for the next test to take. Creating a
# database copies a template (~0.2 s here); emptying one is a few milliseconds.
_SPARE: dict[PostgresServer, list[str]] = {}


@contextlib.contextmanager
def fresh_database(server: PostgresServer) -> Iterator[str]:
    """An empty database on `server` for one test; its URL. When the block ends (a
    fixture's teardown ends it, whether the test passed or failed), the database's
    connections are closed and its schema dropped and made anew, and it waits for the
    next test. An error raised inside the block leaves the database as it was, never
    handed out again; the server's folder goes at the session's end."""
    import psycopg

    admin = dict(host=server.host, port=server.port, user=server.user, password=server.password)
    spare = _SPARE.setdefault(server, [])
    if spare:
        name = spare.pop()
    else:
        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(dbname="postgres", autocommit=True, **admin) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    yield server.url(name)
    with psycopg.connect(dbname="postgres", autocommit=True, **admin) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
    with psycopg.connect(dbname=name, autocommit=True, **admin) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute(f'CREATE SCHEMA public AUTHORIZATION "{server.user}"')
    spare.append(name)
