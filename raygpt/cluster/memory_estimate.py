"""How much GPU memory one training process needs, estimated before it starts.

Used where a sweep packs several trials onto one GPU (`--gpus-per-trial 0.25`):
Ray divides GPUs as a resource count but does not enforce memory, so a trial too
big for its share would only fail mid-sweep with an out-of-memory error. A sweep's
trials differ by what it searches, so the check takes the search space's worst
point (`worst_case`), not the base config.

The estimate is deliberately simple and errs high:
- parameters, gradients and optimizer state: 4 bytes each for fp32 weights and
  gradients, plus the optimizer's state per parameter (`STATE_BYTES`);
- activations kept for the backward pass: about 34 x n_embd bytes per token per
  layer at 16-bit (Korthikanti et al. 2022, "Reducing Activation Recomputation",
  without the attention-score term, which fused attention does not store: so
  n_head changes nothing here), twice that at fp32;
- logits: the vocabulary-sized output per token at 16-bit, its fp32 upcast in
  the loss, and its gradient;
- a fixed 1 GiB for the CUDA context, cuBLAS workspaces and allocator slack;
- then 25% on top of the parts that scale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from raygpt.config.train import TrainConfig

# Optimizer state bytes per parameter (fp32 buffers).
STATE_BYTES = {
    "adamw": 8,  # exp_avg, exp_avg_sq
    "adam": 8,
    "sgd": 0,
    "momentum": 4,  # momentum buffer
    "adagrad": 4,  # sum of squares
    "muon": 8,  # momentum for the matrices; AdamW's two for embeddings, head and 1-D
    "lion": 4,  # exp_avg
    "adamw_schedulefree": 8,  # z and exp_avg_sq
}
FIXED_BYTES = 1 << 30
MARGIN = 1.25
HALF_DTYPES = ("auto", "bfloat16", "float16")  # auto is 16-bit on every GPU
# The searchable keys the estimate grows with (each at its largest is the worst), and
# the ones among them that set the tokens of a micro-batch.
SIZE_KEYS = ("batch_size", "tokens_per_step", "block_size", "n_embd", "n_layer")
_TOKEN_KEYS = ("batch_size", "tokens_per_step", "block_size")


def padded_vocab(vocab_size: int) -> int:
    return vocab_size if vocab_size <= 1024 else -(-vocab_size // 64) * 64


def parameter_count(cfg: TrainConfig, vocab_size: int) -> int:
    d, layers = cfg.n_embd, cfg.n_layer
    # 12 d^2 per block (attention 4 d^2, MLP 8 d^2); embeddings tied with the head.
    return 12 * layers * d * d + padded_vocab(vocab_size) * d + cfg.block_size * d


def estimate_training_bytes(cfg: TrainConfig, vocab_size: int, tokens: int | None = None) -> int:
    """Peak bytes of one training process of `cfg`; `tokens` per micro-batch overrides
    the config's own (micro-batch x block_size)."""
    params = parameter_count(cfg, vocab_size)
    weights = params * (4 + 4 + STATE_BYTES.get(cfg.optimizer, 8))
    half = cfg.dtype in HALF_DTYPES
    if tokens is None:
        tokens = cfg.micro_batch_size() * cfg.block_size
    activations = tokens * cfg.n_layer * cfg.n_embd * (34 if half else 68)
    logits = tokens * padded_vocab(vocab_size) * ((2 if half else 4) + 4 + 4)
    return int(FIXED_BYTES + MARGIN * (weights + activations + logits))


def worst_case(
    cfg: TrainConfig,
    vocab_size: int,
    dims: Sequence[Any] = (),
    optimizers: Sequence[str] = (),
) -> tuple[int, TrainConfig, dict[str, Any]]:
    """(bytes, config, point): the estimate of the search space's hungriest trial.

    `dims` are the sweep's searched keys (search_space.Dimension) and `optimizers` its
    --optimizers. The point takes each size key (SIZE_KEYS) at its largest value,
    float32 if dtype is searched and any choice is float32, and the optimizer with the
    most state; the estimate grows with each of them, so no trial needs more. When the
    micro-batch's keys are searched, its tokens are bounded by batch_size x block_size
    and by the step's tokens per worker (the micro-batch never exceeds either), since
    the largest of each need not make a valid config together. `point` holds the
    values that differ from `cfg` (the optimizer always), for the error to name.
    """
    point: dict[str, Any] = {}
    for dim in dims:
        values = list(dim.values) if dim.values else [dim.low, dim.high]
        if dim.key in SIZE_KEYS:
            point[dim.key] = max(v for v in values if v is not None)
        elif dim.key == "dtype" and "float32" in values:
            point[dim.key] = "float32"
        elif dim.key == "dtype":
            point[dim.key] = next(v for v in values if v in HALF_DTYPES)
    if optimizers:
        point["optimizer"] = max(optimizers, key=lambda o: STATE_BYTES.get(o, 8))
    worst = dataclasses.replace(cfg, **point)
    tokens = None
    if any(key in point for key in _TOKEN_KEYS):
        tokens = worst.batch_size * worst.block_size
        if worst.tokens_per_step is not None:
            tokens = min(tokens, worst.tokens_per_step // worst.num_workers)
    need = estimate_training_bytes(worst, vocab_size, tokens)
    return need, worst, {k: v for k, v in point.items() if k == "optimizer" or getattr(cfg, k) != v}
