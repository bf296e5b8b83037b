"""`python -m raygpt.train [EXPERIMENT.toml] [--key value ...]`: one DDP training run.

Everything that can be checked before Ray starts is checked first (config,
storage, data, block size, run folder, checkpoint compatibility), then cluster
capacity and, from every node, the storage path, so bad input costs seconds,
not a worker-group start. Results land in `<storage_path>/<name>/` (a local
folder or s3://, gs://): `steps/` Parquet parts, TensorBoard events,
checkpoints and `run.json` (config, versions, cluster); see results.py.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

from raygpt import checkpoint, data, generation, launch, metrics, results, storage, trackers
from raygpt.config import OneLineArgumentParser, TrainConfig, add_dataclass_flags, load_train_config
from raygpt.errors import exit_on_user_error
from raygpt.evals import during_training
from raygpt.runtime import cpu_threads_available


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train one model as `cfg` says; return a summary (also printed)."""
    name = cfg.name or cfg.default_name()
    trackers.check_installed(cfg)  # --wandb / --mlflow without their package
    # Workers read the data cache the driver resolved, whatever their environment.
    cfg = dataclasses.replace(cfg, data_dir=str(data.data_root(cfg.data_dir)))
    store = storage.resolve(cfg.storage_path)  # unreachable, denied, no bucket: fails here
    run_path = store.path(name)
    _, meta = launch.prepare_data(cfg)
    generation.check(cfg, meta)  # --sample-prompt in the dataset's tokenizer
    during_training.check(cfg, meta)  # HellaSwag downloaded (once) and readable
    if cfg.resume:
        launch.check_resume_compatible(store, run_path, cfg, meta["vocab_size"])
    launch.check_run_dir(store, run_path, cfg.resume, cfg.overwrite)

    started = time.perf_counter()
    in_process = launch.runs_in_process(cfg)
    if in_process:
        cluster = launch.IN_PROCESS_LINE
        print(f"[raygpt] {cluster}", flush=True)
        use_gpu = launch.in_process_use_gpu(cfg.use_gpu)
        if cfg.cpus_per_worker is None:
            cfg = dataclasses.replace(cfg, cpus_per_worker=float(cpu_threads_available()))
    else:
        cluster = launch.connect(cfg.address)
        use_gpu = launch.resolve_use_gpu(cfg.use_gpu)
        if cfg.cpus_per_worker is None:
            cfg = dataclasses.replace(
                cfg, cpus_per_worker=launch.auto_cpus_per_worker(cfg.num_workers, use_gpu)
            )
        launch.check_fits(cfg.num_workers, cfg.cpus_per_worker, 1 if use_gpu else 0)
        storage.preflight(store)  # every node sees the storage, or one line names the node
    ray_ready = time.perf_counter()
    # Only now, with every check passed, may --overwrite remove the old run.
    launch.prepare_run_dir(store, run_path, cfg.resume, cfg.overwrite)

    metadata = {
        "config": cfg.to_dict() | {"name": name},
        "environment": metrics.environment(),
        "cluster": cluster,
        "data": {k: meta.get(k) for k in ("dataset", "tokenizer", "vocab_size", "source_sha256")},
    }
    results.write_json(store, f"{run_path}/{results.RUN_FILE}", metadata)
    trainer = launch.build_trainer(
        cfg,
        name=name,
        storage=store,
        use_gpu=use_gpu,
        outputs={"metadata": metadata},
        in_process=in_process,
    )
    where = store.display(run_path)
    print(
        f"[raygpt] run {name}: {cfg.num_workers} worker(s) x {cfg.cpus_per_worker:g} CPU"
        f"{' + 1 GPU' if use_gpu else ''}, {cfg.optimizer} lr={cfg.learning_rate:g}, "
        f"{'evaluation only' if cfg.eval_only else f'{cfg.max_steps} steps'} -> {where}",
        flush=True,
    )
    result = _fit_in_process(trainer, cfg.max_failures) if in_process else _fit(trainer)
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


def _fit(trainer) -> Any:
    try:
        return trainer.fit()
    except Exception as err:  # Ray wraps worker errors; surface ours as one line
        if (user_error := launch.find_user_error(err)) is not None:
            raise user_error from None
        raise


def _fit_in_process(trainer, max_failures: int) -> Any:
    """Ray Train's local mode has no failure policy of its own: give a run that raises
    the restarts a worker group gets (`max_failures`), each resuming from the latest
    checkpoint, which the loop finds on storage. A bad input (UserError) is never retried."""
    from raygpt.errors import UserError

    for attempt in range(max_failures + 1):
        try:
            return trainer.fit()
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


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m raygpt.train",
        description="Train a GPT with Ray Train (DDP across workers and nodes).",
    )
    parser.add_argument("experiment", nargs="?", help="experiment TOML file (keys as below)")
    add_dataclass_flags(parser, TrainConfig, title="config keys (TOML key = flag name)")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    experiment = args.pop("experiment")
    cfg = load_train_config(experiment, args)
    summary = run(cfg)
    return 1 if summary["diverged"] else 0


if __name__ == "__main__":
    sys.exit(main())
