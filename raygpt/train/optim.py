"""Optimizers by name, their parameter groups, and the per-group learning rate.

Most optimizers get nanoGPT's two parameter groups: weight decay on matrices
(embeddings and linear weights, dim >= 2), none on biases and LayerNorm gains.
Muon splits further (see `muon_param_groups`). Adding an optimizer is one entry in
`_BUILDERS`.

A group may carry "lr_scale": `set_lr` gives it lr_scale x the schedule's rate, so
one schedule (lr_schedule.py) drives groups with different base rates. Under mup and
completep (the model's `parametrization`) the groups split by layer type (embeddings,
hidden matrices, biases and norms) and carry the lr, weight-decay and eps multipliers
of model/parametrization.py's table; under sp they are nanoGPT's, with none.

Schedule-free optimizers hold two points, and the model's weights are one or the
other by mode; `set_optimizer_mode` switches them (a no-op for every other optimizer).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from raygpt.config.choices import OPTIMIZERS, check_parametrization
from raygpt.config.train import TrainConfig
from raygpt.errors import UserError
from raygpt.model import parametrization
from raygpt.model.gpt import unwrapped_name
from raygpt.train.muon import Muon, muon_param_groups

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
        groups,
        lr=cfg.learning_rate,
        momentum=cfg.muon_momentum,
        betas=(cfg.beta1, cfg.beta2),
        run_dtype=cfg.dtype,
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
    """The parameter groups `cfg.optimizer` wants from `model`, with the multipliers of
    the model's parametrization (none under sp)."""
    config = _model_config(model)
    if getattr(config, "parametrization", "sp") == "sp":
        if cfg.optimizer == "muon":
            return muon_param_groups(model, cfg)
        return model.configure_param_groups(cfg.weight_decay)
    check_parametrization(config.parametrization, cfg.optimizer)
    if cfg.optimizer == "muon":
        layers = (parametrization.HIDDEN, parametrization.EMBEDDING, parametrization.VECTOR)
        muon_groups = muon_param_groups(model, cfg)
        groups = [{**g, "layer": layer} for g, layer in zip(muon_groups, layers, strict=True)]
    else:
        groups = _layer_groups(model, cfg.weight_decay)
    for group in groups:
        scale = parametrization.group_scales(config, cfg.optimizer, group["layer"])
        group["lr_scale"] = group.get("lr_scale", 1.0) * scale.lr
        group["weight_decay"] *= scale.weight_decay
        group["eps_scale"] = scale.eps  # build_optimizer applies it to the optimizer's eps
    return groups


def _model_config(model: torch.nn.Module) -> object | None:
    """The GPTConfig of a GPT, through DDP's and torch.compile's wrappers."""
    while not hasattr(model, "config"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return None
        model = inner
    return model.config


def _layer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """One group per layer type of the parametrization table: embeddings (decayed),
    hidden matrices (decayed), biases and norms (not), in that order."""
    by_layer: dict[str, list[torch.nn.Parameter]] = {
        parametrization.EMBEDDING: [],
        parametrization.HIDDEN: [],
        parametrization.VECTOR: [],
    }
    for name, p in model.named_parameters():  # tied weights once
        if p.requires_grad:
            by_layer[parametrization.layer_of(unwrapped_name(name), p.ndim)].append(p)
    return [
        {
            "params": params,
            "layer": layer,
            "weight_decay": 0.0 if layer == parametrization.VECTOR else float(weight_decay),
        }
        for layer, params in by_layer.items()
    ]


def build_optimizer(
    params: torch.nn.Module | list[dict], cfg: TrainConfig, device_type: str
) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` for `params`: a model (the unwrapped one, before DDP
    and compile), or parameter groups each with its weight_decay (not for muon)."""
    if cfg.optimizer == "momentum" and cfg.nesterov and cfg.momentum <= 0:
        # torch raises deep inside the constructor otherwise
        raise UserError(f"nesterov needs momentum > 0, got momentum={cfg.momentum}")
    groups = param_groups(params, cfg) if isinstance(params, torch.nn.Module) else params
    optimizer = _BUILDERS[cfg.optimizer](groups, cfg, device_type)
    for group in optimizer.param_groups:
        if "eps_scale" in group and "eps" in group:  # the optimizer's own eps, scaled
            group["eps"] = group["eps"] * group["eps_scale"]
    if any("lr_scale" in g for g in optimizer.param_groups):
        set_lr(optimizer, cfg.learning_rate)  # each group at its multiple from the start
    return optimizer


# What build_optimizer puts into each parameter group from the config (and, for "fused",
# from the device it builds for). Everything else in a group is the optimizer's own
# running state (schedule-free's averaging weights, say) and comes from the checkpoint.
CONFIG_GROUP_KEYS = (
    "weight_decay",
    "betas",
    "momentum",
    "nesterov",
    "lr_scale",
    "eps",  # a parametrization scales it per group (completep)
    "fused",
)


def load_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A checkpoint's optimizer state into `optimizer`, built by build_optimizer from this
    run's config, keeping the hyperparameters that config gave its groups.

    `load_state_dict` alone brings back the saved groups' values too, so a resume with a
    new --weight-decay or --beta2 (config.resume.RESUME_MAY_CHANGE) would train on with the old
    ones. The rate needs nothing here: set_lr sets it at every step.
    """
    built = [{k: g[k] for k in CONFIG_GROUP_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)  # moves its state to the params' device
    for group, values in zip(optimizer.param_groups, built, strict=True):
        group.update(values)


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
