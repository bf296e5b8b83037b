"""`python -m raygpt.train [EXPERIMENT.toml] [--key value ...]`: one DDP training run.

Everything that can be checked before Ray starts is checked here (config,
data, block size, run folder, checkpoint compatibility, cluster capacity), so
bad input costs seconds, not a worker-group start. Results land in
`<storage_path>/<name>/`: `steps.parquet`, TensorBoard events, checkpoints and
`run.json` (config, versions, hardware).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from raygpt import checkpoint, data, launch, metrics, model
from raygpt import metrics as results  # RunOutputs.after_report has a parameter named metrics
from raygpt.config import OneLineArgumentParser, TrainConfig, add_dataclass_flags, load_train_config
from raygpt.errors import UserError, exit_on_user_error


class RunOutputs(UserCallback):
    """Turns the run's steps.jsonl (rank 0's row log) into Parquet and TensorBoard.

    Runs in the Train controller, which Ray places on the driver's node, after
    every report; a resumed run re-reads the whole log and keeps one row a step.
    """

    def __init__(self, run_dir: str, metadata: dict[str, Any]):
        self.run_dir = run_dir
        self.metadata = metadata
        self._log: results.StepLog | None = None
        self._tail: results.RowTail | None = None
        self._tensorboard: results.TensorBoardLog | None = None

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if self._log is None:
            self._log = results.StepLog(Path(self.run_dir) / "steps.parquet", self.metadata)
            self._tail = results.RowTail(results.rows_path(self.run_dir))
            self._tensorboard = results.TensorBoardLog(Path(self.run_dir) / "tensorboard")
        fresh = self._log.add(self._tail.read_new())
        self._log.write()
        self._tensorboard.add(fresh)


def prepare_data(cfg: TrainConfig) -> tuple[Path, dict[str, Any]]:
    """Prepare (or reuse) the dataset and check the block size fits it, before Ray starts."""
    dataset_dir, meta = data.prepare_from_config(cfg)
    check_init_from(cfg, meta["vocab_size"])
    train_batches = data.BatchSampler(dataset_dir, "train", cfg.block_size, cfg.seed)
    train_batches.sample_indices(0, 0, 0, cfg.batch_size, cfg.num_workers, cfg.grad_accum_steps())
    data.BatchSampler(dataset_dir, "val", cfg.block_size, cfg.seed)  # raises if val is too short
    return dataset_dir, meta


def check_init_from(cfg: TrainConfig, vocab_size: int) -> None:
    """Pretrained weights must cover the block size and the vocabulary: say so before Ray
    starts, not from inside a worker after the weights loaded (loop.build_model checks again)."""
    if cfg.init_from == "scratch" or (shape := model.pretrained_shape(cfg.init_from)) is None:
        return
    if vocab_size > shape["vocab_size"]:
        raise UserError(
            f"data vocabulary ({vocab_size} tokens) is larger than {cfg.init_from}'s "
            f"({shape['vocab_size']}); use --tokenizer gpt2 with pretrained weights"
        )
    if cfg.block_size > shape["n_positions"]:
        raise UserError(
            f"block_size={cfg.block_size} exceeds {cfg.init_from}'s context of "
            f"{shape['n_positions']}; use a block_size <= {shape['n_positions']}"
        )


def check_resume_compatible(run_dir: Path, cfg: TrainConfig, vocab_size: int) -> Path | None:
    latest = checkpoint.latest_in_run(run_dir)
    if latest is not None:
        checkpoint.check_compatible(checkpoint.load(latest), cfg.to_dict(), vocab_size)
    return latest


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train one model as `cfg` says; return a summary (also printed)."""
    name = cfg.name or cfg.default_name()
    # Workers read the data cache the driver resolved, whatever their environment.
    cfg = dataclasses.replace(cfg, data_dir=str(data.data_root(cfg.data_dir)))
    storage = launch.storage_root(cfg.storage_path)
    run_dir = Path(storage) / name
    _, meta = prepare_data(cfg)
    if cfg.resume and run_dir.exists():
        check_resume_compatible(run_dir, cfg, meta["vocab_size"])
    launch.check_run_dir(run_dir, cfg.resume, cfg.overwrite)

    started = time.perf_counter()
    launch.connect(cfg.address)
    use_gpu = launch.resolve_use_gpu(cfg.use_gpu)
    launch.check_fits(cfg.num_workers, cfg.cpus_per_worker, 1 if use_gpu else 0)
    ray_ready = time.perf_counter()
    # Only now, with every check passed, may --overwrite remove the old run.
    launch.prepare_run_dir(run_dir, cfg.resume, cfg.overwrite)

    metadata = {
        "config": cfg.to_dict() | {"name": name},
        "environment": metrics.environment(),
        "data": {k: meta.get(k) for k in ("dataset", "tokenizer", "vocab_size", "source_sha256")},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps(metadata, indent=2, default=str))
    trainer = launch.build_trainer(
        cfg,
        name=name,
        storage_path=storage,
        use_gpu=use_gpu,
        callbacks=[RunOutputs(str(run_dir), metadata)],
        run_info={"trial_id": ""},
    )
    print(
        f"[raygpt] run {name}: {cfg.num_workers} worker(s), {cfg.optimizer} lr={cfg.learning_rate:g}, "
        f"{cfg.max_steps} steps -> {run_dir}",
        flush=True,
    )
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker errors; surface ours as one line
        if (user_error := launch.find_user_error(err)) is not None:
            raise user_error from None
        raise
    finished = time.perf_counter()
    final = result.metrics or {}
    summary = {
        "name": name,
        "run_dir": str(run_dir),
        "step": final.get("step"),
        "train_loss": final.get("train_loss"),
        "val_loss": final.get("val_loss"),
        "best_val_loss": final.get("best_val_loss"),
        "diverged": final.get("diverged", False),
        "ray_startup_seconds": round(ray_ready - started, 2),
        "wall_seconds": round(finished - started, 2),
        "training_seconds": round(finished - ray_ready, 2),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
    }
    print(
        f"[raygpt] done: step {summary['step']} val loss {_fmt(summary['val_loss'])} "
        f"(best {_fmt(summary['best_val_loss'])}) in {summary['wall_seconds']:.0f}s "
        f"(Ray start-up {summary['ray_startup_seconds']:.1f}s); results in {run_dir}",
        flush=True,
    )
    return summary


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
