"""Hugging Face's GPT-2 checkpoints, in and out of raygpt's GPT: the state-dict adapter.

raygpt's parameter names are `GPT2LMHeadModel`'s, so a checkpoint loads key for key;
the only twist is that HF stores its Conv1D weights as (in, out) where `nn.Linear` wants
(out, in), so four weights get transposed (CONV1D_SUFFIXES), here and in export.py.
transformers is not needed: config.json and the safetensors or .bin files are read
directly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from raygpt.errors import UserError
from raygpt.model import parametrization
from raygpt.model.gpt import GPT, GPTConfig

# OpenAI's GPT-2 checkpoints on the Hugging Face hub (named in error messages; any hub id
# holding a GPT-2 checkpoint may be passed).
HUB_GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")

# HF GPT-2 uses Conv1D layers whose weights are stored transposed relative to nn.Linear.
CONV1D_SUFFIXES = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)

# Non-parameter buffers old HF checkpoints carry (the causal mask); we use SDPA instead.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def from_pretrained(name_or_path: str | os.PathLike, override_args: dict | None = None) -> GPT:
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
    model = GPT(config)

    hf_state = _load_hf_state_dict(directory)
    state, problems = _convert_hf_state_dict(hf_state, model)
    if problems:
        raise UserError(f"checkpoint in {directory} does not fit GPT-2: {problems}")
    with torch.no_grad():
        own = model.state_dict()
        for key, value in state.items():
            own[key].copy_(value)
    return model


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
        if name.endswith(CONV1D_SUFFIXES):
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


def sp_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The weights of a standard (sp) GPT-2 that computes what `model` computes: its
    multipliers folded into the weights, so that any GPT-2 implementation (transformers'
    GPT2LMHeadModel, raygpt's own from_pretrained) gives the same logits.

    - input x alpha_in: into wte and wpe;
    - attention scale alpha_attn / d_head: GPT-2 divides by sqrt(d_head), so the query
      rows of c_attn (weight and bias) take alpha_attn / sqrt(d_head);
    - residual branches x 1/d: into both c_proj (weight and bias) of every block;
    - logits x alpha_out / m: into ln_f (weight and bias), divided by alpha_in, because the
      head is tied to wte, which now carries alpha_in. The head stays tied.

    Under sp it is the model's own state dict, tensor for tensor (detached copies)."""
    config = model.config
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if config.parametrization == "sp":
        return state
    n_embd, head_size = config.n_embd, config.n_embd // config.n_head
    inputs, output = (
        parametrization.input_multiplier(config),
        parametrization.output_multiplier(config),
    )
    scale = parametrization.attention_scale(config)
    query = 1.0 if scale is None else scale * math.sqrt(head_size)
    branch = parametrization.residual_multiplier(config)
    with torch.no_grad():
        for key in ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"):
            if key in state:  # lm_head.weight: the same tensor as wte's, in the state dict
                state[key] = state[key] * inputs
        for key in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
            if key in state:
                state[key] = state[key] * (output / inputs)
        for key in list(state):
            if key.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
                value = state[key].clone()
                value[:n_embd] *= query  # q, then k and v: split(n_embd) in the forward
                state[key] = value
            elif key.endswith(("c_proj.weight", "c_proj.bias")):
                state[key] = state[key] * branch
    return state
