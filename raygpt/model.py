"""The GPT-2 language model, nanoGPT style.

One file, read top to bottom: config, the three layer types (attention, MLP,
block), the model, and loading OpenAI's GPT-2 weights. The model knows nothing
of Ray, DDP or devices: callers move it, wrap it and build optimizers from
`configure_param_groups`.

Parameter names follow Hugging Face's `GPT2LMHeadModel` (transformer.wte,
transformer.h.N.attn.c_attn, ..., lm_head) so that loading pretrained weights
is a key-for-key copy; the only twist is that HF stores its Conv1D weights as
(in, out) where `nn.Linear` wants (out, in), so four weights get transposed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from raygpt.errors import UserError

# OpenAI's GPT-2 checkpoints on the Hugging Face hub (named in error messages; any hub id
# holding a GPT-2 checkpoint may be passed).
HUB_GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")

# HF GPT-2 uses Conv1D layers whose weights are stored transposed relative to nn.Linear.
_CONV1D_SUFFIXES = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)

# Non-parameter buffers old HF checkpoints carry (the causal mask); we use SDPA instead.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum sequence length (number of positions)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, like GPT-2


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
            q, k, v, dropout_p=self.attn_dropout_p if self.training else 0.0, is_causal=True
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
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
        # the residual stream are scaled by 1/sqrt(2 * n_layer) (two per block) so the residual
        # stream's variance does not grow with depth.
        self.apply(self._init_weights)
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=resid_std)

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
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

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

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, override_args: dict | None = None
    ) -> GPT:
        """Load OpenAI GPT-2 weights saved in Hugging Face format.

        name_or_path: a local directory with config.json and model.safetensors (or
        pytorch_model.bin, or sharded variants with an index json), or a hub name such as
        gpt2, gpt2-medium, gpt2-large, gpt2-xl (downloaded with huggingface_hub). A local
        directory wins over a hub name of the same spelling. override_args may set only
        dropout. transformers is not needed.
        """
        override_args = dict(override_args or {})
        unknown = sorted(set(override_args) - {"dropout"})
        if unknown:
            raise UserError(
                f"from_pretrained can only override dropout, got {', '.join(unknown)}; "
                "the architecture comes from the checkpoint's config.json"
            )

        directory = _resolve_checkpoint_dir(name_or_path)
        hf = _read_hf_config(directory)
        config = GPTConfig(
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            bias=True,  # GPT-2 always has biases
            dropout=override_args.get("dropout", 0.0),
        )
        model = cls(config)

        hf_state = _load_hf_state_dict(directory)
        state, problems = _convert_hf_state_dict(hf_state, model)
        if problems:
            raise UserError(f"checkpoint in {directory} does not fit GPT-2: {problems}")
        with torch.no_grad():
            own = model.state_dict()
            for key, value in state.items():
                own[key].copy_(value)
        return model


# --- loading Hugging Face GPT-2 checkpoints -------------------------------------------------


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


def _resolve_checkpoint_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id fetched (or found in the cache)."""
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(
            f"{path} is a file; pass the directory that holds config.json and the weights"
        )
    name = os.fspath(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        # A hub id is "name" or "owner/name"; this can only have been meant as a path.
        raise UserError(
            f"no such directory: {name}; pass a directory holding config.json and the weights"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise UserError(
            f"{name} is not a local directory and huggingface_hub is not installed; "
            "install it or pass a directory holding config.json and model.safetensors"
        ) from e
    try:
        # Only the files we read: the hub repos also hold TF, Flax, ONNX and Rust weights.
        local = Path(
            snapshot_download(
                repo_id=name,
                allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"],
            )
        )
        if not any(local.glob("*.safetensors")):
            local = Path(
                snapshot_download(
                    repo_id=name,
                    allow_patterns=["config.json", "pytorch_model*.bin", "*.bin.index.json"],
                )
            )
    except Exception as e:  # offline, unknown repo, bad repo id, auth: all the user's to fix
        known = "" if name in HUB_GPT2_NAMES else f" (known names: {', '.join(HUB_GPT2_NAMES)})"
        raise UserError(
            f"could not fetch model {name!r} from the Hugging Face hub{known} "
            f"({type(e).__name__}); when offline, pass a local directory holding config.json "
            "and model.safetensors"
        ) from e
    return local


def pretrained_shape(name_or_path: str | os.PathLike) -> dict | None:
    """n_positions and vocab_size of pretrained weights, read without loading or downloading
    them: from a local directory's config.json, or known for OpenAI's GPT-2 hub names (all
    1024 positions, 50257 tokens). None for another hub id, which only a download can tell.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if name in HUB_GPT2_NAMES and not path.exists():
        return {"n_positions": 1024, "vocab_size": 50257}
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        hf = _read_hf_config(_resolve_checkpoint_dir(name))  # a path: never downloads
        return {"n_positions": hf["n_positions"], "vocab_size": hf["vocab_size"]}
    return None


def _read_hf_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"{directory} has no config.json; pass a Hugging Face GPT-2 directory")
    try:
        hf = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {config_path}: {e}") from e
    if "n_positions" not in hf and "n_ctx" in hf:  # very old GPT-2 configs
        hf["n_positions"] = hf["n_ctx"]
    missing = [
        k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k not in hf
    ]
    if missing:
        raise UserError(f"{config_path} lacks {', '.join(missing)}; is it a GPT-2 config?")
    # Variants this implementation would silently compute differently.
    unsupported = []
    if hf.get("model_type", "gpt2") != "gpt2":
        unsupported.append(f"model_type={hf['model_type']!r}")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        unsupported.append(f"activation_function={hf['activation_function']!r}")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        unsupported.append("scale_attn_by_inverse_layer_idx=true")
    if not hf.get("scale_attn_weights", True):
        unsupported.append("scale_attn_weights=false")
    if unsupported:
        raise UserError(
            f"{config_path} sets {', '.join(unsupported)}, which this GPT-2 implementation "
            "does not support; use an OpenAI GPT-2 checkpoint"
        )
    return hf


def _load_hf_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Read the weights without transformers: safetensors preferred, then pytorch .bin."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(
            f"reading the weights in {directory} needs the safetensors package: "
            "pip install 'raygpt[hf]'"
        ) from None

    def load_bin(path: Path) -> dict[str, torch.Tensor]:
        return torch.load(path, map_location="cpu", weights_only=True)

    candidates = [
        ("model.safetensors", load_file, None),
        ("model.safetensors.index.json", load_file, True),
        ("pytorch_model.bin", load_bin, None),
        ("pytorch_model.bin.index.json", load_bin, True),
    ]
    for filename, loader, sharded in candidates:
        path = directory / filename
        if not path.is_file():
            continue
        try:
            if not sharded:
                return dict(loader(path))
            # Sharded: the index maps every tensor name to the shard file holding it.
            weight_map = json.loads(path.read_text())["weight_map"]
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(loader(directory / shard))
            return state
        except Exception as e:  # corrupt / truncated / foreign file: one line for the user
            raise UserError(f"cannot read weights from {path}: {type(e).__name__}: {e}") from e
    raise UserError(
        f"{directory} has neither model.safetensors nor pytorch_model.bin; "
        "save the model with save_pretrained or download it again"
    )


def _convert_hf_state_dict(
    hf_state: dict[str, torch.Tensor], model: GPT
) -> tuple[dict[str, torch.Tensor], str]:
    """Map an HF GPT-2 state dict onto `model`'s keys. Returns (state, problems); problems is
    an empty string when every expected key is present with the right shape."""
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state: dict[str, torch.Tensor] = {}
    lm_head = None
    for key, value in hf_state.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if key == "lm_head.weight":
            lm_head = value
            continue
        # GPT2Model checkpoints have no "transformer." prefix; GPT2LMHeadModel ones do.
        name = key if key.startswith("transformer.") else "transformer." + key
        if name not in expected:
            continue  # e.g. the heads of GPT2DoubleHeadsModel: not ours to load
        if name.endswith(_CONV1D_SUFFIXES):
            value = value.t()
        state[name] = value

    missing = [k for k in expected if k not in state]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
        for k in expected
        if k in state and state[k].shape != expected[k]
    ]
    problems = []
    if missing:
        problems.append("missing " + _short_list(missing))
    if wrong:
        problems.append("wrong shape " + _short_list(wrong))
    if not problems and lm_head is not None:
        wte = state["transformer.wte.weight"]
        if lm_head.shape != wte.shape or not torch.equal(lm_head.to(wte.dtype), wte):
            problems.append("lm_head.weight differs from transformer.wte.weight (untied)")
    return state, "; ".join(problems)


def _short_list(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} (and {len(items) - limit} more)"
