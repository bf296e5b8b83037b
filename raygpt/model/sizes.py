"""A model's size from its shape, without torch: what a report, a transfer's plan or a
law needs to know of a model it never builds."""

from __future__ import annotations


def padded_vocab_size(vocab_size: int) -> int:
    """GPT-2's 50257 tokens padded to 50304 (a multiple of 64) for faster matmuls."""
    return vocab_size if vocab_size <= 1024 else -(-vocab_size // 64) * 64


def non_embedding_params(n_layer: int, n_embd: int, vocab_size: int, bias: bool = False) -> int:
    """GPT.n_params(non_embedding=True) of a fresh model, from its shape.

    Per block: attention 4 d^2 (qkv 3 d^2, projection d^2), MLP 8 d^2, two LayerNorm
    weights 2d, and with bias the biases 3d + d + 4d + d and the LayerNorms' 2d. Then
    the final LayerNorm (d, 2d with bias) and the tied token embedding V d. vocab_size
    is the model's (padded) one.
    """
    d = n_embd
    per_block = 12 * d * d + 2 * d + (11 * d if bias else 0)
    return n_layer * per_block + (2 * d if bias else d) + vocab_size * d
