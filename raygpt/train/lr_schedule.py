"""The learning-rate schedule: the peak rate for each optimizer update, by name.

`lr_at(step, cfg)` is the rate for the update with 0-based index `step`; the loop
hands it to `optim.set_lr`, which scales it per parameter group. Every schedule
shares nanoGPT's linear warmup, `peak * (step + 1) / (warmup_steps + 1)`, and
ends at `min_lr` at `lr_decay_steps` (default max_steps); they differ in between.

- `cosine` (default): nanoGPT's cosine decay from the peak to min_lr.
- `wsd` (warmup-stable-decay): the peak rate until the last `decay_fraction` of
  lr_decay_steps, then a 1-sqrt decay to min_lr. 1-sqrt rather than linear because
  Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed
  Training Durations") found it the better cooldown at equal length, matching
  cosine with a ~20% cooldown; it keeps the rate high longer, then drops fast.
  The rate is flat until the cooldown, so two runs stopped early (an ASHA rung)
  compare at their peak rates rather than at differently decayed ones.

`decay_lr = false` keeps the peak after warmup under either schedule.

Schedule-free optimizers (config.SCHEDULE_FREE_OPTIMIZERS) get warmup, then the
peak, whatever `lr_schedule` says: they average their iterates instead of decaying,
and a decay on top defeats that (Defazio et al. 2024). They use this warmup, not the
package's own `warmup_steps`, so one field, `warmup_steps`, means one thing for
every optimizer (the package also tracks the largest lr it has seen to weight its
average, which works the same whichever side warms up).
"""

from __future__ import annotations

import math

from raygpt.config.choices import SCHEDULE_FREE_OPTIMIZERS
from raygpt.config.train import TrainConfig


def _cosine(step: int, cfg: TrainConfig, peak: float, floor: float) -> float:
    decay_steps = cfg.resolved_lr_decay_steps
    ratio = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)


def wsd_decay_start(cfg: TrainConfig) -> int:
    """The first update of wsd's cooldown (never inside the warmup)."""
    decay_steps = cfg.resolved_lr_decay_steps
    return max(cfg.warmup_steps, decay_steps - round(cfg.decay_fraction * decay_steps))


def _wsd(step: int, cfg: TrainConfig, peak: float, floor: float) -> float:
    start = wsd_decay_start(cfg)
    if step < start:
        return peak
    progress = (step - start) / max(1, cfg.resolved_lr_decay_steps - start)
    return floor + (1.0 - math.sqrt(progress)) * (peak - floor)


_SCHEDULES = {"cosine": _cosine, "wsd": _wsd}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update with 0-based index `step` (see the module docstring)."""
    peak, floor = cfg.learning_rate, cfg.resolved_min_lr
    if step < cfg.warmup_steps:
        return peak * (step + 1) / (cfg.warmup_steps + 1)
    if not cfg.decay_lr or cfg.optimizer in SCHEDULE_FREE_OPTIMIZERS:
        return peak
    if step >= cfg.resolved_lr_decay_steps:
        return floor
    return _SCHEDULES[cfg.lr_schedule](step, cfg, peak, floor)
