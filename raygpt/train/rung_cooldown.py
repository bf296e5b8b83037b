"""Rung-time evaluation of a cooled-down copy: fair early comparisons under lr decay.

ASHA compares trials at rungs long before max_steps. Under a cosine (or WSD)
schedule a trial at a rung still trains at a high learning rate, and the higher
its peak rate the noisier its weights there: a rate that would win at max_steps,
once decayed, looks worst at the first rung and is stopped (the bias the
issue measured: adamw at 9.8e-3 stopped at step 500 when 1e-2 wins the grid).

The remedy from the WSD literature (Hägele et al. 2024, "Scaling Laws and
Compute-Optimal Training beyond Fixed Training Durations"): branch a copy at the
rung, decay its learning rate to min_lr over a short cooldown (a fraction of the
steps so far, with WSD's 1-sqrt shape), evaluate the copy, and throw it away. The
trial itself continues from the uncooled state. Every trial that reaches a rung
pays the same extra steps, so the comparison stays at equal budget.

Schedule-free optimizers need no cooldown: their evaluation weights are already
an average, which is what a cooldown approximates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from raygpt.config.choices import SCHEDULE_FREE_OPTIMIZERS
from raygpt.config.train import TrainConfig
from raygpt.train.lr_schedule import lr_at
from raygpt.train.optim import set_lr


def applies(cfg: TrainConfig, step: int) -> bool:
    """Whether `step` is a rung that gets a cooled evaluation."""
    return (
        cfg.rung_cooldown > 0
        and step in cfg.cooldown_at
        and step < cfg.max_steps
        and cfg.optimizer not in SCHEDULE_FREE_OPTIMIZERS
    )


def cooldown_steps(cfg: TrainConfig, step: int) -> int:
    return max(1, round(cfg.rung_cooldown * step))


def cooldown_lr(start: float, floor: float, i: int, total: int) -> float:
    """The rate of cooldown step i (0-based) of `total`: 1-sqrt from `start` to `floor`."""
    return floor + (start - floor) * (1 - math.sqrt((i + 1) / total))


def _cpu_copy(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _cpu_copy(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_cpu_copy(v) for v in state]
    return state


def cooled_val_loss(
    cfg: TrainConfig,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    run_steps: Callable[[int, float], None],
    evaluate_val: Callable[[], float],
) -> float:
    """Train a cooled copy for cooldown_steps from `step`, return its val loss, and put
    model, optimizer and scaler back as they were. `run_steps(s, lr)` runs one training
    step on the batches of step s at rate lr; `evaluate_val()` evaluates the model."""
    saved = (
        _cpu_copy(model.state_dict()),
        _cpu_copy(optimizer.state_dict()),
        _cpu_copy(scaler.state_dict()),
    )
    start = lr_at(step - 1, cfg)
    total = cooldown_steps(cfg, step)
    try:
        for i in range(total):
            lr = cooldown_lr(start, cfg.resolved_min_lr, i, total)
            set_lr(optimizer, lr)
            run_steps(step + i, lr)
        return evaluate_val()
    finally:
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
        scaler.load_state_dict(saved[2])
