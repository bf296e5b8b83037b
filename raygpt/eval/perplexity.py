"""Perplexity of a prepared split: a contiguous sweep, every token scored once.

Why a sweep and not the training loop's evaluation windows (`data/sampler.py: BatchSampler`):
those are a random sample of the split, fine for watching a run, but their mean is
an estimate that moves with the seed and the number of batches. A sweep gives the
split's own number, the same for every run that evaluates it.

Window k holds the tokens [k * stride, k * stride + block_size] and scores those no
earlier window scored. With stride = block_size (the default) the windows touch end to
end, each token is predicted from 0..block_size-1 tokens of context, the same shapes
training's val_loss sees, so exp(val_loss) estimates this number. A smaller stride gives
every token at least block_size - stride tokens of context (and costs block_size / stride
times as much), as Hugging Face's "perplexity of fixed-length models" guide does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from raygpt.errors import UserError


def windows(n_tokens: int, block_size: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, first): tokens[start:end] is a span scoring tokens[start + first:end].

    Token 0 has no context and is never scored, so n_tokens - 1 tokens are.
    """
    if not 1 <= stride <= block_size:
        raise UserError(f"--stride must be between 1 and block_size ({block_size}), got {stride}")
    scored_until = 0  # tokens[: scored_until + 1] are scored (or have no prediction)
    start = 0
    while scored_until < n_tokens - 1:
        end = min(start + block_size + 1, n_tokens)
        yield start, end, scored_until + 1 - start
        scored_until = end - 1
        start += stride


def spans(tokens: Any, block_size: int, stride: int) -> list[tuple[np.ndarray, int]]:
    """The sweep's spans over a token array or a `sampler.TokenSplit`, read now."""
    n_tokens = tokens.n_tokens if hasattr(tokens, "n_tokens") else len(tokens)
    return SweepChunk(tokens, list(windows(n_tokens, block_size, stride)))()


@dataclass
class SweepChunk:
    """Some of a sweep's windows, read from the split only when called: on the Ray worker
    that scores them, so the driver never holds a corpus. `tokens` is a sampler.TokenSplit
    (pickles as shard paths) or, for small data, an array."""

    tokens: Any
    windows: list[tuple[int, int, int]]

    def __call__(self) -> list[tuple[np.ndarray, int]]:
        read = getattr(self.tokens, "read", None)
        return [
            (np.asarray(read(s, e - s) if read else self.tokens[s:e], dtype=np.int64), first)
            for s, e, first in self.windows
        ]


def summary(scores: list[tuple[float, int]]) -> dict[str, Any]:
    """Mean loss (nats per token), perplexity and bits per token of summed span scores."""
    total = math.fsum(s for s, _ in scores)
    count = sum(n for _, n in scores)
    if count == 0:
        raise UserError("no tokens were scored; the split needs at least two tokens")
    loss = -total / count
    return {
        "tokens_scored": count,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_token": loss / math.log(2),
    }
