"""`python -m raygpt.sweep [EXPERIMENT.toml] --optimizers adamw,sgd`: which optimizer, at which lr?

Ray Tune decides configs and stops trials; it never trains by itself. Each
trial is a function trainable that builds a `TorchTrainer` running the same
`loop.train_loop_per_worker` as `raygpt.train`:
- a one-worker trial (the default) runs it in Ray Train's local mode, inside the
  trial's own process, and reports to Tune directly (checkpoints included), so a
  trial costs one process start rather than a Train controller, a placement
  group and a worker actor (about 13 s each on a 2-core machine);
- a multi-worker trial (`--workers-per-trial N`) gets a DDP worker group, with
  `TuneReportCallback` forwarding rank 0's reports (Ray Train V2's Tune pattern).

Settings: sweep_config.py; search spaces, searchers and schedulers:
sweep_search.py; the trials table: sweep_outputs.py; the console's live view:
sweep_progress.py; seed statistics and equal-budget comparisons: report.py.

Outputs in `<storage_path>/<name>/` (a local folder or s3://, gs://):
trials.parquet (rewritten whole while the sweep runs), runs/<trial_id>/ with
each trial's step parts, logs/<trial_id>.log with its console lines,
tensorboard/<trial_id>/ events, Tune's state and one-worker trials'
checkpoints in <trial_id>/ (confirm/ for --confirm-top reruns), and
lr_sensitivity.png and friends (see raygpt.report).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

from raygpt import data, generation, launch, metrics, results, status, storage, trackers
from raygpt.config import OneLineArgumentParser, TrainConfig, add_dataclass_flags
from raygpt.errors import UserError, exit_on_user_error
from raygpt.evals import during_training
from raygpt.storage import Storage
from raygpt.sweep_config import (  # noqa: F401 (re-exported: the sweep's public names)
    DEFAULT_LR_RANGES,
    METRIC,
    MODE,
    MOMENTUM_RANGE,
    SWEEP_OWNED_TRAIN_KEYS,
    SweepConfig,
    load_configs,
)
from raygpt.sweep_outputs import SweepOutputs, error_line, trial_error_line  # noqa: F401
from raygpt.sweep_progress import SweepProgress
from raygpt.sweep_search import (  # noqa: F401
    OptunaSpace,
    build_scheduler,
    build_search,
    config_key,
    grid_points,
    random_points,
    trial_params,
)

LOGS_DIR = "logs"
CONFIRM_DIR = "confirm"  # Tune state of the --confirm-top reruns, inside the sweep folder


# --------------------------------------------------------------------------- one trial


def run_trial(
    config: dict[str, Any],
    base: dict[str, Any],
    store: Storage,
    sweep_path: str,
    use_gpu: bool,
    gpus_per_worker: float,
    env: dict[str, str],
    metadata: dict[str, Any],
    local: bool,
    echo: bool,
) -> None:
    """A Tune function trainable: one TorchTrainer run of the shared training loop."""
    import ray.tune

    os.environ.update(env)  # the driver's RAYGPT_* settings, on to the trial's workers
    if not echo:
        # Ray Train and Tune log at INFO from inside the trial (local mode announces
        # itself); those lines belong in Ray's logs, not the trial's.
        logging.getLogger("ray").setLevel(logging.WARNING)

    cfg = TrainConfig.from_dict({**base, **trial_params(config, base["seed"])}).validate()
    trial_id = ray.tune.get_context().get_trial_id()
    callbacks = []
    if not local:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]
    # The trainer's name is the trial id: a restored trial finds its own checkpoints.
    trainer = launch.build_trainer(
        cfg,
        name=trial_id,
        storage=store.at(f"{sweep_path}/{results.RUNS_DIR}"),
        use_gpu=use_gpu,
        gpus_per_worker=gpus_per_worker,
        callbacks=callbacks,
        run_info={"trial_id": trial_id},
        outputs={
            "tensorboard_path": f"{sweep_path}/{results.TENSORBOARD_DIR}/{trial_id}",
            "metadata": metadata,
            "tune_session": local,
            "log_path": f"{sweep_path}/{LOGS_DIR}/{trial_id}.log",
            "echo": echo,
        },
        in_process=local,
    )
    trainer.fit()


# --------------------------------------------------------------------------- the sweep


def _trial_dirname(trial) -> str:
    return trial.trial_id


def planned_trials(sweep: SweepConfig, train: TrainConfig) -> int:
    """Trials of the search phase (the live view's denominator)."""
    seeds = 1 if sweep.confirm_top else sweep.seeds
    if sweep.search == "grid":
        dims = sweep.dimensions(train)
        points = grid_points(sweep.optimizers, sweep.lr_ranges(), sweep.grid_points, dims)
        return len(points) * seeds
    return sweep.num_samples * seeds


class _Phase:
    """One Tuner run inside the sweep folder: the search, or the --confirm-top reruns."""

    def __init__(self, label: str, tune_name: str, tune_root: str):
        self.label = label
        self.tune_name = tune_name  # Tune's experiment folder name under tune_root
        self.tune_root = tune_root

    @property
    def path(self) -> str:
        return f"{self.tune_root}/{self.tune_name}"


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
    train.rung_cooldown = sweep.trial_rung_cooldown()
    if train.rung_cooldown > 0:
        # Cooled copies are evaluated at the rungs (max_steps needs none: it has decayed).
        train.cooldown_at = sweep.rung_steps(train)[:-1]
    train.validate()
    trackers.check_installed(train)  # --wandb / --mlflow without their package
    _, data_meta = launch.prepare_data(train)  # fail on bad data before Ray starts
    generation.check(train, data_meta)  # --sample-prompt in the dataset's tokenizer
    during_training.check(train, data_meta)  # HellaSwag downloaded (once) and readable
    launch.check_run_dir(store, sweep_path, sweep.resume, sweep.overwrite, kind="sweep")
    if sweep.resume and not tune.Tuner.can_restore(sweep_path, storage_filesystem=store.fs):
        raise UserError(
            f"cannot resume: {where} holds no Tune experiment state; start it without --resume"
        )

    started = time.perf_counter()
    # Tune warns each time frequent checkpoints force a state snapshot; a sweep of small
    # trials checkpoints at every eval by design, and the snapshot is one small file.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    cluster = launch.connect(sweep.address, log_to_driver=sweep.verbose)
    if not sweep.verbose:
        # Tune's, Train's and Optuna's INFO lines stay out of the console; the live view
        # speaks for them (Ray's own logs keep theirs).
        logging.getLogger("ray").setLevel(logging.WARNING)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    use_gpu = launch.resolve_use_gpu(sweep.use_gpu)
    if sweep.gpus_per_trial is not None and not use_gpu:
        raise UserError(
            f"--gpus-per-trial {sweep.gpus_per_trial:g} but the cluster has no GPU in use "
            "(use_gpu is off or no node has a GPU); drop --gpus-per-trial or add GPU nodes"
        )
    gpus = (sweep.gpus_per_trial or 1.0) if use_gpu else 0.0
    if train.cpus_per_worker is None:
        # Trials share the cores: one each keeps as many trials running as there are cores.
        train = TrainConfig.from_dict(train.to_dict() | {"cpus_per_worker": 1.0})
    launch.check_fits(sweep.workers_per_trial, train.cpus_per_worker, gpus, what="each trial")
    if use_gpu:
        launch.check_gpu_memory(train, data_meta["vocab_size"], gpus, launch.gpu_memory_bytes(gpus))
    concurrent = launch.trials_that_fit(sweep.workers_per_trial, train.cpus_per_worker, gpus)
    if sweep.max_concurrent_trials is not None:
        concurrent = min(concurrent, sweep.max_concurrent_trials)
    storage.preflight(store)  # trials may land on any node: every node must see the storage
    ray_ready = time.perf_counter()
    # Only now, with every check passed, may --overwrite remove the old sweep.
    launch.prepare_run_dir(store, sweep_path, sweep.resume, sweep.overwrite, kind="sweep")

    metadata = {
        "sweep": dict(vars(sweep)) | {"name": name},
        "config": train.to_dict(),
        "environment": metrics.environment(),
        "cluster": cluster,
        "data": {
            k: data_meta.get(k) for k in ("dataset", "tokenizer", "vocab_size", "source_sha256")
        },
    }
    results.write_json(store, f"{sweep_path}/{results.SWEEP_FILE}", metadata)
    local = sweep.workers_per_trial == 1
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=train.to_dict(),
            store=store,
            sweep_path=sweep_path,
            use_gpu=use_gpu,
            gpus_per_worker=gpus,
            env=launch.raygpt_env(),
            metadata=metadata,
            local=local,
            echo=sweep.verbose,
        ),
        # A one-worker trial trains in its own process and holds the worker's share; a
        # multi-worker trial's process only waits on its TorchTrainer, whose workers hold
        # the resources (Tune rejects an all-zero request: a token 1 MiB of memory).
        {"cpu": train.cpus_per_worker, "gpu": gpus} if local else {"cpu": 0, "memory": 1 << 20},
    )
    packing = f", {gpus:g} GPU each" if use_gpu else ""
    print(
        f"[sweep] {name}: {sweep.search} search over {','.join(sweep.optimizers)}, "
        f"{sweep.scheduler} scheduler, {planned_trials(sweep, train)} trial(s), up to "
        f"{concurrent} at once{packing}, {train.max_steps} steps max -> {where}",
        flush=True,
    )
    print(
        f"[sweep] each trial's lines: {store.display(f'{sweep_path}/{LOGS_DIR}')}/<trial>.log"
        + ("" if sweep.verbose else " (-v shows them here)"),
        flush=True,
    )

    search_phase = _Phase("search", name, store.root)
    records = _run_phase(
        search_phase, sweep, train, store, sweep_path, metadata, trainable, concurrent
    )
    if sweep.confirm_top:
        confirm_phase = _Phase("confirm", CONFIRM_DIR, sweep_path)
        _run_phase(
            confirm_phase,
            sweep,
            train,
            store,
            sweep_path,
            metadata,
            trainable,
            concurrent,
            points=top_configurations(
                records, sweep.confirm_top, train.max_steps, sweep.confirm_scope == "optimizer"
            ),
        )
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


def top_configurations(
    records: list[dict[str, Any]], top: int, max_steps: int, per_optimizer: bool = False
) -> list[dict[str, Any]]:
    """The `top` configurations that completed max_steps (of each optimizer, with
    `per_optimizer`), best final val first, as param dicts. Equal budget: a trial ASHA
    stopped at a lower rung is not comparable, so it is never among them."""
    import json
    import math

    done = [
        r
        for r in records
        if r["status"] == status.COMPLETED
        and r["steps"] == max_steps
        and r["final_val_loss"] is not None
        and math.isfinite(r["final_val_loss"])
    ]
    done.sort(key=lambda r: r["final_val_loss"])
    chosen, seen = [], set()
    taken: dict[str, int] = {}
    for r in done:
        group = r["optimizer"] if per_optimizer else ""
        if r["config_key"] in seen or taken.get(group, 0) == top:
            continue
        seen.add(r["config_key"])
        taken[group] = taken.get(group, 0) + 1
        params = json.loads(r["params"])
        params.pop("seed", None)
        chosen.append(params)
    return chosen


def _run_phase(
    phase: _Phase,
    sweep: SweepConfig,
    train: TrainConfig,
    store: Storage,
    sweep_path: str,
    metadata: dict[str, Any],
    trainable: Any,
    concurrent: int,
    points: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run (or restore and finish) one Tuner; return the trials table's rows after it."""
    from ray import tune

    confirm = points is not None
    if confirm and not points:
        print("[sweep] no configuration completed max_steps; nothing to confirm", flush=True)
        return []
    seeds = sweep.seed_list(train)[1:] if confirm else None
    outputs = SweepOutputs(
        store,
        sweep_path,
        metadata,
        train.max_steps,
        base_seed=train.seed,
        phase=phase.label,
        target_loss=sweep.target_loss,
        announce=False,
    )
    total = len(points) * len(seeds) if confirm else planned_trials(sweep, train)
    progress = SweepProgress(outputs, total, train.max_steps)
    if confirm:
        print(
            f"[sweep] confirming the top {len(points)} configuration(s) over seeds "
            f"{', '.join(map(str, seeds))} (seed {train.seed} ran in the search)",
            flush=True,
        )
    if sweep.resume and tune.Tuner.can_restore(phase.path, storage_filesystem=store.fs):
        tuner = tune.Tuner.restore(
            phase.path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=sweep.max_trial_failures > 0,
            storage_filesystem=store.fs,
        )
    else:
        if confirm:
            search_alg, scheduler, num_samples = None, tune.schedulers.FIFOScheduler(), 1
            param_space = {"point": tune.grid_search(points), "seed": tune.grid_search(seeds)}
        else:
            search_alg, param_space, num_samples = build_search(sweep, train)
            scheduler = build_scheduler(sweep, train)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=sweep.metric(train),
                mode=sweep.mode(),
                search_alg=search_alg,
                scheduler=scheduler,
                num_samples=num_samples,
                max_concurrent_trials=concurrent,
                trial_dirname_creator=_trial_dirname,
                # A one-worker trial's process (torch imported, data cached) serves the next
                # trial: about 3.5 s of process start and imports saved per trial.
                reuse_actors=sweep.workers_per_trial == 1,
            ),
            run_config=tune.RunConfig(
                name=phase.tune_name,
                storage_path=phase.tune_root,
                storage_filesystem=store.fs,
                callbacks=[outputs, progress, *trackers.tune_callbacks(train, phase.tune_name)],
                failure_config=tune.FailureConfig(max_failures=sweep.max_trial_failures),
                # One-worker trials' checkpoints are Tune's: keep as many as a run keeps,
                # and under PBT enough that a checkpoint being cloned is not pruned first.
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=max(train.keep_checkpoints, 4)
                    if sweep.scheduler == "pbt"
                    else train.keep_checkpoints
                ),
                verbose=0,
            ),
        )
    # Tune's result grid looks for the per-trial JSON/CSV logs raygpt turns off.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    tuner.fit()
    return outputs.records()


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


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m raygpt.sweep",
        description="Search optimizer x learning rate with Ray Tune (Optuna + ASHA).",
    )
    parser.add_argument("experiment", nargs="?", help="experiment TOML ([sweep] table + keys)")
    add_dataclass_flags(
        parser,
        SweepConfig,
        exclude=("lr_range", "search_space", "verbose"),
        title="sweep keys",
    )
    parser.add_argument(
        "--lr-range",
        dest="lr_range",
        action="append",
        default=argparse.SUPPRESS,
        metavar="OPT=LO:HI",
        help="learning-rate range for one optimizer (repeatable)",
    )
    parser.add_argument(
        "--search-space",
        dest="search_space",
        action="append",
        default=argparse.SUPPRESS,
        metavar="KEY=LO:HI[:log]|KEY=a,b,c",
        help="another TrainConfig key to search, e.g. weight_decay=1e-3:0.3:log (repeatable)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        dest="verbose",
        action="store_const",
        const="true",
        default=argparse.SUPPRESS,
        help="also print every trial's lines and Ray's own output on the console",
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
