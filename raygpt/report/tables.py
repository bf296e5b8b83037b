"""A sweep's (or run's) folder read back: its trials table and step rows, and views of
them that the summary and the plots share.

Reads only the Parquet files a sweep (or a single `raygpt.train` run) leaves in
`<storage>/<name>/`, a local folder or an s3:// or gs:// URI: `trials.parquet`
(one row per trial) and the step parts (one row per trial and step; see
results.py). No Ray import, so it runs anywhere the files are, also while a
sweep is still writing them: every file is written whole, and a missing one
just means "nothing yet".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raygpt import results, status, storage
from raygpt.errors import UserError
from raygpt.storage import Storage


def folder_storage(where: str | Path | Storage) -> Storage:
    """The storage rooted at a sweep or run folder (a path, a URI, or a Storage already)."""
    if isinstance(where, Storage):
        return where
    store = storage.resolve(str(where), check=False)
    if store.root.endswith(".parquet"):  # someone passed trials.parquet or a part itself
        parent = store.root.rsplit("/", 1)[0]
        if parent.endswith(f"/{results.STEPS_DIR}"):
            parent = parent.rsplit("/", 1)[0]
        store = store.at(parent)
    return store


def load(where: str | Path | Storage) -> tuple[pa.Table | None, pa.Table | None, dict[str, Any]]:
    """Read a sweep folder (or a train run folder): (trials, steps, metadata).

    A run folder has only step parts; its trials table is then derived from
    the steps (one row per trial_id, "" for a plain run). The metadata is the
    decoded `raygpt.*` Parquet metadata of both (trials' wins), plus "name":
    the sweep or run name.
    """
    store = folder_storage(where)
    hint = "give a sweep or run folder (<storage>/<name>) that holds trials.parquet or steps/"
    shown = store.display()
    metadata: dict[str, Any] = {}
    try:
        if not store.is_dir(store.root):
            raise UserError(f"no such folder: {shown}; {hint}")
        steps, steps_meta = results.read_steps(store, store.root)
        metadata.update(steps_meta)
        trials = results.read_table(store, f"{store.root}/{results.TRIALS_FILE}")
        if trials is not None:
            metadata.update(results.decode_metadata(trials.schema))
            trials = results.conform(trials, results.TRIAL_SCHEMA)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise UserError(f"cannot read {shown}: {str(err).splitlines()[0]}") from None
    if trials is None and steps is None:
        raise UserError(f"no {results.TRIALS_FILE} or step parts in {shown} (yet?); {hint}")
    metadata["has_trials_file"] = trials is not None
    if trials is None:
        trials = derive_trials(steps, metadata)
    metadata["name"] = _name(metadata, store.root)
    return trials, steps, metadata


def _name(metadata: dict[str, Any], root: str) -> str:
    for key in ("sweep", "config"):
        section = metadata.get(key)
        if isinstance(section, dict) and section.get("name"):
            return str(section["name"])
    return root.rstrip("/").rsplit("/", 1)[-1]


def columns(table: pa.Table, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Columns as numpy arrays: floats and ints as float64 with NaN for null, strings as str."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out[name] = np.array(
                [v if v is not None else "" for v in col.to_pylist()], dtype=object
            )
        else:
            out[name] = col.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    return out


def trial_groups(steps: pa.Table | None) -> list[dict[str, Any]]:
    """Steps split per trial, each sorted by step: [{trial_id, optimizer, learning_rate, cols}]."""
    if steps is None or len(steps) == 0:
        return []
    names = tuple(results.STEP_COLUMNS)
    cols = columns(steps, names)
    val_valid = pc.is_valid(steps.column("val_loss")).to_numpy(zero_copy_only=False)
    cols["val_valid"] = np.asarray(val_valid, dtype=bool)
    trial_ids = cols["trial_id"]
    groups = []
    for trial_id in sorted(set(trial_ids.tolist())):
        idx = np.flatnonzero(trial_ids == trial_id)
        idx = idx[np.argsort(cols["step"][idx], kind="stable")]
        sub = {k: v[idx] for k, v in cols.items()}
        optimizer = next((o for o in sub["optimizer"] if o), "?")
        lrs = sub["learning_rate"][np.isfinite(sub["learning_rate"])]
        groups.append(
            {
                "trial_id": trial_id,
                "run": next((r for r in sub["run"] if r), ""),
                "optimizer": optimizer,
                "learning_rate": float(lrs[0]) if len(lrs) else None,
                "cols": sub,
            }
        )
    return groups


def derive_trials(steps: pa.Table | None, metadata: dict[str, Any] | None = None) -> pa.Table:
    """A trials table (TRIAL_SCHEMA) built from step rows, for folders without trials.parquet.

    Status: "diverged" when a loss is not finite (or, with the run's config at
    hand, the last train loss exceeds divergence_factor x the first), "running"
    when the config's max_steps is not reached yet, else "completed".
    """
    config = (metadata or {}).get("config")
    config = config if isinstance(config, dict) else {}
    max_steps = config.get("max_steps")
    factor = config.get("divergence_factor") or 0
    rows = []
    for group in trial_groups(steps):
        c = group["cols"]
        train, val = c["train_loss"], c["val_loss"][c["val_valid"]]
        finite_train = train[np.isfinite(train)]
        finite_val = val[np.isfinite(val)]
        last_step = int(np.nanmax(c["step"])) if np.isfinite(c["step"]).any() else 0
        diverged = bool(len(val) and not np.isfinite(val[-1])) or bool(
            len(train) and not np.isfinite(train[-1])
        )
        if factor and len(finite_train) and len(train) and np.isfinite(train[-1]):
            diverged = diverged or train[-1] > factor * finite_train[0]
        trial_status = status.decide(
            errored=False,
            diverged=diverged,
            steps=last_step,
            max_steps=int(max_steps) if isinstance(max_steps, int | float) else None,
            ended=False,
        )
        if len(finite_val):
            best_val = float(finite_val.min())
        else:
            best_val = math.inf if len(val) else None
        step_ms = c["step_time_ms"][np.isfinite(c["step_time_ms"])]
        tps = c["tokens_per_sec"][np.isfinite(c["tokens_per_sec"])]
        mfu = c["mfu"][np.isfinite(c["mfu"])]
        tokens = c["tokens_seen"][np.isfinite(c["tokens_seen"])]
        rows.append(
            {
                "trial_id": group["trial_id"],
                "optimizer": group["optimizer"],
                "learning_rate": group["learning_rate"],
                "status": trial_status,
                "steps": last_step,
                "best_val_loss": best_val,
                "final_train_loss": float(train[-1]) if len(train) else None,
                "final_val_loss": float(val[-1]) if len(val) else None,
                "train_seconds": float(step_ms.sum() / 1000) if len(step_ms) else None,
                "tokens": int(tokens.max()) if len(tokens) else None,
                "mean_tokens_per_sec": float(tps.mean()) if len(tps) else None,
                "mean_mfu": float(mfu.mean()) if len(mfu) else None,
            }
        )
    full = [{name: row.get(name) for name in results.TRIAL_SCHEMA.names} for row in rows]
    return pa.Table.from_pylist(full, schema=results.TRIAL_SCHEMA)


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def trial_rows(trials: pa.Table | None) -> list[dict[str, Any]]:
    if trials is None:
        return []
    rows = trials.to_pylist()
    for row in rows:
        row["status"] = row.get("status") or status.RUNNING
        row["optimizer"] = row.get("optimizer") or "?"
    return rows


def evals_by_trial(steps: pa.Table | None) -> dict[str, dict[int, float]]:
    """Each trial's val loss at its evaluated steps, the cooled copy's where a rung had one
    (rung_cooldown.py): the value its scheduler ranked it on."""
    out: dict[str, dict[int, float]] = {}
    for group in trial_groups(steps):
        c = group["cols"]
        cooled = c.get("cooled_val_loss")
        vals = {}
        for i in np.flatnonzero(c["val_valid"]):
            value = c["val_loss"][i]
            if cooled is not None and np.isfinite(cooled[i]):
                value = cooled[i]
            vals[int(c["step"][i])] = float(value)
        if vals:
            out[group["trial_id"]] = vals
    return out
