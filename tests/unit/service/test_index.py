"""Sweep folders into the service's database (raygpt/service/index.py), on SQLite and on
a real PostgreSQL server: what a folder becomes, ingesting twice, rebuilding a storage
root (local and s3://) against ingesting live, and the trials back out by filter.

Folders are written with raygpt's own writers: sweep.json through the driver's
write_record, trials.parquet through results (rows as the trials table holds them), and
one sweep by the trials table's own Tune callback, driven with stand-in trials.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import sqlalchemy as sa
from builders import TuneTrial

from raygpt import results, storage
from raygpt.config.train import TrainConfig
from raygpt.errors import UserError
from raygpt.redact import redact_config
from raygpt.service import db as service_db
from raygpt.service import index
from raygpt.sweep.config import SweepConfig
from raygpt.sweep.search import config_key
from raygpt.train import preflight

T0 = 1_760_000_000.0  # the sweeps' clock


def sweep_record(name: str, sweep: dict | None = None, **config: Any) -> dict[str, Any]:
    """sweep.json as the sweep driver writes it."""
    settings = SweepConfig(
        **{"optimizers": ["adamw", "muon"], "search": "grid", "grid_points": 2,
           "gpus_per_trial": 0.5, "max_concurrent_trials": 4} | (sweep or {})
    )  # fmt: skip
    train = TrainConfig(**({"max_steps": 200, "cpus_per_worker": 1.0} | config))
    return redact_config(
        {
            "sweep": dict(vars(settings)) | {"name": name},
            "config": train.to_dict(),
            "environment": {"python": "3.11"},
            "cluster": {"nodes": 1},
            "data": {"vocab_size": 65},
        }
    )


def trial_row(trial_id: str, optimizer: str, lr: float, n_params: int, **values: Any) -> dict:
    """A trials.parquet row of a finished trial, every column as the trials table fills it."""
    seed = values.pop("seed", 1337)
    params = {"optimizer": optimizer, "learning_rate": lr, "seed": seed}
    start = T0 + 100 * int(trial_id.rsplit("_", 1)[-1], 16)
    steps = values.get("steps", 200)
    return (
        {name: None for name in results.TRIAL_SCHEMA.names}
        | {
            "trial_id": trial_id, "optimizer": optimizer, "learning_rate": lr,
            "params": json.dumps(params), "status": "completed", "steps": steps,
            "best_val_loss": 2.0, "final_val_loss": 2.05, "final_train_loss": 2.0,
            "wall_seconds": 60.0, "train_seconds": 50.0, "tokens": steps * 4096,
            "mean_tokens_per_sec": 16384.0, "seed": seed, "config_key": config_key(params),
            "phase": "search", "queued_at": start - 5, "started_at": start,
            "workers_up_at": start + 2, "first_step_at": start + 3, "last_step_at": start + 55,
            "torn_down_at": start + 60, "overhead_seconds": 8.0, "cooldown_seconds": 0.0,
            "n_params": n_params, "n_layer": 4, "n_embd": 256, "parametrization": "sp",
            "flops": 6.0 * n_params * steps * 4096, "device_seconds": 25.0,
            "gpu_hours": 25.0 / 3600,
        }
        | values
    )  # fmt: skip


def write_sweep(root: str | Path, name: str, rows: list[dict], record: dict | None = None) -> str:
    """A sweep folder under the storage root `root`; its URI (as the index keys it)."""
    store = storage.resolve(str(root), check=False)
    path = store.path(name)
    record = record or sweep_record(name.rsplit("/", 1)[-1])
    preflight.write_record(store, f"{path}/{results.SWEEP_FILE}", record)
    table = pa.Table.from_pylist(rows, schema=results.TRIAL_SCHEMA)
    results.write_table(
        store, f"{path}/{results.TRIALS_FILE}", results.with_metadata(table, record)
    )
    return index.folder_uri(store, name)


def dump(engine: sa.Engine) -> tuple[dict[str, dict], list[dict]]:
    """Every sweep (by folder URI, its id left out) and trial (its sweep as that URI)."""
    with engine.connect() as conn:
        sweeps = [dict(r) for r in conn.execute(sa.select(service_db.sweeps)).mappings()]
        trials = [dict(r) for r in conn.execute(sa.select(service_db.trials)).mappings()]
    uri = {s["id"]: s["folder_uri"] for s in sweeps}
    for trial in trials:
        trial["sweep_id"] = uri[trial.pop("sweep_id")]
    by_folder = {s["folder_uri"]: {k: v for k, v in s.items() if k != "id"} for s in sweeps}
    return by_folder, sorted(trials, key=lambda t: (t["sweep_id"], t["trial_id"]))


def ids(rows: list[dict]) -> list[str]:
    return sorted(r["trial_id"] for r in rows)


def test_a_folder_becomes_one_sweep_and_its_trials(db, tmp_path):
    rows = [
        trial_row("t_00001", "adamw", 1e-3, 120_000_000, best_val_loss=1.9, final_val_loss=1.95),
        # Lower, but diverged: never the sweep's best.
        trial_row("t_00002", "muon", 0.3, 120_000_000, status="diverged", best_val_loss=1.5,
                  final_val_loss=math.nan, steps=80),
        trial_row("t_00003", "muon", 0.02, 120_000_000, status="stopped_early", steps=100,
                  best_val_loss=1.8, final_val_loss=1.85, seed=1338),
        trial_row("t_00004", "adamw", 1e-2, 120_000_000, status="error", error="boom",
                  steps=10, best_val_loss=None),
    ]  # fmt: skip
    uri = write_sweep(tmp_path, "alpha", rows)
    assert uri == str(tmp_path.resolve() / "alpha")
    sweep_id = index.ingest(db, uri)
    sweeps, trials = dump(db)
    sweep = sweeps[uri]
    assert sweep["name"] == "alpha" and sweep["status"] == "succeeded"
    assert sweep["storage_path"] == str(tmp_path.resolve()) and sweep["owner"] is None
    assert sweep["best_val_loss"] == 1.8
    assert sweep["best_config"] == {
        "trial_id": "t_00003",
        "params": {"optimizer": "muon", "learning_rate": 0.02, "seed": 1338},
    }
    assert sweep["n_trials"] == 4 and sweep["steps_trained"] == 200 + 80 + 100 + 10
    # A grid of 2 optimizers x 2 learning rates, all four ended: the steps they trained.
    assert sweep["steps_planned"] == 390
    assert sweep["gpu_hours"] == pytest.approx(4 * 25.0 / 3600)
    assert (sweep["workers_per_trial"], sweep["gpus_per_worker"]) == (1, 0.5)
    assert (sweep["cpus_per_worker"], sweep["max_concurrent_trials"]) == (1.0, 4)
    assert sweep["config"]["max_steps"] == 200 and sweep["settings"]["search"] == "grid"
    assert sweep["submitted_at"] == T0 + 100 - 5  # the first trial's queueing
    assert sweep["started_at"] == T0 + 100 and sweep["ended_at"] == T0 + 400 + 60
    assert ids(trials) == ["t_00001", "t_00002", "t_00003", "t_00004"]
    by_id = {t["trial_id"]: t for t in trials}
    first = by_id["t_00001"]
    assert (first["optimizer"], first["learning_rate"], first["status"]) == (
        "adamw",
        1e-3,
        "completed",
    )
    assert (first["val_loss"], first["best_val_loss"]) == (1.95, 1.9)
    assert (first["n_params"], first["n_layer"], first["n_embd"]) == (120_000_000, 4, 256)
    assert (first["dataset"], first["seed"], first["phase"]) == ("pydocs_char", 1337, "search")
    assert first["tokens"] == 200 * 4096 and first["gpu_hours"] == pytest.approx(25 / 3600)
    assert first["params"] == {"optimizer": "adamw", "learning_rate": 1e-3, "seed": 1337}
    assert first["ended_at"] == T0 + 160
    # NaN is NULL on both databases, so a range filter treats it alike on both.
    assert by_id["t_00002"]["val_loss"] is None and by_id["t_00002"]["status"] == "diverged"
    assert by_id["t_00004"]["error"] == "boom"
    assert all(t["sweep_id"] == uri for t in trials)
    assert index.ingest(db, tmp_path / "alpha") == sweep_id  # the same folder, the same row


def test_ingesting_twice_gives_the_same_rows_and_a_rewrite_replaces_trials(db, tmp_path):
    rows = [trial_row(f"t_{i:05x}", "adamw", 10**-i, 1_000_000) for i in range(1, 5)]
    uri = write_sweep(tmp_path, "twice", rows)
    sweep_id = index.ingest(db, uri)
    before = dump(db)
    assert index.ingest(db, uri) == sweep_id
    assert dump(db) == before
    with db.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(service_db.trials))
        assert count.scalar_one() == 4
    # --overwrite replaced the folder: two trials gone, one changed, one new.
    rows = [rows[0] | {"best_val_loss": 1.5}, rows[1], trial_row("t_00009", "muon", 0.01, 1)]
    write_sweep(tmp_path, "twice", rows)
    assert index.ingest(db, uri) == sweep_id
    _, trials = dump(db)
    assert ids(trials) == ["t_00001", "t_00002", "t_00009"]
    assert {t["trial_id"]: t["best_val_loss"] for t in trials}["t_00001"] == 1.5


def test_statuses_and_times_follow_the_service_and_the_folder(db, tmp_path):
    running = [
        trial_row("t_00001", "adamw", 1e-3, 1, status="running", steps=50, torn_down_at=None),
        trial_row("t_00002", "adamw", 1e-2, 1),
    ]
    uri = write_sweep(tmp_path, "s", running)
    # The service queued the sweep (its own columns) before the folder existed.
    with db.begin() as conn:
        conn.execute(
            sa.insert(service_db.users).values(
                name="ada", gpu_quota=1.0, cpu_quota=8.0, priority=0, created_at=T0
            )
        )
        queued = conn.execute(
            sa.insert(service_db.sweeps)
            .values(
                name="s", owner="ada", status="queued", submitted_at=T0 - 50,
                storage_path=str(tmp_path), folder_uri=index.folder_uri(tmp_path, "s"),
                experiment_toml="[sweep]\n", flags=["--optimizers", "adamw"],
            )
            .returning(service_db.sweeps.c.id)
        ).scalar_one()  # fmt: skip
    assert index.ingest(db, uri, sweep_id=queued) == queued
    sweep = dump(db)[0][uri]
    assert sweep["status"] == "running" and sweep["ended_at"] is None
    assert sweep["owner"] == "ada" and sweep["flags"] == ["--optimizers", "adamw"]
    assert sweep["submitted_at"] == T0 - 50  # the submission, before any trial queued
    # 1 running (max_steps), 1 ended (200), 2 of the grid's 4 still to come.
    assert sweep["steps_planned"] == 200 + 200 + 2 * 200
    # The service cancelled it; the killed driver's table still shows a running trial.
    index.ingest(db, uri, status="cancelled")
    index.ingest(db, uri)
    sweep = dump(db)[0][uri]
    assert sweep["status"] == "cancelled" and sweep["ended_at"] == T0 + 200 + 60
    # Resumed and finished: the folder's word again.
    finished = [running[0] | {"status": "completed", "steps": 200, "torn_down_at": T0 + 900}]
    write_sweep(tmp_path, "s", [*finished, running[1]])
    index.ingest(db, uri, status="running")
    assert dump(db)[0][uri]["ended_at"] is None
    index.ingest(db, uri)
    sweep = dump(db)[0][uri]
    assert (sweep["status"], sweep["ended_at"]) == ("succeeded", T0 + 900)
    with pytest.raises(UserError, match="sweep status 'done' is unknown"):
        index.ingest(db, uri, status="done")
    with pytest.raises(UserError, match=r"^no sweep 999 in the database"):
        index.ingest(db, uri, sweep_id=999)


def test_a_resume_changes_the_config_the_index_keeps(db, tmp_path):
    uri = write_sweep(tmp_path, "r", [trial_row("t_00001", "adamw", 1e-3, 1, status="running")])
    store = storage.resolve(str(tmp_path), check=False)
    resumed = sweep_record("r", max_steps=400)
    preflight.write_record(store, store.path("r", results.SWEEP_FILE), resumed, resumed=True)
    index.ingest(db, uri)
    sweep = dump(db)[0][uri]
    assert sweep["config"]["max_steps"] == 400  # sweep.json's first config, resumes applied
    assert sweep["steps_planned"] == 4 * 400


def _storage_root(root: Path) -> list[str]:
    """Sweeps at the top and nested as a transfer's proxies, beside folders that are not."""
    uris = [
        write_sweep(root, "alpha", [trial_row("t_00001", "adamw", 1e-3, 100)]),
        write_sweep(
            root, "beta",
            [trial_row("t_00002", "muon", 0.02, 200), trial_row("t_00003", "adamw", 3e-3, 200)],
        ),
        write_sweep(root, "transfer/proxies/n_embd-64", [trial_row("t_00004", "muon", 0.05, 50)]),
    ]  # fmt: skip
    store = storage.resolve(str(root), check=False)
    # A transfer's own folder: its record but no trials table.
    preflight.write_record(store, store.path("transfer", results.SWEEP_FILE), sweep_record("t"))
    # A run folder, a lock, and a trials table beside a sweep.json raygpt did not write.
    results.write_json(store, store.path("a-run", results.RUN_FILE), {"config": {}})
    results.write_json(store, store.path(".raygpt-locks", "alpha.json"), {"pid": 1})
    results.write_json(store, store.path("stranger", results.SWEEP_FILE), ["not", "ours"])
    results.write_table(
        store,
        store.path("stranger", results.TRIALS_FILE),
        pa.Table.from_pylist([trial_row("t_00005", "sgd", 0.1, 1)], schema=results.TRIAL_SCHEMA),
    )
    return uris


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_rebuild_gives_the_index_that_live_ingestion_gave(make_db, tmp_path):
    root = tmp_path / "results"
    uris = _storage_root(root)
    live = make_db()
    live_ids = {uri: index.ingest(live, uri) for uri in uris}
    files = _files(root)
    rebuilt = make_db()
    done = index.rebuild(rebuilt, str(root))
    assert sorted(done.indexed) == sorted(uris)
    assert list(done.skipped) == [str(root / "stranger")]
    assert "holds no raygpt sweep.json" in done.skipped[str(root / "stranger")]
    assert dump(rebuilt) == dump(live)
    assert _files(root) == files  # a rebuild writes nothing to storage
    # Over the live index it changes nothing, ids included, and leaves other rows alone.
    with live.begin() as conn:
        conn.execute(
            sa.insert(service_db.sweeps).values(
                name="gone", status="failed", storage_path="/elsewhere", folder_uri="/elsewhere/x"
            )
        )
    before = dump(live)
    assert index.rebuild(live, root).indexed == live_ids
    assert dump(live) == before
    with pytest.raises(UserError, match=r"^no such folder: .*nowhere; give the --storage-path"):
        index.rebuild(live, tmp_path / "nowhere")


def test_rebuild_of_an_object_store_root(make_db, s3_storage):
    uris = [
        write_sweep(s3_storage, "alpha", [trial_row("t_00001", "adamw", 1e-3, 100)]),
        write_sweep(s3_storage, "deep/beta", [trial_row("t_00002", "muon", 0.02, 200)]),
    ]
    base, _, query = storage.resolve(s3_storage, check=False).uri.partition("?")
    bucket_path = base.removeprefix("s3://")
    assert uris == [f"s3://{bucket_path}/alpha?{query}", f"s3://{bucket_path}/deep/beta?{query}"]
    db = make_db()
    done = index.rebuild(db, s3_storage)
    assert sorted(done.indexed) == uris and not done.skipped
    assert index.ingest(db, uris[1]) == done.indexed[uris[1]]  # its URI reads it again
    sweeps, trials = dump(db)
    assert sweeps[uris[1]]["storage_path"] == f"s3://{bucket_path}/deep?{query}"
    assert [(t["sweep_id"], t["trial_id"]) for t in trials] == [
        (uris[0], "t_00001"),
        (uris[1], "t_00002"),
    ]


def test_live_ingestion_of_the_trials_tables_own_writes_equals_a_rebuild(make_db, tmp_path):
    from raygpt.sweep.trials_table import SweepOutputs

    store = storage.resolve(str(tmp_path), check=False)
    sweep_path = store.path("live")
    record = sweep_record("live", {"search": "random", "num_samples": 3}, max_steps=20)
    preflight.write_record(store, f"{sweep_path}/{results.SWEEP_FILE}", record)
    outputs = SweepOutputs(store, sweep_path, record, max_steps=20, base_seed=1337, announce=False)
    outputs.WRITE_EVERY_S = 0.0  # every event reaches trials.parquet
    live = make_db()
    uri = index.folder_uri(store, "live")
    points = [("adamw", 1e-3), ("muon", 0.02), ("adamw", 3e-3)]
    trials = [TuneTrial(f"t_{i:05d}", {"optimizer": o, "learning_rate": lr})
              for i, (o, lr) in enumerate(points)]  # fmt: skip
    outputs.on_step_begin(0, trials)
    for i, trial in enumerate(trials):
        outputs.on_trial_start(0, trials, trial)
        index.ingest(live, uri)
        steps = 20 if i < 2 else 10
        outputs.on_trial_result(
            0, trials, trial,
            {"step": steps, "val_loss": 2.5 - 0.1 * i, "best_val_loss": 2.5 - 0.1 * i,
             "train_loss": 2.4, "n_params": 10_000 * (i + 1), "n_layer": 2, "n_embd": 64},
        )  # fmt: skip
        index.ingest(live, uri)
        rows = [{"trial_id": trial.trial_id, "step": s, "tokens_seen": 64 * s,
                 "train_loss": 2.4, "step_time_ms": 10.0} for s in range(1, steps + 1)]  # fmt: skip
        results.write_step_part(store, f"{sweep_path}/runs/{trial.trial_id}", rows, {})
        if i < 2:
            outputs.on_trial_complete(0, trials, trial)
        else:
            outputs.on_trial_error(0, trials, trial)
        index.ingest(live, uri)
    outputs.on_experiment_end(trials)
    index.ingest(live, uri)
    rebuilt = make_db()
    index.rebuild(rebuilt, tmp_path)
    assert dump(rebuilt) == dump(live)
    sweep = dump(live)[0][uri]
    assert sweep["status"] == "succeeded" and sweep["best_val_loss"] == pytest.approx(2.4)
    assert sweep["steps_planned"] == sweep["steps_trained"] == 50


def _query_sweeps(db, root: Path) -> None:
    small = [
        trial_row("t_00001", "muon", 0.02, 120_000_000),
        trial_row("t_00002", "muon", 0.05, 300_000_000),
        trial_row("t_00003", "adamw", 1e-3, 150_000_000),
        trial_row("t_00004", "muon", 0.01, 200_000_000, seed=1338, status="stopped_early"),
        trial_row("t_00005", "muon", 0.01, 99_999_999),
    ]
    other = [trial_row("t_00006", "muon", 0.02, 150_000_000)]
    index.ingest(db, write_sweep(root, "small", small))
    record = sweep_record("shakespeare", data_file="/data/tinyshakespeare.txt")
    index.ingest(db, write_sweep(root, "shakespeare", other, record))


def test_query_trials_selects_exactly_the_matching_trials(db, tmp_path):
    _query_sweeps(db, tmp_path)
    query = index.query_trials
    assert ids(query(db, "optimizer=muon&n_params=1e8:2e8&dataset=pydocs_char")) == [
        "t_00001",
        "t_00004",
    ]
    assert ids(query(db, "n_params=1.2e8:1.5e8")) == ["t_00001", "t_00003", "t_00006"]
    assert ids(query(db, "n_params=:1.2e8")) == ["t_00001", "t_00005"]
    assert ids(query(db, "?n_params=2e8:&optimizer=muon")) == ["t_00002", "t_00004"]
    assert ids(query(db, "dataset=tinyshakespeare")) == ["t_00006"]
    assert ids(query(db, "optimizer=adamw&optimizer=sgd")) == ["t_00003"]  # any of them
    assert ids(query(db, "seed=1338")) == ["t_00004"]
    assert ids(query(db, "status=stopped_early")) == ["t_00004"]
    assert ids(query(db, {"learning_rate": "0.01:0.02", "sweep": "small"})) == [
        "t_00001",
        "t_00004",
        "t_00005",
    ]
    assert ids(query(db, [("dataset", "pydocs%5Fchar")])) == []  # pairs are not unquoted
    assert ids(query(db, "dataset=pydocs%5Fchar&n_params=3e8")) == ["t_00002"]
    assert len(query(db, "")) == 6 and len(query(db, "optimizer=muon", limit=2)) == 2
    (row,) = query(db, "trial_id=t_00006")
    assert row["sweep"] == "shakespeare" and row["owner"] is None
    assert row["params"] == {"optimizer": "muon", "learning_rate": 0.02, "seed": 1337}
    assert isinstance(row, dict) and row["n_params"] == 150_000_000


@pytest.mark.parametrize(
    ("filters", "fragment"),
    [
        ("optimiser=muon", "unknown filter 'optimiser' (did you mean 'optimizer'?)"),
        ("n_params=a:b", "filter n_params=a:b: 'a' is not a finite number"),
        ("n_params=2e8:1e8", "filter n_params=2e8:1e8: LO 2e+08 is above HI 1e+08"),
        ("n_params=:", "filter n_params=: gives no bound"),
        ("learning_rate=1:2:3", "filter learning_rate=1:2:3 has more than one ':'"),
        ("val_loss=nan", "'nan' is not a finite number"),
        ("optimizer=", "filter optimizer= gives no value"),
        ("optimizer", "filter 'optimizer' is not KEY=VALUE"),
    ],
)
def test_a_bad_filter_is_one_line_naming_it_and_the_valid_keys(db, filters, fragment):
    with pytest.raises(UserError) as err:
        index.query_trials(db, filters)
    line = str(err.value)
    assert fragment in line and "\n" not in line
    for key in ("optimizer", "dataset", "n_params", "learning_rate", "best_val_loss"):
        assert key in line.split("; ", 1)[1]


def test_a_folder_that_is_no_sweep_is_one_line(db, tmp_path):
    with pytest.raises(UserError, match=r"holds no raygpt sweep.json; give a sweep folder"):
        index.ingest(db, tmp_path)
    store = storage.resolve(str(tmp_path), check=False)
    preflight.write_record(store, store.path("s", results.SWEEP_FILE), sweep_record("s"))
    with pytest.raises(UserError, match=r"no trials.parquet in .*/s \(yet\?\)"):
        index.ingest(db, tmp_path / "s")
    (tmp_path / "s" / results.TRIALS_FILE).write_bytes(b"PAR1 damaged")
    with pytest.raises(UserError, match=r"^cannot read .*/s: "):
        index.ingest(db, tmp_path / "s")
