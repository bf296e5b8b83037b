"""raygpt.train.evaluation: the mean loss of fixed batches per split, on one rank."""

from __future__ import annotations

import pytest
import torch

from raygpt.model.gpt import GPT, GPTConfig
from raygpt.runtime import Runtime
from raygpt.train.evaluation import evaluate

CPU = Runtime(torch.device("cpu"), torch.float32, compile=False)


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16, dropout=0.5))


def _batches(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 20, (2, 8), generator=gen)
        out.append((x, torch.roll(x, -1, dims=1)))
    return out


def test_mean_loss_per_split_in_the_given_order():
    model = _model().train()
    sets = {"val": _batches(1, 3), "train": _batches(2, 2)}
    losses = evaluate(model, sets, CPU, world_size=1)
    assert list(losses) == ["val", "train"]
    model.eval()
    with torch.no_grad():
        for split, batches in sets.items():
            expected = sum(float(model(x, y)[1]) for x, y in batches) / len(batches)
            assert losses[split] == pytest.approx(expected, rel=1e-6)
    assert all(isinstance(v, float) for v in losses.values())


def test_dropout_is_off_while_evaluating_and_training_mode_comes_back():
    model = _model().train()
    sets = {"val": _batches(3, 2)}
    first = evaluate(model, sets, CPU, world_size=1)
    assert model.training
    # Dropout 0.5 would make two evaluations differ; in eval mode they are identical.
    assert evaluate(model, sets, CPU, world_size=1) == first


def test_no_gradients_are_kept():
    model = _model()
    evaluate(model, {"val": _batches(4, 1)}, CPU, world_size=1)
    assert all(p.grad is None for p in model.parameters())
