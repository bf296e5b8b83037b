"""Sweep folders into the service's database, and trials back out by filter.

The folder is the truth: `ingest` reads what raygpt wrote in `<storage>/<name>/`
(sweep.json and trials.parquet, through raygpt's own readers) and upserts one sweeps row
(keyed by the folder's URI) and one trials row per trial (keyed by sweep and trial id),
removing trials the folder no longer holds. So ingesting a folder twice changes nothing,
and `rebuild`, which ingests every sweep folder under a storage root, gives the same
rows as ingesting each folder while it ran: every value comes from the folder, and the
few that accumulate across ingests (first times, last times) are minimums and maximums
that the final folder decides alone.

A sweep's status from its folder: running while a trial is running (or none has
started), else succeeded if a trial completed or was stopped early, else failed. The
service's own word wins where it passes one; an ended sweep whose folder still shows a
running trial (a killed driver leaves one) stays ended.

`query_trials` gives the trials that a query string selects (`optimizer=muon&n_params=
1e8:2e8`: equality for text, inclusive `LO:HI` ranges for numbers; db.parse_filters).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import sqlalchemy as sa

from raygpt import results, run_folder, storage
from raygpt import status as trial_status
from raygpt.config.train import TrainConfig
from raygpt.errors import UserError, first_line
from raygpt.redact import redact
from raygpt.report import compute
from raygpt.service import db as schema
from raygpt.storage import Storage
from raygpt.sweep.config import SweepConfig
from raygpt.sweep.search import grid_points
from raygpt.sweep.space import parse_search_space

CONFIRM = "confirm"  # the phase of --confirm-top reruns (trials_table.py)
_DELETE_CHUNK = 500  # trial ids per DELETE: well under every database's bound variables


@dataclass(frozen=True)
class SweepFolder:
    """What raygpt wrote in one sweep folder: its record and its trials' rows."""

    uri: str  # the folder, as folder_uri() writes it
    storage_path: str  # the folder above it: the --storage-path the sweep ran under
    record: dict[str, Any]  # sweep.json
    trials: list[dict[str, Any]]  # trials.parquet, one dict per row (TRIAL_SCHEMA)


@dataclass
class Rebuilt:
    """What `rebuild` did: each sweep folder indexed (its sweep id), and each one it could
    not read, with the one line that says why."""

    indexed: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- folders


def folder_uri(where: str | Storage, name: str | None = None) -> str:
    """The URI the database keys a sweep folder by: `<storage>/<name>`, or `where` itself.

    An absolute path on a local disk; `s3://bucket/prefix/name?endpoint_override=...` on an
    object store (the query string keeps the endpoint, so the URI reads the folder again).
    The service names a sweep it queues with this, before the folder exists.
    """
    store = where if isinstance(where, Storage) else storage.resolve(str(where), check=False)
    return _uri(store, store.path(name) if name else store.root)


def _uri(store: Storage, fs_path: str) -> str:
    if store.is_local:
        return fs_path
    scheme, _, rest = store.uri.partition("://")
    query = rest.partition("?")[2]
    # Storage URIs hold no credentials (storage.resolve refuses them); masked all the same.
    return redact(f"{scheme}://{fs_path}" + (f"?{query}" if query else ""))


def read_folder(folder: str | Storage) -> SweepFolder:
    """The record and trials of a sweep folder (a path, a URI, or a Storage rooted there).
    A one-line UserError when it is no raygpt sweep folder or cannot be read."""
    store = folder if isinstance(folder, Storage) else storage.resolve(str(folder), check=False)
    shown = store.display()
    hint = "give a sweep folder (<storage>/<name>) that holds sweep.json and trials.parquet"
    try:
        if run_folder.written_as(store, store.root) != "sweep":
            raise UserError(f"{shown} holds no raygpt {results.SWEEP_FILE}; {hint}")
        record = json.loads(store.read_bytes(store.path(results.SWEEP_FILE)))
        table = results.read_table(store, store.path(results.TRIALS_FILE))
    except (pa.ArrowException, OSError, ValueError) as err:
        raise UserError(f"cannot read {shown}: {first_line(err)}") from None
    if table is None:
        raise UserError(f"no {results.TRIALS_FILE} in {shown} (yet?); {hint}")
    rows = results.conform(table, results.TRIAL_SCHEMA).to_pylist()
    for row in rows:
        row["status"] = row["status"] or trial_status.RUNNING  # as the report reads a row
    head, sep, _ = store.root.rstrip("/").rpartition("/")
    parent = (head or "/") if sep else store.root  # a bucket's own root has none above
    return SweepFolder(_uri(store, store.root), _uri(store, parent), record, rows)


def sweep_folders(store: Storage) -> list[str]:
    """The fs path of every folder under `store`'s root (itself included) that holds both
    sweep.json and trials.parquet, in one recursive listing (one request stream on an
    object store, not one per folder). Hidden folders (locks, temp copies) are passed by."""
    selector = pafs.FileSelector(store.root, recursive=True, allow_not_found=True)
    wanted = {results.SWEEP_FILE, results.TRIALS_FILE}
    found: dict[str, set[str]] = {}
    root = store.root.rstrip("/")
    for info in store.fs.get_file_info(selector):
        if info.type != pafs.FileType.File or info.base_name not in wanted:
            continue
        folder = info.path.rsplit("/", 1)[0]
        inside = folder[len(root) :].strip("/")
        if any(part.startswith(".") for part in inside.split("/") if part):
            continue
        found.setdefault(folder, set()).add(info.base_name)
    return sorted(folder for folder, names in found.items() if names == wanted)


# --------------------------------------------------------------------------- values


def dataset_name(config: Mapping[str, Any]) -> str | None:
    """What a config trains on, named as TrainConfig.default_name names it: a prepared
    folder's name, a data file's stem, or the registered dataset."""
    if config.get("dataset_dir"):
        return str(config["dataset_dir"]).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if config.get("data_file"):
        return PurePosixPath(str(config["data_file"])).stem
    return config.get("dataset")


def folder_status(rows: list[dict[str, Any]]) -> str:
    """A sweep's status from its trials alone (see the module docstring)."""
    if not rows or any(r["status"] == trial_status.RUNNING for r in rows):
        return schema.RUNNING
    if any(r["status"] in trial_status.FINISHED_OK for r in rows):
        return schema.SUCCEEDED
    return schema.FAILED


def planned_search_trials(settings: Mapping[str, Any]) -> int | None:
    """Trials of a sweep's search phase, as the sweep driver plans them (None: unknown)."""
    fields = SweepConfig.__dataclass_fields__
    try:
        sweep = SweepConfig(**{k: v for k, v in settings.items() if k in fields})
        seeds = 1 if sweep.confirm_top else int(sweep.seeds)
        if sweep.search != "grid":
            return int(sweep.num_samples) * seeds
        dims = parse_search_space(list(sweep.search_space), TrainConfig())
        return (
            len(grid_points(sweep.optimizers, sweep.lr_ranges(), sweep.grid_points, dims)) * seeds
        )
    except (UserError, TypeError, ValueError, KeyError):
        return None


def steps_planned(
    settings: Mapping[str, Any], config: Mapping[str, Any], rows: list[dict[str, Any]]
) -> int | None:
    """Steps planned as the live view counts them: a finished trial's steps, max_steps for
    a running one and for each trial still to come (the --confirm-top reruns included)."""
    max_steps = config.get("max_steps")
    if not isinstance(max_steps, int):
        return None
    planned = sum(
        max_steps if r["status"] == trial_status.RUNNING else (r["steps"] or 0) for r in rows
    )
    searched = sum(1 for r in rows if r["phase"] != CONFIRM)
    to_come = max(0, (planned_search_trials(settings) or 0) - searched)
    top = int(settings.get("confirm_top") or 0)
    if top and searched == len(rows):  # no rerun has started: as many as the plan says
        groups = (
            len(settings.get("optimizers") or [])
            if settings.get("confirm_scope") == "optimizer"
            else 1
        )
        to_come += top * groups * max(0, int(settings.get("seeds") or 1) - 1)
    return planned + to_come * max_steps


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial with the lowest finite best val loss among those that may win."""
    candidates = [
        r for r in rows if r["status"] in trial_status.CAN_WIN and _finite(r["best_val_loss"])
    ]
    return min(candidates, key=lambda r: (r["best_val_loss"], r["trial_id"]), default=None)


def sweep_values(folder: SweepFolder) -> dict[str, Any]:
    """The sweeps columns a folder decides (the times and status come from `_merged`)."""
    from raygpt.train.preflight import current_config  # imports torch: only when ingesting

    settings = current_config(folder.record, "sweep")
    config = current_config(folder.record)
    rows = folder.trials
    best = _best(rows)
    return {
        "name": settings.get("name") or folder.uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1],
        "storage_path": folder.storage_path,
        "folder_uri": folder.uri,
        "workers_per_trial": settings.get("workers_per_trial"),
        "cpus_per_worker": config.get("cpus_per_worker"),
        "gpus_per_worker": settings.get("gpus_per_trial"),
        "max_concurrent_trials": settings.get("max_concurrent_trials"),
        "settings": _clean(settings),
        "config": _clean(config),
        "n_trials": len(rows),
        "best_val_loss": best["best_val_loss"] if best else None,
        "best_config": ({"trial_id": best["trial_id"], "params": _params(best)} if best else None),
        "gpu_hours": compute.totals(rows)["gpu_hours"],
        "steps_trained": sum(r["steps"] or 0 for r in rows),
        "steps_planned": steps_planned(settings, config, rows),
    }


def trial_values(
    sweep_id: int, row: Mapping[str, Any], config: Mapping[str, Any]
) -> dict[str, Any]:
    """One trials row from a trials.parquet row and its sweep's base config."""
    params = _params(row)
    merged = {**config, **params}  # the trial's own config: its searched keys over the base
    return {
        "sweep_id": sweep_id,
        "trial_id": row["trial_id"],
        "optimizer": row["optimizer"] or merged.get("optimizer"),
        "learning_rate": _num(row["learning_rate"]),
        "params": params,
        "status": row["status"],
        "error": row["error"],
        "val_loss": _num(row["final_val_loss"]),
        "best_val_loss": _num(row["best_val_loss"]),
        "steps": row["steps"],
        "tokens": row["tokens"],
        "flops": _num(row["flops"]),
        "device_seconds": _num(row["device_seconds"]),
        "gpu_hours": _num(row["gpu_hours"]),
        "wall_seconds": _num(row["wall_seconds"]),
        "n_params": row["n_params"],
        "n_layer": row["n_layer"] if row["n_layer"] is not None else merged.get("n_layer"),
        "n_embd": row["n_embd"] if row["n_embd"] is not None else merged.get("n_embd"),
        "parametrization": row["parametrization"] or merged.get("parametrization") or "sp",
        "dataset": dataset_name(merged),
        "seed": row["seed"] if row["seed"] is not None else merged.get("seed"),
        "phase": row["phase"],
        "config_key": row["config_key"],
        "started_at": _num(row["started_at"]),
        "ended_at": _num(row["torn_down_at"]),
    }


def _params(row: Mapping[str, Any]) -> dict[str, Any]:
    try:
        params = json.loads(row.get("params") or "{}")
    except ValueError:
        return {}
    return _clean(params) if isinstance(params, dict) else {}


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _num(x: Any) -> float | None:
    """A float column's value; NaN as NULL (SQLite stores it so: PostgreSQL then agrees)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _clean(value: Any) -> Any:
    """A JSON value with non-finite floats as null: PostgreSQL's JSONB refuses NaN."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- ingest


def ingest(
    db: sa.Engine, folder: str | Storage, *, sweep_id: int | None = None, status: str | None = None
) -> int:
    """Index one sweep folder; return its sweep id. Ingesting it again changes nothing.

    `sweep_id`: the row the service queued for this folder (else the row with its URI,
    else a new one). `status`: the service's word on the sweep, over the folder's.
    """
    if status is not None and status not in schema.SWEEP_STATUSES:
        raise UserError(f"sweep status {status!r} is unknown; give one of {schema.SWEEP_STATUSES}")
    found = read_folder(folder)
    values = sweep_values(found)
    config = values["config"] or {}
    rows = sorted(found.trials, key=lambda r: r["trial_id"] or "")
    with db.begin() as conn:
        existing = _existing(conn, sweep_id, found.uri)
        merged = _merged(values, rows, existing, status)
        if existing is not None:
            sid = existing["id"]
            conn.execute(sa.update(schema.sweeps).where(schema.sweeps.c.id == sid).values(merged))
        else:
            stmt = schema.dialect_insert(conn, schema.sweeps).values(merged)
            # Another ingester may have inserted the folder since the look above.
            stmt = stmt.on_conflict_do_update(index_elements=["folder_uri"], set_=merged)
            sid = conn.execute(stmt.returning(schema.sweeps.c.id)).scalar_one()
        _replace_trials(conn, sid, [trial_values(sid, r, config) for r in rows])
    return sid


def _existing(conn: sa.Connection, sweep_id: int | None, uri: str) -> dict[str, Any] | None:
    sweeps = schema.sweeps
    by_uri = conn.execute(sa.select(sweeps).where(sweeps.c.folder_uri == uri)).mappings().first()
    if sweep_id is None:
        return dict(by_uri) if by_uri else None
    row = conn.execute(sa.select(sweeps).where(sweeps.c.id == sweep_id)).mappings().first()
    if row is None:
        raise UserError(f"no sweep {sweep_id} in the database; ingest {uri} without a sweep id")
    if by_uri is not None and by_uri["id"] != sweep_id:
        raise UserError(
            f"{uri} is already indexed as sweep {by_uri['id']}, not {sweep_id}; "
            "ingest it without a sweep id"
        )
    return dict(row)


def _merged(
    values: dict[str, Any],
    rows: list[dict[str, Any]],
    existing: Mapping[str, Any] | None,
    given: str | None,
) -> dict[str, Any]:
    """The folder's values with the status and times the module docstring describes."""
    derived = folder_status(rows)
    before = existing or {}
    if given is not None:
        new_status = given
    elif before.get("status") in schema.ENDED and derived == schema.RUNNING:
        new_status = before["status"]
    else:
        new_status = derived
    queued = [r["queued_at"] for r in rows if _finite(r["queued_at"])]
    started = [r["started_at"] for r in rows if _finite(r["started_at"])]
    ended = [r["torn_down_at"] for r in rows if _finite(r["torn_down_at"])]
    out = dict(values)
    out["status"] = new_status
    out["submitted_at"] = _extreme(min, before.get("submitted_at"), *queued)
    out["started_at"] = _extreme(min, before.get("started_at"), *started)
    still = new_status in (schema.QUEUED, schema.RUNNING)
    out["ended_at"] = None if still else _extreme(max, before.get("ended_at"), *ended)
    return out


def _extreme(pick, *values: float | None) -> float | None:
    known = [v for v in values if v is not None]
    return pick(known) if known else None


def _replace_trials(conn: sa.Connection, sweep_id: int, rows: list[dict[str, Any]]) -> None:
    """The sweep's trials become `rows`: each upserted, and those gone from the folder
    (an --overwrite replaced it) deleted."""
    trials = schema.trials
    have = set(
        conn.execute(sa.select(trials.c.trial_id).where(trials.c.sweep_id == sweep_id)).scalars()
    )
    gone = sorted(have - {r["trial_id"] for r in rows})
    for start in range(0, len(gone), _DELETE_CHUNK):
        chunk = gone[start : start + _DELETE_CHUNK]
        conn.execute(
            sa.delete(trials).where(trials.c.sweep_id == sweep_id, trials.c.trial_id.in_(chunk))
        )
    schema.upsert(conn, trials, rows, ["sweep_id", "trial_id"])


def rebuild(db: sa.Engine, storage_path: str | Storage) -> Rebuilt:
    """Index every sweep folder under a storage root (a path or an s3:// / gs:// URI),
    as `ingest` would one by one. Other folders, and the database's other rows, are left
    as they are; a folder that cannot be read is skipped, with its reason in the result."""
    store = (
        storage_path
        if isinstance(storage_path, Storage)
        else storage.resolve(str(storage_path), check=False)
    )
    try:
        if not store.is_dir(store.root):
            raise UserError(
                f"no such folder: {store.display()}; give the --storage-path the sweeps ran under"
            )
        folders = sweep_folders(store)
    except OSError as err:
        raise UserError(f"cannot list {store.display()}: {first_line(err)}") from None
    done = Rebuilt()
    for fs_path in folders:
        uri = _uri(store, fs_path)
        try:
            done.indexed[uri] = ingest(db, store.at(fs_path))
        except UserError as err:
            done.skipped[uri] = str(err)
    return done


# --------------------------------------------------------------------------- query

_T, _S = schema.trials.c, schema.sweeps.c


def query_trials(
    db: sa.Engine, filters: schema.Filters = "", limit: int | None = None
) -> list[dict[str, Any]]:
    """The trials that match every filter (db.parse_filters: `optimizer=muon&n_params=1e8:2e8`),
    as plain dicts: the trials columns, with their sweep's name (`sweep`) and owner.
    Ordered by sweep id, then trial id."""
    query = (
        sa.select(schema.trials, _S.name.label("sweep"), _S.owner)
        .join(schema.sweeps, _T.sweep_id == _S.id)
        .where(*schema.parse_filters(filters))
        .order_by(_T.sweep_id, _T.trial_id)
    )
    if limit is not None:
        query = query.limit(limit)
    with db.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]
