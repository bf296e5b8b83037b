"""Sweeps a researcher trusts, on a real local Ray cluster: a seeded search over weight
decay with its confirmation reruns, and PBT cloning a better trial's checkpoint.
"""

from __future__ import annotations

import json
import statistics

import pyarrow.parquet as pq
import pytest

from raygpt.sweep import cli as sweep_cli
from raygpt.sweep import driver as sweep_driver

TINY = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
    "--batch-size", "8", "--eval-iters", "2", "--warmup-steps", "2",
    "--log-interval", "10", "--compile", "false", "--eval-interval", "10",
]  # fmt: skip


def test_seeded_search_over_weight_decay_with_confirmation(ray_cluster, storage, capsys):
    args = [
        *TINY, "--max-steps", "30",
        "--optimizers", "adamw", "--search", "grid", "--grid-points", "1",
        "--lr-range", "adamw=3e-3:6e-3", "--scheduler", "fifo",
        "--search-space", "weight_decay=0.0,0.5",
        "--seeds", "2", "--confirm-top", "1", "--target-loss", "4.0",
        "--name", "seeded", "--storage-path", str(storage),
    ]  # fmt: skip
    summary = sweep_driver.run(*sweep_cli.configs_from_argv(args))
    out = capsys.readouterr().out
    folder = storage / "seeded"
    trials = pq.read_table(folder / "trials.parquet").to_pylist()

    # Search: the two weight decays at seed 1337; confirmation: the better one at 1338.
    search = [t for t in trials if t["phase"] == "search"]
    confirm = [t for t in trials if t["phase"] == "confirm"]
    assert sorted(json.loads(t["params"])["weight_decay"] for t in search) == [0.0, 0.5]
    assert {t["seed"] for t in search} == {1337} and [t["seed"] for t in confirm] == [1338]
    best_search = min(search, key=lambda t: t["final_val_loss"])
    assert confirm[0]["config_key"] == best_search["config_key"]

    # The timeline of every trial, in order, and its overhead.
    for t in trials:
        order = [t[k] for k in ("queued_at", "started_at", "workers_up_at", "first_step_at",
                                "last_step_at", "torn_down_at")]  # fmt: skip
        assert None not in order, t
        assert order == sorted(order), t
        assert t["overhead_seconds"] >= 0
        assert t["steps_to_target"] is None or 0 < t["steps_to_target"] <= 30

    # Mean +- sd over the confirmed configuration's two seeds, from the rows.
    seeded = [c for c in summary["comparison"]["ranking"] if c["n"] == 2]
    assert len(seeded) == 1
    vals = [t["final_val_loss"] for t in trials if t["config_key"] == confirm[0]["config_key"]]
    assert seeded[0]["mean"] == pytest.approx(statistics.fmean(vals))
    assert seeded[0]["sd"] == pytest.approx(statistics.stdev(vals))

    # One live view on the console; each trial's lines in its own log file instead.
    assert "[sweep] " in out and "| trials 2:" in out and "steps " in out and "ETA" in out
    assert "step 30/30" not in out
    logs = sorted((folder / "logs").glob("*.log"))
    assert len(logs) == 3 and all("step 30/30" in p.read_text() for p in logs)
    assert "mean ± sd over seeds" in out


def test_pbt_clones_a_better_trials_checkpoint(ray_cluster, storage):
    args = [
        *TINY, "--max-steps", "60",
        "--optimizers", "adamw,sgd", "--search", "grid", "--grid-points", "1",
        # adamw learns; sgd at 1e-6 does not, so PBT replaces it with adamw's checkpoint
        "--lr-range", "adamw=5e-3:6e-3", "--lr-range", "sgd=1e-6:2e-6",
        "--scheduler", "pbt", "--pbt-interval", "10",
        "--name", "pbt", "--storage-path", str(storage),
    ]  # fmt: skip
    sweep_driver.run(*sweep_cli.configs_from_argv(args))
    folder = storage / "pbt"
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    assert len(trials) == 2

    # The sgd trial was restarted from adamw's checkpoint with adamw's (perturbed) config.
    def lines(trial_id: str) -> str:  # every attempt's log: a clone restarts the trial
        return "".join(p.read_text() for p in (folder / "logs").glob(f"{trial_id}*.log"))

    cloned = [t for t in trials if "resumed from step" in lines(t["trial_id"])]
    assert cloned, [lines(t["trial_id"]) for t in trials]
    assert all(t["optimizer"] == "adamw" for t in cloned)
    assert all(t["status"] == "completed" and t["steps"] == 60 for t in trials)
    assert (folder / "pbt_global.txt").exists()  # Tune's record of each exploit
