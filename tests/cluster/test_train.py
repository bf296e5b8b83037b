"""The training loop end to end on a real local Ray cluster (no mocks)."""

from __future__ import annotations

import math
import os

import pytest
from conftest import step_metadata, step_rows, tiny_config

from raygpt.errors import UserError
from raygpt.train import driver as train_driver
from raygpt.train.faults import FAIL_AT_ENV

# 12 steps, a checkpoint every 6: small enough for seconds, long enough to compare.
SHORT = dict(max_steps=12, lr_decay_steps=12, eval_interval=6, warmup_steps=2)


def _losses(run_dir) -> dict[int, float]:
    return {row["step"]: row["train_loss"] for row in step_rows(run_dir)}


def _assert_same_losses(a: dict[int, float], b: dict[int, float], tol: float) -> None:
    assert sorted(a) == sorted(b) == list(range(1, SHORT["max_steps"] + 1))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=tol), step


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """Runs that several tests compare against, each run once per session."""
    storage = tmp_path_factory.mktemp("reference")
    runs = {
        # the same global batch (16 sequences) three ways
        "ddp": tiny_config(storage, name="ddp", num_workers=2, batch_size=8, **SHORT),
        "single": tiny_config(storage, name="single", num_workers=1, batch_size=16, **SHORT),
        # in this process (Ray Train's local mode): the same loop without a worker group
        "accum": tiny_config(
            storage,
            name="accum",
            batch_size=8,
            tokens_per_step=16 * 32,
            in_process="true",
            **SHORT,
        ),
    }
    summaries = {key: train_driver.run(cfg) for key, cfg in runs.items()}
    return storage, summaries


def test_loss_falls_and_results_are_written(ray_cluster, storage):
    # Checkpoints every 15 steps, independent of the evals every 20.
    cfg = tiny_config(storage, name="falls", max_steps=60, eval_interval=20, checkpoint_interval=15)
    summary = train_driver.run(cfg)
    run_dir = storage / "falls"
    rows = step_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 61))
    # One immutable part per report (checkpoints at 15, 30, 45, 60; evals at 20, 40, 60),
    # never one rewritten file; every checkpoint step closes a part.
    assert sorted(p.name for p in (run_dir / "steps").iterdir()) == [
        "part-000000001-000000015.parquet",
        "part-000000016-000000020.parquet",
        "part-000000021-000000030.parquet",
        "part-000000031-000000040.parquet",
        "part-000000041-000000045.parquet",
        "part-000000046-000000060.parquet",
    ]
    evals = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    assert len(evals) == 3
    assert evals[-1] < evals[0] < rows[0]["train_loss"] - 0.5, evals
    assert math.log(96) - 0.5 < rows[0]["train_loss"] < math.log(96) + 0.5
    assert summary["val_loss"] == pytest.approx(evals[-1])
    assert all(r["mfu"] is None for r in rows)  # CPU: no MFU
    # The first step's time holds the warm-up: it has no throughput of its own.
    assert rows[0]["tokens_per_sec"] is None and rows[0]["step_time_ms"] > 0
    assert all(r["tokens_per_sec"] > 0 for r in rows[1:])
    meta = step_metadata(run_dir)
    assert meta["config"]["learning_rate"] == 3e-3
    assert meta["environment"]["torch"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/val", "optim/lr", "optim/grad_norm", "perf/tokens_per_sec"} <= tags
    assert len(acc.Scalars("loss/train")) == 60
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [
        "checkpoint_0000045",
        "checkpoint_0000060",
    ]  # checkpoints at 15, 30, 45, 60; keep_checkpoints=2
    # torch got every core of the node (cpus_per_worker auto), not Ray's default of one.
    from raygpt.cluster import resources

    cores = ray_cluster.cluster_resources()["CPU"]
    assert summary["cpus_per_worker"] == cores == resources.auto_cpus_per_worker(1, use_gpu=False)
    assert resources.auto_cpus_per_worker(2, use_gpu=False) == max(1, cores // 2)
    assert resources.auto_cpus_per_worker(64, use_gpu=False) == 1


def test_a_run_whose_cpus_are_taken_fails_in_one_line_after_its_start_timeout(
    ray_cluster, storage, capsys
):
    # Another job holds one of the node's CPUs; the run asks for all of them.
    cores = ray_cluster.cluster_resources()["CPU"]

    class Holder:  # defined here, so that Ray ships it by value to the worker
        def ready(self) -> bool:
            return True

    holder = ray_cluster.remote(num_cpus=1)(Holder).remote()
    try:
        ray_cluster.get(holder.ready.remote())
        free = ray_cluster.available_resources().get("CPU", 0)
        cfg = tiny_config(
            storage, name="queued", num_workers=1, cpus_per_worker=cores, start_timeout_s=5
        )
        with pytest.raises(UserError) as err:
            train_driver.run(cfg)
    finally:
        ray_cluster.kill(holder)
    message = str(err.value)
    assert "\n" not in message
    assert f"(1 worker(s) x {cores:g} CPU) could not start within 5 s" in message
    assert free < cores and f"the cluster has {free:g} CPU" in message
    assert "--start-timeout-s" in message
    out = capsys.readouterr().out
    assert f"[raygpt] waiting for 1 worker(s) x {cores:g} CPU: the cluster has {free:g}" in out


def test_two_worker_ddp_equals_one_worker_with_double_micro_batch(reference):
    storage, summaries = reference
    _assert_same_losses(_losses(storage / "ddp"), _losses(storage / "single"), 1e-4)
    assert summaries["ddp"]["val_loss"] == pytest.approx(summaries["single"]["val_loss"], abs=1e-4)


def test_gradient_accumulation_equals_one_big_micro_batch(reference):
    storage, _ = reference
    _assert_same_losses(_losses(storage / "accum"), _losses(storage / "single"), 1e-4)


def test_resumed_run_equals_uninterrupted(reference):
    storage, _ = reference
    # The "single" run stopped after its step-6 checkpoint, then resumed to the end
    # (in this process: resume is the loop's, whichever way it runs).
    split = dict(name="split", batch_size=16, in_process="true")
    train_driver.run(tiny_config(storage, **split, **{**SHORT, "max_steps": 6}))
    train_driver.run(tiny_config(storage, **split, resume=True, **SHORT))
    _assert_same_losses(_losses(storage / "split"), _losses(storage / "single"), 1e-6)


def test_worker_death_restarts_from_checkpoint_with_same_losses(reference, monkeypatch, capfd):
    storage, summaries = reference
    # Rank 1 dies abruptly after step 9; the last checkpoint is step 6.
    monkeypatch.setitem(os.environ, FAIL_AT_ENV, "1:9")
    summary = train_driver.run(
        tiny_config(storage, name="crash", num_workers=2, batch_size=8, max_failures=1, **SHORT)
    )
    _assert_same_losses(_losses(storage / "crash"), _losses(storage / "ddp"), 1e-6)
    assert summary["val_loss"] == pytest.approx(summaries["ddp"]["val_loss"], abs=1e-6)
    assert "resumed from step 6" in capfd.readouterr().out  # it did die, and came back


def test_in_process_run_equals_worker_group_and_restarts_after_a_raise(
    reference, monkeypatch, capfd
):
    """Ray Train's local mode (in_process): the same numbers as a worker group, its own
    checkpoints on storage, and a raised error restarts from the latest one."""
    storage, summaries = reference
    monkeypatch.setitem(os.environ, FAIL_AT_ENV, "0:9:raise")  # after the step-6 checkpoint
    summary = train_driver.run(
        tiny_config(
            storage, name="inproc", in_process="true", batch_size=16, max_failures=1, **SHORT
        )
    )
    run_dir = storage / "inproc"
    out = capfd.readouterr().out
    assert "injected fault at step 9" in out and "resumed from step 6" in out
    _assert_same_losses(_losses(run_dir), _losses(storage / "single"), 1e-6)
    assert summary["val_loss"] == pytest.approx(summaries["single"]["val_loss"], abs=1e-6)
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == [
        "checkpoint_0000006",
        "checkpoint_0000012",
    ]
    assert summary["checkpoint"].endswith("checkpoint_0000012")
    import json
    import socket

    from raygpt.runtime import cpu_threads_available

    info = json.loads((run_dir / "run.json").read_text())
    assert info["cluster"].startswith("running in this process")
    # In this process, so on this machine: the worker's host is this one's name.
    assert info["workers"] == [
        {"host": socket.gethostname(), "device": "cpu", "device_name": None,
         "cpu_threads": cpu_threads_available(), "rank": 0}
    ]  # fmt: skip
