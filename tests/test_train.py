"""The training loop end to end on a real local Ray cluster (no mocks)."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
from conftest import tiny_config

from raygpt import train

pytestmark = pytest.mark.slow


def _losses(run_dir) -> dict[int, float]:
    table = pq.read_table(run_dir / "steps.parquet").to_pylist()
    return {row["step"]: row["train_loss"] for row in table}


def test_loss_falls_and_results_are_written(ray_cluster, storage):
    cfg = tiny_config(storage, name="falls", max_steps=60, eval_interval=20)
    summary = train.run(cfg)
    run_dir = storage / "falls"
    rows = pq.read_table(run_dir / "steps.parquet").to_pylist()
    assert [r["step"] for r in rows] == list(range(1, 61))
    evals = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    assert len(evals) == 3
    assert evals[-1] < evals[0] < rows[0]["train_loss"] - 0.5, evals
    assert math.log(96) - 0.5 < rows[0]["train_loss"] < math.log(96) + 0.5
    assert summary["val_loss"] == pytest.approx(evals[-1])
    assert all(r["tokens_per_sec"] > 0 and r["mfu"] is None for r in rows)  # CPU: no MFU
    from raygpt.metrics import read_metadata

    meta = read_metadata(run_dir / "steps.parquet")
    assert meta["config"]["learning_rate"] == 3e-3
    assert meta["environment"]["torch"]
    # TensorBoard events carry the curves
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/val", "optim/lr", "optim/grad_norm", "perf/tokens_per_sec"} <= tags
    assert len(acc.Scalars("loss/train")) == 60


def test_two_worker_ddp_equals_one_worker_with_double_micro_batch(ray_cluster, storage):
    common = dict(max_steps=12, eval_interval=6, warmup_steps=2)
    ddp = train.run(tiny_config(storage, name="ddp", num_workers=2, batch_size=4, **common))
    single = train.run(tiny_config(storage, name="single", num_workers=1, batch_size=8, **common))
    a, b = _losses(storage / "ddp"), _losses(storage / "single")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-4), step
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], abs=1e-4)


def test_gradient_accumulation_matches_bigger_micro_batch(ray_cluster, storage):
    common = dict(max_steps=8, eval_interval=4, warmup_steps=2, tokens_per_step=8 * 32)
    train.run(tiny_config(storage, name="accum", batch_size=4, **common))
    train.run(tiny_config(storage, name="whole", batch_size=8, **common))
    a, b = _losses(storage / "accum"), _losses(storage / "whole")
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-4), step


def test_resumed_run_equals_uninterrupted(ray_cluster, storage):
    common = dict(max_steps=20, lr_decay_steps=20, eval_interval=5, warmup_steps=3)
    train.run(tiny_config(storage, name="whole", **common))
    # The same run stopped after its step-10 checkpoint, then resumed to the end.
    train.run(tiny_config(storage, name="split", **{**common, "max_steps": 10}))
    train.run(tiny_config(storage, name="split", resume=True, **common))
    whole, split = _losses(storage / "whole"), _losses(storage / "split")
    assert sorted(split) == list(range(1, 21))
    for step in range(1, 21):
        assert split[step] == pytest.approx(whole[step], abs=1e-6), step
