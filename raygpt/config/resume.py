"""What a resume may change: the keys whose new values a run resumed from its checkpoint
takes (checkpoint.check_compatible refuses a change to any other), and how an older
record reads."""

from __future__ import annotations

from typing import Any

from raygpt.config.choices import (
    LR_SCHEDULE_KEYS,
    OBSERVATION_KEYS,
    PARAMETRIZATION_KEYS,
    PLACEMENT_KEYS,
)
from raygpt.config.train import TrainConfig

# The keys a resume may give other values than the run's checkpoint has; checkpoint.py
# refuses any other difference, naming the key. A key is here when the saved state means
# the same under its new value and the change takes effect from the resume step on:
RESUME_MAY_CHANGE = (
    # where and how it runs, not what it trains: the global batch (tokens_per_step,
    # compared resolved) and the sampler's (seed, rank, step) order make any worker count
    # and micro-batch draw the same tokens
    *PLACEMENT_KEYS,
    "batch_size",
    "compile",
    "peak_tflops",
    # paths to the data, which the checkpoint's data facts (its text, tokenizer and
    # dataset name) compare by content
    "data_file",
    "dataset_dir",
    "data_dir",
    # the lr schedule: the loop sets every group's rate from it at each step, so a new
    # peak, floor, warmup or length (a longer run, PBT's perturbed rate) applies at once
    "learning_rate",
    *LR_SCHEDULE_KEYS,
    # optimizer hyperparameters: optim.load_state re-applies them to the restored groups;
    # the optimizer's state (moments, buffers) is the same kind under any of their values
    "weight_decay",
    "beta1",
    "beta2",
    "momentum",
    "nesterov",
    "muon_momentum",
    "muon_adamw_lr_scale",
    "grad_clip",
    # regularisation the model applies at each forward pass; no saved state depends on it
    "dropout",
    # what is measured, shown, saved and sent: none of it changes the weights' path
    *OBSERVATION_KEYS,
)
# How the run was asked for rather than what it trains: never compared, never recorded.
RESUME_NOT_COMPARED = ("name", "resume", "overwrite")


def with_parametrization_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config (a checkpoint's, a run's record) with the parametrization keys it
    lacks at their defaults: a record written before they existed was trained under sp."""
    defaults = TrainConfig.__dataclass_fields__
    return {**{key: defaults[key].default for key in PARAMETRIZATION_KEYS}, **config}
