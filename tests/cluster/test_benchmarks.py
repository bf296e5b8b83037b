"""The benchmark scripts that need a Ray cluster, run as documented at a tiny size (the
rest are in tests/unit/benchmarks/). They join the session's private cluster
(RAY_ADDRESS, or the script's --address) instead of starting their own.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from benchmark_runs import (
    BENCH,
    last_json,
    run,
)
from conftest import REPO, step_rows


def test_prepare_throughput(env, address, tmp_path):
    out = tmp_path / "prepare.json"
    stdout = run([BENCH / "prepare_throughput.py", "--gb", "0.001", "--merges", "50",
                  "--runs", "raygpt-1,nanogpt-1", "--work", tmp_path / "work", "--tiny",
                  "--address", address, "--json", out], env)  # fmt: skip
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"raygpt-1", "nanogpt-1"}
    assert runs["raygpt-1"]["tokens"] == runs["nanogpt-1"]["tokens"] > 0
    assert "same tokens on every side: True" in stdout


def test_sweep_overhead_runs_the_asha_bias_grid_and_asha_bias_reads_it(
    cluster_env, experiment, text_file, tmp_path
):
    storage = tmp_path / "results"
    # asha_bias.py's docstring grid, tiny (2 learning rates to step 20, rungs at 5 and 15),
    # timed by sweep_overhead.py's `run`: one sweep serves both scripts.
    stdout = run([BENCH / "sweep_overhead.py", "run", "--label", "asha-bias", "--",
                  experiment, "--data-file", text_file, "--optimizers", "adamw",
                  "--search", "grid", "--grid-points", "2", "--lr-range", "adamw=1e-3:3e-2",
                  "--scheduler", "fifo", "--grace-steps", "5", "--reduction-factor", "3",
                  "--rung-cooldown", "0.2", "--eval-train", "false", "--name", "asha-bias",
                  "--storage-path", storage], cluster_env)  # fmt: skip
    overhead = last_json(stdout)
    assert overhead["label"] == "asha-bias" and overhead["trials"] == 2
    assert overhead["overhead_from"] == "timeline" and overhead["overhead_per_trial_mean_s"] >= 0
    assert overhead["command_wall_seconds"] >= overhead["sweep_seconds"] > 0
    assert overhead["ratio_wall_to_steps_and_cooldowns_per_slot"] > 0
    # FIFO with --grace-steps trains cooled copies (milliseconds each, here: the summary's
    # one decimal rounds them away, the trials table keeps them).
    trials = pq.read_table(storage / "asha-bias" / "trials.parquet").to_pylist()
    assert all(t["cooldown_seconds"] > 0 for t in trials)

    rows = step_rows(storage / "asha-bias")
    cooled = sorted((r["trial_id"], r["step"]) for r in rows if r["cooled_val_loss"] is not None)
    trials = sorted({r["trial_id"] for r in rows})
    assert len(trials) == 2 and cooled == [(t, s) for t in trials for s in (5, 15)]

    stdout = run([BENCH / "asha_bias.py", storage / "asha-bias", "--reduction-factor", "3"],
                 cluster_env)  # fmt: skip
    result = json.loads(stdout)
    assert result["final_step"] == 20 and len(result["final"]) == 2
    assert [r["step"] for r in result["rungs"]] == [5, 15]
    for rung in result["rungs"]:
        for half in ("before", "after"):
            assert sorted(rung[half]["ranking"]) == sorted(result["final"])
            assert rung[half]["spearman_vs_final"] in (-1.0, 1.0)  # two trials


def test_sweep_grid_vs_optuna_counts_rung_cooldown_steps(
    cluster_env, experiment, text_file, tmp_path
):
    out, storage = tmp_path / "grid_vs_optuna.json", tmp_path / "results"
    run([BENCH / "sweep_grid_vs_optuna.py", "--experiment", experiment, "--data-file", text_file,
         "--max-steps", "20", "--optimizers", "adamw", "--grid-points", "2",
         "--grace-steps", "5", "--reduction-factor", "3", "--storage-path", storage,
         "--json", out], cluster_env)  # fmt: skip
    grid, optuna = json.loads(out.read_text())["rows"]
    assert grid["trials"] == optuna["trials"] == 2
    assert grid["cooldown_steps"] == 0 and grid["steps"] == grid["trial_steps"] == 40
    # ASHA's rungs at 5 and 15 (grace 5, x3): a cooled copy of 1 and of 3 steps (0.2 x s)
    # for every trial that got there.
    trials = pq.read_table(storage / "bench-optuna" / "trials.parquet").to_pylist()
    expected = sum((t["steps"] >= 5) * 1 + (t["steps"] >= 15) * 3 for t in trials)
    assert expected > 0 and optuna["cooldown_steps"] == expected
    assert optuna["steps"] == optuna["trial_steps"] + expected
    assert optuna["trial_steps"] == sum(t["steps"] for t in trials)

    # A sweep without rung cooldowns (the FIFO grid) is not asha_bias.py's input: one line.
    bad = subprocess.run(
        [sys.executable, BENCH / "asha_bias.py", storage / "bench-grid"],
        cwd=REPO, env=cluster_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "no cooled val" in lines[0], bad.stderr


def test_lr_transfer_fits_proxies_predicts_and_checks_against_a_direct_sweep(cluster_env, tmp_path):
    out, storage = tmp_path / "transfer.json", tmp_path / "results"
    # The experiment file the figures come from, shrunk (3 learning rates, 10 steps), on the
    # embedded corpus: a real transfer sweep at three proxy widths, then a direct sweep.
    stdout = run([BENCH / "lr_transfer.py", "--parametrizations", "mup",
         "--proxies", "16,32,48", "--target", "64", "--direct", "64", "--direct-seeds", "1",
         "--storage-path", storage, "--json", out, "--", "--dataset", "pydocs_char",
         "--n-head", "2", "--block-size", "16", "--batch-size", "4", "--max-steps", "10",
         "--lr-decay-steps", "10", "--warmup-steps", "2", "--eval-interval", "10",
         "--eval-iters", "2", "--grid-points", "3", "--seeds", "1", "--mup-base-width", "16",
         "--lr-range", "adamw=4e-3:6.4e-2", "--max-concurrent-trials", "2"], cluster_env)  # fmt: skip
    record = json.loads(out.read_text())
    (width,) = record["width"]
    assert width["parametrization"] == "mup" and width["axis"] == "n_embd"
    assert [p["size"] for p in width["proxies"]] == [16, 32, 48]
    assert all(p["device_seconds"] > 0 for p in width["proxies"])
    (direct,) = record["direct"]
    assert direct["size"] == 64 and direct["trials"] == 3 and direct["device_seconds"] > 0
    assert 4e-3 <= direct["lr"] <= 6.4e-2
    checks = record["checks"]["mup"]
    proxies = {p["size"]: p["lr"] for p in width["proxies"]}
    assert checks["widest_vs_narrowest"] == pytest.approx(proxies[48] / proxies[16])
    spent = sum(p["device_seconds"] for p in width["proxies"])
    if width["prediction"]["lr"] is not None:
        assert checks["cost_fraction"] == pytest.approx(spent / direct["device_seconds"])
        assert checks["prediction_vs_direct"] == pytest.approx(
            width["prediction"]["lr"] / direct["lr"]
        )
    # What the transfer sweep wrote: each proxy's own sweep, the table and the figure.
    folder = storage / "transfer-mup"
    for w in (16, 32, 48):
        rows = pq.read_table(folder / "proxies" / f"n_embd={w}" / "trials.parquet").to_pylist()
        assert len(rows) == 3 and {r["n_embd"] for r in rows} == {w}
        assert all(r["flops"] > 0 and r["device_seconds"] > 0 for r in rows)
    assert (folder / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pq.read_table(folder / "transfer.parquet").to_pylist()
    assert [r["n_embd"] for r in table if r["kind"] == "proxy"] == [16, 32, 48]
    (line,) = [x for x in width["lines"] if x.startswith("adamw: ")]
    assert "for n_embd=64" in line and line in stdout, width["lines"]
    assert line.startswith("adamw: lr ") or line.startswith("adamw: no prediction"), line
    assert (storage / "direct-mup-n_embd=64" / "trials.parquet").exists()


def test_checkpoint_upload(env, address, tmp_path):
    out = tmp_path / "ckpt.json"
    # One pair on S3 (each worker-group run costs ~15 s on 2 cores); the order of a
    # longer schedule is checked above.
    stdout = run([BENCH / "checkpoint_upload.py", "--storage", "s3", "--max-steps", "4",
                  "--eval-interval", "2", "--n-layer", "1", "--n-embd", "48", "--repeats", "1",
                  "--no-warmup", "--address", address, "--json", out], env)  # fmt: skip
    records = json.loads(out.read_text())
    assert [(r["storage"], r["repeat"], r["mode"]) for r in records] == [
        ("s3", 0, "sync"), ("s3", 0, "async"),
    ]  # fmt: skip
    assert all(r["checkpoints"] == 2 and r["training_seconds"] > 0 for r in records)
    # How the checkpoint is uploaded changes nothing the run computes.
    assert records[0]["val_loss"] == pytest.approx(records[1]["val_loss"], abs=1e-6)
    assert re.search(r"s3   : sync +[\d.]+ s, async +[\d.]+ s", stdout), stdout[-2000:]
