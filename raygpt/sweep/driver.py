"""One sweep, as `python -m raygpt.sweep` starts it (raygpt.sweep.cli): which optimizer, at which lr?

Ray Tune decides configs and stops trials; it never trains by itself. Each
trial is a function trainable that builds a `TorchTrainer` running the same
`loop.train_loop_per_worker` as `raygpt.train`:
- a one-worker trial (the default) runs it in Ray Train's local mode, inside the
  trial's own process, and reports to Tune directly (checkpoints included), so a
  trial costs one process start rather than a Train controller, a placement
  group and a worker actor (about 13 s each on a 2-core machine);
- a multi-worker trial (`--workers-per-trial N`) gets a DDP worker group, with
  `TuneReportCallback` forwarding rank 0's reports (Ray Train V2's Tune pattern).

Settings: config.py; search spaces, searchers and schedulers: space.py and
search.py; one trial: trial.py; the trials table: trials_table.py; the console's
live view: live_view.py; seed statistics and equal-budget comparisons:
raygpt/report/comparisons.py.

Outputs in `<storage_path>/<name>/` (a local folder or s3://, gs://):
trials.parquet (rewritten whole while the sweep runs), runs/<trial_id>/ with
each trial's step parts, logs/<trial_id>.log with its console lines,
tensorboard/<trial_id>/ events, Tune's state and one-worker trials'
checkpoints in <trial_id>/ (confirm/ for --confirm-top reruns), and
lr_sensitivity.png and friends (see raygpt.report).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

from raygpt import results, run_folder, status, storage
from raygpt.cluster import connect, resources, storage_check
from raygpt.config.train import TrainConfig
from raygpt.data import cache
from raygpt.errors import UserError
from raygpt.redact import redact, redact_config
from raygpt.storage import Storage
from raygpt.sweep import trial
from raygpt.sweep.config import SweepConfig
from raygpt.sweep.live_view import SweepProgress
from raygpt.sweep.search import build_scheduler, build_search, grid_points
from raygpt.sweep.trials_table import SweepOutputs
from raygpt.train import metrics, preflight, trackers, trainer

CONFIRM_DIR = "confirm"  # Tune state of the --confirm-top reruns, inside the sweep folder


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
    # The sweep folder's lock, taken in _run before Ray starts, is released however it
    # ends. Trials write inside the folder under it and take no lock of their own.
    with contextlib.ExitStack() as held:
        return _run(sweep, train, held)


def _run(sweep: SweepConfig, train: TrainConfig, held: contextlib.ExitStack) -> dict[str, Any]:
    from ray import tune

    name = sweep.name or f"sweep-{'-'.join(sweep.optimizers)}-{sweep.search}"
    store = storage.resolve(sweep.storage_path)  # unreachable, denied, no bucket: fails here
    sweep_path = store.path(name)
    where = store.display(sweep_path)
    # Trials read the data cache the driver resolved, whatever their environment.
    train = TrainConfig.from_dict(
        train.to_dict()
        | {"num_workers": sweep.workers_per_trial, "data_dir": str(cache.data_root(train.data_dir))}
    )
    train.rung_cooldown = sweep.trial_rung_cooldown()
    if train.rung_cooldown > 0:
        # Cooled copies are evaluated at the rungs (max_steps needs none: it has decayed).
        train.cooldown_at = sweep.rung_steps(train)[:-1]
    train.validate()
    preflight.check_trackers(train)
    data_meta = preflight.check_inputs(train)
    # The folder is free to write, and this process its one writer until the sweep ends.
    held.enter_context(run_folder.claim(store, name, sweep.resume, sweep.overwrite, "sweep"))
    if sweep.resume and not tune.Tuner.can_restore(sweep_path, storage_filesystem=store.fs):
        raise UserError(
            f"cannot resume: {where} holds no Tune experiment state; start it without --resume"
        )
    if sweep.resume:  # the trials' checkpoints must fit their configs, which train feeds
        preflight.check_sweep_resume(store, sweep_path, train, data_meta)

    started = time.perf_counter()
    # Tune warns each time frequent checkpoints force a state snapshot; a sweep of small
    # trials checkpoints at every eval by design, and the snapshot is one small file.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    cluster = connect.connect(sweep.address, log_to_driver=sweep.verbose)
    if not sweep.verbose:
        # Tune's, Train's and Optuna's INFO lines stay out of the console; the live view
        # speaks for them (Ray's own logs keep theirs).
        logging.getLogger("ray").setLevel(logging.WARNING)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    use_gpu = resources.resolve_use_gpu(sweep.use_gpu)
    if sweep.gpus_per_trial is not None and not use_gpu:
        raise UserError(
            f"--gpus-per-trial {sweep.gpus_per_trial:g} but the cluster has no GPU in use "
            "(use_gpu is off or no node has a GPU); drop --gpus-per-trial or add GPU nodes"
        )
    gpus = (sweep.gpus_per_trial or 1.0) if use_gpu else 0.0
    if train.cpus_per_worker is None:
        # Trials share the cores: one each keeps as many trials running as there are cores.
        train = TrainConfig.from_dict(train.to_dict() | {"cpus_per_worker": 1.0})
    resources.check_fits(sweep.workers_per_trial, train.cpus_per_worker, gpus, what="each trial")
    if use_gpu:
        # Over the search space: a searched batch_size=32 trial needs more than the base's.
        resources.check_gpu_memory(
            train,
            data_meta["vocab_size"],
            gpus,
            resources.gpu_memory_bytes(gpus),
            dims=sweep.dimensions(train),
            optimizers=sweep.optimizers,
        )
    concurrent = resources.trials_that_fit(sweep.workers_per_trial, train.cpus_per_worker, gpus)
    if sweep.max_concurrent_trials is not None:
        concurrent = min(concurrent, sweep.max_concurrent_trials)
    storage_check.preflight(store)  # trials may land on any node: every node must see the storage
    ray_ready = time.perf_counter()
    # Only now, with every check passed, may --overwrite remove the old sweep.
    run_folder.prepare_run_dir(store, sweep_path, sweep.resume, sweep.overwrite, kind="sweep")

    # Masked (a --mlflow URI's password): Tune pickles the trials' parameters, this among
    # them, into the sweep folder's tuner.pkl, and it is written as footers and sweep.json.
    metadata = redact_config(
        {
            "sweep": dict(vars(sweep)) | {"name": name},
            "config": train.to_dict(),
            "environment": metrics.environment(),
            "cluster": cluster,
            "data": preflight.data_record(data_meta),
        }
    )
    # A resume keeps the record of how the sweep began and adds what this resume changed.
    preflight.write_record(store, f"{sweep_path}/{results.SWEEP_FILE}", metadata, sweep.resume)
    local = sweep.workers_per_trial == 1
    trainable = tune.with_resources(
        tune.with_parameters(
            trial.run_trial,
            # The driver's callbacks log trials to the trackers; a trial never connects, so
            # its copy of the --mlflow URI (pickled into tuner.pkl) is masked too.
            base=train.to_dict() | {"mlflow": redact(train.mlflow) if train.mlflow else None},
            store=store,
            sweep_path=sweep_path,
            use_gpu=use_gpu,
            gpus_per_worker=gpus,
            env=trainer.raygpt_env(),
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
        f"[sweep] each trial's lines: {store.display(f'{sweep_path}/{trial.LOGS_DIR}')}/<trial>.log"
        + ("" if sweep.verbose else " (-v shows them here)"),
        flush=True,
    )

    search_phase = _Phase("search", name, store.root)
    records = _run_phase(
        search_phase, sweep, train, store, sweep_path, metadata, trainable, concurrent, gpus=gpus
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
            gpus=gpus,
            points=top_configurations(
                records, sweep.confirm_top, train.max_steps, sweep.confirm_scope == "optimizer"
            ),
        )
    finished = time.perf_counter()

    from raygpt.report import driver as report_driver
    from raygpt.report import summary as report_summary
    from raygpt.report import tables

    folder = store.at(sweep_path)
    price = sweep.gpu_hour_price
    text, pngs = report_driver.render(folder, gpu_hour_price=price)
    print(text, flush=True)
    for png in pngs:
        print(f"[sweep] plot: {png}", flush=True)
    summary = report_summary.summarize(*tables.load(folder)[:2], gpu_hour_price=price)
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
    gpus: float = 0.0,
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
        workers=sweep.workers_per_trial,
        gpus_per_worker=gpus,
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
        if train.mlflow is not None:  # the restored MLflow callback's store and credentials
            trackers.mlflow_environment(train.mlflow)
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
