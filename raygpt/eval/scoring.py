"""Log-likelihood of token spans: the one model call HellaSwag and perplexity make.

A span is `(tokens, first)`: the sum of log p(tokens[i] | tokens[:i]) over i >= first.
HellaSwag scores an ending after its context (first = the context's length);
perplexity scores the part of a window that no earlier window scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from raygpt.model.gpt import GPT
from raygpt.runtime import Runtime

Span = tuple[Sequence[int] | np.ndarray, int]

# Rows x positions per forward pass. The logits are tokens x vocabulary floats (GPT-2:
# 2048 x 50257 x 4 B = 400 MB, and cross-entropy makes a second copy), so this bounds a
# worker's memory rather than its speed.
DEFAULT_TOKENS_PER_BATCH = 2048


def fit_to_context(tokens: np.ndarray, first: int, block_size: int) -> tuple[np.ndarray, int]:
    """Keep the last block_size + 1 tokens (the model sees block_size inputs), as
    lm-evaluation-harness truncates from the left; token 0 is never predicted, so a span
    cut this way loses its first tokens from the score, never its last."""
    drop = max(0, len(tokens) - (block_size + 1))
    return tokens[drop:], max(1, first - drop)


def truncated(span: Span, block_size: int) -> bool:
    return len(span[0]) > block_size + 1


@torch.no_grad()
def sum_logprobs(
    model: GPT,
    spans: Sequence[Span],
    *,
    runtime: Runtime | None = None,
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH,
) -> list[tuple[float, int]]:
    """(sum of log-probabilities, number of tokens scored) of each span, in order.

    `model` must already be on `runtime.device` (default: CPU, float32). Spans are
    right-padded into batches; causal attention keeps the padding out of every real
    position. Sums are float64 so a long sweep does not lose precision.
    """
    runtime = runtime or Runtime(torch.device("cpu"), torch.float32, compile=False)
    block_size = model.config.block_size
    fitted = [
        fit_to_context(np.asarray(tokens, dtype=np.int64), first, block_size)
        for tokens, first in spans
    ]
    out: list[tuple[float, int]] = []
    start = 0
    while start < len(fitted):
        # Grow the batch while rows x longest row stays within the budget (at least one row).
        stop, longest = start, 0
        while stop < len(fitted):
            longest_next = max(longest, len(fitted[stop][0]) - 1)
            if stop > start and (stop - start + 1) * longest_next > tokens_per_batch:
                break
            longest, stop = longest_next, stop + 1
        batch = fitted[start:stop]
        x = torch.zeros((len(batch), max(longest, 1)), dtype=torch.long)
        y = torch.full_like(x, -1)  # -1: not scored (context and padding)
        for row, (tokens, first) in enumerate(batch):
            n = len(tokens)
            if n < 2:
                continue  # nothing to predict
            t = torch.from_numpy(tokens)
            x[row, : n - 1] = t[:-1]
            y[row, first - 1 : n - 1] = t[first:]
        x, y = x.to(runtime.device), y.to(runtime.device)
        with runtime.autocast():
            # With targets the model returns every position's logits (its mean loss is
            # unused here: per-row sums are needed).
            logits, _ = model(x, y)
        nll = F.cross_entropy(
            logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none"
        ).view_as(y)
        sums = (-nll.double()).sum(dim=1).tolist()
        counts = (y >= 0).sum(dim=1).tolist()
        out.extend(zip(sums, counts, strict=True))
        start = stop
    return out
