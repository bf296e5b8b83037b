"""Optimizers, their parameter groups and the learning-rate schedule (no Ray).

Each new optimizer trains a tiny GPT on a fixed batch; resuming from a checkpoint
taken through torch.save/torch.load gives bit-identical weights; muon's update
matches torch.optim.Muon and its AdamW side torch.optim.AdamW; lion matches the
paper's update; the schedules match hand-computed rates.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from raygpt.config.train import TrainConfig
from raygpt.errors import UserError
from raygpt.model.gpt import GPT, GPTConfig
from raygpt.train.lr_schedule import lr_at, wsd_decay_start
from raygpt.train.muon import NS_COEFFICIENTS, Muon, zeropower_via_newtonschulz5
from raygpt.train.optim import Lion, build_optimizer, set_lr, set_optimizer_mode

NEW_OPTIMIZERS = ("muon", "lion", "adamw_schedulefree")
# A rate in each one's good range for this tiny model (muon's is its hidden matrices').
LRS = {"adamw": 1e-2, "muon": 5e-2, "lion": 1e-2, "adamw_schedulefree": 1e-2}
VOCAB, BLOCK = 64, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)
    return GPT(config)  # bias=True: biases land in the 1-D group too


def _cfg(optimizer: str, **overrides) -> TrainConfig:
    values = dict(
        optimizer=optimizer,
        learning_rate=LRS[optimizer],
        warmup_steps=3,
        max_steps=24,
        lr_schedule="wsd",
    )
    return TrainConfig(**{**values, **overrides}).validate()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (8, BLOCK + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def _train(model: GPT, optimizer, cfg: TrainConfig, start: int, stop: int) -> list[float]:
    """Steps start..stop-1 in loop.py's order: rate, forward, backward, clip, step."""
    x, y = _batch()
    losses = []
    for step in range(start, stop):
        set_lr(optimizer, lr_at(step, cfg))
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _checkpoint(model: GPT, optimizer) -> bytes:
    """What the loop does at a checkpoint: eval mode, serialise, back to train mode."""
    set_optimizer_mode(optimizer, training=False)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    set_optimizer_mode(optimizer, training=True)
    return buffer.getvalue()


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", NEW_OPTIMIZERS)
def test_new_optimizer_trains_a_tiny_model(name):
    cfg = _cfg(name)
    model = _model()
    optimizer = build_optimizer(model, cfg, "cpu")
    losses = _train(model, optimizer, cfg, 0, cfg.max_steps)
    assert all(math.isfinite(v) for v in losses)
    # ln(64) = 4.16 at the start; every one of them at least halves it on this batch.
    assert losses[-1] < 0.5 * losses[0], losses
    set_optimizer_mode(optimizer, training=False)  # schedule-free: the averaged weights
    with torch.no_grad():
        _, eval_loss = model(*_batch())
    assert eval_loss.item() < 0.5 * losses[0]


@pytest.mark.parametrize("name", ("adamw", *NEW_OPTIMIZERS))
def test_resume_from_a_checkpoint_is_exact(name):
    cfg = _cfg(name, max_steps=10)
    k = 6

    straight = _model()
    optimizer = build_optimizer(straight, cfg, "cpu")
    _train(straight, optimizer, cfg, 0, k)
    saved = _checkpoint(straight, optimizer)
    _train(straight, optimizer, cfg, k, cfg.max_steps)

    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    optimizer = build_optimizer(resumed, cfg, "cpu")
    # weights_only=True, as checkpoint.load reads it: the state must be plain data.
    state = torch.load(io.BytesIO(saved), weights_only=True)
    resumed.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_optimizer_mode(optimizer, training=True)
    _train(resumed, optimizer, cfg, k, cfg.max_steps)

    for (key, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), key


def test_schedule_free_modes_swap_the_weights_and_back():
    cfg = _cfg("adamw_schedulefree")
    model = _model()
    optimizer = build_optimizer(model, cfg, "cpu")  # built in train mode: steps at once
    _train(model, optimizer, cfg, 0, 5)
    y = [p.detach().clone() for p in model.parameters()]
    set_optimizer_mode(optimizer, training=False)
    x = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(x, y, strict=True))
    set_optimizer_mode(optimizer, training=False)  # idempotent
    assert all(torch.equal(a, p) for a, p in zip(x, model.parameters(), strict=True))
    with pytest.raises(Exception, match="train mode"):  # the package refuses to step in eval
        optimizer.step()
    set_optimizer_mode(optimizer, training=True)
    for a, p in zip(y, model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), a)


def test_mode_switch_is_a_no_op_for_other_optimizers():
    model = _model()
    optimizer = build_optimizer(model, _cfg("adamw"), "cpu")
    before = [p.detach().clone() for p in model.parameters()]
    set_optimizer_mode(optimizer, training=False)
    set_optimizer_mode(optimizer, training=True)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


# --------------------------------------------------------------------------- muon


class _Wrapped(torch.nn.Module):
    """Names like DDP's (module.) around torch.compile's (_orig_mod.)."""

    def __init__(self, model: GPT):
        super().__init__()
        inner = torch.nn.Module()
        inner._orig_mod = model
        self.module = inner


def test_muon_groups_hidden_matrices_apart_from_embeddings_and_vectors():
    model = _model()
    cfg = _cfg("muon", learning_rate=0.02, muon_adamw_lr_scale=0.25, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    for wrapped in (model, _Wrapped(model)):
        optimizer = build_optimizer(wrapped, cfg, "cpu")
        hidden, matrices, vectors = (
            sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups
        )
        assert hidden == sorted(
            f"transformer.h.{i}.{m}.weight"
            for i in range(2)
            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        )
        # lm_head.weight is tied to wte: one tensor, optimized once, by AdamW.
        assert matrices == ["transformer.wpe.weight", "transformer.wte.weight"]
        assert vectors and all(
            names[id(p)] not in hidden for p in optimizer.param_groups[2]["params"]
        )
        assert all(p.ndim == 1 for p in optimizer.param_groups[2]["params"])
        assert len(hidden) + len(matrices) + len(vectors) == len(names)

    groups = optimizer.param_groups
    assert [g["use_muon"] for g in groups] == [True, False, False]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.05, 0.0]
    assert [g["lr"] for g in groups] == [0.02, 0.005, 0.005]  # lr_scale applied when built
    set_lr(optimizer, 0.01)
    assert [g["lr"] for g in groups] == [0.01, 0.0025, 0.0025]
    assert groups[0]["momentum"] == 0.95


def test_muon_needs_the_model_not_plain_groups():
    model = _model()
    with pytest.raises(TypeError, match="build_optimizer\\(model"):
        build_optimizer(model.configure_param_groups(0.1), _cfg("muon"), "cpu")


def test_newton_schulz_orthogonalises_in_float32():
    g = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    o = zeropower_via_newtonschulz5(g, dtype=torch.float32)
    assert o.shape == g.shape and o.dtype == torch.float32
    singular = torch.linalg.svdvals(o)
    # The quintic trades exactness for speed: singular values land near 1, not on it.
    assert singular.min() > 0.6 and singular.max() < 1.3, singular


def test_newton_schulz_matches_torch_in_bfloat16():
    torch_muon = pytest.importorskip("torch.optim._muon")  # torch >= 2.9
    g = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    for m in (g, g.T.contiguous()):
        ours = zeropower_via_newtonschulz5(m, dtype=torch.bfloat16)
        theirs = torch_muon._zeropower_via_newtonschulz(m, NS_COEFFICIENTS, 5, 1e-7)
        assert torch.equal(ours, theirs)


def _three_steps(optimizer, param: torch.nn.Parameter) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        param.grad = torch.randn(param.shape, generator=gen)
        optimizer.step()
    return param.detach()


def test_muon_update_matches_torch_optim_muon():
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon arrived in torch 2.9")
    start = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    groups = [{"params": [ours], "use_muon": True, "weight_decay": 0.1}]
    ours_out = _three_steps(Muon(groups, lr=0.02, momentum=0.95, ns_dtype="bfloat16"), ours)
    torch_muon = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, momentum=0.95)
    assert torch.equal(ours_out, _three_steps(torch_muon, theirs))


def test_muon_adamw_side_matches_torch_adamw():
    start = torch.randn(10, 6, generator=torch.Generator().manual_seed(4))
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    groups = [{"params": [ours], "use_muon": False, "weight_decay": 0.1}]
    ours_out = _three_steps(Muon(groups, lr=1e-2, betas=(0.9, 0.99)), ours)
    adamw = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, foreach=False)
    assert torch.equal(ours_out, _three_steps(adamw, theirs))


# --------------------------------------------------------------------------- lion


def test_lion_follows_the_paper():
    lr, beta1, beta2, wd = 1e-2, 0.9, 0.99, 0.5
    start = torch.randn(7, 5, generator=torch.Generator().manual_seed(5))
    param = torch.nn.Parameter(start.clone())
    lion = Lion([{"params": [param]}], lr=lr, betas=(beta1, beta2), weight_decay=wd)
    theta, m = start.double(), torch.zeros_like(start, dtype=torch.float64)
    gen = torch.Generator().manual_seed(6)
    for _ in range(4):
        g = torch.randn(start.shape, generator=gen)
        param.grad = g.clone()
        lion.step()
        # Chen et al. 2023, Algorithm 2, in float64:
        c = beta1 * m + (1 - beta1) * g.double()
        theta = theta - lr * (torch.sign(c) + wd * theta)
        m = beta2 * m + (1 - beta2) * g.double()
        torch.testing.assert_close(param.detach().double(), theta, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- lr schedule


def _nanogpt_lr(step: int, cfg: TrainConfig) -> float:
    """raygpt's cosine schedule before lr_schedule.py existed (nanoGPT's get_lr)."""
    peak, floor = cfg.learning_rate, cfg.resolved_min_lr
    if step < cfg.warmup_steps:
        return peak * (step + 1) / (cfg.warmup_steps + 1)
    if not cfg.decay_lr:
        return peak
    decay_steps = cfg.resolved_lr_decay_steps
    if step >= decay_steps:
        return floor
    ratio = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"lr_decay_steps": 1500, "min_lr": 0.0}, {"decay_lr": False}, {"warmup_steps": 0}],
)
def test_cosine_is_unchanged(overrides):
    cfg = TrainConfig(**overrides).validate()
    assert cfg.lr_schedule == "cosine"  # the default
    assert [lr_at(s, cfg) for s in range(2100)] == [_nanogpt_lr(s, cfg) for s in range(2100)]


def test_cosine_by_hand():
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=100, max_steps=2000).validate()
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 101)
    assert lr_at(99, cfg) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    assert lr_at(1050, cfg) == pytest.approx(5.5e-4)  # halfway: (peak + min_lr) / 2
    assert lr_at(2000, cfg) == lr_at(5000, cfg) == pytest.approx(1e-4)


def test_wsd_by_hand():
    cfg = TrainConfig(
        learning_rate=1e-3, warmup_steps=10, max_steps=100, lr_schedule="wsd", decay_fraction=0.2
    ).validate()
    assert wsd_decay_start(cfg) == 80
    assert lr_at(5, cfg) == pytest.approx(1e-3 * 6 / 11)
    assert lr_at(10, cfg) == lr_at(50, cfg) == lr_at(79, cfg) == lr_at(80, cfg) == 1e-3
    # 1-sqrt cooldown: min_lr + (1 - sqrt(progress)) (peak - min_lr), min_lr = peak / 10
    assert lr_at(85, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # progress 1/4
    assert lr_at(95, cfg) == pytest.approx(1e-4 + (1 - math.sqrt(0.75)) * 9e-4)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    rates = [lr_at(s, cfg) for s in range(80, 101)]
    assert rates == sorted(rates, reverse=True)


def test_wsd_respects_lr_decay_steps_warmup_and_decay_lr():
    base = dict(learning_rate=1e-3, max_steps=100, lr_schedule="wsd")
    short = TrainConfig(**base, warmup_steps=10, lr_decay_steps=50).validate()
    assert wsd_decay_start(short) == 40 and lr_at(60, short) == pytest.approx(1e-4)
    # All decay: the cooldown starts where warmup ends, never inside it.
    whole = TrainConfig(**base, warmup_steps=10, decay_fraction=1.0).validate()
    assert wsd_decay_start(whole) == 10 and lr_at(10, whole) == 1e-3
    flat = TrainConfig(**base, warmup_steps=10, decay_lr=False).validate()
    assert lr_at(99, flat) == 1e-3


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_schedule_free_gets_warmup_then_the_peak(schedule):
    cfg = TrainConfig(
        optimizer="adamw_schedulefree",
        learning_rate=2e-3,
        warmup_steps=10,
        max_steps=100,
        lr_schedule=schedule,
    ).validate()
    assert lr_at(4, cfg) == pytest.approx(2e-3 * 5 / 11)
    assert {lr_at(s, cfg) for s in range(10, 120)} == {2e-3}


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"lr_schedule": "linear"}, "unknown lr_schedule 'linear'; choose one of cosine, wsd"),
        ({"decay_fraction": 1.5}, "decay_fraction=1.5 must be between 0 and 1"),
        ({"muon_momentum": 1.0}, "muon_momentum=1.0 must be in [0, 1)"),
        ({"muon_adamw_lr_scale": 0.0}, "muon_adamw_lr_scale=0.0 must be > 0"),
        ({"optimizer": "lamb"}, "unknown optimizer 'lamb'"),
    ],
)
def test_bad_schedule_and_optimizer_values_are_named(overrides, fragment):
    with pytest.raises(UserError) as err:
        TrainConfig(**overrides).validate()
    assert fragment in str(err.value)
