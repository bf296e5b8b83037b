"""Parametrizations: how init, forward multipliers and per-group optimizer
hyperparameters scale with width and depth. Every rule is one row of `RULES`, with its
source; the model (init, forward) and train/optim.py (parameter groups) read them here
and nowhere else, and docs/parametrization.md prints the same table (`markdown_table`).

- sp: nanoGPT's GPT-2 (N(0, 0.02) init, residual projections / sqrt(2 n_layer),
  attention 1/sqrt(d_head), one learning rate): what raygpt always trained, unchanged.
- mup: the maximal update parametrization (Yang et al. 2022, "Tensor Programs V",
  arXiv 2203.03466), in the tied-embedding form of its Table 8 that EleutherAI's
  nanoGPT-mup (branch master) implements: hidden init variance / m, hidden Adam lr / m,
  logits x alpha_out / m, attention alpha_attn / d_head, embeddings unchanged.
- completep: mup plus residual branches x 1/depth-multiplier (Dey et al. 2025,
  "Don't be lazy", arXiv 2505.01618, Table 1 with alpha = 1; nanoGPT-mup branch
  completep): the learning rate then transfers across depth too.

m = n_embd / mup_base_width is the width multiplier, d = n_layer / mup_base_depth the
depth multiplier, L = n_layer. Optimizer rules are per family: "adam" (adamw, adam,
adagrad, lion, adamw_schedulefree: entrywise-normalised updates), "sgd" (sgd,
momentum) and "muon". How settled each optimizer's rules are is in `OPTIMIZER_NOTES`;
the combinations no source settles are refused by config.choices.check_parametrization
(config.choices.PARAMETRIZATION_UNSETTLED), and shown here as refused rows.

The head is tied to the token embedding (GPT-2), so one matrix is both the input
and the output weights: under mup the output multiplier alpha_out / m carries the output
side, which makes the two sides' rules agree (Table 8 of arXiv 2203.03466: Adam lr 1 for
both, SGD lr x m for both).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raygpt.config.choices import OPTIMIZERS, PARAMETRIZATION_KEYS, PARAMETRIZATION_UNSETTLED

# GPT-2's init std, the base every init rule scales.
INIT_STD = 0.02

FAMILIES: dict[str, str] = {
    "adamw": "adam",
    "adam": "adam",
    "adagrad": "adam",
    "lion": "adam",
    "adamw_schedulefree": "adam",
    "sgd": "sgd",
    "momentum": "sgd",
    "muon": "muon",
}
assert set(FAMILIES) == set(OPTIMIZERS)

# Layer types, as the rows name them.
EMBEDDING = "embedding"  # wte (tied to the head) and wpe
HIDDEN = "hidden"  # the 2-D matrices inside the blocks: c_attn, c_fc, c_proj
PROJECTION = "hidden c_proj"  # the two matrices that write into the residual stream
ATTENTION = "attention scores"
OUTPUT = "output logits"
RESIDUAL = "residual branches"
VECTOR = "biases, norms"  # every 1-D parameter

NANOGPT = "nanoGPT model.py (GPT-2 init, reference/nanoGPT)"
TP5 = "Tensor Programs V, arXiv 2203.03466"
MUP_MASTER = "nanoGPT-mup master model.py"
MUP_COMPLETEP = "nanoGPT-mup completep model.py"
COMPLETEP = "CompleteP, arXiv 2505.01618, Table 1 (alpha = 1)"
MUP_PACKAGE = "microsoft/mup mup/optim.py"
SPECTRAL = "Bernstein et al., A Spectral Condition for Feature Learning, arXiv 2310.17813"


@dataclass(frozen=True)
class Scales:
    """What the rules are functions of, for one model."""

    m: float  # width multiplier, n_embd / mup_base_width
    d: float  # depth multiplier, n_layer / mup_base_depth
    n_layer: int
    head_size: int
    input_alpha: float
    output_alpha: float
    attn_alpha: float


@dataclass(frozen=True)
class Rule:
    """One rule: under `parametrization`, for optimizer `family` ("model" for init and
    forward rules), `layer`'s `quantity` is `formula` (evaluated by `value`)."""

    parametrization: str
    family: str  # "model", "adam", "sgd" or "muon"
    layer: str
    quantity: str  # init std | forward | lr | weight decay | eps
    formula: str
    value: Callable[[Scales], float | None]
    source: str
    status: str = "settled"  # settled | derived (see the source) | refused


def _one(_: Scales) -> float:
    return 1.0


def _rules() -> list[Rule]:
    rows: list[Rule] = []

    def add(par, family, layer, quantity, formula, value, source, status="settled"):
        for p in (par,) if isinstance(par, str) else par:
            rows.append(Rule(p, family, layer, quantity, formula, value, source, status))

    both = ("mup", "completep")
    # ---- init and forward (the model's)
    add("sp", "model", EMBEDDING, "init std", "0.02", lambda s: INIT_STD, NANOGPT)
    add("sp", "model", HIDDEN, "init std", "0.02", lambda s: INIT_STD, NANOGPT)
    add(
        "sp",
        "model",
        PROJECTION,
        "init std",
        "0.02 / sqrt(2 L)",
        lambda s: INIT_STD / math.sqrt(2 * s.n_layer),
        NANOGPT + "; GPT-2 paper Sec. 2.3",
    )
    add("sp", "model", EMBEDDING, "forward", "1", _one, NANOGPT)
    add("sp", "model", ATTENTION, "forward", "1 / sqrt(d_head)", lambda s: None, NANOGPT)
    add("sp", "model", OUTPUT, "forward", "1", _one, NANOGPT)
    add("sp", "model", RESIDUAL, "forward", "1", _one, NANOGPT)
    add(
        both,
        "model",
        EMBEDDING,
        "init std",
        "0.02",
        lambda s: INIT_STD,
        f"{TP5} Table 3 (input weights: init var 1/fan_in, fan_in the vocabulary); "
        f"{MUP_MASTER} README table",
    )
    add(
        both,
        "model",
        EMBEDDING,
        "forward",
        "alpha_in",
        lambda s: s.input_alpha,
        f"{MUP_MASTER} GPT.forward (x *= mup_input_alpha)",
    )
    add(
        both,
        "model",
        HIDDEN,
        "init std",
        "0.02 / sqrt(m)",
        lambda s: INIT_STD / math.sqrt(s.m),
        f"{TP5} Table 3 (hidden init var 1/fan_in); {MUP_MASTER} GPT.__init__",
    )
    add(
        "mup",
        "model",
        PROJECTION,
        "init std",
        "0.02 / sqrt(2 L m)",
        lambda s: INIT_STD / math.sqrt(2 * s.n_layer * s.m),
        f"{MUP_MASTER} GPT.__init__ (GPT-2's 1/sqrt(2 L) kept)",
    )
    add(
        "completep",
        "model",
        PROJECTION,
        "init std",
        "0.02 / sqrt(m)",
        lambda s: INIT_STD / math.sqrt(s.m),
        f"{MUP_COMPLETEP} GPT.__init__; {COMPLETEP} (the branch multiplier replaces "
        "GPT-2's depth-scaled init)",
    )
    add(
        both,
        "model",
        ATTENTION,
        "forward",
        "alpha_attn / d_head",
        lambda s: s.attn_alpha / s.head_size,
        f"{TP5} (attention logits 1/d); {MUP_MASTER} CausalSelfAttention.forward",
    )
    add(
        both,
        "model",
        OUTPUT,
        "forward",
        "alpha_out / m",
        lambda s: s.output_alpha / s.m,
        f"{TP5} Table 8 (output multiplier 1/fan_in; microsoft/mup MuSharedReadout); "
        f"{MUP_MASTER} GPT.forward",
    )
    add("mup", "model", RESIDUAL, "forward", "1", _one, MUP_MASTER)
    add(
        "completep",
        "model",
        RESIDUAL,
        "forward",
        "1 / d",
        lambda s: 1.0 / s.d,
        f"{COMPLETEP}; {MUP_COMPLETEP} Block.forward (residual_scaling)",
    )
    add(
        ("sp", *both),
        "model",
        VECTOR,
        "init std",
        "LayerNorm 1, biases 0",
        lambda s: None,
        NANOGPT,
    )

    # ---- Adam-type optimizers: adamw, adam, adagrad, lion, adamw_schedulefree
    adam_lr = f"{TP5} Table 3 (Adam lr); {MUP_PACKAGE} MuAdam; {MUP_MASTER} configure_optimizers"
    add(both, "adam", EMBEDDING, "lr", "1", _one, adam_lr + " (Table 8: 1 for tied in/out)")
    add(both, "adam", EMBEDDING, "weight decay", "1", _one, f"{MUP_PACKAGE} MuAdam (vector-like)")
    add(both, "adam", HIDDEN, "lr", "1 / m", lambda s: 1.0 / s.m, adam_lr)
    add(
        both,
        "adam",
        HIDDEN,
        "weight decay",
        "m",
        lambda s: s.m,
        f"{MUP_PACKAGE} MuAdam (weight_decay *= width_mult); {COMPLETEP}; "
        f"{MUP_COMPLETEP} (weight_decay / width_lr_scaling): lr x wd, the decay per step, "
        "stays width-independent. nanoGPT-mup master leaves it x 1",
    )
    add(both, "adam", VECTOR, "lr", "1", _one, f"{TP5} Table 3 (biases: Adam lr 1); {COMPLETEP}")
    add("mup", "adam", "all groups", "eps", "1", _one, f"{MUP_MASTER}; {MUP_PACKAGE} MuAdam")
    add(
        "completep",
        "adam",
        "all groups",
        "eps",
        "1 / (m d)",
        lambda s: 1.0 / (s.m * s.d),
        f"{COMPLETEP}; {MUP_COMPLETEP} configure_optimizers (adam_eps *= ...)",
    )

    # ---- SGD and momentum
    sgd = f"{TP5} Table 3 (SGD lr); {MUP_PACKAGE} MuSGD"
    add(
        "mup",
        "sgd",
        EMBEDDING,
        "lr",
        "m",
        lambda s: s.m,
        sgd + " (vector-like lr *= width_mult; Table 8: output lr x fan_in, the same for tied)",
    )
    add(
        "mup",
        "sgd",
        EMBEDDING,
        "weight decay",
        "1 / m",
        lambda s: 1.0 / s.m,
        f"{MUP_PACKAGE} MuSGD (vector-like weight_decay /= width_mult: lr x wd kept)",
    )
    add("mup", "sgd", HIDDEN, "lr", "1", _one, sgd + " (hidden: 1)")
    add("mup", "sgd", HIDDEN, "weight decay", "1", _one, f"{MUP_PACKAGE} MuSGD")
    add("mup", "sgd", VECTOR, "lr", "m", lambda s: s.m, sgd + " (biases: fan_out)")

    # ---- Muon: Newton-Schulz on the hidden matrices, AdamW on the rest
    add(
        "mup",
        "muon",
        HIDDEN,
        "lr",
        "1",
        _one,
        f"{SPECTRAL} Condition 1: the update's spectral norm ~ sqrt(fan_out / fan_in), "
        "which Muon's orthogonalised update x sqrt(max(1, rows / cols)) already has at "
        "any width",
        "derived",
    )
    add(
        "mup",
        "muon",
        HIDDEN,
        "weight decay",
        "1",
        _one,
        f"{SPECTRAL} (lr is width-free)",
        "derived",
    )
    add(
        "mup",
        "muon",
        EMBEDDING,
        "lr",
        "1",
        _one,
        "the AdamW side of Muon: the adam rows (x muon_adamw_lr_scale as under sp)",
    )
    add(
        "mup", "muon", EMBEDDING, "weight decay", "1", _one, "the AdamW side of Muon: the adam rows"
    )
    add("mup", "muon", VECTOR, "lr", "1", _one, "the AdamW side of Muon: the adam rows")
    add("mup", "muon", "all groups", "eps", "1", _one, "the AdamW side of Muon: the adam rows")

    # ---- refused: no source settles them (config.choices.PARAMETRIZATION_UNSETTLED)
    for (par, optimizer), reason in PARAMETRIZATION_UNSETTLED.items():
        family = FAMILIES[optimizer]
        if not any(r.parametrization == par and r.family == family for r in rows):
            add(par, family, "all groups", "lr", "refused", _one, reason, "refused")
    return rows


RULES: tuple[Rule, ...] = tuple(_rules())

# How each optimizer's family rules apply to it, and how settled they are.
OPTIMIZER_NOTES: dict[str, str] = {
    "adamw": "settled: the optimizer of arXiv 2203.03466, nanoGPT-mup and CompleteP",
    "adam": "settled for lr and init (arXiv 2203.03466 Table 3 is for Adam); its weight "
    "decay is coupled L2, scaled as microsoft/mup's MuAdam scales it",
    "adagrad": "the adam rows: microsoft/mup's optim.py names Adagrad among the 'Adam-like' "
    "optimizers MuAdam covers; no published transfer study",
    "lion": "derived: a sign update is entrywise-normalised like Adam's, so the adam rows; "
    "no published muP transfer study of Lion; it has no eps",
    "adamw_schedulefree": "derived: its update is AdamW's, averaged linearly, so the adam "
    "rows; no published muP transfer study",
    "sgd": "mup: settled (arXiv 2203.03466 Table 3, microsoft/mup MuSGD); completep: refused",
    "momentum": "as sgd: momentum is linear in the gradients",
    "muon": "mup: derived from the spectral condition (arXiv 2310.17813), not validated by "
    "nanoGPT-mup; completep: refused",
}
assert set(OPTIMIZER_NOTES) == set(OPTIMIZERS)


# --------------------------------------------------------------------------- lookups


def scales(config: Any) -> Scales:
    """The Scales of a GPTConfig (or any object with its fields)."""
    return Scales(
        m=config.n_embd / config.mup_base_width,
        d=config.n_layer / config.mup_base_depth,
        n_layer=config.n_layer,
        head_size=config.n_embd // config.n_head,
        input_alpha=config.mup_input_alpha,
        output_alpha=config.mup_output_alpha,
        attn_alpha=config.mup_attn_alpha,
    )


_BY_KEY = {(r.parametrization, r.family, r.layer, r.quantity): r for r in RULES}
assert len(_BY_KEY) == len(RULES), "two rules for one parametrization, family, layer, quantity"


def rule(parametrization: str, family: str, layer: str, quantity: str) -> Rule:
    """The one row for these; KeyError (a bug, not a user's mistake) if there is none."""
    return _BY_KEY[(parametrization, family, layer, quantity)]


def _model_value(config: Any, layer: str, quantity: str) -> float | None:
    return rule(config.parametrization, "model", layer, quantity).value(scales(config))


def config_keys(cfg: Any) -> dict[str, Any]:
    """The parametrization keys of a TrainConfig, as GPTConfig takes them."""
    return {key: getattr(cfg, key) for key in PARAMETRIZATION_KEYS}


# What the model asks: its init and its forward multipliers.

_HIDDEN_INPUT_SUFFIXES = ("attn.c_attn.weight", "mlp.c_fc.weight")
_PROJECTION_SUFFIX = "c_proj.weight"


def reinit_std(config: Any, name: str) -> float | None:
    """The init std of parameter `name` where it differs from nn.Linear/nn.Embedding's
    N(0, 0.02), which GPT.__init__ draws first; None: keep that draw. Under sp only the
    residual projections are drawn again, as nanoGPT does (the same random numbers)."""
    if name.endswith(_PROJECTION_SUFFIX):
        return _model_value(config, PROJECTION, "init std")
    if config.parametrization != "sp" and name.endswith(_HIDDEN_INPUT_SUFFIXES):
        return _model_value(config, HIDDEN, "init std")
    return None


def attention_scale(config: Any) -> float | None:
    """The attention-score scale; None: scaled_dot_product_attention's 1/sqrt(d_head)."""
    return _model_value(config, ATTENTION, "forward")


def input_multiplier(config: Any) -> float:
    return _model_value(config, EMBEDDING, "forward")


def output_multiplier(config: Any) -> float:
    return _model_value(config, OUTPUT, "forward")


def residual_multiplier(config: Any) -> float:
    return _model_value(config, RESIDUAL, "forward")


# What the optimizer asks: each parameter group's multipliers.


def layer_of(name: str, ndim: int) -> str:
    """The optimizer-side layer type of a parameter (its bare name and dimensions)."""
    if ndim < 2:
        return VECTOR
    if name.startswith("transformer.h."):
        return HIDDEN
    return EMBEDDING  # wte (= the tied head) and wpe


@dataclass(frozen=True)
class GroupScales:
    lr: float
    weight_decay: float
    eps: float


def group_scales(config: Any, optimizer: str, layer: str) -> GroupScales:
    """lr, weight-decay and eps multipliers of `layer`'s parameter group under `config`'s
    parametrization for `optimizer` (all 1 under sp)."""
    if config.parametrization == "sp":
        return GroupScales(1.0, 1.0, 1.0)
    family = FAMILIES[optimizer]
    s = scales(config)

    def value(where: str, quantity: str) -> float:
        return float(rule(config.parametrization, family, where, quantity).value(s))

    lr = value(layer, "lr")
    weight_decay = value(layer, "weight decay") if layer != VECTOR else 1.0  # no decay there
    eps = value("all groups", "eps") if family != "sgd" else 1.0  # SGD has no eps
    return GroupScales(lr, weight_decay, eps)


# --------------------------------------------------------------------------- the docs' table


def markdown_table() -> str:
    """RULES as the Markdown table docs/parametrization.md holds (tests compare them)."""
    lines = [
        "| parametrization | optimizer family | layer | quantity | rule | status | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in RULES:
        lines.append(
            f"| {r.parametrization} | {r.family} | {r.layer} | {r.quantity} | {r.formula} | "
            f"{r.status} | {r.source} |"
        )
    return "\n".join(lines)
