"""Optimizers by name, and the learning-rate schedule.

Every optimizer gets the same two parameter groups (nanoGPT's rule): weight
decay on matrices (embeddings and linear weights, dim >= 2), none on biases and
LayerNorm gains. Adding an optimizer is one entry in `_BUILDERS`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch

from raygpt.config import OPTIMIZERS, TrainConfig
from raygpt.errors import UserError


def _adamw(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    # The fused CUDA kernel is markedly faster; CPU keeps the default foreach path.
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused or None
    )


def _adam(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    # Adam's weight_decay is L2 added to the gradient (coupled), not AdamW's decoupled decay.
    fused = device_type == "cuda"
    return torch.optim.Adam(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused or None
    )


def _sgd(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=0.0)


def _momentum(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        groups, lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.nesterov
    )


def _adagrad(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(groups, lr=cfg.learning_rate)


_BUILDERS: dict[str, Callable[[list[dict], TrainConfig, str], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adam": _adam,
    "sgd": _sgd,
    "momentum": _momentum,
    "adagrad": _adagrad,
}
assert tuple(_BUILDERS) == OPTIMIZERS


def build_optimizer(
    param_groups: list[dict], cfg: TrainConfig, device_type: str
) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` over `param_groups` (each with its weight_decay)."""
    if cfg.optimizer == "momentum" and cfg.nesterov and cfg.momentum <= 0:
        # torch raises deep inside the constructor otherwise
        raise UserError(f"nesterov needs momentum > 0, got momentum={cfg.momentum}")
    return _BUILDERS[cfg.optimizer](param_groups, cfg, device_type)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update with 0-based index `step`.

    Linear warmup over `warmup_steps`, then cosine decay to `min_lr` at
    `lr_decay_steps`, then `min_lr` (nanoGPT's schedule). `decay_lr=false` keeps
    the peak rate after warmup.
    """
    peak, floor = cfg.learning_rate, cfg.resolved_min_lr
    if step < cfg.warmup_steps:
        return peak * (step + 1) / (cfg.warmup_steps + 1)
    if not cfg.decay_lr:
        return peak
    decay_steps = cfg.resolved_lr_decay_steps
    if step >= decay_steps:
        return floor
    ratio = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
