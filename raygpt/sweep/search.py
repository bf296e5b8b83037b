"""What a sweep tries and when it stops a trial: search spaces, searchers, schedulers.

Search: Optuna define-by-run (the optimizer, a log-uniform learning rate per
optimizer, momentum only for `momentum`, and any `--search-space` keys), a fixed
grid, or seeded random points. Seeds: `--seeds K` repeats each configuration
(Tune's Repeater for Optuna, which then learns from the seeds' mean; a seed
axis for grid and random). Schedulers: ASHA and HyperBand compare trials on
val_loss at rungs that are multiples of eval_interval; PBT clones the better
trials' checkpoints and perturbs their learning rate; FIFO runs every trial out.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from raygpt.config.train import TrainConfig
from raygpt.sweep.config import MOMENTUM_RANGE, SweepConfig
from raygpt.sweep.space import Dimension, lr_key

TRIAL_INDEX = "__trial_index__"  # ray.tune.search.repeater.TRIAL_INDEX: which repeat


class OptunaSpace:
    """Define-by-run space: each optimizer has its own lr dimension, so TPE models them apart.

    A class, not a closure, because Tune pickles the searcher with the sweep state.
    """

    def __init__(
        self,
        optimizers: list[str],
        ranges: dict[str, tuple[float, float]],
        dims: list[Dimension] | None = None,
    ):
        self.optimizers = list(optimizers)
        self.ranges = dict(ranges)
        self.dims = list(dims or [])

    def __call__(self, trial) -> None:
        optimizer = trial.suggest_categorical("optimizer", self.optimizers)
        lo, hi = self.ranges[optimizer]
        trial.suggest_float(lr_key(optimizer), lo, hi, log=True)
        searched = {d.key for d in self.dims}
        if optimizer == "momentum" and "momentum" not in searched:
            trial.suggest_float("momentum", *MOMENTUM_RANGE)
        for dim in self.dims:
            dim.suggest(trial)


def grid_points(
    optimizers: list[str],
    ranges: dict[str, tuple[float, float]],
    points: int,
    dims: list[Dimension] | None = None,
) -> list[dict[str, Any]]:
    """Log-spaced learning rates per optimizer (like the classic lr_sweep.sh scripts),
    crossed with each searched key's grid values."""
    dims = list(dims or [])
    combos = list(itertools.product(*(d.grid(points) for d in dims)))
    return [
        {"optimizer": opt, "learning_rate": float(lr)}
        | dict(zip([d.key for d in dims], combo, strict=True))
        for opt in optimizers
        for lr in np.geomspace(*ranges[opt], points)
        for combo in combos
    ]


def random_points(
    optimizers: list[str],
    ranges: dict[str, tuple[float, float]],
    samples: int,
    seed: int,
    dims: list[Dimension] | None = None,
) -> list[dict[str, Any]]:
    """Seeded uniform-in-log samples: the baseline a model-based search should beat."""
    rng = np.random.default_rng(seed)
    searched = {d.key for d in dims or []}
    out = []
    for _ in range(samples):
        opt = optimizers[int(rng.integers(len(optimizers)))]
        lo, hi = ranges[opt]
        point = {"optimizer": opt, "learning_rate": float(np.exp(rng.uniform(*np.log([lo, hi]))))}
        if opt == "momentum" and "momentum" not in searched:
            point["momentum"] = float(rng.uniform(*MOMENTUM_RANGE))
        for dim in dims or []:
            point[dim.key] = _draw(dim, rng)
        out.append(point)
    return out


def _draw(dim: Dimension, rng: np.random.Generator) -> Any:
    if dim.values:
        return dim.values[int(rng.integers(len(dim.values)))]
    lo, hi = (np.log(dim.low), np.log(dim.high)) if dim.log else (dim.low, dim.high)
    if dim.integer:
        value = rng.uniform(lo, np.log(dim.high + 1) if dim.log else hi + 1)
        return int(min(dim.high, np.floor(np.exp(value) if dim.log else value)))
    value = rng.uniform(lo, hi)
    return float(np.exp(value) if dim.log else value)


def trial_params(config: dict[str, Any], base_seed: int | None = None) -> dict[str, Any]:
    """Normalise what a searcher sampled into TrainConfig keys (optimizer, learning_rate,
    searched keys, and the seed of a repeat)."""
    params = dict(config.get("point", config))
    optimizer = params["optimizer"]
    if "learning_rate" not in params:
        params["learning_rate"] = params[lr_key(optimizer)]
    if "seed" in config:
        params["seed"] = int(config["seed"])
    elif TRIAL_INDEX in config and base_seed is not None:
        params["seed"] = base_seed + int(config[TRIAL_INDEX])
    fields = TrainConfig.__dataclass_fields__
    return {k: v for k, v in params.items() if k in fields}


def config_key(params: dict[str, Any]) -> str:
    """What identifies a configuration across its seeds: every param but the seed."""
    import json

    return json.dumps({k: v for k, v in sorted(params.items()) if k != "seed"}, default=str)


def build_search(sweep: SweepConfig, train: TrainConfig):
    """(search_alg or None, param_space, num_samples) for Tuner."""
    from ray import tune

    ranges = sweep.lr_ranges()
    dims = sweep.dimensions(train)
    seeds = sweep.seed_list(train) if not sweep.confirm_top else [train.seed]
    if sweep.search == "optuna":
        import optuna
        from ray.tune.search import Repeater
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(
            seed=train.seed,
            n_startup_trials=max(len(sweep.optimizers) * 2, sweep.num_samples // 3),
            constant_liar=True,  # concurrent trials do not all sample the same point
        )
        search = OptunaSearch(
            space=OptunaSpace(sweep.optimizers, ranges, dims),
            metric=sweep.metric(train),
            mode=sweep.mode(),
            sampler=sampler,
        )
        if len(seeds) > 1:
            # Each suggestion runs once per seed; Optuna is told the seeds' mean.
            return Repeater(search, repeat=len(seeds)), {}, sweep.num_samples * len(seeds)
        return search, {}, sweep.num_samples
    if sweep.search == "grid":
        points = grid_points(sweep.optimizers, ranges, sweep.grid_points, dims)
    else:
        points = random_points(sweep.optimizers, ranges, sweep.num_samples, train.seed, dims)
    space: dict[str, Any] = {"point": tune.grid_search(points)}
    if len(seeds) > 1:
        space["seed"] = tune.grid_search(seeds)
    return None, space, 1


class ClampToRange:
    """PBT's explore step, kept inside the trial's own optimizer's learning-rate range:
    a perturbed sgd rate must not wander into adamw's decade."""

    def __init__(self, ranges: dict[str, tuple[float, float]]):
        self.ranges = dict(ranges)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        point = config["point"]
        lo, hi = self.ranges[point["optimizer"]]
        point["learning_rate"] = float(min(hi, max(lo, point["learning_rate"])))
        return config


def build_scheduler(sweep: SweepConfig, train: TrainConfig):
    from ray import tune
    from ray.tune.schedulers import (
        ASHAScheduler,
        FIFOScheduler,
        HyperBandScheduler,
        PopulationBasedTraining,
    )

    if sweep.scheduler == "fifo":
        return FIFOScheduler()
    if sweep.scheduler == "hyperband":
        # Synchronous HyperBand pauses trials at rungs; a paused trial resumes from its
        # last checkpoint, which every rung (a multiple of eval_interval) has.
        return HyperBandScheduler(
            time_attr="step", max_t=train.max_steps, reduction_factor=sweep.reduction_factor
        )
    if sweep.scheduler == "pbt":
        ranges = sweep.lr_ranges()
        lo = min(r[0] for r in ranges.values())
        hi = max(r[1] for r in ranges.values())
        return PopulationBasedTraining(
            time_attr="step",
            perturbation_interval=sweep.resolved_pbt_interval(train),
            hyperparam_mutations={"point": {"learning_rate": tune.loguniform(lo, hi)}},
            custom_explore_fn=ClampToRange(ranges),
            quantile_fraction=0.25,
            resample_probability=0.25,
            synch=sweep.pbt_synch,
        )
    return ASHAScheduler(
        time_attr="step",
        max_t=train.max_steps,
        grace_period=sweep.resolved_grace_steps(train),
        reduction_factor=sweep.reduction_factor,
    )
