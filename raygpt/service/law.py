"""The learning-rate law of the database's trials: `python -m raygpt.service lr-law` and
`GET /lr-law`.

The trials are those a filter selects, as for `GET /trials` (db.parse_filters,
index.query_trials), and each becomes the law row that `python -m raygpt.report --lr-law`
makes of it from its sweep's folder (law_rows.law_row, one function for both): N is its
n_params column, D its sweep's config with its params applied (max_steps x
tokens_per_step), else its tokens. The law, its lines and lr_law.json's record are then
law_outputs.outcome's, as for the report.

A row is rebuilt from the trials columns as trials.parquet holds it (`val_loss` is its
`final_val_loss`), and the rows go in the folders' order: by sweep, then by trial id,
as the trials table writes them. The fit's bootstrap draws in the rows' order, so the
same trials in another order would give slightly other intervals. One difference is the
index's: a trial that trials.parquet left without a status is indexed as running, so it
is left out of the fit here, where the report counts it as completed.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa

from raygpt import results, storage
from raygpt.errors import UserError
from raygpt.report.transfer import law_outputs, law_rows
from raygpt.report.transfer.law import Law
from raygpt.service import db as schema
from raygpt.service import index

# trials columns named otherwise than trials.parquet's
_RENAMED = {"final_val_loss": "val_loss", "torn_down_at": "ended_at"}
_OPTIONS = ("predict", "extrapolate")  # the query's keys that are not filters
_YES, _NO = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def law_rows_from_db(db: sa.Engine, filters: schema.Filters = "") -> list[dict[str, Any]]:
    """The trials that `filters` select (db.parse_filters), each as the law row
    law_rows.law_rows makes of it from its sweep's folder; trials whose D is unknown are
    left out."""
    trials = index.query_trials(db, filters)
    # Python's order, not the database's collation: the trials table writes in this one.
    trials.sort(key=lambda t: (t["sweep_id"], t["trial_id"]))
    sweeps = _sweeps(db, {t["sweep_id"] for t in trials})
    out = []
    for sweep_id, group in itertools.groupby(trials, key=lambda t: t["sweep_id"]):
        sweep = sweeps[sweep_id]
        rows = [_table_row(t) for t in group]
        base = sweep["config"] if isinstance(sweep["config"], dict) else {}
        # The data record counts N only for a trial without n_params (a table written
        # before that column), and only the folder keeps it: read it then alone.
        needs_data = any(r["n_params"] is None for r in rows) and not base.get("vocab_size")
        data = _data_record(sweep["folder_uri"]) if needs_data else {}
        shown = (sweep["folder_uri"] or sweep["name"]).split("?", 1)[0]  # as display() shows it
        for row in rows:
            try:
                found = law_rows.law_row(row, base, data, shown)
            except UserError as err:
                raise UserError(
                    f"{err} (sweep {sweep['name']}: choose the others with sweep=NAME, repeated)"
                ) from None
            if found is not None:
                out.append(found)
    return out


def fit(
    db: sa.Engine,
    filters: schema.Filters = "",
    predict: str | None = None,
    extrapolate: bool = False,
) -> tuple[dict[str, Law], list[str], dict[str, Any]]:
    """(laws, lines, record) of the trials `filters` select: law_outputs.outcome's, with
    the filters in the record. `predict`: "N=124M,D=2.5e9", as --predict takes it."""
    point = law_outputs.parse_point(predict) if predict is not None else None
    pairs = schema.filter_pairs(filters)
    rows = law_rows_from_db(db, pairs)
    said = "&".join(f"{k}={v}" for k, v in pairs)
    if not rows:
        where = f"match {said}" if said else "are indexed"
        raise UserError(
            f"no trials with a known budget {where}; python -m raygpt.service query shows them"
        )
    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    laws, record, lines = law_outputs.outcome(rows, sweeps, point, extrapolate)
    return laws, lines, {"filters": said, **record}


def answer(db: sa.Engine, query: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """`GET /lr-law`'s JSON: {"lines", "record"} of the query's filters, with its
    `predict=N=...,D=...` and `extrapolate=1`."""
    filters, options = [], {}
    for key, value in query:
        if key in _OPTIONS:
            options[key] = value
        else:
            filters.append((key, value))
    flag = options.get("extrapolate", "").strip().lower()
    if flag not in _YES + _NO:
        raise UserError(f"extrapolate={flag!r}: give extrapolate=1 or leave it out")
    _, lines, record = fit(db, filters, options.get("predict"), flag in _YES)
    return {"lines": lines, "record": record}


def write(out_dir: str, found: Mapping[str, Any]) -> list[Any]:
    """lr_law.json and lr_law.png of an `answer` into the folder `out_dir` (a path or a
    storage URI); the paths written."""
    record = found["record"]
    out = storage.resolve(str(out_dir), check=False)
    return law_outputs.write_outputs(
        out, record, _plotted(record), name=record.get("filters") or "every trial"
    )


def _plotted(record: Mapping[str, Any]) -> dict[str, SimpleNamespace]:
    """The record's laws with what law_outputs.plot_law reads of a Law: over HTTP the
    command has the record, not the Law objects."""
    laws = {}
    for opt, law in record["laws"].items():
        points = tuple(
            SimpleNamespace(N=p["N"], D=p["D"], best=SimpleNamespace(**p["best"]))
            for p in law["points"]
        )
        laws[opt] = SimpleNamespace(
            points=points,
            n_range=tuple(law["n_range"]),
            a=law["a"],
            alpha=law["alpha"],
            beta=law["beta"],
        )
    return laws


def _table_row(trial: Mapping[str, Any]) -> dict[str, Any]:
    """A trials row as trials.parquet holds the trial (its columns, `params` as JSON)."""
    row = {name: trial.get(_RENAMED.get(name, name)) for name in results.TRIAL_SCHEMA.names}
    row["params"] = json.dumps(trial.get("params") or {})
    return row


def _sweeps(db: sa.Engine, ids: set[int]) -> dict[int, dict[str, Any]]:
    s = schema.sweeps.c
    query = sa.select(s.id, s.name, s.folder_uri, s.config).where(s.id.in_(sorted(ids)))
    with db.connect() as conn:
        return {row["id"]: dict(row) for row in conn.execute(query).mappings()}


def _data_record(folder_uri: str | None) -> dict[str, Any]:
    """The sweep's data record (sweep.json's `data`, as its trials.parquet footer has it);
    {} where the folder cannot be read: law_row then says N cannot be counted."""
    if not folder_uri:
        return {}
    try:
        store = storage.resolve(folder_uri, check=False)
        record = json.loads(store.read_bytes(store.path(results.SWEEP_FILE)))
    except (OSError, ValueError, UserError):
        return {}
    data = record.get("data") if isinstance(record, dict) else None
    return data if isinstance(data, dict) else {}
