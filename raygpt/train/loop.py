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

import functools
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import ray.train
import ray.train.torch
import torch

from raygpt import checkpoint, results, status
from raygpt.config.train import TrainConfig
from raygpt.data import prepare, sampler
from raygpt.eval.during_training import HellaSwagProbe
from raygpt.model import generate, init_from, param_table
from raygpt.runtime import (
    Runtime,
    cpu_threads_available,
    dtype_name,
    resolve_device,
)
from raygpt.storage import Storage
from raygpt.train import faults, metrics, reporting, restore, rung_cooldown, tensorboard, trackers
from raygpt.train.evaluation import evaluate
from raygpt.train.log_capture import maybe_capture, quiet_ray_train_logs
from raygpt.train.lr_schedule import lr_at
from raygpt.train.optim import build_optimizer, set_lr, set_optimizer_mode
from raygpt.train.prefetch import BatchPrefetcher, to_device
from raygpt.train.step import train_step, wrap_for_training
from raygpt.train.step_stats import StepStats
from raygpt.train.wiring import RunWiring


def step_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of one rank's step: ranks draw different dropout masks, and a run
    resumed at any step draws what the uninterrupted run drew, with no RNG state saved."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train one GPT on this rank; called by Ray Train on every worker.

    A sweep trial's rank 0 keeps its lines in the trial's own log file (log_capture.py),
    saved at every report, so the sweep's console shows one live view."""
    wiring: RunWiring = config["wiring"]
    log_path = wiring.log_path if reporting.world(wiring)[0] == 0 else None
    with maybe_capture(wiring.storage, log_path, wiring.echo) as log:
        _train(config, before_report=log.save if log is not None else None)


def _train(config: dict[str, Any], before_report: Callable[[], None] | None = None) -> None:
    cfg = TrainConfig.from_dict(config["train"])
    quiet_ray_train_logs()
    run_info = config.get("run_info", {})  # trial id etc., stamped on every step row
    wiring: RunWiring = config["wiring"]
    rank, world_size, run_name = reporting.world(wiring)
    # In-process runs (Ray Train's local mode) have no Ray storage context: the
    # driver names the run folder, and checkpoints go there through our storage.
    in_process = wiring.in_process
    # A one-worker sweep trial runs in its Tune trial's own process (local mode): it
    # reports to Tune directly, checkpoints included, so Tune's own restore, failure
    # retries and PBT's checkpoint cloning all work on them.
    tune_session = wiring.tune_session
    timeline = {"workers_up_at": time.time()}
    if in_process:  # the driver chose, honouring use_gpu (local mode would take any GPU)
        device = resolve_device(wiring.device)  # cuda: the current one, indexed
    else:
        device = ray.train.torch.get_device()
    is_main = rank == 0
    # The run folder, on whatever storage the driver resolved (local, NFS, s3://).
    run: Storage = wiring.storage
    run_path = wiring.run_path or ray.train.get_context().get_storage().experiment_fs_path
    tensorboard_path = wiring.tensorboard_path or f"{run_path}/{results.TENSORBOARD_DIR}"
    send = functools.partial(
        reporting.report,
        tune_session=tune_session,
        in_process=in_process,
        run=run,
        run_path=run_path,
        keep=cfg.keep_checkpoints,
        upload=cfg.checkpoint_upload,
    )

    if device.type == "cpu":
        # Ray sets OMP_NUM_THREADS from the worker's CPUs; say it explicitly (fractions -> 1).
        threads = cfg.cpus_per_worker or cpu_threads_available()
        torch.set_num_threads(max(1, int(threads)))
    torch.manual_seed(cfg.seed)  # same init on every rank; DDP also broadcasts rank 0's
    runtime = Runtime.create(device, cfg.dtype, cfg.compile)

    dataset_dir, meta = prepare.prepare_from_config(cfg)
    train_batches = sampler.BatchSampler(dataset_dir, "train", cfg.block_size, cfg.seed)
    val_batches = sampler.BatchSampler(dataset_dir, "val", cfg.block_size, cfg.seed)
    grad_accum = cfg.grad_accum_steps(world_size)
    micro = cfg.micro_batch_size(world_size)  # batch_size, or less where it must divide
    eval_sets = {"val": val_batches.eval_batches(cfg.eval_iters, micro, rank, world_size)}
    if cfg.eval_train or cfg.eval_only:  # eval-only reports both splits
        eval_sets["train"] = train_batches.eval_batches(cfg.eval_iters, micro, rank, world_size)

    model = init_from.build_model(cfg, meta["vocab_size"]).to(device)
    optimizer = build_optimizer(model, cfg, device.type)
    scaler = runtime.grad_scaler()

    start_step, first_loss, best_val = 0, None, math.inf
    last_val: float | None = None
    rung_val: float | None = None
    cooldown_seconds = 0.0
    if tune_session:
        state, state_path = restore.tune_checkpoint_state()
    else:
        state, state_path = restore.newest_state(run, run_path)
    resumed = state is not None
    if state is not None:
        progress = restore.resume_from(
            state,
            run.display(state_path),
            model,
            optimizer,
            scaler,
            cfg,
            meta,
            dtype_name(runtime.dtype),
        )
        start_step, first_loss, best_val, last_val = progress
        del state  # the CPU copy is not needed once loaded
        if is_main:
            # Parts past the checkpoint belong to the interrupted attempt; they are rewritten.
            results.drop_parts_after(run, run_path, start_step)
            tensorboard.drop_after(run, tensorboard_path, start_step)
            print(
                f"[raygpt] resumed from step {start_step} ({run.display(state_path)})", flush=True
            )

    workers = reporting.describe_workers(device, world_size)
    if is_main and start_step == 0:
        reporting.record_workers(run, run_path, workers)
    if is_main and wiring.hparams:  # a sweep trial: TensorBoard's HParams tab
        tensorboard.write_hparams(run, tensorboard_path, wiring.hparams)
    # What rank 0 shows besides losses: the model's size by module, and text samples;
    # HellaSwag runs on every rank, each scoring its share of the examples.
    samples = generate.TrainingSamples.from_config(cfg, meta) if is_main else None
    hellaswag_probe = HellaSwagProbe.from_config(cfg, meta, rank, world_size)
    last_hellaswag: float | None = None
    if is_main:
        print(param_table.format_table(model), flush=True)
        print(f"[raygpt] {world_size} rank(s) on {runtime.describe()}", flush=True)
        if hellaswag_probe is not None:
            print(hellaswag_probe.describe(cfg.hellaswag_every), flush=True)
    flops_per_token = model.flops_per_token()
    peak = metrics.peak_flops(workers[0]["device_name"], cfg.peak_tflops)
    tokens_per_step = cfg.resolved_tokens_per_step
    ckpt_interval = cfg.resolved_checkpoint_interval

    train_model, ddp, eval_model = wrap_for_training(model, world_size, device, runtime)
    parameters = list(model.parameters())

    def micro_batches(s: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # All of the step's micro-batches in one read: one batch of requests on object storage.
        return train_batches.get_step(s, rank, micro, world_size, grad_accum)

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
    part_metadata = {**(wiring.metadata or {"config": cfg.to_dict()}), "workers": workers}
    if cfg.eval_only:  # max_steps of training skipped: the initial model's evaluation only
        row, report = reporting.step_zero(
            evaluate(eval_model, eval_sets, runtime, world_size), row_identity
        )
        if is_main:
            results.write_step_part(run, run_path, [row], part_metadata)
            tensorboard.write_part(run, tensorboard_path, [row])
            print(
                f"[raygpt] eval only, step 0: train loss {row['eval_train_loss']:.4f}, "
                f"val loss {row['val_loss']:.4f} ({cfg.eval_iters} batches each)",
                flush=True,
            )
        send(report, None, 0)
        prefetcher.close()
        train_batches.close()
        val_batches.close()
        return
    started = time.perf_counter()
    step = start_step
    train_loss = math.nan
    set_optimizer_mode(optimizer, training=True)  # schedule-free: weights at the train point
    tracker: trackers.RunTrackers | None = None
    try:
        if is_main:  # this attempt's W&B / MLflow runs, when asked for
            tracker = trackers.RunTrackers.open(cfg, run_name, run_info)
        stats.start_attempt()  # its first step holds the compile: flagged, kept out of tok/s
        while step < cfg.max_steps:
            torch.manual_seed(step_seed(cfg.seed, rank, step))
            lr = lr_at(step, cfg)
            set_lr(optimizer, lr)
            batches = prefetcher.get(step)
            timeline.setdefault("first_step_at", time.time())
            loss, grad_norm = update(batches)
            step += 1
            stats.end_step(step, loss, grad_norm)  # timed from the previous step's end

            is_last = step == cfg.max_steps
            evaluated = step % cfg.eval_interval == 0 or is_last
            save_now = step % ckpt_interval == 0 or is_last
            # Decided from the config alone: every rank must take part in the read below.
            sample_now = _due(step, cfg.sample_every, is_last)
            probe_now = _due(step, cfg.hellaswag_every, is_last)
            if not (
                evaluated or save_now or sample_now or probe_now or step % cfg.log_interval == 0
            ):
                faults.maybe_inject_fault(rank, step, resumed, cfg.optimizer)
                continue  # nothing to show or report: the device runs ahead

            # One wait for the device (and one all-reduce) for every step since the last read.
            diverged = False
            for reading in stats.read():
                train_loss = reading.train_loss
                first_loss = train_loss if first_loss is None else first_loss
                row = reporting.step_row(
                    reading, cfg, row_identity, tokens_per_step, flops_per_token, world_size, peak
                )
                if is_main:
                    pending_rows.append(row)
                if status.is_diverged(train_loss, first_loss, cfg.divergence_factor):
                    diverged = True  # the steps up to here still get their rows
            # A divergence is seen at the read after it happened; the run ends there, with
            # an evaluation but no checkpoint (see below).
            is_last = is_last or diverged
            evaluated = evaluated or diverged
            save_now = save_now and not diverged
            row = pending_rows[-1] if is_main else {}
            if evaluated or save_now:
                # Schedule-free: evaluate and checkpoint the averaged weights, not the
                # point the gradients are taken at (a no-op for other optimizers).
                set_optimizer_mode(optimizer, training=False)
            if evaluated:
                losses = evaluate(eval_model, eval_sets, runtime, world_size)
                last_val = losses["val"] if math.isfinite(losses["val"]) else math.inf
                best_val = min(best_val, last_val)
                if is_main:
                    row["val_loss"], row["eval_train_loss"] = losses["val"], losses.get("train")
                    row["best_val_loss"] = best_val  # TensorBoard's, not a step column
                # The weights about to be saved, judged as the train loss is: a train loss
                # is read before its update, so the update after it shows here first.
                diverged = diverged or status.is_diverged(
                    losses["val"], first_loss, cfg.divergence_factor
                )
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

            if save_now and not diverged and (bad := checkpoint.first_non_finite(model)):
                # The update after the last loss read can still turn the weights to NaN or
                # inf. Every rank holds the same weights, so every rank decides the same.
                diverged = True
                if is_main:
                    print(f"[raygpt] step {step} left NaN or inf in {bad}", flush=True)
            if diverged:
                # A diverged state is never saved: the latest checkpoint, which sample,
                # export, --init-from and --resume pick, stays the last sound one.
                save_now, is_last = False, True
            if evaluated or save_now or diverged:
                report = reporting.report_metrics(
                    step=step,
                    tokens_seen=step * tokens_per_step,
                    train_loss=train_loss,
                    last_val=last_val,
                    rung_val=rung_val,
                    cooldown_seconds=cooldown_seconds,
                    best_val=best_val,
                    evaluated=evaluated,
                    lr=lr,
                    diverged=diverged,
                    done=is_last,
                    hellaswag=last_hellaswag,
                    timeline=timeline,
                    model_size=reporting.model_size(model, flops_per_token),
                )
                state_now = None
                if save_now and is_main:
                    state_now = checkpoint.training_state(
                        model,
                        optimizer,
                        scaler,
                        step=step,
                        first_loss=first_loss,
                        best_val_loss=best_val,
                        last_val_loss=last_val,
                        config=cfg.to_dict(),
                        data_meta=meta,
                        dtype=dtype_name(runtime.dtype),
                    )
                if is_main:
                    results.write_step_part(run, run_path, pending_rows, part_metadata)
                    tensorboard.write_part(run, tensorboard_path, pending_rows)
                    if tracker is not None:
                        tracker.log_rows(pending_rows)
                # The log first: a report the driver has seen implies a log that holds it.
                if before_report is not None:
                    before_report()
                send(report, state_now, step)
                pending_rows = []
                # Only now: the checkpoint's state dict shares memory with the live weights.
                set_optimizer_mode(optimizer, training=True)
                if diverged:
                    if is_main:
                        print(
                            f"[raygpt] diverged at step {step} (loss {train_loss:.4g}); stopping",
                            flush=True,
                        )
                    break
            # The reads, evaluations and reports above are no step's work: the next step's
            # time starts here.
            stats.start_step()
            faults.maybe_inject_fault(rank, step, resumed, cfg.optimizer)
    finally:
        prefetcher.close()
        train_batches.close()
        val_batches.close()
        if tracker is not None:
            tracker.close(failed=sys.exc_info()[0] is not None)


def _due(step: int, every: int, is_last: bool) -> bool:
    """Whether a periodic extra (a sample, a HellaSwag score) runs at `step`: every `every`
    steps and at the last one, so the final model always gets one; never when `every` is 0."""
    return every > 0 and (step % every == 0 or is_last)
