"""The one training loop: `train_loop_per_worker`, run by every DDP rank.

Ray Train's `TorchTrainer` starts it on each worker with the process group set
up; `raygpt.train` runs it once, `raygpt.sweep` once per trial. It owns nothing
about Ray beyond the context (rank, world size, device) and `ray.train.report`.

Step numbering: `step` counts completed optimizer updates, so "step 2000" is
the model after 2000 updates, like nanoGPT's `iter_num` at its final eval.
Reports happen at evaluation steps, checkpoint steps and the last step. ASHA's
rungs are multiples of `eval_interval`, so the report that reaches a rung is
always one with a fresh `val_loss`; a checkpoint-only report repeats the last
one (`evaluated` false).

Each step's loss and gradient norm stay on the device; they are read back, for
all the steps since the last read, at log intervals, evaluations and reports
(step_stats.py). The host thus never waits for the device in between, and a
divergence is noticed at the read after it, where the run then stops.

Before each report rank 0 writes the steps since the previous report as one
Parquet part and one TensorBoard event file (results.py), so every checkpoint
step is a part boundary and a run resumed from it rewrites the same parts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from raygpt import (
    checkpoint,
    data,
    generation,
    metrics,
    model_summary,
    results,
    rung_cooldown,
    status,
    trackers,
    trained,
)
from raygpt.config import TrainConfig
from raygpt.errors import UserError
from raygpt.evals.during_training import HellaSwagProbe
from raygpt.lr_schedule import lr_at
from raygpt.model import GPT, GPTConfig
from raygpt.optim import build_optimizer, set_lr, set_optimizer_mode
from raygpt.prefetch import BatchPrefetcher, to_device
from raygpt.runtime import Runtime, cpu_threads_available
from raygpt.step_stats import StepStats
from raygpt.storage import Storage
from raygpt.train_step import train_step
from raygpt.trial_log import maybe_capture

# Fault injection for the reliability tests and for drills on a real cluster:
# RAYGPT_FAIL_AT="RANK:STEP[:MODE[:OPTIMIZER]]" makes that rank fail after STEP
# updates, once: a run resumed from a checkpoint does not fail again. MODE is
# "exit" (the process dies abruptly, as on a crash or OOM kill; default) or
# "raise" (the loop raises, as on a bad batch); OPTIMIZER limits it to runs of
# that optimizer, so one trial of a sweep can fail while the others go on.
FAIL_AT_ENV = "RAYGPT_FAIL_AT"
# What a checkpoint records about its data, to refuse resuming on other data, and the
# tokenizer (a character vocabulary, a trained BPE's JSON) that sample and export rebuild.
CHECKPOINT_DATA_KEYS = (
    "dataset",
    "tokenizer",
    "vocab_size",
    "itos",
    "source_sha256",
    "tokenizer_json",
)


def padded_vocab_size(vocab_size: int) -> int:
    """GPT-2's 50257 tokens padded to 50304 (a multiple of 64) for faster matmuls."""
    return vocab_size if vocab_size <= 1024 else -(-vocab_size // 64) * 64


def build_model(cfg: TrainConfig, vocab_size: int) -> GPT:
    """A fresh GPT from the config, or the weights `init_from` names (trained.py)."""
    if cfg.init_from == "scratch":
        return GPT(
            GPTConfig(
                block_size=cfg.block_size,
                vocab_size=padded_vocab_size(vocab_size),
                n_layer=cfg.n_layer,
                n_head=cfg.n_head,
                n_embd=cfg.n_embd,
                dropout=cfg.dropout,
                bias=cfg.bias,
            )
        )
    return trained.model_to_train(cfg, vocab_size)


@torch.no_grad()
def evaluate(model, batches_by_split, runtime: Runtime, world_size) -> dict[str, float]:
    """Mean loss over fixed batches per split, averaged across ranks.

    Losses stay on the device until one read at the end: one wait per evaluation,
    not one per batch."""
    model.eval()
    means = []
    for batches in batches_by_split.values():
        total = torch.zeros((), device=runtime.device)
        for x, y in batches:
            with runtime.autocast():
                _, loss = model(
                    x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
                )
            total += loss.float()
        means.append(total / len(batches))
    model.train()
    values = torch.stack(means).to(torch.float64)
    if world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= world_size
    return dict(zip(batches_by_split, values.tolist(), strict=True))


def step_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of one rank's step: ranks draw different dropout masks, and a run
    resumed at any step draws what the uninterrupted run drew, with no RNG state saved."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63)


def _newest_state(run: Storage, run_path: str) -> tuple[dict[str, Any] | None, str | None]:
    """The newest loadable checkpoint of this run (state on the CPU, and its folder), or None.

    Ray hands back the latest checkpoint its controller registered, but a rank
    that dies right after a report can beat the controller's next poll, leaving
    a newer checkpoint on storage that Ray never registered. Checkpoint folders
    are named by step, so the newest on storage wins; one damaged by a crash
    mid-upload is skipped in favour of the one before it.
    """
    candidates = checkpoint.checkpoints_in_run(run_path, run)
    registered = ray.train.get_checkpoint()
    if registered is not None and registered.path not in candidates:
        candidates.append(registered.path)
    for path in candidates:
        try:
            return checkpoint.load(path, run), path
        except UserError as err:
            print(f"[raygpt] skipping checkpoint {path}: {err}", flush=True)
    return None, None


def _world(outputs: dict[str, Any]) -> tuple[int, int, str]:
    """(rank, world size, run name). Ray refuses `ray.train.get_context()` inside a Tune
    function, which is where a one-worker sweep trial runs this loop (local mode): one
    rank, named by the driver."""
    if outputs.get("tune_session"):
        return 0, 1, outputs["run_name"]
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size(), context.get_experiment_name()


def _tune_checkpoint_state() -> tuple[dict[str, Any] | None, str | None]:
    """The checkpoint Tune hands this trial: its own latest (a restored sweep, a retry
    after a failure, a HyperBand pause) or, under PBT, the one cloned from a better trial."""
    import ray.tune

    found = ray.tune.get_checkpoint()
    if found is None:
        return None, None
    with found.as_directory() as folder:
        return checkpoint.load(folder), found.path


def _report_to_tune(report: dict[str, Any], state: dict[str, Any] | None) -> None:
    """`ray.tune.report`, with the state as a Tune checkpoint when there is one. Tune
    persists it to the sweep's storage before returning, so the folder can go."""
    import ray.tune

    if state is None:
        ray.tune.report(report)
        return
    with tempfile.TemporaryDirectory(prefix="raygpt-ckpt-") as tmp:
        checkpoint.save(tmp, state)
        ray.tune.report(report, checkpoint=ray.tune.Checkpoint.from_directory(tmp))


def _maybe_inject_fault(rank: int, step: int, resumed: bool, optimizer: str) -> None:
    spec = os.environ.get(FAIL_AT_ENV)
    if not spec or resumed:
        return
    parts = spec.split(":")
    fail_rank, fail_step = parts[0], parts[1]
    mode = parts[2] if len(parts) > 2 else "exit"
    only_optimizer = parts[3] if len(parts) > 3 else ""
    if rank != int(fail_rank) or step != int(fail_step):
        return
    if only_optimizer and only_optimizer != optimizer:
        return
    print(f"[raygpt] fault injection: rank {rank} fails ({mode}) at step {step}", flush=True)
    if mode == "raise":
        raise RuntimeError(f"injected fault at step {step} on rank {rank}")
    os._exit(1)


def _quiet_ray_train_logs() -> None:
    """Ray Train logs each report, metrics included, at INFO: keep the console readable.

    Some Ray Train V2 modules name their logger by file path (`getLogger(__file__)`),
    outside the "ray.train" hierarchy, so those are found by path.
    """
    marker = os.sep + os.path.join("ray", "train") + os.sep
    for name in ["ray.train", *logging.Logger.manager.loggerDict]:
        if name.startswith("ray.train") or marker in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train one GPT on this rank; called by Ray Train on every worker.

    A sweep trial's rank 0 keeps its lines in the trial's own log file (trial_log.py),
    saved at every report, so the sweep's console shows one live view."""
    outputs = config["outputs"]
    log_path = outputs.get("log_path") if _world(outputs)[0] == 0 else None
    with maybe_capture(outputs["storage"], log_path, outputs.get("echo", True)) as log:
        _train(config, after_report=log.save if log is not None else None)


def _train(config: dict[str, Any], after_report: Callable[[], None] | None = None) -> None:
    cfg = TrainConfig.from_dict(config["train"])
    _quiet_ray_train_logs()
    run_info = config.get("run_info", {})  # trial id etc., stamped on every step row
    outputs = config["outputs"]
    rank, world_size, run_name = _world(outputs)
    # In-process runs (Ray Train's local mode) have no Ray storage context: the
    # driver names the run folder, and checkpoints go there through our storage.
    in_process = outputs.get("in_process", False)
    # A one-worker sweep trial runs in its Tune trial's own process (local mode): it
    # reports to Tune directly, checkpoints included, so Tune's own restore, failure
    # retries and PBT's checkpoint cloning all work on them.
    tune_session = outputs.get("tune_session", False)
    timeline = {"workers_up_at": time.time()}
    if in_process:  # the driver chose, honouring use_gpu (local mode would take any GPU)
        device = torch.device(outputs["device"])
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = ray.train.torch.get_device()
    is_main = rank == 0
    # The run folder, on whatever storage the driver resolved (local, NFS, s3://).
    run: Storage = outputs["storage"]
    run_path = outputs.get("run_path") or ray.train.get_context().get_storage().experiment_fs_path
    tensorboard_path = outputs.get("tensorboard_path") or f"{run_path}/{results.TENSORBOARD_DIR}"

    if device.type == "cpu":
        # Ray sets OMP_NUM_THREADS from the worker's CPUs; say it explicitly (fractions -> 1).
        threads = cfg.cpus_per_worker or cpu_threads_available()
        torch.set_num_threads(max(1, int(threads)))
    torch.manual_seed(cfg.seed)  # same init on every rank; DDP also broadcasts rank 0's
    runtime = Runtime.create(device, cfg.dtype, cfg.compile)

    dataset_dir, meta = data.prepare_from_config(cfg)
    train_batches = data.BatchSampler(dataset_dir, "train", cfg.block_size, cfg.seed)
    val_batches = data.BatchSampler(dataset_dir, "val", cfg.block_size, cfg.seed)
    grad_accum = cfg.grad_accum_steps(world_size)
    micro = cfg.micro_batch_size(world_size)  # batch_size, or less where it must divide
    eval_sets = {"val": val_batches.eval_batches(cfg.eval_iters, micro, rank, world_size)}
    if cfg.eval_train or cfg.eval_only:  # eval-only reports both splits
        eval_sets["train"] = train_batches.eval_batches(cfg.eval_iters, micro, rank, world_size)

    model = build_model(cfg, meta["vocab_size"]).to(device)
    optimizer = build_optimizer(model, cfg, device.type)
    scaler = runtime.grad_scaler()

    start_step, first_loss, best_val = 0, None, math.inf
    last_val: float | None = None
    rung_val: float | None = None
    cooldown_seconds = 0.0
    if tune_session:
        state, state_path = _tune_checkpoint_state()
    else:
        state, state_path = _newest_state(run, run_path)
    resumed = state is not None
    if state is not None:
        checkpoint.check_compatible(state, cfg.to_dict(), meta["vocab_size"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])  # moves its state to the params' device
        scaler.load_state_dict(state["scaler"])
        start_step = state["step"]
        first_loss, best_val = state["first_loss"], state["best_val_loss"]
        last_val = state.get("last_val_loss")
        del state  # the CPU copy is not needed once loaded
        if is_main:
            # Parts past the checkpoint belong to the interrupted attempt; they are rewritten.
            results.drop_parts_after(run, run_path, start_step)
            results.drop_tensorboard_after(run, tensorboard_path, start_step)
            print(
                f"[raygpt] resumed from step {start_step} ({run.display(state_path)})", flush=True
            )

    workers = _describe_workers(device, world_size)
    if is_main and start_step == 0:
        _record_workers(run, run_path, workers)
    # What rank 0 shows besides losses: the model's size by module, and text samples;
    # HellaSwag runs on every rank, each scoring its share of the examples.
    samples = generation.TrainingSamples.from_config(cfg, meta) if is_main else None
    hellaswag_probe = HellaSwagProbe.from_config(cfg, meta, rank, world_size)
    last_hellaswag: float | None = None
    if is_main:
        print(model_summary.format_table(model), flush=True)
        if hellaswag_probe is not None:
            print(hellaswag_probe.describe(cfg.hellaswag_every), flush=True)
    flops_per_token = model.flops_per_token()
    peak = metrics.peak_flops(workers[0]["device_name"], cfg.peak_tflops)
    tokens_per_step = cfg.resolved_tokens_per_step
    ckpt_interval = cfg.resolved_checkpoint_interval

    # DDP first, then compile (PyTorch's compiled-DDP recipe): the compiler's DDP
    # optimizer splits the graph at gradient-bucket boundaries, so each bucket's
    # all-reduce overlaps the rest of the backward pass; compiling inside DDP would
    # leave one opaque backward whose gradients are all reduced at its end.
    # gradient_as_bucket_view: gradients live in the buckets, with no copy in between.
    train_model: torch.nn.Module = model
    ddp: DistributedDataParallel | None = None
    if world_size > 1:
        ddp = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
        train_model = ddp
    train_model = runtime.maybe_compile(train_model)
    # Evaluation runs the raw model (no DDP: nothing to reduce), compiled too when training
    # is: its own graph, since eval mode and no_grad change what the compiler traces.
    eval_model = runtime.maybe_compile(model)
    parameters = list(model.parameters())

    def micro_batches(s: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            train_batches.get_batch(s, rank, m, micro, world_size, grad_accum)
            for m in range(grad_accum)
        ]

    prefetcher = BatchPrefetcher(micro_batches, device, cfg.max_steps)

    def update(batches: list[tuple[torch.Tensor, torch.Tensor]]):
        """One optimizer update on these micro-batches: (loss, grad norm) on the device."""
        return train_step(
            train_model,
            parameters,
            optimizer,
            scaler,
            batches,
            runtime.autocast,
            cfg.grad_clip,
            no_sync=ddp.no_sync if ddp is not None else None,
        )

    def cooldown_step(s: int, lr: float) -> None:
        """One step of a rung cooldown's copy (rung_cooldown.py), on step s's batches."""
        torch.manual_seed(step_seed(cfg.seed, rank, s))
        update(to_device(micro_batches(s), device))

    stats = StepStats(device, world_size)

    # Rank 0 writes the rows since the last report as one Parquet part (and one
    # TensorBoard file) before each report: a lost report or a killed driver loses no row.
    pending_rows: list[dict[str, Any]] = []
    row_identity = {
        "run": run_name,
        "trial_id": "",
        "optimizer": cfg.optimizer,
        "learning_rate": cfg.learning_rate,
        **run_info,
    }
    # The driver's metadata (config, versions, cluster) rides in every part's footer,
    # with the hardware the ranks actually ran on.
    part_metadata = {**(outputs.get("metadata") or {"config": cfg.to_dict()}), "workers": workers}
    if cfg.eval_only:  # max_steps of training skipped: the initial model's evaluation only
        row, report = _step_zero(evaluate(eval_model, eval_sets, runtime, world_size), row_identity)
        if is_main:
            results.write_step_part(run, run_path, [row], part_metadata)
            results.write_tensorboard_part(run, tensorboard_path, [row])
            print(
                f"[raygpt] eval only, step 0: train loss {row['eval_train_loss']:.4f}, "
                f"val loss {row['val_loss']:.4f} ({cfg.eval_iters} batches each)",
                flush=True,
            )
        if tune_session:
            _report_to_tune(report, None)
        elif in_process:
            ray.train.report(report)
        else:
            _report(report, None, 0, cfg.checkpoint_upload)
        prefetcher.close()
        return
    started = time.perf_counter()
    step = start_step
    train_loss = math.nan
    set_optimizer_mode(optimizer, training=True)  # schedule-free: weights at the train point
    tracker: trackers.RunTrackers | None = None
    try:
        if is_main:  # this attempt's W&B / MLflow runs, when asked for
            tracker = trackers.RunTrackers.open(cfg, run_name, run_info)
        while step < cfg.max_steps:
            torch.manual_seed(step_seed(cfg.seed, rank, step))
            lr = lr_at(step, cfg)
            set_lr(optimizer, lr)
            batches = prefetcher.get(step)
            stats.start_step()
            timeline.setdefault("first_step_at", time.time())
            loss, grad_norm = update(batches)
            step += 1
            stats.end_step(step, loss, grad_norm)

            is_last = step == cfg.max_steps
            evaluated = step % cfg.eval_interval == 0 or is_last
            save_now = step % ckpt_interval == 0 or is_last
            # Decided from the config alone: every rank must take part in the read below.
            sample_now = _due(step, cfg.sample_every, is_last)
            probe_now = _due(step, cfg.hellaswag_every, is_last)
            if not (
                evaluated or save_now or sample_now or probe_now or step % cfg.log_interval == 0
            ):
                _maybe_inject_fault(rank, step, resumed, cfg.optimizer)
                continue  # nothing to show or report: the device runs ahead

            # One wait for the device (and one all-reduce) for every step since the last read.
            diverged = False
            for reading in stats.read():
                train_loss = reading.train_loss
                first_loss = train_loss if first_loss is None else first_loss
                tokens_per_sec = tokens_per_step / max(reading.seconds, 1e-9)
                row: dict[str, Any] = {
                    "step": reading.step,
                    "tokens_seen": reading.step * tokens_per_step,
                    "train_loss": train_loss,
                    "val_loss": None,
                    "eval_train_loss": None,
                    "lr": lr_at(reading.step - 1, cfg),  # the rate of that update
                    "grad_norm": reading.grad_norm,
                    "step_time_ms": reading.seconds * 1000,
                    "tokens_per_sec": tokens_per_sec,
                    "mfu": metrics.mfu(flops_per_token, tokens_per_sec, world_size, peak),
                    **row_identity,
                }
                if is_main:
                    pending_rows.append(row)
                if status.is_diverged(train_loss, first_loss, cfg.divergence_factor):
                    diverged = True  # the steps up to here still get their rows
            # A divergence is seen at the read after it happened; the run ends there.
            is_last = is_last or diverged
            evaluated = evaluated or diverged
            save_now = save_now or diverged
            row = pending_rows[-1] if is_main else {}
            if evaluated or save_now:
                # Schedule-free: evaluate and checkpoint the averaged weights, not the
                # point the gradients are taken at (a no-op for other optimizers).
                set_optimizer_mode(optimizer, training=False)
            if evaluated:
                losses = evaluate(eval_model, eval_sets, runtime, world_size)
                if is_main:
                    row["val_loss"], row["eval_train_loss"] = losses["val"], losses.get("train")
                last_val = losses["val"] if math.isfinite(losses["val"]) else math.inf
                best_val = min(best_val, last_val)
                diverged = diverged or not math.isfinite(losses["val"])
                rung_val = last_val
                if not diverged and rung_cooldown.applies(cfg, step):
                    cooldown_started = time.perf_counter()
                    rung_val = rung_cooldown.cooled_val_loss(
                        cfg,
                        step,
                        model,
                        optimizer,
                        scaler,
                        run_steps=cooldown_step,
                        evaluate_val=lambda: evaluate(
                            eval_model, {"val": eval_sets["val"]}, runtime, world_size
                        )["val"],
                    )
                    cooldown_seconds += time.perf_counter() - cooldown_started
                    if is_main:
                        row["cooled_val_loss"] = rung_val
            if sample_now or probe_now:
                set_optimizer_mode(optimizer, training=False)  # schedule-free: averaged weights
                if probe_now and hellaswag_probe is not None:
                    last_hellaswag = hellaswag_probe.score(model, runtime)
                    if is_main:
                        row["hellaswag_acc_norm"] = last_hellaswag
                if sample_now and samples is not None:
                    row["sample"] = samples.sample(model, runtime, step)  # TensorBoard text
                    print(f"[raygpt] sample at step {step}:\n{row['sample']}", flush=True)
                if not (evaluated or save_now):  # else the report below switches back
                    set_optimizer_mode(optimizer, training=True)
            if is_main and (step % cfg.log_interval == 0 or evaluated or probe_now):
                done = step - start_step
                eta = (time.perf_counter() - started) / done * (cfg.max_steps - step)
                print(metrics.progress_line(row, cfg.max_steps, eta), flush=True)

            if evaluated or save_now:
                report = {
                    "step": step,
                    "tokens_seen": step * tokens_per_step,
                    "train_loss": train_loss,
                    # Tune needs the metric in every result: a checkpoint-only report
                    # repeats the last val loss (inf before the first eval; ASHA's rungs
                    # are evals).
                    "val_loss": last_val if last_val is not None else math.inf,
                    # What ASHA ranks when the sweep asks for rung cooldowns: the cooled
                    # copy's val at a rung, the plain val elsewhere.
                    "rung_val_loss": rung_val if rung_val is not None else math.inf,
                    "cooldown_seconds": cooldown_seconds,  # this attempt's, so far
                    "best_val_loss": best_val,
                    "evaluated": evaluated,
                    "lr": lr,
                    "diverged": diverged,
                    "done": is_last,
                    **(
                        {"hellaswag_acc_norm": last_hellaswag} if last_hellaswag is not None else {}
                    ),
                    # When this attempt's worker came up, began and (so far) ended its steps:
                    # the sweep's per-trial timeline.
                    **timeline,
                    "last_step_at": time.time(),
                }
                state_now = None
                if save_now and is_main:
                    state_now = {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(),
                        "step": step,
                        "first_loss": first_loss,
                        "best_val_loss": best_val,
                        "last_val_loss": last_val,
                        "config": cfg.to_dict(),
                        # The shape itself: init_from runs' differs from the config's keys.
                        "model_config": dataclasses.asdict(model.config),
                        "data": {k: meta.get(k) for k in CHECKPOINT_DATA_KEYS},
                    }
                if is_main:
                    results.write_step_part(run, run_path, pending_rows, part_metadata)
                    results.write_tensorboard_part(run, tensorboard_path, pending_rows)
                    if tracker is not None:
                        tracker.log_rows(pending_rows)
                if tune_session:
                    _report_to_tune(report, state_now)
                elif in_process:
                    _save_in_process(run, run_path, state_now, step, cfg.keep_checkpoints)
                    ray.train.report(report)
                else:
                    _report(report, state_now, step, cfg.checkpoint_upload)
                pending_rows = []
                if after_report is not None:
                    after_report()
                # Only now: the checkpoint's state dict shares memory with the live weights.
                set_optimizer_mode(optimizer, training=True)
                if diverged:
                    if is_main:
                        print(
                            f"[raygpt] diverged at step {step} (loss {train_loss:.4g}); stopping",
                            flush=True,
                        )
                    break
            _maybe_inject_fault(rank, step, resumed, cfg.optimizer)
    finally:
        prefetcher.close()
        if tracker is not None:
            tracker.close(failed=sys.exc_info()[0] is not None)


def _due(step: int, every: int, is_last: bool) -> bool:
    """Whether a periodic extra (a sample, a HellaSwag score) runs at `step`: every `every`
    steps and at the last one, so the final model always gets one; never when `every` is 0."""
    return every > 0 and (step % every == 0 or is_last)


def _step_zero(
    losses: dict[str, float], row_identity: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The step row and the report of an --eval-only run: the initial model's losses."""
    row = {
        "step": 0,
        "tokens_seen": 0,
        "train_loss": None,  # no training step was taken
        "val_loss": losses["val"],
        "eval_train_loss": losses["train"],
        **row_identity,
    }
    report = {
        "step": 0,
        "tokens_seen": 0,
        "train_loss": losses["train"],
        "val_loss": losses["val"],
        "best_val_loss": losses["val"],
        "evaluated": True,
        "lr": 0.0,
        "diverged": not math.isfinite(losses["val"]),
        "done": True,
    }
    return row, report


def _describe_workers(device: torch.device, world_size: int) -> list[dict[str, Any]]:
    """Every rank's host and device, gathered on all ranks: what the run really ran on."""
    import socket

    mine: dict[str, Any] = {"host": socket.gethostname(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        mine |= {
            "device_name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        }
    else:
        mine |= {"device_name": None, "cpu_threads": torch.get_num_threads()}
    if world_size == 1:
        return [mine | {"rank": 0}]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return [w | {"rank": r} for r, w in enumerate(gathered)]


def _record_workers(run: Storage, run_path: str, workers: list[dict[str, Any]]) -> None:
    """Add the ranks' hardware to run.json (the driver wrote what it could see from its
    own machine, which on a cluster is not where training runs)."""
    path = f"{run_path}/{results.RUN_FILE}"
    if not run.exists(path):
        return  # a sweep trial: its hardware rides in the step parts' metadata
    info = json.loads(run.read_bytes(path))
    info["workers"] = workers
    results.write_json(run, path, info)


def _save_in_process(
    run: Storage, run_path: str, state: dict[str, Any] | None, step: int, keep: int | None
) -> None:
    """Checkpoint an in-process run to its folder, as Ray Train would for a worker group.

    Same folder names and files, so resume, `raygpt.sample` and the worker-group path
    read them alike. The older folders beyond `keep` go, oldest first, after the new
    one is complete.
    """
    if state is None:
        return
    with tempfile.TemporaryDirectory(prefix="raygpt-ckpt-") as tmp:
        checkpoint.save(tmp, state)
        run.upload_dir(tmp, f"{run_path}/{checkpoint.checkpoint_dir_name(step)}")
    if keep:
        for old in checkpoint.checkpoints_in_run(run_path, run)[keep:]:
            run.delete_dir(old)


def _report(metrics_: dict[str, Any], state: dict[str, Any] | None, step: int, upload: str) -> None:
    """`ray.train.report`, with a checkpoint of `state` when rank 0 passes one.

    Async upload: Ray copies the folder to storage in a thread and deletes it
    afterwards, so the ranks go on training instead of waiting on storage.
    """
    if state is None:
        ray.train.report(metrics_)
        return
    from ray.train import CheckpointUploadMode

    tmp = tempfile.mkdtemp(prefix="raygpt-ckpt-")
    asynchronous = upload == "async"
    try:
        checkpoint.save(tmp, state)
        ray.train.report(
            metrics_,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint.checkpoint_dir_name(step),
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC
            if asynchronous
            else CheckpointUploadMode.SYNC,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not asynchronous:
        shutil.rmtree(tmp, ignore_errors=True)
