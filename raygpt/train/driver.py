"""One DDP training run, as `python -m raygpt.train` starts it (raygpt.train.cli).

Everything that can be checked before Ray starts is checked first (config,
storage, data, block size, run folder, checkpoint compatibility), then cluster
capacity and, from every node, the storage path, so bad input costs seconds,
not a worker-group start. Results land in `<storage_path>/<name>/` (a local
folder or s3://, gs://): `steps/` Parquet parts, TensorBoard events,
checkpoints and `run.json` (config, versions, cluster); see results.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

from raygpt import checkpoint, errors, results, run_folder, storage
from raygpt.cluster import connect, resources, storage_check
from raygpt.config.train import TrainConfig
from raygpt.data import cache
from raygpt.runtime import cpu_threads_available
from raygpt.train import metrics, preflight, trainer
from raygpt.train.wiring import RunWiring


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train one model as `cfg` says; return a summary (also printed)."""
    # The run folder's lock, taken in _run before Ray starts, is released however it ends.
    with contextlib.ExitStack() as held:
        return _run(cfg, held)


def _run(cfg: TrainConfig, held: contextlib.ExitStack) -> dict[str, Any]:
    name = cfg.name or cfg.default_name()
    preflight.check_trackers(cfg)
    # Workers read the data cache the driver resolved, whatever their environment.
    cfg = dataclasses.replace(cfg, data_dir=str(cache.data_root(cfg.data_dir)))
    store = storage.resolve(cfg.storage_path)  # unreachable, denied, no bucket: fails here
    run_path = store.path(name)
    meta = preflight.check_inputs(cfg)
    from_step = preflight.check_resume_compatible(store, run_path, cfg, meta) if cfg.resume else 0
    # The folder is free to write, and this process its one writer until the run ends
    # (--eval-only too: it writes run.json and a step part).
    held.enter_context(run_folder.claim(store, name, cfg.resume, cfg.overwrite, "run"))

    started = time.perf_counter()
    in_process = trainer.runs_in_process(cfg)
    if in_process:
        cluster = trainer.IN_PROCESS_LINE
        print(f"[raygpt] {cluster}", flush=True)
        use_gpu = trainer.in_process_use_gpu(cfg.use_gpu)
        if cfg.cpus_per_worker is None:
            cfg = dataclasses.replace(cfg, cpus_per_worker=float(cpu_threads_available()))
    else:
        cluster = connect.connect(cfg.address)
        use_gpu = resources.resolve_use_gpu(cfg.use_gpu)
        if cfg.cpus_per_worker is None:
            cfg = dataclasses.replace(
                cfg, cpus_per_worker=resources.auto_cpus_per_worker(cfg.num_workers, use_gpu)
            )
        resources.check_fits(cfg.num_workers, cfg.cpus_per_worker, 1 if use_gpu else 0)
        storage_check.preflight(store)  # every node sees the storage, or one line names the node
    ray_ready = time.perf_counter()
    # Only now, with every check passed, may --overwrite remove the old run.
    run_folder.prepare_run_dir(store, run_path, cfg.resume, cfg.overwrite)

    metadata = {
        "config": cfg.to_dict() | {"name": name},
        "environment": metrics.environment(),
        "cluster": cluster,
        "data": preflight.data_record(meta),
    }
    # A resume keeps the record of how the run began and adds what this resume changed.
    preflight.write_record(store, f"{run_path}/{results.RUN_FILE}", metadata, cfg.resume, from_step)
    torch_trainer = trainer.build_trainer(
        cfg,
        name=name,
        storage=store,
        use_gpu=use_gpu,
        wiring=RunWiring(storage=store, metadata=metadata),
        in_process=in_process,
    )
    where = store.display(run_path)
    print(
        f"[raygpt] run {name}: {cfg.num_workers} worker(s) x {cfg.cpus_per_worker:g} CPU"
        f"{' + 1 GPU' if use_gpu else ''}, {cfg.optimizer} lr={cfg.learning_rate:g}, "
        f"{'evaluation only' if cfg.eval_only else f'{cfg.max_steps} steps'} -> {where}",
        flush=True,
    )
    if in_process:
        result = _fit_in_process(torch_trainer, cfg.max_failures)
    else:
        gpus = 1 if use_gpu else 0
        resources.announce_wait(cfg.num_workers, cfg.cpus_per_worker, gpus, cfg.start_timeout_s)
        result = _fit(torch_trainer, cfg, gpus)
    finished = time.perf_counter()
    final = result.metrics or {}
    if cfg.eval_only and not final:  # Ray keeps only reports with a checkpoint; it has none
        final = _step_zero_result(store, run_path)
    summary = {
        "name": name,
        "run_dir": where,
        "step": final.get("step"),
        "train_loss": final.get("train_loss"),
        "val_loss": final.get("val_loss"),
        "best_val_loss": final.get("best_val_loss"),
        "diverged": final.get("diverged", False),
        "cpus_per_worker": cfg.cpus_per_worker,
        "ray_startup_seconds": round(ray_ready - started, 2),
        "wall_seconds": round(finished - started, 2),
        "training_seconds": round(finished - ray_ready, 2),
        "checkpoint": _final_checkpoint(store, run_path, result),
    }
    print(
        f"[raygpt] done: step {summary['step']} val loss {_fmt(summary['val_loss'])} "
        f"(best {_fmt(summary['best_val_loss'])}) in {summary['wall_seconds']:.0f}s "
        f"(Ray start-up {summary['ray_startup_seconds']:.1f}s); results in {where}",
        flush=True,
    )
    return summary


def _fit(torch_trainer, cfg: TrainConfig, gpus_per_worker: float) -> Any:
    try:
        return torch_trainer.fit()
    except Exception as err:  # Ray wraps worker errors; surface ours as one line
        if (user_error := errors.find_user_error(err)) is not None:
            raise user_error from None
        if resources.is_start_timeout(err):
            raise resources.start_timeout_error(
                cfg.num_workers, cfg.cpus_per_worker, gpus_per_worker, cfg.start_timeout_s
            ) from None
        raise


def _fit_in_process(torch_trainer, max_failures: int) -> Any:
    """Ray Train's local mode has no failure policy of its own: give a run that raises
    the restarts a worker group gets (`max_failures`), each resuming from the latest
    checkpoint, which the loop finds on storage. A bad input (UserError) is never retried."""
    from raygpt.errors import UserError

    for attempt in range(max_failures + 1):
        try:
            return torch_trainer.fit()
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as err:
            if attempt == max_failures:
                raise
            first = (str(err).strip().splitlines() or [""])[0]
            print(
                f"[raygpt] the run failed ({type(err).__name__}: {first}); restarting from "
                f"its latest checkpoint ({attempt + 1} of {max_failures})",
                flush=True,
            )
    raise AssertionError("unreachable")


def _step_zero_result(store, run_path: str) -> dict[str, Any]:
    """An --eval-only run's losses, from the one step row it wrote."""
    table, _ = results.read_steps(store, run_path)
    if table is None or not table.num_rows:
        return {}
    row = table.to_pylist()[-1]
    return {
        "step": row["step"],
        "train_loss": row["eval_train_loss"],
        "val_loss": row["val_loss"],
        "best_val_loss": row["val_loss"],
    }


def _final_checkpoint(store, run_path: str, result) -> str | None:
    if result.checkpoint is not None and result.path is not None:
        return store.display(result.checkpoint.path)
    latest = checkpoint.latest_in_run(run_path, store)  # in-process: saved by the loop
    return store.display(latest) if latest else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
