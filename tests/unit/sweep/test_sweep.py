"""The sweep's search space and flags without Ray: the conditional space, the log-spaced
grid, and bad flags named in one line. The sweep on a cluster is in
tests/cluster/test_sweep.py.
"""

from __future__ import annotations

import optuna
import pytest

from raygpt.errors import UserError
from raygpt.sweep import cli as sweep_cli
from raygpt.sweep import config as sweep_config
from raygpt.sweep import search

TINY = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
    "--batch-size", "8", "--max-steps", "40", "--eval-interval", "10", "--eval-iters", "2",
    "--warmup-steps", "2", "--log-interval", "40", "--compile", "false",
]  # fmt: skip


def test_conditional_space_samples_momentum_only_for_momentum():
    space = search.OptunaSpace(["adamw", "sgd", "momentum"], sweep_config.DEFAULT_LR_RANGES)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        space(trial)
        params = trial.params
        seen.add(params["optimizer"])
        assert ("momentum" in params) == (params["optimizer"] == "momentum")
        lo, hi = sweep_config.DEFAULT_LR_RANGES[params["optimizer"]]
        assert lo <= params[f"{params['optimizer']}_learning_rate"] <= hi
        study.tell(trial, 1.0)
    assert seen == {"adamw", "sgd", "momentum"}


def test_grid_is_log_spaced_per_optimizer():
    points = search.grid_points(["adamw", "sgd"], {"adamw": (1e-4, 1e-2), "sgd": (1e-3, 1.0)}, 3)
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
        sweep_cli.configs_from_argv([*TINY, *flags])
    assert fragment in str(err.value)
