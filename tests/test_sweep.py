"""The sweep on a real local Ray cluster: ASHA, divergence, Parquet, TensorBoard, report."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pyarrow.parquet as pq
import pytest
from conftest import step_rows

from raygpt import sweep
from raygpt.errors import UserError

TINY = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
    "--batch-size", "8", "--max-steps", "40", "--eval-interval", "10", "--eval-iters", "2",
    "--warmup-steps", "2", "--log-interval", "40", "--compile", "false",
]  # fmt: skip


@pytest.mark.slow
def test_grid_sweep_asha_stops_frees_and_records_divergence(ray_cluster, storage):
    args = [
        *TINY,
        "--optimizers", "adamw,sgd,momentum",
        "--search", "grid", "--grid-points", "2",
        # adamw learns, sgd at 1e-5 barely moves (ASHA stops it), momentum at 500 blows up
        "--lr-range", "adamw=3e-3:6e-3", "--lr-range", "sgd=1e-5:2e-5",
        "--lr-range", "momentum=300:500",
        "--grace-steps", "10", "--reduction-factor", "2",
        "--max-concurrent-trials", "2",
        # Room after the first rung: ASHA's stop reaches a trial asynchronously, and a tiny
        # model could otherwise finish 40 steps before it lands (seen once in CI).
        "--max-steps", "100",
        "--name", "grid", "--storage-path", str(storage),
    ]  # fmt: skip
    sweep.run(*sweep.configs_from_argv(args))
    sweep_dir = storage / "grid"

    trials = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    assert len(trials) == 6
    status = {t["trial_id"]: t["status"] for t in trials}
    by_opt = {}
    for t in trials:
        by_opt.setdefault(t["optimizer"], []).append(t)
    assert any(t["status"] == "completed" and t["steps"] == 100 for t in by_opt["adamw"]), status
    assert all(t["status"] == "diverged" for t in by_opt["momentum"]), status
    assert any(t["status"] == "stopped_early" for t in by_opt["sgd"]), status
    # Every trial ran, so the slots of stopped and diverged trials were given back.
    assert all(t["status"] != "running" and t["steps"] > 0 for t in trials)
    assert all(t["momentum"] is None for t in trials if t["optimizer"] != "momentum")

    steps = step_rows(sweep_dir)
    assert len(steps) == sum(t["steps"] for t in trials)
    keys = [(r["trial_id"], r["step"]) for r in steps]
    assert len(set(keys)) == len(keys)
    assert set(steps[0]) >= {"trial_id", "step", "train_loss", "val_loss", "lr",
                             "grad_norm", "tokens_per_sec", "mfu"}  # fmt: skip
    meta = pq.read_schema(sweep_dir / "trials.parquet").metadata
    assert b"raygpt.environment" in meta and b"raygpt.sweep" in meta

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    best = min(by_opt["adamw"], key=lambda t: t["best_val_loss"])
    acc = EventAccumulator(str(sweep_dir / "tensorboard" / best["trial_id"]))
    acc.Reload()
    assert {"loss/train", "loss/val", "optim/lr", "optim/grad_norm", "perf/tokens_per_sec"} <= set(
        acc.Tags()["scalars"]
    )
    assert len(acc.Scalars("loss/train")) == 100
    assert (sweep_dir / "lr_sensitivity.png").stat().st_size > 10_000

    (sweep_dir / "lr_sensitivity.png").unlink()
    out = subprocess.run(
        [sys.executable, "-m", "raygpt.report", str(sweep_dir)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "adamw" in out.stdout and f"{best['learning_rate']:.3g}" in out.stdout
    assert (sweep_dir / "lr_sensitivity.png").exists()


def test_conditional_space_samples_momentum_only_for_momentum():
    space = sweep.OptunaSpace(["adamw", "sgd", "momentum"], sweep.DEFAULT_LR_RANGES)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        space(trial)
        params = trial.params
        seen.add(params["optimizer"])
        assert ("momentum" in params) == (params["optimizer"] == "momentum")
        lo, hi = sweep.DEFAULT_LR_RANGES[params["optimizer"]]
        assert lo <= params[f"{params['optimizer']}_learning_rate"] <= hi
        study.tell(trial, 1.0)
    assert seen == {"adamw", "sgd", "momentum"}


def test_grid_is_log_spaced_per_optimizer():
    points = sweep.grid_points(["adamw", "sgd"], {"adamw": (1e-4, 1e-2), "sgd": (1e-3, 1.0)}, 3)
    assert [p["learning_rate"] for p in points] == pytest.approx(
        [1e-4, 1e-3, 1e-2, 1e-3, 10**-1.5, 1.0]
    )


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--optimizers", "adamw,lamb"], "'lamb'"),
        (["--lr-range", "adamw=1e-2:1e-4"], "LO=0.01 HI=0.0001"),
        (["--lr-range", "sgd=abc"], "OPT=LO:HI"),
        (["--lr-range", "adam=1e-4:1e-3"], "not in --optimizers"),
        (["--grace-steps", "15"], "multiple of eval_interval"),
        (["--search", "bayes"], "'bayes'"),
    ],
)
def test_bad_sweep_flags_name_the_value(flags, fragment):
    with pytest.raises(UserError, match=None) as err:
        sweep.configs_from_argv([*TINY, *flags])
    assert fragment in str(err.value)
