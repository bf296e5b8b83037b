"""How much GPU memory one training process needs, estimated before it starts.

Used where a sweep packs several trials onto one GPU (`--gpus-per-trial 0.25`):
Ray divides GPUs as a resource count but does not enforce memory, so a trial too
big for its share would only fail mid-sweep with an out-of-memory error.

The estimate is deliberately simple and errs high:
- parameters, gradients and optimizer state: 4 bytes each for fp32 weights and
  gradients, plus the optimizer's state per parameter (`STATE_BYTES`);
- activations kept for the backward pass: about 34 x n_embd bytes per token per
  layer at 16-bit (Korthikanti et al. 2022, "Reducing Activation Recomputation",
  without the attention-score term, which fused attention does not store), twice
  that at fp32;
- logits: the vocabulary-sized output per token at 16-bit, its fp32 upcast in
  the loss, and its gradient;
- a fixed 1 GiB for the CUDA context, cuBLAS workspaces and allocator slack;
- then 25% on top of the parts that scale.
"""

from __future__ import annotations

from raygpt.config import TrainConfig

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


def padded_vocab(vocab_size: int) -> int:
    return vocab_size if vocab_size <= 1024 else -(-vocab_size // 64) * 64


def parameter_count(cfg: TrainConfig, vocab_size: int) -> int:
    d, layers = cfg.n_embd, cfg.n_layer
    # 12 d^2 per block (attention 4 d^2, MLP 8 d^2); embeddings tied with the head.
    return 12 * layers * d * d + padded_vocab(vocab_size) * d + cfg.block_size * d


def estimate_training_bytes(cfg: TrainConfig, vocab_size: int) -> int:
    params = parameter_count(cfg, vocab_size)
    weights = params * (4 + 4 + STATE_BYTES.get(cfg.optimizer, 8))
    half = cfg.dtype in ("auto", "bfloat16", "float16")
    tokens = cfg.micro_batch_size() * cfg.block_size
    activations = tokens * cfg.n_layer * cfg.n_embd * (34 if half else 68)
    logits = tokens * padded_vocab(vocab_size) * ((2 if half else 4) + 4 + 4)
    return int(FIXED_BYTES + MARGIN * (weights + activations + logits))
