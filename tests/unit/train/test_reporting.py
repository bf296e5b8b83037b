"""raygpt.train.reporting: step rows, report metrics, --eval-only's step zero, the ranks'
hardware in run.json, and in-process reports with their checkpoints (Ray Train's local
mode, which starts no Ray)."""

from __future__ import annotations

import json
import math
import socket
import time

import pytest
import ray
import torch

from raygpt import checkpoint, results, storage
from raygpt.config.train import TrainConfig
from raygpt.model.gpt import GPT, GPTConfig
from raygpt.train import reporting
from raygpt.train.lr_schedule import lr_at
from raygpt.train.step_stats import StepReading
from raygpt.train.wiring import RunWiring


def _cfg(tmp_path) -> TrainConfig:
    return TrainConfig(
        storage_path=str(tmp_path), learning_rate=1e-3, warmup_steps=4, max_steps=20
    ).validate()


IDENTITY = {"run": "r", "trial_id": "", "optimizer": "adamw", "learning_rate": 1e-3}


def test_step_row(tmp_path):
    cfg = _cfg(tmp_path)
    first = reporting.step_row(
        StepReading(1, 4.5, 2.0, 3.0, first=True), cfg, IDENTITY, 512, 1000, 2, 1e12
    )
    # The attempt's first step (compile, warm-up) keeps its time but no throughput.
    assert first["tokens_per_sec"] is None and first["mfu"] is None
    assert first["step_time_ms"] == pytest.approx(3000.0)
    assert first["lr"] == lr_at(0, cfg)  # the rate of the update that made step 1
    row = reporting.step_row(StepReading(5, 3.0, 1.0, 0.5), cfg, IDENTITY, 512, 1000, 2, 1e12)
    assert row["step"] == 5 and row["tokens_seen"] == 5 * 512
    assert row["train_loss"] == 3.0 and row["grad_norm"] == 1.0
    assert row["lr"] == lr_at(4, cfg) and row["lr"] != lr_at(5, cfg)
    assert row["tokens_per_sec"] == pytest.approx(1024.0)
    assert row["mfu"] == pytest.approx(1000 * 1024.0 / (1e12 * 2))
    assert (row["val_loss"], row["eval_train_loss"]) == (None, None)  # filled at evaluations
    assert {k: row[k] for k in IDENTITY} == IDENTITY
    # No known peak (a CPU): no MFU, but a throughput.
    cpu = reporting.step_row(StepReading(5, 3.0, 1.0, 0.5), cfg, IDENTITY, 512, 1000, 1, None)
    assert cpu["mfu"] is None and cpu["tokens_per_sec"] == pytest.approx(1024.0)
    # Every key but the identity is a step column.
    assert set(row) - set(IDENTITY) <= set(results.STEP_COLUMNS)


def _metrics(**overrides):
    values = dict(
        step=10,
        tokens_seen=5120,
        train_loss=3.0,
        last_val=None,
        rung_val=None,
        cooldown_seconds=0.0,
        best_val=math.inf,
        evaluated=False,
        lr=1e-3,
        diverged=False,
        done=False,
        hellaswag=None,
        timeline={"workers_up_at": 1.0, "first_step_at": 2.0},
    )
    return reporting.report_metrics(**(values | overrides))


def test_report_metrics():
    before = time.time()
    report = _metrics()
    # Tune needs its metric in every report: inf before the first evaluation.
    assert report["val_loss"] == math.inf and report["rung_val_loss"] == math.inf
    assert "hellaswag_acc_norm" not in report
    assert (report["workers_up_at"], report["first_step_at"]) == (1.0, 2.0)
    assert before <= report["last_step_at"] <= time.time()
    assert "n_params" not in report
    size = {"n_params": 10, "flops_per_token": 60, "n_layer": 1, "n_embd": 8}
    later = _metrics(last_val=2.5, rung_val=2.4, hellaswag=0.3, evaluated=True, model_size=size)
    assert (later["val_loss"], later["rung_val_loss"], later["hellaswag_acc_norm"]) == (
        2.5,
        2.4,
        0.3,
    )
    assert {k: later[k] for k in size} == size
    assert later["evaluated"] is True and later["done"] is False


def test_step_zero():
    row, report = reporting.step_zero({"val": 4.0, "train": 3.9}, IDENTITY)
    assert row["step"] == 0 and row["train_loss"] is None  # no training step was taken
    assert (row["val_loss"], row["eval_train_loss"]) == (4.0, 3.9)
    assert report["train_loss"] == 3.9 and report["best_val_loss"] == 4.0
    assert report["done"] and report["evaluated"] and not report["diverged"]
    _, nan = reporting.step_zero({"val": math.nan, "train": 3.9}, IDENTITY)
    assert nan["diverged"] is True


def test_model_size_and_workers(tmp_path):
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=2, n_head=2, n_embd=16))
    size = reporting.model_size(model, 123)
    assert size == {
        "n_params": model.n_params(),
        "flops_per_token": 123,
        "n_layer": 2,
        "n_embd": 16,
    }
    (worker,) = reporting.describe_workers(torch.device("cpu"), 1)
    assert worker == {
        "host": socket.gethostname(),
        "device": "cpu",
        "device_name": None,
        "cpu_threads": torch.get_num_threads(),
        "rank": 0,
    }


def test_record_workers(tmp_path):
    store = storage.resolve(str(tmp_path), check=False)
    workers = [{"host": "h", "rank": 0}]
    # A sweep trial has no run.json: nothing is written.
    reporting.record_workers(store, store.path("trial"), workers)
    assert not (tmp_path / "trial").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"config": {"x": 1}, "workers": []}))
    reporting.record_workers(store, store.path("run"), workers)
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == {
        "config": {"x": 1},
        "workers": workers,
    }


def test_world_of_a_tune_trial_needs_no_ray_context(tmp_path):
    store = storage.resolve(str(tmp_path), check=False)
    assert reporting.world(RunWiring(storage=store, tune_session=True, run_name="t1")) == (
        0,
        1,
        "t1",
    )
    assert reporting.world(RunWiring(storage=store, tune_session=True)) == (0, 1, "")


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((2,), float(step))}, "config": {}, "step": step}


def test_in_process_reports_and_checkpoints_in_local_mode(tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    store = storage.resolve(str(tmp_path), check=False)
    run_path = store.path("local")

    def send(metrics, state, step):
        reporting.report(
            metrics,
            state,
            step,
            tune_session=False,
            in_process=True,
            run=store,
            run_path=run_path,
            keep=2,
            upload="async",
        )

    def train():
        world = reporting.world(RunWiring(storage=store))
        for step in (3, 6, 9):
            send({"step": step, "val_loss": 10.0 - step}, _state(step), step)
        send({"step": 10, "val_loss": 0.5}, None, 10)  # an evaluation without a checkpoint
        return world

    result = TorchTrainer(
        train, scaling_config=ScalingConfig(num_workers=0), run_config=RunConfig(name="local")
    ).fit()
    assert not ray.is_initialized()
    assert result.return_value == (0, 1, "local")  # rank, world size, run name
    assert result.metrics == {"step": 10, "val_loss": 0.5}
    # Saved under Ray Train's names; only the `keep` newest stay.
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == [
        "checkpoint_0000006",
        "checkpoint_0000009",
    ]
    newest = checkpoint.load(checkpoint.latest_in_run(run_path, store), store)
    assert newest["step"] == 9 and torch.equal(newest["model"]["w"], torch.full((2,), 9.0))
