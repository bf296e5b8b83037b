"""The service's database (raygpt/service/db.py) on SQLite and on a real PostgreSQL
server: tables created once and kept, constraints that hold on both, and a bad or
unreachable URL as one line within seconds, its password masked."""

from __future__ import annotations

import socket
import time

import pytest
import sqlalchemy as sa

import raygpt.service
from raygpt.errors import UserError
from raygpt.service import db as service_db

SECRET = "pw-Zq8-never-shown"


def _one_line_error(url: str) -> str:
    started = time.monotonic()
    with pytest.raises(UserError) as err:
        service_db.connect(url)
    assert time.monotonic() - started < 10, "a bad database URL must fail in seconds"
    line = str(err.value)
    assert "\n" not in line and SECRET not in line, line
    return line


def test_package_names_its_modules():
    for module in ("db", "index", "auth", "admission", "pages"):
        assert f"`{module}`" in raygpt.service.__doc__


def test_connect_creates_every_table_once_and_keeps_rows(db_url):
    engine = service_db.connect(db_url)
    try:
        names = set(sa.inspect(engine).get_table_names())
        assert {"users", "tokens", "sweeps", "trials"} <= names
        with engine.begin() as conn:
            conn.execute(
                sa.insert(service_db.users).values(
                    name="ada", gpu_quota=2.0, cpu_quota=16.0, priority=1, created_at=1.0
                )
            )
    finally:
        engine.dispose()
    again = service_db.connect(db_url)  # the tables exist: nothing is created or dropped
    try:
        with again.connect() as conn:
            rows = conn.execute(sa.select(service_db.users)).mappings().all()
        assert [dict(r) for r in rows] == [
            {"name": "ada", "gpu_quota": 2.0, "cpu_quota": 16.0, "priority": 1, "created_at": 1.0}
        ]
        indexes = {i["name"] for i in sa.inspect(again).get_indexes("trials")}
        assert {"ix_trials_optimizer", "ix_trials_n_params", "ix_trials_dataset"} <= indexes
    finally:
        again.dispose()


def test_constraints_hold_on_every_database(db):
    sweeps, trials = service_db.sweeps, service_db.trials
    with db.begin() as conn:
        sweep_id = conn.execute(
            sa.insert(sweeps)
            .values(name="s", status="queued", storage_path="/r", folder_uri="/r/s", flags=None)
            .returning(sweeps.c.id)
        ).scalar_one()
        conn.execute(sa.insert(trials).values(sweep_id=sweep_id, trial_id="t1", params={"a": 1}))
    with db.connect() as conn:
        row = conn.execute(sa.select(sweeps.c.flags, trials.c.params).join(trials)).one()
        # None is SQL NULL, not JSON null; JSON reads back as Python values.
        assert row.flags is None and row.params == {"a": 1}
        nulls = conn.execute(sa.select(sa.func.count()).where(sweeps.c.flags.is_(None)))
        assert nulls.scalar_one() == 1
    with pytest.raises(sa.exc.IntegrityError), db.begin() as conn:  # not a sweep status
        conn.execute(
            sa.insert(sweeps).values(name="x", status="done", storage_path="/r", folder_uri="/r/x")
        )
    with pytest.raises(sa.exc.IntegrityError), db.begin() as conn:  # one row per folder
        conn.execute(
            sa.insert(sweeps).values(
                name="s", status="running", storage_path="/r", folder_uri="/r/s"
            )
        )
    with pytest.raises(sa.exc.IntegrityError), db.begin() as conn:  # no owner of that name
        conn.execute(
            sa.insert(sweeps).values(
                name="y", status="queued", storage_path="/r", folder_uri="/r/y", owner="nobody"
            )
        )
    with db.begin() as conn:  # a sweep's trials go with it (SQLite too: foreign keys on)
        conn.execute(sa.delete(sweeps).where(sweeps.c.id == sweep_id))
    with db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(trials)).scalar_one() == 0


def test_default_is_sqlite_under_home_with_its_folder_created(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    engine = service_db.connect()
    try:
        assert engine.dialect.name == "sqlite"
        assert (tmp_path / ".raygpt" / "service.db").is_file()
    finally:
        engine.dispose()
    engine = service_db.connect(f"sqlite:///{tmp_path}/deeper/x.db")
    engine.dispose()
    assert (tmp_path / "deeper" / "x.db").is_file()


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+psycopg"])
def test_postgresql_urls_go_through_psycopg(postgres_server, scheme):
    url = postgres_server.url().replace("postgresql://", f"{scheme}://", 1)
    engine = service_db.connect(url)
    try:
        assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
        assert postgres_server.password not in repr(engine)
    finally:
        engine.dispose()


def test_an_unreachable_postgresql_is_one_line_within_seconds():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    line = _one_line_error(f"postgresql://ada:{SECRET}@127.0.0.1:{port}/service")
    assert line.startswith(f"cannot reach database postgresql://ada:***@127.0.0.1:{port}/service")
    assert "check that PostgreSQL runs there" in line


def test_a_wrong_password_or_database_is_one_line(postgres_server):
    line = _one_line_error(postgres_server.url(password=SECRET))
    assert "refused the login" in line and "password authentication failed" in line
    assert postgres_server.password not in line
    line = _one_line_error(
        postgres_server.url("no_such_db").replace(postgres_server.password, SECRET)
    )
    assert "refused the login" in line  # the password is checked before the database
    line = _one_line_error(postgres_server.url("no_such_db"))
    assert 'database "no_such_db" does not exist' in line and "createdb" in line
    assert postgres_server.password not in line


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        (f"postgresql://ada:{SECRET}@db.example:port/x", "is malformed"),
        (f"mysql://ada:{SECRET}@db.example/x", "unsupported scheme 'mysql://'"),
        (f"postgresql+asyncpg://ada:{SECRET}@db.example/x", "through psycopg 3"),
        ("   ", "the database URL is empty"),
    ],
)
def test_malformed_urls_are_one_line_with_the_password_masked(url, fragment):
    line = _one_line_error(url)
    assert fragment in line, line
    if "ada" in url:
        assert "ada:***@" in line


def test_a_folder_or_a_file_that_is_no_database_is_refused(tmp_path):
    assert "is a folder" in _one_line_error(str(tmp_path))
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is no SQLite database, just bytes " * 100)
    line = _one_line_error(str(junk))
    assert "cannot open database" in line and "not a database" in line
    assert "cannot be created" in _one_line_error(str(junk / "below.db"))
