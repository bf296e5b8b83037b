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
            _, loss = model(x, y)
            loss = loss / n
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip if grad_clip > 0 else math.inf)
    scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm
