"""Optimizers by name, their parameter groups, and the per-group learning rate.

Most optimizers get nanoGPT's two parameter groups: weight decay on matrices
(embeddings and linear weights, dim >= 2), none on biases and LayerNorm gains.
Muon splits further (see `muon_param_groups`). Adding an optimizer is one entry in
`_BUILDERS`.

A group may carry "lr_scale": `set_lr` gives it lr_scale x the schedule's rate, so
one schedule (lr_schedule.py) drives groups with different base rates.

Schedule-free optimizers hold two points, and the model's weights are one or the
other by mode; `set_optimizer_mode` switches them (a no-op for every other optimizer).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch

from raygpt.config import OPTIMIZERS, TrainConfig
from raygpt.errors import UserError

# The schedule lives in lr_schedule.py; this name stays importable from here for the
# callers written before it moved (loop.py, benchmarks/).
from raygpt.lr_schedule import lr_at
from raygpt.model import unwrapped_name

__all__ = [
    "Lion",
    "Muon",
    "build_optimizer",
    "lr_at",
    "muon_param_groups",
    "set_lr",
    "set_optimizer_mode",
    "zeropower_via_newtonschulz5",
]


# --------------------------------------------------------------------------- muon

# Keller Jordan's quintic coefficients (also torch.optim.Muon's): they maximise the
# slope at zero, so 5 steps lift even tiny singular values to roughly 0.5-1.5 rather
# than converging exactly to 1, which does not hurt training.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def zeropower_via_newtonschulz5(
    grad: torch.Tensor,
    steps: int = NS_STEPS,
    dtype: torch.dtype = torch.bfloat16,
    eps: float = 1e-7,
) -> torch.Tensor:
    """An approximately orthogonal matrix near `grad` (its U V^T, singular values ~1).

    The same operations as torch 2.13's torch.optim.Muon, so bfloat16 results match it
    bit for bit (tests/test_optim.py checks), but with the dtype a parameter: CPUs run
    bfloat16 matmuls slowly or emulated, so the optimizer uses float32 there.
    """
    a, b, c = NS_COEFFICIENTS
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1: NS converges
    for _ in range(steps):
        gram = x @ x.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, gram_update, x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for groups with use_muon=True, AdamW for the others, in one optimizer.

    Muon (modded-nanogpt; torch.optim.Muon has the same update): Nesterov momentum,
    then the update replaced by its Newton-Schulz orthogonalisation, scaled by
    sqrt(max(1, rows/cols)), with decoupled weight decay p <- p(1 - lr wd). AdamW
    groups follow torch.optim.AdamW's single-tensor update exactly.

    One object rather than a Muon and an AdamW side by side, so the loop's GradScaler,
    gradient clipping, set_lr and checkpoints treat it like any other optimizer.

    DDP: every rank holds the full all-reduced gradient and runs the same
    deterministic update, so this single-device form is correct on any number of
    ranks. modded-nanogpt instead shards the Newton-Schulz work across ranks and
    all-gathers the results; that saves time, not correctness, and only pays off
    for models far larger than the ones trained here.
    """

    def __init__(
        self,
        params: list[dict],
        lr: float,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        ns_steps: int = NS_STEPS,
        ns_dtype: str | None = None,
    ):
        # ns_dtype None: bfloat16 on CUDA (fast, and what Muon was tuned with), float32
        # elsewhere. A name rather than a torch.dtype keeps checkpoints plain data.
        if ns_dtype not in (None, "bfloat16", "float32"):
            raise ValueError(f"ns_dtype={ns_dtype!r} must be None, 'bfloat16' or 'float32'")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            use_muon=False,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon's use_muon groups take 2-D matrices only")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, decay, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            update = p.grad.lerp(buf, mu)  # Nesterov: the gradient, then the momentum
            if group["ns_dtype"] is None:
                dtype = torch.bfloat16 if p.is_cuda else torch.float32
            else:
                dtype = getattr(torch, group["ns_dtype"])
            update = zeropower_via_newtonschulz5(update, group["ns_steps"], dtype)
            p.mul_(1 - lr * decay)
            # Orthogonal updates of a tall matrix have smaller entries; this evens the RMS.
            p.add_(update, alpha=-lr * math.sqrt(max(1, p.size(0) / p.size(1))))

    def _adamw_step(self, group: dict) -> None:
        lr, decay, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1 - lr * decay)
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** state["step"]
            bias_correction2 = 1 - beta2 ** state["step"]
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


# Muon is for the hidden matrices: the 2-D weights inside the transformer blocks
# (model.py keeps Hugging Face's GPT-2 names). Embeddings are lookups, not linear
# maps, and the tied lm head is the token embedding.
_HIDDEN_PREFIX = "transformer.h."


def muon_param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Three groups: Muon on the hidden matrices; AdamW at muon_adamw_lr_scale x the
    rate on the other matrices (embeddings, head; weight decay) and on the 1-D
    parameters (no decay)."""
    hidden, other_matrices, vectors = [], [], []
    for name, p in model.named_parameters():  # tied weights once
        if not p.requires_grad:
            continue
        if p.ndim == 2 and unwrapped_name(name).startswith(_HIDDEN_PREFIX):
            hidden.append(p)
        elif p.ndim >= 2:
            other_matrices.append(p)
        else:
            vectors.append(p)
    scale = cfg.muon_adamw_lr_scale
    return [
        {"params": hidden, "use_muon": True, "lr_scale": 1.0, "weight_decay": cfg.weight_decay},
        {
            "params": other_matrices,
            "use_muon": False,
            "lr_scale": scale,
            "weight_decay": cfg.weight_decay,
        },
        {"params": vectors, "use_muon": False, "lr_scale": scale, "weight_decay": 0.0},
    ]


# --------------------------------------------------------------------------- lion


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Alg. 2):

        c = beta1 m + (1 - beta1) g;  p <- p - lr (sign(c) + wd p);  m <- beta2 m + (1 - beta2) g

    Every entry moves by exactly lr, so its useful rate is 3-10x below AdamW's.
    """

    def __init__(
        self,
        params: list[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                update = exp_avg.lerp(p.grad, 1 - beta1).sign_()
                p.mul_(1 - lr * decay)
                p.add_(update, alpha=-lr)
                exp_avg.lerp_(p.grad, 1 - beta2)
        return loss


# --------------------------------------------------------------------------- builders


def _adamw(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    # The fused CUDA kernel is markedly faster; CPU keeps the default foreach path.
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused or None
    )


def _adam(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    # Adam's weight_decay is L2 added to the gradient (coupled), not AdamW's decoupled decay.
    fused = device_type == "cuda"
    return torch.optim.Adam(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused or None
    )


def _sgd(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=0.0)


def _momentum(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        groups, lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.nesterov
    )


def _adagrad(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(groups, lr=cfg.learning_rate)


def _muon(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    if not all("use_muon" in g for g in groups):
        # A bug in the caller, not a user's mistake: plain weight-decay groups cannot tell
        # a hidden matrix from an embedding.
        raise TypeError("muon needs its own groups: call build_optimizer(model, cfg, device_type)")
    optimizer = Muon(
        groups, lr=cfg.learning_rate, momentum=cfg.muon_momentum, betas=(cfg.beta1, cfg.beta2)
    )
    set_lr(optimizer, cfg.learning_rate)  # apply lr_scale before any schedule does
    return optimizer


def _lion(groups: list[dict], cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    # Lion's paper defaults are beta1=0.9, beta2=0.99: raygpt's defaults too.
    return Lion(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


def _adamw_schedulefree(
    groups: list[dict], cfg: TrainConfig, device_type: str
) -> torch.optim.Optimizer:
    import schedulefree

    # warmup_steps=0: lr_schedule.lr_at does the warmup (and no decay) for every
    # optimizer; two warmups would multiply.
    optimizer = schedulefree.AdamWScheduleFree(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), warmup_steps=0
    )
    # Its step() refuses to run in eval mode, which is how it is built; train mode
    # now (a no-op on the weights before the first step) so any loop can step it.
    optimizer.train()
    return optimizer


_BUILDERS: dict[str, Callable[[list[dict], TrainConfig, str], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adam": _adam,
    "sgd": _sgd,
    "momentum": _momentum,
    "adagrad": _adagrad,
    "muon": _muon,
    "lion": _lion,
    "adamw_schedulefree": _adamw_schedulefree,
}
assert tuple(_BUILDERS) == OPTIMIZERS


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """The parameter groups `cfg.optimizer` wants from `model`."""
    if cfg.optimizer == "muon":
        return muon_param_groups(model, cfg)
    return model.configure_param_groups(cfg.weight_decay)


def build_optimizer(
    params: torch.nn.Module | list[dict], cfg: TrainConfig, device_type: str
) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` for `params`: a model (the unwrapped one, before DDP
    and compile), or parameter groups each with its weight_decay (not for muon)."""
    if cfg.optimizer == "momentum" and cfg.nesterov and cfg.momentum <= 0:
        # torch raises deep inside the constructor otherwise
        raise UserError(f"nesterov needs momentum > 0, got momentum={cfg.momentum}")
    groups = param_groups(params, cfg) if isinstance(params, torch.nn.Module) else params
    return _BUILDERS[cfg.optimizer](groups, cfg, device_type)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's rate: `lr` times the group's lr_scale (1 when it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def set_optimizer_mode(optimizer: torch.optim.Optimizer, training: bool) -> None:
    """Put a schedule-free optimizer's weights in train or eval mode; others: no-op.

    Schedule-free AdamW keeps the averaged point x (the one to evaluate and keep) and
    the point y the gradients are taken at; the model's weights hold y in train mode,
    x in eval mode, and its step() refuses to run in eval mode. Call with
    training=False before evaluating and before taking model/optimizer state for a
    checkpoint, and training=True after the checkpoint is written (the state dict
    shares storage with the live weights) and after loading a checkpoint, before the
    next step.
    """
    # Every schedulefree optimizer carries train_mode in its defaults; torch's don't.
    if "train_mode" not in optimizer.defaults:
        return
    if training:
        optimizer.train()
    else:
        optimizer.eval()
