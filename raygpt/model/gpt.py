"""The GPT-2 language model, nanoGPT style.

One file, read top to bottom: config, the three layer types (attention, MLP,
block), the model (OpenAI's GPT-2 weights load through hf.py). The model knows nothing
of Ray, DDP or devices: callers move it, wrap it and build optimizers from
`configure_param_groups`. Its parametrization (sp, mup, completep) is part of its
config: the init and the forward multipliers come from model/parametrization.py's
table; under sp (the default) it is nanoGPT's GPT-2, computed the same way.

Parameter names follow Hugging Face's `GPT2LMHeadModel` (transformer.wte,
transformer.h.N.attn.c_attn, ..., lm_head) so that loading pretrained weights
is a key-for-key copy (hf.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from raygpt.config.choices import PARAMETRIZATIONS
from raygpt.errors import UserError
from raygpt.model import parametrization


@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum sequence length (number of positions)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, like GPT-2
    # sp | mup | completep, with its base shape and constants (config.TrainConfig's keys of
    # the same names): what the init and forward multipliers are computed from.
    parametrization: str = "sp"
    mup_base_width: int = 256
    mup_base_depth: int = 2
    mup_input_alpha: float = 1.0
    mup_output_alpha: float = 1.0
    mup_attn_alpha: float = 1.0


def _validate_config(config: GPTConfig) -> None:
    """Raise UserError (one line: the bad value and what to do) for an impossible config."""
    for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
    if config.n_embd % config.n_head != 0:
        raise UserError(
            f"GPTConfig.n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head}); "
            "choose n_embd as a multiple of n_head"
        )
    dropout = config.dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(f"GPTConfig.dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(config.bias, bool):
        raise UserError(f"GPTConfig.bias must be True or False, got {config.bias!r}")
    if config.parametrization not in PARAMETRIZATIONS:
        raise UserError(
            f"GPTConfig.parametrization must be one of {', '.join(PARAMETRIZATIONS)}, "
            f"got {config.parametrization!r}"
        )
    for name in ("mup_base_width", "mup_base_depth", "mup_input_alpha", "mup_output_alpha"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UserError(f"GPTConfig.{name} must be a positive number, got {value!r}")
    value = config.mup_attn_alpha
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"GPTConfig.mup_attn_alpha must be a positive number, got {value!r}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        # query, key and value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout_p = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        # None: SDPA's own 1/sqrt(head size) (sp); mup's alpha_attn / head size otherwise.
        self.scale = parametrization.attention_scale(config)
        # No causal-mask buffer: scaled_dot_product_attention(is_causal=True) masks for us
        # (and picks a flash / memory-efficient kernel where one exists).

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
            is_causal=True,
            scale=self.scale,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        # completep: each branch x 1/depth multiplier, so the sum of n_layer of them keeps
        # its size at any depth; 1 otherwise (and then not multiplied at all).
        self.branch_scale = parametrization.residual_multiplier(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch_scale == 1.0:
            x = x + self.attn(self.ln_1(x))
            x = x + self.mlp(self.ln_2(x))
            return x
        x = x + self.branch_scale * self.attn(self.ln_1(x))
        x = x + self.branch_scale * self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        _validate_config(config)
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.block_size, config.n_embd),
                "drop": nn.Dropout(config.dropout),
                "h": nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                "ln_f": nn.LayerNorm(config.n_embd, bias=config.bias),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (https://paperswithcode.com/method/weight-tying): the token embedding
        # and the output projection are one tensor, as in GPT-2.
        self.transformer.wte.weight = self.lm_head.weight

        # GPT-2 init: N(0, 0.02) for weights, zeros for biases; the projections that write into
        # the residual stream are drawn again, scaled by 1/sqrt(2 * n_layer) (two per block)
        # so the residual stream's variance does not grow with depth. mup and completep
        # draw the hidden matrices again too, by their rules (parametrization.py).
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            std = parametrization.reinit_std(config, name)
            if std is not None:
                torch.nn.init.normal_(p, mean=0.0, std=std)
        # mup: embeddings x alpha_in, logits x alpha_out / width multiplier (1: not applied).
        self.input_scale = parametrization.input_multiplier(config)
        self.output_scale = parametrization.output_multiplier(config)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # nn.LayerNorm keeps its default init: weight 1, bias 0.

    def n_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (tied weights counted once).

        With non_embedding=True the position embeddings are subtracted, as in nanoGPT. The
        token embeddings stay in: they are also the output projection (weight tying), whose
        FLOPs are real.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM paper appendix B.

        flops_per_token = 6 * N + 12 * L * H * Q * T

        where N = n_params() (non-embedding parameters, as nanoGPT's estimate_mfu uses),
        L = n_layer, H = n_head, Q = n_embd // n_head (head size) and T = seq_len (default
        block_size). 6*N: a multiply-add (2 FLOPs) per parameter per token forward, twice that
        backward. 12*L*H*Q*T: the attention scores and weighted sum (QK^T and AV, 2 FLOPs per
        multiply-add each, times 3 for forward + backward) against T positions.
        """
        cfg = self.config
        T = cfg.block_size if seq_len is None else seq_len
        if isinstance(T, bool) or not isinstance(T, int) or T <= 0:
            raise UserError(f"seq_len must be a positive integer, got {seq_len!r}")
        N = self.n_params()
        L, H, Q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        return 6 * N + 12 * L * H * Q * T

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids. Returns (logits, loss).

        With targets (B, T): logits (B, T, vocab_size) and the mean cross-entropy, positions
        whose target is -1 ignored. Without: logits (B, 1, vocab_size) of the last position
        only and loss None -- generation needs nothing else, and it skips the big lm_head
        matmul for every other position.
        """
        t = idx.size(1)
        if t > self.config.block_size:
            raise UserError(
                f"sequence length {t} exceeds the model's block_size {self.config.block_size}; "
                "use shorter sequences or a model with a larger block_size"
            )
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        tok_emb = self.transformer.wte(idx)  # (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # (t, n_embd)
        x = tok_emb + pos_emb
        if self.input_scale != 1.0:
            x = x * self.input_scale
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if self.output_scale != 1.0:
            # The head's input rather than its output: the head stays one matmul, and the
            # coordinate check's hook on it sees the logits themselves.
            x = x * self.output_scale

        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        else:
            logits = self.lm_head(x[:, [-1], :])  # list index keeps the time dimension
            loss = None
        return logits, loss

    def crop_block_size(self, block_size: int) -> None:
        """Model surgery: shrink the context length, e.g. load GPT-2 (1024) and train at 256.

        Replaces the position-embedding Parameter, so call it before building the optimizer.
        """
        if (
            isinstance(block_size, bool)
            or not isinstance(block_size, int)
            or not 0 < block_size <= self.config.block_size
        ):
            raise UserError(
                f"crop_block_size needs 0 < block_size <= {self.config.block_size}, "
                f"got {block_size!r}; a model's context can only be cropped, not grown"
            )
        # A new config object: the caller's GPTConfig may be shared, do not mutate it.
        self.config = replace(self.config, block_size=block_size)
        wpe = self.transformer.wpe
        wpe.weight = nn.Parameter(
            wpe.weight.detach()[:block_size].clone(), requires_grad=wpe.weight.requires_grad
        )
        wpe.num_embeddings = block_size
        for block in self.transformer.h:
            # Implementations with an explicit causal-mask buffer (nanoGPT without flash
            # attention) keep it as attn.bias of shape (1, 1, T, T); ours has none, but crop
            # one if it is there.
            mask = getattr(block.attn, "bias", None)
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                block.attn.bias = mask[:, :, :block_size, :block_size]

    def configure_param_groups(self, weight_decay: float) -> list[dict]:
        """Two optimizer param groups: weight decay for every parameter with dim >= 2
        (matmul weights and embeddings), none for the rest (biases, LayerNorm gains)."""
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
            raise UserError(f"weight_decay must be a number, got {weight_decay!r}")
        if weight_decay < 0:
            raise UserError(f"weight_decay must be >= 0, got {weight_decay}")
        params = [p for p in self.parameters() if p.requires_grad]  # tied weights once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": float(weight_decay)},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        vocab_size: int | None = None,
    ) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T) and return (B, T + max_new_tokens).

        Each step feeds at most the last block_size tokens, divides the last logits by
        temperature, keeps only the top_k most likely tokens when top_k is given, and samples
        (with `generator` when given, for reproducible output). Call model.eval() first if
        the model has dropout. `vocab_size`: sample only ids below it, the tokenizer's own,
        when the model's vocabulary is padded (training pads 50257 to 50304).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise UserError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not temperature > 0:
            raise UserError(
                f"temperature must be > 0, got {temperature}; for (near-)greedy decoding "
                "use top_k=1 or a small temperature"
            )
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        ):
            raise UserError(f"top_k must be a positive integer or None, got {top_k!r}")
        block_size = self.config.block_size
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :vocab_size] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


# What DDP ("module.") and torch.compile ("_orig_mod.") put before the names of a wrapped
# GPT's parameters; saved state and parameter groups are matched on the bare names.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    """A parameter name without wrapper prefixes, however many and in whatever order."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name
