"""Sweeps a researcher trusts, without Ray: GPU packing arithmetic, the trial memory
check, one-line settings errors, the packaged preset, rung cooldowns, seed and
equal-budget statistics, the live view. Seeds and PBT on a cluster are in
tests/cluster/test_sweep_trust.py.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics

import pytest
from scipy import stats

from raygpt.cluster import memory_estimate, resources
from raygpt.config.train import TrainConfig
from raygpt.errors import UserError
from raygpt.report import comparisons
from raygpt.sweep import cli as sweep_cli
from raygpt.sweep import driver as sweep_driver
from raygpt.sweep.live_view import progress_line
from raygpt.train import rung_cooldown

TINY = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
    "--batch-size", "8", "--eval-iters", "2", "--warmup-steps", "2",
    "--log-interval", "10", "--compile", "false", "--eval-interval", "10",
]  # fmt: skip


@pytest.mark.parametrize(
    "available, each, fit",
    [(1.0, 0.25, 4), (1.0, 0.1, 10), (2.0, 0.3, 6), (1.0, 1.0, 1), (8.0, 0.5, 16), (1, 0.3, 3)],
)
def test_fractional_gpu_shares_fit_as_ray_counts_them(available, each, fit):
    # 1 // 0.1 is 9.0 in floating point; Ray's resource units would place 10.
    assert resources.bundles_that_fit(available, each) == fit


def test_trial_memory_check_names_the_share_and_the_need():
    cfg = TrainConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=32)
    need = memory_estimate.estimate_training_bytes(cfg, 50257)
    params = memory_estimate.parameter_count(cfg, 50257)
    assert 120e6 < params < 130e6  # GPT-2 small with a padded vocabulary
    # weights + grads + AdamW state (16 bytes each) are a floor of the estimate
    assert need > 16 * params + memory_estimate.FIXED_BYTES
    gib = 2**30
    resources.check_gpu_memory(cfg, 50257, 1.0, 80 * gib)  # fits a whole H100
    with pytest.raises(UserError) as err:
        resources.check_gpu_memory(cfg, 50257, 0.25, 80 * gib)
    text = str(err.value)
    assert "--gpus-per-trial 0.25" in text and "20.0 GiB" in text and "batch_size=32" in text


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--gpus-per-trial", "0.25", "--workers-per-trial", "2"], "gpus_per_trial=0.25"),
        (["--gpus-per-trial", "1.5"], "must be in (0, 1]"),
        (["--scheduler", "pbt"], "--search random"),
        (["--scheduler", "pbt", "--search", "random", "--workers-per-trial", "2"], "one-worker"),
        (["--confirm-top", "2"], "--seeds 2"),
        (["--confirm-scope", "all", "--seeds", "2", "--confirm-top", "1"], "'all'"),
        (["--search-space", "weight_decay=abc:1"], "weight_decay"),
        (["--search-space", "seed=1,2"], "repeat seeds instead"),
        (["--rung-cooldown", "2"], "rung_cooldown=2.0"),
        (["--search-space", "rung_cooldown=0.1,0.2"], "not searchable"),
    ],
)
def test_bad_sweep_settings_are_one_line_errors(flags, fragment):
    with pytest.raises(UserError) as err:
        sweep_cli.configs_from_argv([*TINY, "--max-steps", "40", *flags])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_card_command_trains_the_packaged_preset():
    sweep_cfg, train = sweep_cli.configs_from_argv(["--optimizers", "adamw,sgd"])
    assert train.dataset == "pydocs_char" and train.max_steps == 450
    assert sweep_cfg.num_samples == 10 and sweep_cfg.scheduler == "asha"


def test_rung_cooldown_decays_to_min_lr_with_wsd_shape():
    lrs = [rung_cooldown.cooldown_lr(1e-2, 1e-3, i, 10) for i in range(10)]
    assert lrs[-1] == pytest.approx(1e-3)
    assert all(a > b for a, b in itertools.pairwise(lrs))
    # 1-sqrt: a quarter of the way in, half of the gap is gone
    assert rung_cooldown.cooldown_lr(1.0, 0.0, 24, 100) == pytest.approx(0.5)
    cfg = TrainConfig(rung_cooldown=0.2, cooldown_at=[250, 750], max_steps=2000)
    assert rung_cooldown.applies(cfg, 250) and not rung_cooldown.applies(cfg, 500)
    assert rung_cooldown.cooldown_steps(cfg, 750) == 150
    sf = TrainConfig(optimizer="adamw_schedulefree", rung_cooldown=0.2, cooldown_at=[250])
    assert not rung_cooldown.applies(sf, 250)  # its eval weights are already averaged


def _row(trial_id, config, lr, seed, status="completed", steps=100):
    params = {"optimizer": "adamw", "learning_rate": lr, "seed": seed}
    return {
        "trial_id": trial_id,
        "optimizer": "adamw",
        "learning_rate": lr,
        "params": json.dumps(params),
        "config_key": config,
        "status": status,
        "steps": steps,
        "final_val_loss": None,
        "steps_to_target": None,
    }


def test_seed_statistics_match_a_hand_computation():
    a = [1.50, 1.52, 1.49]  # the winner, three seeds
    b = [1.56, 1.55, 1.59]  # the runner-up
    rows = [_row(f"a{i}", "A", 1e-3, i) for i in range(3)]
    rows += [_row(f"b{i}", "B", 3e-3, i) for i in range(3)]
    rows.append(_row("c0", "C", 1e-2, 0, status="stopped_early", steps=50))
    evals = {f"a{i}": {50: 2.0, 100: v} for i, v in enumerate(a)}
    evals |= {f"b{i}": {50: 2.1, 100: v} for i, v in enumerate(b)}
    evals["c0"] = {50: 1.2}  # lower, but only at step 50: never the answer
    out = comparisons.compare(rows, evals)

    assert out["top_budget"] == 100
    first, second = out["ranking"]
    mean_a = sum(a) / 3
    sd_a = math.sqrt(sum((x - mean_a) ** 2 for x in a) / 2)
    assert first["mean"] == pytest.approx(mean_a) and first["sd"] == pytest.approx(sd_a)
    assert first["n"] == 3 and second["n"] == 3
    # Welch's t and its Welch-Satterthwaite degrees of freedom, by hand.
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 3
    t = (mean_a - sum(b) / 3) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    test = out["test"]
    assert test["p_value"] == pytest.approx(stats.t.cdf(t, df))
    assert test["lead"] == pytest.approx(sum(b) / 3 - mean_a)
    assert test["beyond_noise"] is True
    # Step 50 is a budget of its own, where the stopped trial does win.
    assert out["budgets"][0]["step"] == 50 and out["budgets"][0]["best"]["trial_ids"] == ["c0"]
    assert "beyond the seed noise" in comparisons.describe_test(test)


def test_a_lead_within_the_noise_is_called_so():
    rows = [_row(f"a{i}", "A", 1e-3, i) for i in range(3)]
    rows += [_row(f"b{i}", "B", 3e-3, i) for i in range(3)]
    evals = {f"a{i}": {100: v} for i, v in enumerate([1.50, 1.60, 1.40])}
    evals |= {f"b{i}": {100: v} for i, v in enumerate([1.52, 1.41, 1.62])}
    test = comparisons.compare(rows, evals)["test"]
    assert test["beyond_noise"] is False and test["p_value"] > 0.3
    assert "within the seed noise" in comparisons.describe_test(test)


def test_top_configurations_skip_stopped_trials_and_dedupe_seeds():
    rows = [
        _row("a0", "A", 1e-3, 0) | {"final_val_loss": 1.5},
        _row("a1", "A", 1e-3, 1) | {"final_val_loss": 1.4},
        _row("b0", "B", 3e-3, 0) | {"final_val_loss": 1.6},
        _row("c0", "C", 1e-2, 0, status="stopped_early", steps=50) | {"final_val_loss": 1.0},
    ]
    top = sweep_driver.top_configurations(rows, 2, 100)
    assert [t["learning_rate"] for t in top] == [1e-3, 3e-3]
    assert all("seed" not in t for t in top)


def test_progress_line_counts_steps_and_names_the_best():
    rows = [
        {"status": "completed", "steps": 100, "optimizer": "adamw", "learning_rate": 1e-3,
         "best_val_loss": 1.5},
        {"status": "stopped_early", "steps": 20, "optimizer": "sgd", "learning_rate": 0.1,
         "best_val_loss": 2.5},
        {"status": "running", "steps": 40, "optimizer": "adamw", "learning_rate": 3e-3,
         "best_val_loss": 1.9},
    ]  # fmt: skip
    line = progress_line(rows, total_trials=5, max_steps=100, elapsed=16.0)
    # planned: 100 + 20 (finished as they are) + 100 (running) + 2 queued x 100
    assert "steps 160/420" in line
    assert "1 running" in line and "1 completed" in line and "1 stopped early" in line
    assert "2 queued" in line and "best adamw lr=0.001 val 1.5000" in line
    assert "ETA <= 0m26s" in line  # 260 steps left at 10 steps/s
