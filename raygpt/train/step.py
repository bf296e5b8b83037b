"""One optimizer update: the training step shared by the loop and the benchmark.

It returns the loss and the gradient norm as tensors on the device and never
reads them back: a `.item()` per step would make the host wait for the device
every step, so the loop reads a batch of steps at once (see step_stats.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from raygpt.runtime import Runtime


def train_step(
    model: torch.nn.Module,
    parameters: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    autocast: Callable[[], contextlib.AbstractContextManager],
    grad_clip: float,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over `micro_batches` (gradient accumulation), clip, update.

    `model` is what runs the forward (possibly DDP-wrapped and compiled);
    `parameters` are the raw model's, for clipping. `no_sync` (DDP's) skips the
    gradient all-reduce on all but the last micro-batch, whose backward reduces
    the accumulated sum once. Returns (mean loss, pre-clip gradient norm).
    """
    n = len(micro_batches)
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    for i, (x, y) in enumerate(micro_batches):
        last = i == n - 1
        with contextlib.nullcontext() if last or no_sync is None else no_sync(), autocast():
            # Only the loss is kept: a name bound to the logits (B x T x vocab, 1.2 GB
            # for GPT-2 small at batch 12) would hold them through the backward and the
            # next micro-batch's forward, on top of that forward's own.
            loss = model(x, y)[1] / n
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip if grad_clip > 0 else math.inf)
    scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def wrap_for_training(
    model: torch.nn.Module, world_size: int, device: torch.device, runtime: Runtime
) -> tuple[torch.nn.Module, DistributedDataParallel | None, torch.nn.Module]:
    """(the module training steps run, its DDP wrapper if any, the module evaluations run)."""
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
    return train_model, ddp, eval_model
