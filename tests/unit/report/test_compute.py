"""Compute accounting (raygpt/report/compute.py) in trials.parquet and the summary (no Ray).

The trials table's callback (sweep/trials_table.py) is driven with stand-in trials and
step parts written as a trial's rank 0 writes them; the summary reads a synthetic
trials.parquet with the new columns, and an old one without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import TuneTrial
from conftest import REPO, run_main

from raygpt import results, storage
from raygpt.model import sizes
from raygpt.report import compute, tables
from raygpt.report import driver as report_driver
from raygpt.report import summary as report_summary


@pytest.mark.parametrize(
    ("n_layer", "n_head", "n_embd", "block", "vocab", "bias"),
    [(2, 4, 64, 32, 65, False), (1, 2, 48, 16, 50304, True), (3, 4, 96, 64, 65, True)],
)
def test_flops_per_token_and_params_are_the_models(n_layer, n_head, n_embd, block, vocab, bias):
    torch = pytest.importorskip("torch")
    from raygpt.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            block_size=block,
            vocab_size=vocab,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            bias=bias,
        )
    )
    n = sizes.non_embedding_params(n_layer, n_embd, vocab, bias)
    assert n == model.n_params(non_embedding=True)
    assert compute.flops_per_token(n, n_layer, n_head, n_embd, block) == model.flops_per_token()


def test_trial_compute_on_gpus_and_cpus():
    # 2 workers x 0.5 GPU for 100 s (90 s of steps + 10 s of rung cooldowns).
    gpu = compute.trial_compute(100.0, 1000, 6e6, workers=2, gpus_per_worker=0.5)
    assert gpu == {"flops": 6e9, "device_seconds": 100.0, "gpu_hours": pytest.approx(100 / 3600)}
    cpu = compute.trial_compute(100.0, 1000, 6e6, workers=3, gpus_per_worker=0.0)
    assert cpu["device_seconds"] == 300.0 and cpu["gpu_hours"] == 0.0
    assert compute.trial_compute(None, None, None, 1, 0.0) == {
        "flops": None,
        "device_seconds": None,
        "gpu_hours": None,
    }


def _row(trial_id: str, **values) -> dict:
    return (
        {name: None for name in results.TRIAL_SCHEMA.names}
        | {
            "trial_id": trial_id,
            "optimizer": "adamw",
            "learning_rate": 1e-3,
            "params": json.dumps({"optimizer": "adamw", "learning_rate": 1e-3}),
            "status": "completed",
            "steps": 20,
            "best_val_loss": 2.0,
            "final_val_loss": 2.0,
            "tokens": 20 * 64,
            "train_seconds": 10.0,
            "wall_seconds": 12.0,
        }
        | values
    )


def _write(folder: Path, rows: list[dict], schema: pa.Schema = results.TRIAL_SCHEMA) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(
        results.with_metadata(table, {"sweep": {"name": folder.name}}), folder / "trials.parquet"
    )
    return folder


def test_summary_totals_flops_device_hours_and_cost(tmp_path):
    rows = [
        _row("a", flops=2e12, device_seconds=1800.0, gpu_hours=0.5),
        _row("b", flops=1e12, device_seconds=1800.0, gpu_hours=0.5),
    ]
    trials, steps, _ = tables.load(_write(tmp_path / "s", rows))
    summary = report_summary.summarize(trials, steps, gpu_hour_price=2.5)
    c = summary["compute"]
    assert c["total_flops"] == 3e12 and c["device_hours"] == 1.0 and c["gpu_hours"] == 1.0
    assert c["cost"] == 2.5
    text = report_summary.format_summary(summary)
    assert "3.0e12 FLOPs, 1 device-hours (1 GPU-hours), cost 2.50 at 2.5 per GPU-hour" in text
    # Without a price: no cost; on CPUs the hours say so.
    cpu = [_row("c", flops=1e12, device_seconds=36.0, gpu_hours=0.0)]
    trials, steps, _ = tables.load(_write(tmp_path / "cpu", cpu))
    text = report_summary.format_summary(report_summary.summarize(trials, steps))
    assert "1.0e12 FLOPs, 0.01 device-hours (CPU workers, no GPU)" in text
    assert "cost" not in text


def test_an_old_trials_table_reads_with_nulls(tmp_path):
    old = pa.schema(
        [f for f in results.TRIAL_SCHEMA if f.name not in ("flops", "device_seconds", "gpu_hours")]
    )
    rows = [{k: v for k, v in _row("a").items() if k in old.names}]
    trials, steps, _ = tables.load(_write(tmp_path / "old", rows, old))
    assert trials["flops"].to_pylist() == [None] and trials["n_params"].to_pylist() == [None]
    summary = report_summary.summarize(trials, steps, gpu_hour_price=3.0)
    assert summary["compute"]["total_flops"] is None and summary["compute"]["cost"] is None
    assert "n/a FLOPs, n/a device-hours, cost n/a" in report_summary.format_summary(summary)


def _step_part(store, sweep_path: str, trial_id: str, steps: int, tokens_per_step: int) -> None:
    rows = [
        {
            "trial_id": trial_id,
            "optimizer": "adamw",
            "learning_rate": 1e-3,
            "step": s,
            "tokens_seen": s * tokens_per_step,
            "train_loss": 3.0 - 0.01 * s,
            "step_time_ms": 500.0,
        }
        for s in range(1, steps + 1)
    ]
    results.write_step_part(store, f"{sweep_path}/runs/{trial_id}", rows, {})


def test_trials_table_fills_the_compute_columns(tmp_path):
    from raygpt.sweep.trials_table import SweepOutputs

    store = storage.resolve(str(tmp_path), check=False)
    sweep_path = store.path("s")
    base = {"n_layer": 2, "n_embd": 64, "n_head": 4, "parametrization": "mup"}
    outputs = SweepOutputs(
        store,
        sweep_path,
        {"config": base},
        max_steps=20,
        base_seed=1337,
        announce=False,
        workers=2,
        gpus_per_worker=0.5,
    )
    trial = TuneTrial("t1", {"optimizer": "adamw", "learning_rate": 1e-3, "n_embd": 96})
    outputs.on_trial_start(0, [trial], trial)
    record = outputs.records()[0]
    # From the config until the model reports: the trial's own n_embd over the base's.
    assert (record["n_layer"], record["n_embd"], record["parametrization"]) == (2, 96, "mup")
    outputs.on_trial_result(
        0,
        [trial],
        trial,
        {"step": 20, "val_loss": 2.0, "n_params": 123_456, "flops_per_token": 800_000,
         "n_layer": 2, "n_embd": 96, "cooldown_seconds": 2.0},
    )  # fmt: skip
    _step_part(store, sweep_path, "t1", 20, 64)
    outputs.on_trial_complete(0, [trial], trial)
    (row,) = pq.read_table(tmp_path / "s" / "trials.parquet").to_pylist()
    assert row["n_params"] == 123_456 and row["n_embd"] == 96
    assert row["tokens"] == 20 * 64 and row["flops"] == 800_000 * 20 * 64
    # 20 steps of 0.5 s and 2 s of cooldowns, on 2 workers x 0.5 GPU.
    assert row["device_seconds"] == pytest.approx(12.0)
    assert row["gpu_hours"] == pytest.approx(12.0 / 3600)
    # A restored sweep reloads the table: the count is kept, and recomputed from its rate.
    again = SweepOutputs(store, sweep_path, {"config": base}, 20, 1337, announce=False)
    again.on_experiment_end([])
    (row,) = pq.read_table(tmp_path / "s" / "trials.parquet").to_pylist()
    assert row["flops"] == 800_000 * 20 * 64


def test_cli_gpu_hour_price(tmp_path, capfd):
    folder = _write(tmp_path / "s", [_row("a", flops=1e12, device_seconds=7200.0, gpu_hours=2.0)])
    # The command as its own process; its refusal in this process.
    proc = subprocess.run(
        [sys.executable, "-m", "raygpt.report", str(folder), "--no-plots", "--gpu-hour-price", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cost 6.00 at 3 per GPU-hour" in proc.stdout
    bad = run_main(report_driver.main, folder, "--gpu-hour-price", "cheap", capfd=capfd)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --gpu-hour-price 'cheap' must be a number >= 0 (the price of a GPU-hour)"
    ]
