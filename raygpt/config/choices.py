"""The values a TrainConfig key may take, and the checks shared with other configs (a
sweep's, a data prepare's) that say which."""

from __future__ import annotations

import difflib

from raygpt.errors import UserError

OPTIMIZERS = (
    "adamw",
    "adam",
    "sgd",
    "momentum",
    "adagrad",
    "muon",
    "lion",
    "adamw_schedulefree",
)
# Optimizers that average their iterates instead of decaying the lr: the lr schedule
# gives them warmup, then the peak rate (see lr_schedule.py).
SCHEDULE_FREE_OPTIMIZERS = ("adamw_schedulefree",)
LR_SCHEDULES = ("cosine", "wsd")
# How a model's init, forward multipliers and per-group optimizer hyperparameters scale
# with width and depth (model/parametrization.py holds every rule and its source).
PARAMETRIZATIONS = ("sp", "mup", "completep")
# The combinations model/parametrization.py has no rule for: refused here, at the edge,
# because no source settles them (its table shows them as refused rows).
PARAMETRIZATION_UNSETTLED: dict[tuple[str, str], str] = {
    ("completep", "sgd"): (
        "CompleteP's depth rules are derived for Adam-type updates; depth-muP for SGD "
        "(arXiv 2310.02244) scales branches by 1/sqrt(depth), not 1/depth"
    ),
    ("completep", "momentum"): (
        "CompleteP's depth rules are derived for Adam-type updates; depth-muP for SGD "
        "(arXiv 2310.02244) scales branches by 1/sqrt(depth), not 1/depth"
    ),
    ("completep", "muon"): (
        "no published rule scales Muon's orthogonalised update with depth under 1/depth "
        "residual branches"
    ),
}
# The keys that define a parametrization; a checkpoint or record without them (written
# before they existed) was trained under their defaults, that is under sp.
PARAMETRIZATION_KEYS = (
    "parametrization",
    "mup_base_width",
    "mup_base_depth",
    "mup_input_alpha",
    "mup_output_alpha",
    "mup_attn_alpha",
)
DTYPES = ("auto", "float32", "bfloat16", "float16")
TRI_STATE = ("auto", "true", "false")
UPLOAD_MODES = ("async", "sync")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def check_rung_cooldown(value: float) -> None:
    """The one check of a rung-cooldown fraction: TrainConfig's and the sweep's own key."""
    if not 0 <= value <= 1:
        raise UserError(
            f"rung_cooldown={value} must be between 0 (off) and 1 (a cooldown "
            "as long as the steps so far)"
        )


def check_parametrization(parametrization: str, optimizer: str) -> None:
    """Refuse an unknown parametrization, and one no source gives `optimizer` a rule for."""
    if parametrization not in PARAMETRIZATIONS:
        close = difflib.get_close_matches(parametrization, PARAMETRIZATIONS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(
            f"unknown parametrization {parametrization!r}; {hint}choose one of "
            f"{', '.join(PARAMETRIZATIONS)}"
        )
    reason = PARAMETRIZATION_UNSETTLED.get((parametrization, optimizer))
    if reason is not None:
        raise UserError(
            f"parametrization={parametrization} has no settled rule for optimizer={optimizer} "
            f"({reason}); use --parametrization mup, or an Adam-type optimizer"
        )


# A byte-level BPE holds the 256 byte values plus <|endoftext|>.
BPE_MIN_VOCAB_SIZE = 257


def check_bpe_vocab_size(vocab_size: int | None) -> int:
    """The vocabulary size a trained BPE may have, or a UserError naming the value."""
    if vocab_size is None:
        raise UserError(
            f"--tokenizer bpe trains a BPE on the data and needs its size: pass --vocab-size N "
            f"(N >= {BPE_MIN_VOCAB_SIZE}; GPT-2 has 50257)"
        )
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise UserError(f"vocab_size={vocab_size!r} must be an integer >= {BPE_MIN_VOCAB_SIZE}")
    if vocab_size < BPE_MIN_VOCAB_SIZE:
        raise UserError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE, which holds the 256 "
            f"byte values plus <|endoftext|>; use --vocab-size {BPE_MIN_VOCAB_SIZE} or more"
        )
    return vocab_size


# Keys by what they set, shared by the lists of what a resume may change (config.resume)
# and what a coordinate check takes no flag for (mup.driver).
# Where and how a run executes, not what it trains.
PLACEMENT_KEYS = (
    "storage_path",
    "num_workers",
    "cpus_per_worker",
    "use_gpu",
    "placement_strategy",
    "in_process",
    "address",
    "max_failures",
    "start_timeout_s",
)
# The learning-rate schedule around its peak.
LR_SCHEDULE_KEYS = (
    "min_lr",
    "warmup_steps",
    "lr_schedule",
    "decay_fraction",
    "decay_lr",
    "lr_decay_steps",
    "max_steps",
)
# What is measured, shown, saved and sent: none of it changes the weights' path.
OBSERVATION_KEYS = (
    "eval_interval",
    "eval_iters",
    "eval_train",
    "rung_cooldown",
    "cooldown_at",
    "log_interval",
    "checkpoint_interval",
    "checkpoint_upload",
    "keep_checkpoints",
    "divergence_factor",
    "sample_every",
    "sample_tokens",
    "sample_prompt",
    "hellaswag_every",
    "hellaswag_limit",
    "hellaswag_file",
    "wandb",
    "mlflow",
)
