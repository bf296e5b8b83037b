"""A sweep's own settings: the `[sweep]` table of an experiment file, and its flags.

Loading follows the rule of config.py (defaults < file < flags, every value
checked here, once). With no experiment file, trials train the packaged preset
`presets/sweep.toml`: the bare `python -m raygpt.sweep --optimizers adamw,sgd`
then answers in minutes on a laptop, where TrainConfig's own defaults (a
2,000-step run) would take a quarter of an hour per handful of trials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raygpt.config.choices import OPTIMIZERS, check_parametrization, check_rung_cooldown
from raygpt.config.io import merge, read_toml
from raygpt.config.train import TrainConfig, default_storage_path
from raygpt.errors import UserError
from raygpt.report.transfer import plan as transfer_plan
from raygpt.run_folder import check_name

PRESET = Path(__file__).resolve().parents[1] / "presets" / "sweep.toml"

# Where each optimizer's learning rate is worth searching (log scale). Adaptive
# methods normalise the step, so their useful range sits two decades lower.
DEFAULT_LR_RANGES: dict[str, tuple[float, float]] = {
    "adamw": (1e-4, 1e-2),
    "adam": (1e-4, 1e-2),
    "sgd": (1e-3, 1.0),
    "momentum": (1e-3, 1.0),
    "adagrad": (1e-3, 1.0),
    # muon: the hidden matrices' rate (AdamW's groups run at muon_adamw_lr_scale x it);
    # orthogonalised steps have a fixed size, so its rates sit near modded-nanogpt's 0.02-0.05.
    "muon": (3e-3, 3e-1),
    # lion: sign updates move every entry by the full lr; the paper uses 3-10x below AdamW.
    "lion": (3e-5, 3e-3),
    # schedule-free AdamW tolerates, and wants, rates somewhat above AdamW's (Defazio et al.).
    "adamw_schedulefree": (3e-4, 3e-2),
}
MOMENTUM_RANGE = (0.8, 0.99)
SEARCHES = ("optuna", "grid", "random")
SCHEDULERS = ("asha", "fifo", "hyperband", "pbt")
CONFIRM_SCOPES = ("sweep", "optimizer")
RANK_BY = ("val_loss", "hellaswag_acc_norm")
METRIC, MODE = "val_loss", "min"

# Keys of TrainConfig that the sweep owns (per-trial names, storage, cluster).
SWEEP_OWNED_TRAIN_KEYS = (
    "name",
    "storage_path",
    "address",
    "resume",
    "overwrite",
    "use_gpu",
    "rung_cooldown",  # the sweep's own key (SweepConfig), handed to trials at its rungs
    "cooldown_at",
)


@dataclass
class SweepConfig:
    """The `[sweep]` table of an experiment file; every key is also a flag."""

    optimizers: list[str] = field(default_factory=lambda: ["adamw", "sgd"])
    num_samples: int = 12  # configurations in all (grid: optimizers x grid_points instead)
    search: str = "optuna"  # optuna | grid | random
    scheduler: str = "asha"  # asha | fifo | hyperband | pbt
    grace_steps: int | None = None  # ASHA/HyperBand's first rung; default 2 x eval_interval
    reduction_factor: int = 3  # ASHA keeps the best 1/reduction_factor at each rung
    # ASHA/HyperBand rank a copy cooled down over this fraction of the steps so far at
    # each rung (rung_cooldown.py), not the undecayed val; 0: rank the plain val loss.
    rung_cooldown: float = 0.2
    pbt_interval: int | None = None  # PBT: steps between exploit/explore; default grace_steps
    # PBT waits for every trial at each interval before exploiting, so which trial clones
    # which depends on the losses alone, not on which finished its steps first.
    pbt_synch: bool = True
    grid_points: int = 5  # learning rates per optimizer for --search grid
    lr_range: list[str] = field(default_factory=list)  # OPT=LO:HI, overrides the defaults
    # Other TrainConfig keys to search: KEY=LO:HI, KEY=LO:HI:log or KEY=a,b,c (space.py)
    search_space: list[str] = field(default_factory=list)
    seeds: int = 1  # seeds per configuration (seed, seed+1, ...)
    confirm_top: int = 0  # >0: search with one seed, then rerun the top N over `seeds` seeds
    confirm_scope: str = "sweep"  # sweep: the top N overall | optimizer: the top N of each
    target_loss: float | None = None  # adds steps_to_target: first eval with val <= this
    rank_by: str = "val_loss"  # what schedulers and searchers rank: val_loss | hellaswag_acc_norm
    workers_per_trial: int = 1  # DDP workers inside each trial
    gpus_per_trial: float | None = None  # GPU share of each trial's worker; default 1 on GPUs
    max_concurrent_trials: int | None = None  # default: as many as the cluster fits
    max_trial_failures: int = 0  # retries of a trial that raised
    verbose: bool = False  # workers' lines on the console too (they always go to logs/)
    # A learning-rate transfer (transfer.py): KEY=a,b,c per axis, one sweep per proxy size,
    # and the model it predicts for, KEY=N,...; --confirm then trains the target at the
    # prediction and at 2x and 1/2 of it.
    transfer: list[str] = field(default_factory=list)
    target: str | None = None
    confirm: bool = False
    gpu_hour_price: float | None = None  # the summary's cost: GPU-hours x this
    use_gpu: str = "auto"
    name: str | None = None
    storage_path: str = field(default_factory=default_storage_path)
    address: str | None = None
    resume: bool = False
    overwrite: bool = False

    def lr_ranges(self) -> dict[str, tuple[float, float]]:
        ranges = {opt: DEFAULT_LR_RANGES[opt] for opt in self.optimizers}
        for spec in self.lr_range:
            opt, lo, hi = _parse_lr_range(spec)
            if opt not in self.optimizers:
                raise UserError(
                    f"--lr-range {spec!r} names {opt!r}, which is not in --optimizers "
                    f"{','.join(self.optimizers)}"
                )
            ranges[opt] = (lo, hi)
        return ranges

    def dimensions(self, train: TrainConfig) -> list[Any]:
        from raygpt.sweep.space import parse_search_space

        return parse_search_space(self.search_space, train)

    def seed_list(self, train: TrainConfig) -> list[int]:
        return [train.seed + i for i in range(self.seeds)]

    def transfer_axes(self) -> list[tuple[str, list[int]]]:
        return [transfer_plan.parse_axis(spec) for spec in self.transfer]

    def transfer_target(self) -> dict[str, int]:
        return transfer_plan.parse_target(self.target or "")

    def proxy_sizes(self, train: TrainConfig) -> list[tuple[str, dict[str, int]]]:
        """(folder name, size) of each proxy of the transfer; refuses a bad plan."""
        return transfer_plan.check_plan(vars(train), self.transfer_axes(), self.transfer_target())

    def validate(self, train: TrainConfig) -> SweepConfig:
        if not self.optimizers:
            raise UserError("--optimizers is empty; name at least one of " + ", ".join(OPTIMIZERS))
        for opt in self.optimizers:
            if opt not in OPTIMIZERS:
                raise UserError(
                    f"unknown optimizer {opt!r} in --optimizers; choose from {', '.join(OPTIMIZERS)}"
                )
        for opt in self.optimizers:  # each trial trains under the base's parametrization
            check_parametrization(train.parametrization, opt)
        if len(set(self.optimizers)) != len(self.optimizers):
            raise UserError(f"--optimizers {','.join(self.optimizers)} repeats a name")
        if self.search not in SEARCHES:
            raise UserError(f"unknown --search {self.search!r}; choose {', '.join(SEARCHES)}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(
                f"unknown --scheduler {self.scheduler!r}; choose {', '.join(SCHEDULERS)}"
            )
        for key in ("num_samples", "workers_per_trial", "grid_points", "seeds"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}={getattr(self, key)} must be >= 1")
        if self.reduction_factor < 2:
            raise UserError(f"reduction_factor={self.reduction_factor} must be >= 2")
        if self.max_trial_failures < 0:
            raise UserError(f"max_trial_failures={self.max_trial_failures} must be >= 0")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise UserError(f"max_concurrent_trials={self.max_concurrent_trials} must be >= 1")
        if self.confirm_top < 0:
            raise UserError(f"confirm_top={self.confirm_top} must be >= 0 (0: no confirmation)")
        if self.confirm_top and self.seeds < 2:
            raise UserError(
                f"confirm_top={self.confirm_top} reruns the top configurations over more seeds; "
                "give --seeds 2 or more"
            )
        if self.confirm_scope not in CONFIRM_SCOPES:
            raise UserError(
                f"unknown confirm_scope {self.confirm_scope!r}; choose {', '.join(CONFIRM_SCOPES)}"
            )
        if self.target_loss is not None and not (
            math.isfinite(self.target_loss) and self.target_loss > 0
        ):
            raise UserError(f"target_loss={self.target_loss} must be a positive number")
        check_rung_cooldown(self.rung_cooldown)
        if self.rank_by not in RANK_BY:
            raise UserError(f"unknown rank_by {self.rank_by!r}; choose {', '.join(RANK_BY)}")
        if self.rank_by == "hellaswag_acc_norm" and not train.hellaswag_every:
            raise UserError(
                "rank_by=hellaswag_acc_norm needs HellaSwag during training: add "
                "--hellaswag-every N (a multiple of eval_interval, so every rung has one)"
            )
        self._validate_gpus()
        self._validate_steps(train)
        if self.scheduler == "pbt":
            if self.search == "optuna":
                raise UserError(
                    "--scheduler pbt evolves its own population from random or grid starting "
                    "points; add --search random (or grid)"
                )
            if self.workers_per_trial != 1:
                raise UserError(
                    "--scheduler pbt clones checkpoints between trials, which it can do for "
                    f"one-worker trials only; workers_per_trial={self.workers_per_trial}"
                )
            if self.seeds > 1 and not self.confirm_top:
                raise UserError(
                    "--scheduler pbt mixes configurations mid-run, so per-seed repeats have "
                    "no fixed configuration; use --confirm-top N with --seeds"
                )
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; choose one")
        if self.name is not None:  # from --name or the [sweep] table: one folder, in the root
            check_name(self.name, "sweep name")
        self.lr_ranges()
        self.dimensions(train)
        self._validate_transfer(train)
        return self

    def _validate_transfer(self, train: TrainConfig) -> None:
        if self.gpu_hour_price is not None and not (
            math.isfinite(self.gpu_hour_price) and self.gpu_hour_price >= 0
        ):
            raise UserError(f"gpu_hour_price={self.gpu_hour_price} must be a number >= 0")
        if not self.transfer:
            if self.target is not None or self.confirm:
                flag = "--target" if self.target is not None else "--confirm"
                raise UserError(
                    f"{flag} belongs to a transfer: add --transfer KEY=a,b,c (for example "
                    "--transfer n_embd=64,128,256)"
                )
            return
        if self.target is None:
            raise UserError(
                "--transfer needs --target: the model it predicts for, e.g. "
                "--target n_embd=768,n_layer=12"
            )
        if train.init_from != "scratch":
            raise UserError(
                f"--transfer trains proxies of other sizes from scratch; init_from="
                f"{train.init_from!r} brings its own shape: drop --init-from"
            )
        if self.scheduler != "fifo":
            raise UserError(
                f"--transfer fits each size's loss against learning rate over trials trained to "
                f"the end; --scheduler {self.scheduler} stops or perturbs them: use "
                "--scheduler fifo (the transfer's default)"
            )
        sizes = self.proxy_sizes(train)
        keys = {k for _, s in sizes for k in s} | set(self.transfer_target())
        searched = sorted(keys & {d.key for d in self.dimensions(train)})
        if searched:
            raise UserError(
                f"--search-space {searched[0]} is a size the transfer sets per proxy; drop it "
                "from --search-space"
            )

    def _validate_gpus(self) -> None:
        share = self.gpus_per_trial
        if share is None:
            return
        if not 0 < share <= 1:
            raise UserError(
                f"gpus_per_trial={share:g} must be in (0, 1]: one worker drives one GPU, and "
                "fractions such as 0.25 let several trials share it"
            )
        if share < 1 and self.workers_per_trial > 1:
            raise UserError(
                f"gpus_per_trial={share:g} shares a GPU between processes, but the "
                f"{self.workers_per_trial} DDP workers of one trial each need a GPU of their "
                "own (NCCL); use --workers-per-trial 1 or --gpus-per-trial 1"
            )

    def _validate_steps(self, train: TrainConfig) -> None:
        grace = self.resolved_grace_steps(train)
        if grace % train.eval_interval or not 0 < grace <= train.max_steps:
            raise UserError(
                f"grace_steps={grace} must be a multiple of eval_interval={train.eval_interval} "
                f"and at most max_steps={train.max_steps}"
            )
        interval = self.resolved_pbt_interval(train)
        if self.scheduler == "pbt" and (
            interval % train.resolved_checkpoint_interval or not 0 < interval < train.max_steps
        ):
            raise UserError(
                f"pbt_interval={interval} must be a multiple of the checkpoint interval "
                f"({train.resolved_checkpoint_interval}) and below max_steps={train.max_steps}: "
                "PBT clones the checkpoint taken at each interval"
            )

    def metric(self, train: TrainConfig) -> str:
        """What the scheduler and searcher rank: the cooled val at rungs when the trials
        run rung cooldowns (rung_cooldown.py), else the val loss."""
        if self.rank_by == "hellaswag_acc_norm":
            return self.rank_by
        return "rung_val_loss" if train.rung_cooldown > 0 else METRIC

    def mode(self) -> str:
        return "max" if self.rank_by == "hellaswag_acc_norm" else MODE

    def resolved_grace_steps(self, train: TrainConfig) -> int:
        if self.grace_steps is not None:
            return self.grace_steps
        return min(2 * train.eval_interval, train.max_steps)

    def resolved_pbt_interval(self, train: TrainConfig) -> int:
        return self.pbt_interval or self.resolved_grace_steps(train)

    def trial_rung_cooldown(self) -> float:
        """The cooldown fraction trials run: where a scheduler compares at rungs (ASHA,
        HyperBand), and under FIFO where --grace-steps names rungs. FIFO stops no trial,
        so its cooled copies measure what ASHA would have ranked at the same steps against
        the finished runs (benchmarks/asha_bias.py); without --grace-steps it has no rungs."""
        if self.scheduler in ("asha", "hyperband"):
            return self.rung_cooldown
        if self.scheduler == "fifo" and self.grace_steps is not None:
            return self.rung_cooldown
        return 0.0

    def rung_steps(self, train: TrainConfig) -> list[int]:
        """The steps at which ASHA/HyperBand compare trials: grace x reduction_factor^k."""
        rungs, step = [], self.resolved_grace_steps(train)
        while step < train.max_steps:
            rungs.append(step)
            step *= self.reduction_factor
        return [*rungs, train.max_steps]


def _parse_lr_range(spec: str) -> tuple[str, float, float]:
    try:
        opt, bounds = spec.split("=", 1)
        lo_text, hi_text = bounds.split(":", 1)
        lo, hi = float(lo_text), float(hi_text)
    except ValueError:
        raise UserError(
            f"--lr-range {spec!r} is not OPT=LO:HI (for example adamw=1e-4:1e-2)"
        ) from None
    opt = opt.strip()
    if not (0 < lo < hi) or not math.isfinite(hi):
        raise UserError(f"--lr-range {spec!r} needs 0 < LO < HI, got LO={lo:g} HI={hi:g}")
    return opt, lo, hi


def _split_repeated(values: list[str], separator: str) -> list[str]:
    return [part for value in values for part in value.replace(separator, " ").split()]


def load_configs(experiment: str | None, flags: dict[str, Any]) -> tuple[SweepConfig, TrainConfig]:
    """SweepConfig from `[sweep]` + sweep flags; TrainConfig from the rest (the packaged
    preset stands in for a missing experiment file)."""
    file_values = read_toml(experiment or PRESET)
    source = experiment or "the default sweep preset"
    sweep_table = file_values.pop("sweep", {})
    if not isinstance(sweep_table, dict):
        raise UserError(f"[sweep] in {source} must be a table")
    sweep_keys = set(SweepConfig.__dataclass_fields__)
    sweep_flags = {k: v for k, v in flags.items() if k in sweep_keys}
    train_flags = {k: v for k, v in flags.items() if k not in sweep_keys}
    if "lr_range" in sweep_flags:  # repeated flag: a list of OPT=LO:HI strings
        sweep_flags["lr_range"] = _split_repeated(sweep_flags["lr_range"], ",")
    if "search_space" in sweep_flags:  # repeated flag; KEY=a,b,c keeps its commas
        sweep_flags["search_space"] = _split_repeated(sweep_flags["search_space"], " ")
    if "transfer" in sweep_flags:  # repeated flag; KEY=a,b,c keeps its commas
        sweep_flags["transfer"] = _split_repeated(sweep_flags["transfer"], " ")
    sweep = merge(SweepConfig, sweep_table, sweep_flags, f"[sweep] of {source}")
    if sweep.transfer and "scheduler" not in sweep_flags:
        # A transfer fits whole curves, so every trial trains to the end, whatever the
        # file's scheduler; a --scheduler flag other than fifo is refused in validate.
        sweep.scheduler = "fifo"
    for key in SWEEP_OWNED_TRAIN_KEYS:
        file_values.pop(key, None)
    train = merge(TrainConfig, file_values, train_flags, source).validate()
    return sweep.validate(train), train
