"""The device/precision rules, the shared training step and the batched step reads (no Ray)."""

from __future__ import annotations

import pytest
import torch

from raygpt.errors import UserError
from raygpt.model.gpt import GPT, GPTConfig
from raygpt.runtime import Runtime, resolve_dtype, use_compile
from raygpt.train.prefetch import BatchPrefetcher
from raygpt.train.step import train_step
from raygpt.train.step_stats import StepStats

CPU = torch.device("cpu")


def test_dtype_and_compile_rules_on_cpu():
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    with pytest.raises(UserError, match="float16 is not supported on CPU"):
        resolve_dtype("float16", CPU)
    with pytest.raises(UserError, match="'fp8'"):
        resolve_dtype("fp8", CPU)
    assert not use_compile("auto", CPU) and use_compile("true", CPU)
    assert not Runtime.create(CPU).grad_scaler().is_enabled()


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=16))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_two_micro_batches_equal_one_batch_of_both():
    runtime = Runtime.create(CPU)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(16, (8, 8), generator=gen)
    y = torch.randint(16, (8, 8), generator=gen)
    results = []
    for batches in ([(x, y)], [(x[:4], y[:4]), (x[4:], y[4:])]):
        model, opt = _model_and_optimizer()
        loss, norm = train_step(
            model, list(model.parameters()), opt, runtime.grad_scaler(), batches,
            runtime.autocast, grad_clip=1.0,
        )  # fmt: skip
        results.append((loss.item(), norm.item(), model.lm_head.weight.detach().clone()))
    (l1, n1, w1), (l2, n2, w2) = results
    assert l1 == pytest.approx(l2, abs=1e-6) and n1 == pytest.approx(n2, rel=1e-5)
    torch.testing.assert_close(w1, w2)
    assert l1 == pytest.approx(torch.log(torch.tensor(16.0)).item(), abs=0.5)


def test_step_stats_return_every_step_in_order_then_forget_them():
    stats = StepStats(CPU, world_size=1)
    for step in (1, 2, 3):
        stats.start_step()
        stats.end_step(step, torch.tensor(float(step)), torch.tensor(10.0 * step))
    assert len(stats) == 3
    readings = stats.read()
    assert [(r.step, r.train_loss, r.grad_norm) for r in readings] == [
        (1, 1.0, 10.0),
        (2, 2.0, 20.0),
        (3, 3.0, 30.0),
    ]
    assert all(r.seconds >= 0 for r in readings) and stats.read() == []


def test_prefetcher_gives_each_step_its_own_batches():
    made = []

    def make(step):
        made.append(step)
        return [(torch.full((2, 3), step), torch.full((2, 3), -step))]

    fetch = BatchPrefetcher(make, CPU, last_step=5)
    for step in (0, 1, 3):  # a jump, as after a resume
        ((x, y),) = fetch.get(step)
        assert x.eq(step).all() and y.eq(-step).all()
    fetch.close()
    assert made == [0, 1, 3]  # on CPU nothing is built ahead
