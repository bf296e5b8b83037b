"""The service's database: its four tables, `connect(url)`, which opens it, and the
filters a query of its trials may use.

One database holds the team's users and their tokens, every sweep submitted or found in
storage, and every trial of those sweeps. It is SQLite in one file on the head node by
default (`~/.raygpt/service.db`), or a PostgreSQL server for a team that wants one
outside the cluster (`postgresql://USER:PASSWORD@HOST:PORT/DATABASE`, through psycopg 3).
SQLAlchemy Core keeps the two the same to the code above: the tables below, and rows as
plain mappings.

What `connect` promises: the database answers and holds every table (created where
missing, so a second connect changes nothing), or a one-line UserError within seconds
that names the URL with its password masked and says what to do. The URL, with its
password, lives only in the engine that connects; nothing here prints or stores it.

`parse_filters` turns a query string (`optimizer=muon&n_params=1e8:2e8`) into conditions
on the trials: equality for text, inclusive `LO:HI` ranges for numbers (either side may
be empty), a bad key or value a one-line UserError that lists the keys.

Times are Unix seconds (floats), as in trials.parquet's timeline. JSON columns are JSONB
on PostgreSQL, text on SQLite; either way a Python None is SQL NULL.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from raygpt.errors import UserError, first_line
from raygpt.redact import redact
from raygpt.run_folder import NAME_MAX

DEFAULT_PATH = "~/.raygpt/service.db"
ACCEPTED = (
    "a file path (SQLite, e.g. ~/.raygpt/service.db), sqlite:///PATH, or "
    "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
)
CONNECT_TIMEOUT_S = 5  # PostgreSQL: a host that never answers fails in seconds
SQLITE_BUSY_S = 30.0  # SQLite: how long a writer waits for another's lock
PSYCOPG = "postgresql+psycopg"

# A sweep's status, as the service sees it (a trial's own statuses are raygpt.status's).
QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
SWEEP_STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
ENDED = (SUCCEEDED, FAILED, CANCELLED)

# Constraint and index names fixed here, so they are the same on every database.
metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)
JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
NAME = sa.String(NAME_MAX)  # a user's or sweep's name: run_folder's name rule

users = sa.Table(
    "users",
    metadata,
    sa.Column("name", NAME, primary_key=True),
    sa.Column("gpu_quota", sa.Double, nullable=False),  # GPUs held at once (fractions count)
    sa.Column("cpu_quota", sa.Double, nullable=False),  # CPUs held at once
    sa.Column("priority", sa.Integer, nullable=False),  # higher goes first in the queue
    sa.Column("created_at", sa.Double, nullable=False),
)

# Only a token's sha256 is kept: the database, its backups and its logs hold nothing that
# signs in. "user" is a reserved word in PostgreSQL, so the column is user_name.
tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "user_name",
        NAME,
        sa.ForeignKey("users.name", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("revoked_at", sa.Double),
)

# One row per sweep folder (folder_uri). The service owns owner, queued_reason,
# submitted_at, experiment_toml, flags, files and ray_job_id; index.ingest fills the rest from
# the folder (sweep.json and trials.parquet), so a rebuild from storage gives them back.
sweeps = sa.Table(
    "sweeps",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", NAME, nullable=False, index=True),
    sa.Column("owner", NAME, sa.ForeignKey("users.name"), index=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("queued_reason", sa.Text),  # why it still waits (the admission's one line)
    sa.Column("submitted_at", sa.Double),
    sa.Column("started_at", sa.Double),
    sa.Column("ended_at", sa.Double),
    sa.Column("storage_path", sa.Text, nullable=False),  # the --storage-path it ran under
    sa.Column("folder_uri", sa.Text, unique=True),  # <storage>/<name>, as index.folder_uri says
    sa.Column("experiment_toml", sa.Text),  # the experiment file as submitted
    sa.Column("flags", JSON),  # the command-line flags as submitted, a list of strings
    # The files the flags name, as submitted ({relative path: text}); the job runs in a
    # folder that holds them, so the flags' relative paths find them there.
    sa.Column("files", JSON),
    sa.Column("workers_per_trial", sa.Integer),  # each trial's demand, and how many at once
    sa.Column("cpus_per_worker", sa.Double),
    sa.Column("gpus_per_worker", sa.Double),
    sa.Column("max_concurrent_trials", sa.Integer),
    sa.Column("ray_job_id", sa.String(128)),
    sa.Column("settings", JSON),  # sweep.json's sweep settings
    sa.Column("config", JSON),  # its base training config, every resume's changes applied
    sa.Column("n_trials", sa.Integer),
    sa.Column("best_val_loss", sa.Double),
    sa.Column("best_config", JSON),  # the best trial: its id and params
    sa.Column("gpu_hours", sa.Double),
    sa.Column("steps_trained", sa.BigInteger),
    sa.Column("steps_planned", sa.BigInteger),  # as the sweep's live view counts them
    sa.CheckConstraint(sa.column("status").in_(SWEEP_STATUSES), name="status"),
)

# One row per trial of an indexed sweep: the columns people filter on, and the rest of a
# trial's searched hyperparameters in `params` (its full config is its sweep's config
# with these applied). Values as trials.parquet has them; val_loss is its final_val_loss.
trials = sa.Table(
    "trials",
    metadata,
    sa.Column(
        "sweep_id", sa.Integer, sa.ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("trial_id", sa.String(128), primary_key=True),
    sa.Column("optimizer", sa.String(64), index=True),
    sa.Column("learning_rate", sa.Double, index=True),
    sa.Column("params", JSON),
    sa.Column("status", sa.String(32), index=True),  # raygpt.status: completed, error, ...
    sa.Column("error", sa.Text),
    sa.Column("val_loss", sa.Double),
    sa.Column("best_val_loss", sa.Double, index=True),
    sa.Column("steps", sa.BigInteger),
    sa.Column("tokens", sa.BigInteger),
    sa.Column("flops", sa.Double),
    sa.Column("device_seconds", sa.Double),
    sa.Column("gpu_hours", sa.Double),
    sa.Column("wall_seconds", sa.Double),
    sa.Column("n_params", sa.BigInteger, index=True),
    sa.Column("n_layer", sa.Integer),
    sa.Column("n_embd", sa.Integer),
    sa.Column("parametrization", sa.String(32)),
    sa.Column("dataset", sa.Text, index=True),
    sa.Column("seed", sa.BigInteger),
    sa.Column("phase", sa.String(32)),  # search, or confirm (--confirm-top reruns)
    sa.Column("config_key", sa.Text),  # the configuration across its seeds
    sa.Column("started_at", sa.Double),
    sa.Column("ended_at", sa.Double),  # torn down
)


def connect(url: str | None = None) -> sa.Engine:
    """An engine on the database at `url` (default: SQLite at DEFAULT_PATH), every table
    created where missing. A one-line UserError, password masked, when it cannot be used.

    `url`: a file path (its folder is created), `sqlite:///PATH`, or a PostgreSQL URL
    (`postgresql://` and `postgres://` mean psycopg 3: `postgresql+psycopg://`).
    """
    raw = DEFAULT_PATH if url is None else str(url).strip()
    shown = redact(raw)
    try:
        engine = _engine(_parse(raw, shown))
    except ModuleNotFoundError as err:  # the driver itself
        raise UserError(
            f"database {shown}: the driver {err.name!r} is not installed; "
            "pip install 'psycopg[binary]>=3.1' for PostgreSQL"
        ) from None
    try:
        with engine.begin() as conn:
            metadata.create_all(conn)  # checks first: existing tables are left as they are
    except sa.exc.SQLAlchemyError as err:
        engine.dispose()
        raise UserError(explain(shown, err)) from None
    return engine


def _parse(raw: str, shown: str) -> sa.URL:
    """The SQLAlchemy URL that `raw` names; the SQLite file's folder is created."""
    if not raw:
        raise UserError(f"the database URL is empty; give {ACCEPTED}")
    if "://" not in raw:
        return sa.URL.create("sqlite", database=_sqlite_file(raw, shown))
    scheme = raw.split("://", 1)[0].lower()
    if scheme not in ("sqlite", "postgresql", "postgres", PSYCOPG):
        hint = (
            "; raygpt talks to PostgreSQL through psycopg 3: write postgresql://..."
            if scheme.startswith("postgresql+")
            else ""
        )
        raise UserError(
            f"database {shown} uses the unsupported scheme '{scheme}://'; give {ACCEPTED}{hint}"
        )
    try:
        url = sa.make_url(raw)
    except (sa.exc.ArgumentError, ValueError) as err:
        raise UserError(
            f"database URL {shown} is malformed ({redact(first_line(err))}); give {ACCEPTED} "
            "(a '@', ':' or '/' inside the password is written %40, %3A, %2F)"
        ) from None
    if scheme != "sqlite":
        return url.set(drivername=PSYCOPG)
    if url.database in (None, "", ":memory:"):
        return url
    return url.set(database=_sqlite_file(url.database, shown))


def _sqlite_file(path_str: str, shown: str) -> str:
    """The absolute path of a SQLite file, its folder created; UserError if it cannot be."""
    try:
        path = Path(path_str).expanduser().resolve()
        if path.is_dir():
            raise UserError(
                f"database {shown} is a folder; give a file path such as {DEFAULT_PATH}"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
    except (RuntimeError, OSError) as err:
        raise UserError(
            f"database {shown} cannot be created ({redact(first_line(err))}); "
            "give a file path in a folder you can write to"
        ) from None
    return str(path)


def _engine(url: sa.URL) -> sa.Engine:
    if url.get_backend_name() == "sqlite":
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_S})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        args["connect_timeout"] = CONNECT_TIMEOUT_S
    # pre_ping: a long-lived service outlives a server restart without a failed request.
    return sa.create_engine(url, connect_args=args, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # SQLite ignores foreign keys (and their ON DELETE CASCADE) unless asked, per connection.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def explain(shown: str, err: BaseException) -> str:
    """One line for a database error: what went wrong at `shown` (a masked URL), and what
    to do."""
    cause = getattr(err, "orig", None) or err
    text = " ".join(str(cause).split()) or type(cause).__name__
    text = redact(re.sub(r"^connection failed:\s*", "", text))
    low = text.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        return (
            f"database {shown} refused the login ({_fatal(text)}); "
            "check the user and password in the URL"
        )
    if re.search(r'database "[^"]*" does not exist', low):
        return f"database {shown}: {_fatal(text)}; create it (createdb NAME) or fix the URL"
    unreachable = (
        "connection refused",
        "could not connect",
        "timeout expired",
        "timed out",
        "could not translate host name",
        "name or service not known",
        "no route to host",
        "network is unreachable",
        "no such file or directory",  # a Unix socket with no server behind it
    )
    if any(s in low for s in unreachable):
        return (
            f"cannot reach database {shown} ({_fatal(text)}); check that PostgreSQL runs "
            "there and the URL's host and port"
        )
    if "unable to open database file" in low or "not a database" in low:
        return f"cannot open database {shown} ({text}); give a SQLite file you can write"
    return f"cannot use database {shown}: {text}; check the URL and the server"


def _fatal(text: str) -> str:
    """A psycopg message cut to its reason: what follows the last 'failed:' or 'FATAL:'."""
    parts = re.split(r"failed:\s*|FATAL:\s*", text)
    return parts[-1].strip() or text


def dialect_insert(conn: sa.Connection, table: sa.Table) -> Any:
    """An INSERT on `table` that knows ON CONFLICT, which SQLite and PostgreSQL both speak."""
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    return insert(table)


def upsert(
    conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]], keys: list[str]
) -> None:
    """Insert `rows`, or update each row whose `keys` already exist, on either database."""
    if not rows:
        return
    stmt = dialect_insert(conn, table)
    changed = {c: stmt.excluded[c] for c in rows[0] if c not in keys}
    if changed:
        stmt = stmt.on_conflict_do_update(index_elements=keys, set_=changed)
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=keys)
    conn.execute(stmt, rows)


# --------------------------------------------------------------------------- filters
# The trials a query string selects (index.query_trials): the columns a filter may name.

_T, _S = trials.c, sweeps.c
TEXT_FILTERS: dict[str, sa.ColumnElement[Any]] = {
    "optimizer": _T.optimizer,
    "dataset": _T.dataset,
    "status": _T.status,
    "phase": _T.phase,
    "parametrization": _T.parametrization,
    "trial_id": _T.trial_id,
    "sweep": _S.name,
    "owner": _S.owner,
}
NUMBER_FILTERS: dict[str, sa.ColumnElement[Any]] = {
    name: getattr(_T, name)
    for name in (
        "sweep_id", "learning_rate", "n_params", "n_layer", "n_embd", "seed", "steps",
        "tokens", "val_loss", "best_val_loss", "device_seconds", "gpu_hours",
    )
}  # fmt: skip
_KNOWN = (
    f"text filters (KEY=VALUE): {', '.join(sorted(TEXT_FILTERS))}; number filters (KEY=X or "
    f"KEY=LO:HI, inclusive, either side may be empty): {', '.join(sorted(NUMBER_FILTERS))}"
)

Filters = str | Mapping[str, str] | Iterable[tuple[str, str]]


def filter_pairs(filters: Filters) -> list[tuple[str, str]]:
    """(key, value) pairs from a query string (`a=1&b=2`, `?` and %-escapes allowed), a
    mapping or pairs."""
    if isinstance(filters, str):
        pairs = []
        for piece in filters.lstrip("?").split("&"):
            if not piece.strip():
                continue
            key, sep, value = piece.partition("=")
            if not sep:
                raise UserError(f"filter {unquote_plus(piece)!r} is not KEY=VALUE; {_KNOWN}")
            pairs.append((unquote_plus(key).strip(), unquote_plus(value).strip()))
        return pairs
    items = filters.items() if isinstance(filters, Mapping) else filters
    return [(str(k).strip(), str(v).strip()) for k, v in items]


def parse_filters(filters: Filters) -> list[sa.ColumnElement[bool]]:
    """The WHERE conditions of `filters`; a UserError naming a bad key or value."""
    text: dict[str, list[str]] = {}
    conditions: list[sa.ColumnElement[bool]] = []
    for key, value in filter_pairs(filters):
        if key in TEXT_FILTERS:
            if not value:
                raise UserError(f"filter {key}= gives no value; {_KNOWN}")
            text.setdefault(key, []).append(value)  # a repeated key: any of its values
        elif key in NUMBER_FILTERS:
            conditions += _range(key, value)
        else:
            close = difflib.get_close_matches(key, [*TEXT_FILTERS, *NUMBER_FILTERS], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown filter {key!r}{hint}; {_KNOWN}")
    for key, values in text.items():
        column = TEXT_FILTERS[key]
        conditions.append(column == values[0] if len(values) == 1 else column.in_(values))
    return conditions


def _range(key: str, value: str) -> list[sa.ColumnElement[bool]]:
    lo_text, _, hi_text = value.partition(":") if ":" in value else (value, "", value)

    def bound(text: str) -> float | None:
        if not text.strip():
            return None
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise UserError(
                f"filter {key}={value}: {text.strip()!r} is not a finite number; {_KNOWN}"
            )
        return number

    if ":" in hi_text:
        raise UserError(f"filter {key}={value} has more than one ':'; {_KNOWN}")
    lo, hi = bound(lo_text), bound(hi_text)
    if lo is None and hi is None:
        raise UserError(f"filter {key}={value} gives no bound; {_KNOWN}")
    if lo is not None and hi is not None and lo > hi:
        raise UserError(f"filter {key}={value}: LO {lo:g} is above HI {hi:g}; {_KNOWN}")
    column = NUMBER_FILTERS[key]
    out = []
    if lo is not None:
        out.append(column >= sa.literal(lo, sa.Double()))
    if hi is not None:
        out.append(column <= sa.literal(hi, sa.Double()))
    return out
