"""`python -m raygpt.sweep [EXPERIMENT.toml] --optimizers adamw,sgd`: which optimizer, at which lr?

Ray Tune decides configs and stops trials; it never trains by itself. Each
trial is a function trainable that builds a `TorchTrainer` running the same
`loop.train_loop_per_worker` as `raygpt.train` (Ray Train V2's supported
Tune pattern), with `TuneReportCallback` forwarding rank 0's reports.

Search: Optuna define-by-run (optimizer categorical, a log-uniform learning
rate per optimizer, momentum only for `momentum`), or a fixed log-spaced grid,
or seeded random points. Scheduler: ASHA on val_loss against the training
step, with rungs at multiples of eval_interval so every rung has an eval.

Outputs in `<storage_path>/<name>/` (a local folder or s3://, gs://):
trials.parquet (rewritten whole while the sweep runs), runs/<trial_id>/ with
each trial's step parts and checkpoints (which let a restored sweep continue
its interrupted trials), tensorboard/<trial_id>/ events, and
lr_sensitivity.png and friends (see raygpt.report).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune import Callback

from raygpt import data, launch, metrics, results, status, storage
from raygpt.config import (
    OPTIMIZERS,
    OneLineArgumentParser,
    TrainConfig,
    add_dataclass_flags,
    default_storage_path,
    merge,
    read_toml,
)
from raygpt.errors import UserError, exit_on_user_error
from raygpt.storage import Storage

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
SCHEDULERS = ("asha", "fifo")
METRIC, MODE = "val_loss", "min"

# Keys of TrainConfig that the sweep owns (per-trial names, storage, cluster).
SWEEP_OWNED_TRAIN_KEYS = ("name", "storage_path", "address", "resume", "overwrite", "use_gpu")


@dataclass
class SweepConfig:
    """The `[sweep]` table of an experiment file; every key is also a flag."""

    optimizers: list[str] = field(default_factory=lambda: ["adamw", "sgd"])
    num_samples: int = 12  # trials in all (grid: optimizers x grid_points instead)
    search: str = "optuna"  # optuna | grid | random
    scheduler: str = "asha"  # asha | fifo
    grace_steps: int | None = None  # ASHA's first rung; default 2 x eval_interval
    reduction_factor: int = 3  # ASHA keeps the best 1/reduction_factor at each rung
    grid_points: int = 5  # learning rates per optimizer for --search grid
    lr_range: list[str] = field(default_factory=list)  # OPT=LO:HI, overrides the defaults
    workers_per_trial: int = 1  # DDP workers inside each trial
    max_concurrent_trials: int | None = None  # default: as many as the cluster fits
    max_trial_failures: int = 0  # retries of a trial that raised
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

    def validate(self, train: TrainConfig) -> SweepConfig:
        if not self.optimizers:
            raise UserError("--optimizers is empty; name at least one of " + ", ".join(OPTIMIZERS))
        for opt in self.optimizers:
            if opt not in OPTIMIZERS:
                raise UserError(
                    f"unknown optimizer {opt!r} in --optimizers; choose from {', '.join(OPTIMIZERS)}"
                )
        if len(set(self.optimizers)) != len(self.optimizers):
            raise UserError(f"--optimizers {','.join(self.optimizers)} repeats a name")
        if self.search not in SEARCHES:
            raise UserError(f"unknown --search {self.search!r}; choose {', '.join(SEARCHES)}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(
                f"unknown --scheduler {self.scheduler!r}; choose {', '.join(SCHEDULERS)}"
            )
        for key in ("num_samples", "workers_per_trial", "grid_points"):
            if getattr(self, key) < 1:
                raise UserError(f"{key}={getattr(self, key)} must be >= 1")
        if self.reduction_factor < 2:
            raise UserError(f"reduction_factor={self.reduction_factor} must be >= 2")
        if self.max_trial_failures < 0:
            raise UserError(f"max_trial_failures={self.max_trial_failures} must be >= 0")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise UserError(f"max_concurrent_trials={self.max_concurrent_trials} must be >= 1")
        grace = self.resolved_grace_steps(train)
        if grace % train.eval_interval or not 0 < grace <= train.max_steps:
            raise UserError(
                f"grace_steps={grace} must be a multiple of eval_interval={train.eval_interval} "
                f"and at most max_steps={train.max_steps}"
            )
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; choose one")
        self.lr_ranges()
        return self

    def resolved_grace_steps(self, train: TrainConfig) -> int:
        if self.grace_steps is not None:
            return self.grace_steps
        return min(2 * train.eval_interval, train.max_steps)


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


# --------------------------------------------------------------------------- search space


class OptunaSpace:
    """Define-by-run space: each optimizer has its own lr dimension, so TPE models them apart.

    A class, not a closure, because Tune pickles the searcher with the sweep state.
    """

    def __init__(self, optimizers: list[str], ranges: dict[str, tuple[float, float]]):
        self.optimizers = list(optimizers)
        self.ranges = dict(ranges)

    def __call__(self, trial) -> None:
        optimizer = trial.suggest_categorical("optimizer", self.optimizers)
        lo, hi = self.ranges[optimizer]
        trial.suggest_float(f"{optimizer}_learning_rate", lo, hi, log=True)
        if optimizer == "momentum":
            trial.suggest_float("momentum", *MOMENTUM_RANGE)


def grid_points(
    optimizers: list[str], ranges: dict[str, tuple[float, float]], points: int
) -> list[dict[str, Any]]:
    """Log-spaced learning rates per optimizer, like the classic lr_sweep.sh scripts."""
    return [
        {"optimizer": opt, "learning_rate": float(lr)}
        for opt in optimizers
        for lr in np.geomspace(*ranges[opt], points)
    ]


def random_points(
    optimizers: list[str], ranges: dict[str, tuple[float, float]], samples: int, seed: int
) -> list[dict[str, Any]]:
    """Seeded uniform-in-log samples: the baseline a model-based search should beat."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(samples):
        opt = optimizers[int(rng.integers(len(optimizers)))]
        lo, hi = ranges[opt]
        point = {"optimizer": opt, "learning_rate": float(np.exp(rng.uniform(*np.log([lo, hi]))))}
        if opt == "momentum":
            point["momentum"] = float(rng.uniform(*MOMENTUM_RANGE))
        out.append(point)
    return out


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """Normalise what a searcher sampled into TrainConfig keys."""
    params = dict(config.get("point", config))
    optimizer = params["optimizer"]
    if "learning_rate" not in params:
        params["learning_rate"] = params.pop(f"{optimizer}_learning_rate")
    return {k: v for k, v in params.items() if k in ("optimizer", "learning_rate", "momentum")}


# --------------------------------------------------------------------------- one trial


def run_trial(
    config: dict[str, Any],
    base: dict[str, Any],
    store: Storage,
    sweep_path: str,
    use_gpu: bool,
    env: dict[str, str],
    metadata: dict[str, Any],
) -> None:
    """A Tune function trainable: one TorchTrainer run of the shared training loop."""
    import os

    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ.update(env)  # the driver's RAYGPT_* settings, on to the trial's workers

    cfg = TrainConfig.from_dict({**base, **trial_params(config)}).validate()
    trial_id = ray.tune.get_context().get_trial_id()
    # The trainer's name is the trial id: a restored trial finds its own checkpoints.
    trainer = launch.build_trainer(
        cfg,
        name=trial_id,
        storage=store.at(f"{sweep_path}/{results.RUNS_DIR}"),
        use_gpu=use_gpu,
        callbacks=[TuneReportCallback()],
        run_info={"trial_id": trial_id},
        outputs={
            "tensorboard_path": f"{sweep_path}/{results.TENSORBOARD_DIR}/{trial_id}",
            "metadata": metadata,
        },
    )
    trainer.fit()


# --------------------------------------------------------------------------- outputs


class SweepOutputs(Callback):
    """Tune callback on the driver: trials.parquet, live, and one line per finished trial.

    Step rows and TensorBoard events are written by each trial's rank 0 (see
    results.py); this callback reads a trial's rows when it ends, to sum up its
    compute, and once more at the end of the sweep, for parts a stopped
    trial's workers wrote after Tune's decision. trials.parquet is one small file rewritten whole (a single
    PUT on object storage) every few seconds and whenever a trial ends.

    It is pickled with the Tuner's state; only the storage, paths and settings
    survive pickling, and the trials table is reloaded from trials.parquet, so
    a restored sweep continues the same table.
    """

    WRITE_EVERY_S = 5.0

    def __init__(self, store: Storage, sweep_path: str, metadata: dict[str, Any], max_steps: int):
        self.store = store
        self.sweep_path = sweep_path
        self.metadata = metadata
        self.max_steps = max_steps
        self._reset()

    def _reset(self) -> None:
        self._trials: dict[str, dict[str, Any]] | None = None
        self._started: dict[str, float] = {}
        self._last_write = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("store", "sweep_path", "metadata", "max_steps")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def trials_path(self) -> str:
        return f"{self.sweep_path}/{results.TRIALS_FILE}"

    # -- state
    def _load(self) -> dict[str, dict[str, Any]]:
        if self._trials is None:
            self._trials = {}
            table = results.read_table(self.store, self.trials_path)
            for row in table.to_pylist() if table is not None else []:
                self._trials[row["trial_id"]] = row
        return self._trials

    def _record(self, trial) -> dict[str, Any]:
        trials = self._load()
        record = trials.get(trial.trial_id)
        if record is None:
            params = trial_params(trial.config)
            record = {col: None for col in results.TRIAL_SCHEMA.names} | {
                "trial_id": trial.trial_id,
                "optimizer": params["optimizer"],
                "learning_rate": params["learning_rate"],
                "momentum": params.get("momentum"),
                "params": json.dumps(params),
                "status": status.RUNNING,
                "steps": 0,
                "wall_seconds": 0.0,
            }
            trials[trial.trial_id] = record
        return record

    def _write(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_write < self.WRITE_EVERY_S:
            return
        self._last_write = now
        rows = [self._trials[k] for k in sorted(self._trials)]
        table = results.pa.Table.from_pylist(rows, schema=results.TRIAL_SCHEMA)
        results.write_table(
            self.store, self.trials_path, results.with_metadata(table, self.metadata)
        )

    def _finish(self, trial, errored: bool, error: str | None = None) -> None:
        record = self._record(trial)
        self._summarise_steps(record)
        record["status"] = status.decide(
            errored=errored,
            diverged=bool(record.pop("diverged_flag", False)),
            steps=record["steps"],
            max_steps=self.max_steps,
        )
        record["error"] = error
        self._account_wall(trial.trial_id, record)
        self._write(force=True)
        trials = self._trials.values()
        done = sum(r["status"] != status.RUNNING for r in trials)
        best = self._best()
        best_text = (
            f"best so far {best['optimizer']} lr={best['learning_rate']:.3g} "
            f"val={best['best_val_loss']:.4f}"
            if best
            else "no finished trial yet"
        )
        outcome = f"{record['status']} at step {record['steps']}"
        if record["status"] == status.ERROR:
            outcome += f": {error}"
        elif record["best_val_loss"] is not None:
            outcome += f" (val {record['best_val_loss']:.4f})"
        print(
            f"[sweep] trial {trial.trial_id} {record['optimizer']} lr={record['learning_rate']:.3g}"
            f": {outcome} | {done} trial(s) finished | {best_text}",
            flush=True,
        )

    def _account_wall(self, trial_id: str, record: dict[str, Any]) -> None:
        started = self._started.pop(trial_id, None)
        if started is not None:
            record["wall_seconds"] = (record["wall_seconds"] or 0.0) + time.time() - started

    def _summarise_steps(self, record: dict[str, Any]) -> None:
        """Compute totals from the trial's own step parts (read once, at its end)."""
        table, _ = results.read_steps(
            self.store, f"{self.sweep_path}/{results.RUNS_DIR}/{record['trial_id']}"
        )
        rows = table.to_pylist() if table is not None else []
        if not rows:
            return
        speeds = [r["tokens_per_sec"] for r in rows if r["tokens_per_sec"]]
        mfus = [r["mfu"] for r in rows if r["mfu"] is not None]
        # Steps actually trained: a stopped trial's workers may finish a report or
        # two after the decision, and that compute counts too.
        record["steps"] = max(record["steps"] or 0, rows[-1]["step"])
        record["train_seconds"] = sum(r["step_time_ms"] or 0.0 for r in rows) / 1000
        record["tokens"] = rows[-1]["tokens_seen"]
        record["mean_tokens_per_sec"] = float(np.mean(speeds)) if speeds else None
        record["mean_mfu"] = float(np.mean(mfus)) if mfus else None
        record["final_train_loss"] = rows[-1]["train_loss"]

    def _best(self) -> dict[str, Any] | None:
        finished = [
            r
            for r in self._trials.values()
            if r["status"] in status.FINISHED_OK
            and r["best_val_loss"] is not None
            and math.isfinite(r["best_val_loss"])
        ]
        return min(finished, key=lambda r: r["best_val_loss"], default=None)

    # -- Tune callback hooks
    def setup(self, **info) -> None:
        self._load()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        record = self._record(trial)
        record["status"] = status.RUNNING
        self._started[trial.trial_id] = time.time()
        self._write(force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        record = self._record(trial)
        record["steps"] = result.get("step", record["steps"])
        record["final_train_loss"] = result.get("train_loss")
        if result.get("evaluated", True):
            record["best_val_loss"] = result.get("best_val_loss")
            record["final_val_loss"] = result.get("val_loss")
        record["checkpoint_path"] = result.get("checkpoint_path") or record["checkpoint_path"]
        if result.get("diverged"):
            record["diverged_flag"] = True
        self._write()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, errored=True, error=trial_error_line(trial))

    def on_experiment_end(self, trials, **info) -> None:
        # A stopped trial's rank 0 may write a part or two after Tune's decision (its
        # workers finish the step in hand); with every trial torn down, count them too.
        for record in self._load().values():
            if record["status"] != status.RUNNING:
                self._summarise_steps(record)
        self._write(force=True)


def trial_error_line(trial) -> str:
    """The one line that says why a trial failed: a raygpt UserError's message, else the
    last line of its traceback that names an exception."""
    text = ""
    error_file = getattr(trial, "error_file", None)
    if error_file and Path(error_file).exists():
        text = Path(error_file).read_text(errors="replace")
    elif hasattr(trial, "get_error"):
        with contextlib.suppress(Exception):  # best effort: the error stays in Ray's logs
            text = str(trial.get_error() or "")
    return error_line(text)


def error_line(text: str) -> str:
    marker = "raygpt.errors.UserError: "
    if marker in text:
        return text.rsplit(marker, 1)[1].splitlines()[0].strip()[:500]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if ("Error" in line or "Exception" in line) and ":" in line:
            return line[:500]
    return lines[-1][:500] if lines else "unknown error (see the trial's error.txt)"


# --------------------------------------------------------------------------- the sweep


def _trial_dirname(trial) -> str:
    return trial.trial_id


def build_search(sweep: SweepConfig, train: TrainConfig):
    """(search_alg or None, param_space, num_samples) for Tuner."""
    from ray import tune

    ranges = sweep.lr_ranges()
    if sweep.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(
            seed=train.seed,
            n_startup_trials=max(len(sweep.optimizers) * 2, sweep.num_samples // 3),
            constant_liar=True,  # concurrent trials do not all sample the same point
        )
        search = OptunaSearch(
            space=OptunaSpace(sweep.optimizers, ranges), metric=METRIC, mode=MODE, sampler=sampler
        )
        return search, {}, sweep.num_samples
    if sweep.search == "grid":
        points = grid_points(sweep.optimizers, ranges, sweep.grid_points)
    else:
        points = random_points(sweep.optimizers, ranges, sweep.num_samples, train.seed)
    return None, {"point": tune.grid_search(points)}, 1


def build_scheduler(sweep: SweepConfig, train: TrainConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="step",
        max_t=train.max_steps,
        grace_period=sweep.resolved_grace_steps(train),
        reduction_factor=sweep.reduction_factor,
    )


def run(sweep: SweepConfig, train: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a sweep; return the summary dict of raygpt.report."""
    from ray import tune

    name = sweep.name or f"sweep-{'-'.join(sweep.optimizers)}-{sweep.search}"
    store = storage.resolve(sweep.storage_path)  # unreachable, denied, no bucket: fails here
    sweep_path = store.path(name)
    where = store.display(sweep_path)
    # Trials read the data cache the driver resolved, whatever their environment.
    train = TrainConfig.from_dict(
        train.to_dict()
        | {"num_workers": sweep.workers_per_trial, "data_dir": str(data.data_root(train.data_dir))}
    )
    train.validate()
    _, data_meta = launch.prepare_data(train)  # fail on bad data before Ray starts
    launch.check_run_dir(store, sweep_path, sweep.resume, sweep.overwrite, kind="sweep")
    if sweep.resume and not tune.Tuner.can_restore(sweep_path, storage_filesystem=store.fs):
        raise UserError(
            f"cannot resume: {where} holds no Tune experiment state; start it without --resume"
        )

    started = time.perf_counter()
    cluster = launch.connect(sweep.address)
    use_gpu = launch.resolve_use_gpu(sweep.use_gpu)
    gpus = 1 if use_gpu else 0
    if train.cpus_per_worker is None:
        # Trials share the cores: one each keeps as many trials running as there are cores.
        train = TrainConfig.from_dict(train.to_dict() | {"cpus_per_worker": 1.0})
    launch.check_fits(sweep.workers_per_trial, train.cpus_per_worker, gpus, what="each trial")
    concurrent = launch.trials_that_fit(sweep.workers_per_trial, train.cpus_per_worker, gpus)
    if sweep.max_concurrent_trials is not None:
        concurrent = min(concurrent, sweep.max_concurrent_trials)
    storage.preflight(store)  # trials may land on any node: every node must see the storage
    ray_ready = time.perf_counter()
    # Only now, with every check passed, may --overwrite remove the old sweep.
    launch.prepare_run_dir(store, sweep_path, sweep.resume, sweep.overwrite, kind="sweep")

    metadata = {
        "sweep": {k: v for k, v in vars(sweep).items()} | {"name": name},
        "config": train.to_dict(),
        "environment": metrics.environment(),
        "cluster": cluster,
        "data": {
            k: data_meta.get(k) for k in ("dataset", "tokenizer", "vocab_size", "source_sha256")
        },
    }
    results.write_json(store, f"{sweep_path}/{results.SWEEP_FILE}", metadata)
    outputs = SweepOutputs(store, sweep_path, metadata, train.max_steps)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=train.to_dict(),
            store=store,
            sweep_path=sweep_path,
            use_gpu=use_gpu,
            env=launch.raygpt_env(),
            metadata=metadata,
        ),
        # The trial actor only waits on its TorchTrainer; the workers hold the CPUs.
        # (Tune rejects an all-zero request, so it reserves a token 1 MiB of memory.)
        {"cpu": 0, "memory": 1 << 20},
    )
    print(
        f"[sweep] {name}: {sweep.search} search over {','.join(sweep.optimizers)}, "
        f"{sweep.scheduler} scheduler, up to {concurrent} trial(s) at once, "
        f"{train.max_steps} steps max -> {where}",
        flush=True,
    )
    if sweep.resume:
        tuner = tune.Tuner.restore(
            sweep_path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=sweep.max_trial_failures > 0,
            storage_filesystem=store.fs,
        )
    else:
        search_alg, param_space, num_samples = build_search(sweep, train)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                search_alg=search_alg,
                scheduler=build_scheduler(sweep, train),
                num_samples=num_samples,
                max_concurrent_trials=concurrent,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=store.root,
                storage_filesystem=store.fs,
                callbacks=[outputs],
                failure_config=tune.FailureConfig(max_failures=sweep.max_trial_failures),
                verbose=0,
            ),
        )
    # Tune's result grid looks for the per-trial JSON/CSV logs raygpt turns off.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    tuner.fit()
    finished = time.perf_counter()

    from raygpt import report

    folder = store.at(sweep_path)
    text, pngs = report.render(folder)
    print(text, flush=True)
    for png in pngs:
        print(f"[sweep] plot: {png}", flush=True)
    summary = report.summarize(*report.load(folder)[:2])
    summary["sweep_dir"] = where
    summary["ray_startup_seconds"] = round(ray_ready - started, 2)
    summary["sweep_seconds"] = round(finished - ray_ready, 2)
    summary["max_concurrent_trials"] = concurrent
    print(
        f"[sweep] wall {summary['sweep_seconds']:.0f}s after {summary['ray_startup_seconds']:.1f}s "
        f"Ray start-up; results in {where}",
        flush=True,
    )
    return summary


def check_found_something(summary: dict[str, Any]) -> None:
    """A sweep in which no trial finished has no answer: say why, and fail."""
    counts = summary.get("status_counts", {})
    if any(counts.get(s) for s in status.FINISHED_OK):
        return
    described = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no trials"
    raise UserError(
        f"no trial finished ({described}); see the error lines above and "
        f"{summary.get('sweep_dir')}/trials.parquet"
    )


def load_configs(experiment: str | None, flags: dict[str, Any]) -> tuple[SweepConfig, TrainConfig]:
    """SweepConfig from `[sweep]` + sweep flags; TrainConfig from the rest."""
    file_values = read_toml(experiment) if experiment else {}
    source = experiment or "defaults"
    sweep_table = file_values.pop("sweep", {})
    if not isinstance(sweep_table, dict):
        raise UserError(f"[sweep] in {source} must be a table")
    sweep_keys = {f for f in SweepConfig.__dataclass_fields__}
    sweep_flags = {k: v for k, v in flags.items() if k in sweep_keys}
    train_flags = {k: v for k, v in flags.items() if k not in sweep_keys}
    if "lr_range" in sweep_flags:  # repeated flag: a list of OPT=LO:HI strings
        sweep_flags["lr_range"] = [
            part for value in sweep_flags["lr_range"] for part in value.replace(",", " ").split()
        ]
    sweep = merge(SweepConfig, sweep_table, sweep_flags, f"[sweep] of {source}")
    for key in SWEEP_OWNED_TRAIN_KEYS:
        file_values.pop(key, None)
    train = merge(TrainConfig, file_values, train_flags, source).validate()
    return sweep.validate(train), train


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m raygpt.sweep",
        description="Search optimizer x learning rate with Ray Tune (Optuna + ASHA).",
    )
    parser.add_argument("experiment", nargs="?", help="experiment TOML ([sweep] table + keys)")
    add_dataclass_flags(parser, SweepConfig, exclude=("lr_range",), title="sweep keys")
    parser.add_argument(
        "--lr-range",
        dest="lr_range",
        action="append",
        default=argparse.SUPPRESS,
        metavar="OPT=LO:HI",
        help="learning-rate range for one optimizer (repeatable)",
    )
    add_dataclass_flags(
        parser, TrainConfig, exclude=SWEEP_OWNED_TRAIN_KEYS, title="training keys (per trial)"
    )
    return parser


def configs_from_argv(argv: list[str] | None) -> tuple[SweepConfig, TrainConfig]:
    args = vars(build_parser().parse_args(argv))
    experiment = args.pop("experiment")
    return load_configs(experiment, args)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    check_found_something(run(*configs_from_argv(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
