"""Muon (modded-nanogpt's; torch.optim.Muon has the same update) for the hidden
matrices, with AdamW for the rest, and the Newton-Schulz orthogonalisation it runs."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from raygpt.config.train import TrainConfig
from raygpt.model.gpt import unwrapped_name
from raygpt.runtime import newton_schulz_dtype

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
    bit for bit (tests/unit/train/test_optim.py checks), but with the dtype a parameter: Muon takes
    it from runtime.newton_schulz_dtype (bfloat16 where the GPU does it natively, float32
    elsewhere; never float16, see there).
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
        run_dtype: str = "auto",
    ):
        # ns_dtype None: runtime.newton_schulz_dtype decides per device, for a run of
        # run_dtype (its --dtype): bfloat16 where the GPU does it natively (fast, and what
        # Muon was tuned with), float32 elsewhere. The decision is not kept in the groups,
        # so a checkpoint resumed on another GPU gets that GPU's. A name rather than a
        # torch.dtype keeps checkpoints plain data.
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
        self.run_dtype = run_dtype
        self._ns_dtypes: dict[torch.device, torch.dtype] = {}
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon's use_muon groups take 2-D matrices only")

    def ns_dtype(self, group: dict, device: torch.device) -> torch.dtype:
        """The Newton-Schulz precision of `group`'s matrices on `device`."""
        if group["ns_dtype"] is not None:
            return getattr(torch, group["ns_dtype"])
        if device not in self._ns_dtypes:
            self._ns_dtypes[device] = newton_schulz_dtype(device, self.run_dtype)
        return self._ns_dtypes[device]

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
            dtype = self.ns_dtype(group, p.device)
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
# (model/gpt.py keeps Hugging Face's GPT-2 names). Embeddings are lookups, not linear
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
