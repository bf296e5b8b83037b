"""`python -m raygpt.sample`: text from a trained checkpoint or from OpenAI's GPT-2.

    python -m raygpt.sample --checkpoint RUN_NAME            # latest checkpoint of a run
    python -m raygpt.sample --checkpoint path/to/checkpoint_0002000 --start "ROMEO:"
    python -m raygpt.sample --init-from gpt2 --start FILE:prompt.txt

A checkpoint brings its own model shape (read from the saved weights) and its
tokenizer (the character vocabulary stored in the checkpoint, or GPT-2 BPE via
tiktoken). Samples go to stdout, each followed by a `---------------` line;
what was loaded goes to stderr. The same seed gives the same text.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

from raygpt import checkpoint, data
from raygpt.config import DTYPES, OneLineArgumentParser, default_storage_path
from raygpt.errors import UserError, exit_on_user_error
from raygpt.model import GPT, GPTConfig

SEPARATOR = "---------------"
_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers
_LAYER_RE = re.compile(r"^transformer\.h\.(\d+)\.")


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m raygpt.sample",
        description="Sample text from a raygpt checkpoint or from pretrained GPT-2 weights.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint",
        metavar="PATH_OR_RUN",
        help="a checkpoint folder, its state.pt, a run folder (its latest checkpoint) or a run "
        "name under --storage-path",
    )
    source.add_argument(
        "--init-from",
        metavar="NAME_OR_DIR",
        help="OpenAI GPT-2 weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl or a local Hugging "
        "Face directory (uses the GPT-2 tokenizer)",
    )
    p.add_argument(
        "--storage-path",
        default=default_storage_path(),
        help="where run names are looked up: a local path or s3://, gs:// "
        "(default $RAYGPT_STORAGE_PATH, else ~/ray_results)",
    )
    p.add_argument(
        "--start",
        default="\n",
        help='the prompt (default "\\n"); FILE:path reads it from a file',
    )
    p.add_argument("--num-samples", type=int, default=3, help="how many samples (default 3)")
    p.add_argument(
        "--max-new-tokens", type=int, default=300, help="tokens per sample (default 300)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="< 1 sharper, > 1 more random (default 0.8)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=200,
        help="sample only among the k most likely tokens; 0 for all (default 200)",
    )
    p.add_argument("--seed", type=int, default=1337, help="random seed (default 1337)")
    p.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="auto: bfloat16 on CUDA where supported, else float16; float32 on CPU",
    )
    return p


# --------------------------------------------------------------------------- devices


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asks for CUDA but no GPU is available; use cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return (
            torch.bfloat16
            if torch.cuda.is_bf16_supported(including_emulation=False)
            else torch.float16
        )
    return torch.float32


# --------------------------------------------------------------------------- loading


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def model_config_from_state(
    weights: dict[str, torch.Tensor], config: dict[str, Any], where: str
) -> GPTConfig:
    """The GPTConfig of saved weights: shapes from the tensors, n_head from the run config.

    Reading the shapes off the weights is what loop.build_model did, padding included
    (loop.padded_vocab_size: the vocabulary is padded to a multiple of 64 above 1024
    tokens), and it also covers runs started from pretrained GPT-2 (init_from), whose
    shape is not in the config's n_layer / n_embd.
    """
    embedding = weights.get("lm_head.weight", weights.get("transformer.wte.weight"))
    positions = weights.get("transformer.wpe.weight")
    if embedding is None or positions is None or embedding.dim() != 2:
        raise UserError(f"checkpoint {where} lacks the GPT embeddings (wte/wpe); not a GPT")
    vocab_size, n_embd = embedding.shape
    block_size = positions.shape[0]
    n_layer = 1 + max((int(m.group(1)) for k in weights if (m := _LAYER_RE.match(k))), default=-1)
    if n_layer == 0:
        raise UserError(f"checkpoint {where} has no transformer blocks; not a GPT")
    init_from = config.get("init_from", "scratch")
    if init_from in (None, "scratch"):
        n_head = config.get("n_head")
    else:
        # Every OpenAI GPT-2 size has 64-dimensional heads; a local directory says so itself.
        hf_config = Path(str(init_from)).expanduser() / "config.json"
        try:
            n_head = json.loads(hf_config.read_text())["n_head"]
        except (OSError, ValueError, KeyError, TypeError):
            n_head = n_embd // 64
    if not isinstance(n_head, int) or n_head <= 0 or n_embd % n_head:
        raise UserError(
            f"checkpoint {where} has n_head={n_head!r}, which does not divide n_embd={n_embd}"
        )
    return GPTConfig(
        block_size=int(block_size),
        vocab_size=int(vocab_size),
        n_layer=n_layer,
        n_head=n_head,
        n_embd=int(n_embd),
        dropout=0.0,
        bias="transformer.ln_f.bias" in weights,
    )


def _crop_vocab(weights: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Drop the padding rows of the (tied) embedding, so padding ids are never sampled."""
    out = dict(weights)
    for key in ("lm_head.weight", "transformer.wte.weight"):
        if key in out:
            out[key] = out[key][:vocab_size]
    return out


def load_checkpoint_model(
    path_or_run: str, storage_path: str, device: torch.device
) -> tuple[GPT, Any, str]:
    """(model in eval mode, tokenizer, description) from a raygpt checkpoint."""
    store, ckpt_dir = checkpoint.resolve(path_or_run, storage_path)
    state = checkpoint.load(ckpt_dir, store)
    where = store.display(ckpt_dir)
    weights = state["model"]
    if not isinstance(weights, dict):
        raise UserError(f"checkpoint {where} has no model weights")
    weights = _strip_prefixes(weights)
    config = state.get("config") or {}
    data_info = state.get("data") or {}
    if data_info.get("tokenizer") not in data.TOKENIZERS:
        raise UserError(
            f"checkpoint {where} does not record its tokenizer (data.tokenizer is "
            f"{data_info.get('tokenizer')!r}); it cannot be decoded"
        )
    if data_info["tokenizer"] == "char" and not isinstance(data_info.get("itos"), list):
        raise UserError(f"checkpoint {where} lacks its character vocabulary (data.itos)")
    tokenizer = data.tokenizer_from_meta(data_info)
    model_config = model_config_from_state(weights, config, where)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(
            f"checkpoint {where} has a {tokenizer.vocab_size}-token vocabulary but an output "
            f"layer of {model_config.vocab_size}; the checkpoint is inconsistent"
        )
    model_config.vocab_size = tokenizer.vocab_size
    model = GPT(model_config)
    weights = _crop_vocab(weights, tokenizer.vocab_size)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        detail = str(err).strip().splitlines()[-1].strip()
        raise UserError(f"checkpoint {where} does not fit the GPT model ({detail})") from None
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to transformer.wte.weight
    if missing or unexpected:
        shown = ", ".join((missing + unexpected)[:4])
        raise UserError(f"checkpoint {where} does not fit the GPT model ({shown})")
    step = state.get("step")
    description = f"{where} (step {step}, {data_info.get('dataset')}, {tokenizer.kind})"
    return model.to(device).eval(), tokenizer, description


def load_pretrained_model(name: str, device: torch.device) -> tuple[GPT, Any, str]:
    """(model in eval mode, GPT-2 tokenizer, description) from OpenAI GPT-2 weights."""
    tokenizer = data.GPT2Tokenizer(data.load_gpt2_encoding())
    model = GPT.from_pretrained(name)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"{name} has a vocabulary of {model.config.vocab_size} tokens, fewer than GPT-2's "
            f"{tokenizer.vocab_size}; it is not a GPT-2 checkpoint"
        )
    return model.to(device).eval(), tokenizer, f"{name} (pretrained GPT-2)"


# --------------------------------------------------------------------------- prompting


def read_prompt(start: str) -> str:
    if not start.startswith("FILE:"):
        return start
    path = Path(start[len("FILE:") :]).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read prompt file {path} ({type(err).__name__}: {err})") from None


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt)  # a character outside the vocabulary: UserError naming it
    if ids:
        return ids
    if tokenizer.eos_token is not None:
        return [tokenizer.eos_token]  # GPT-2 starts documents after <|endoftext|>
    raise UserError("the prompt is empty; pass --start with at least one character")


def _check_args(args) -> None:
    if args.checkpoint is None and args.init_from is None:
        raise UserError("give --checkpoint PATH_OR_RUN or --init-from gpt2 (see --help)")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.temperature > 0:
        raise UserError(
            f"--temperature must be > 0, got {args.temperature}; use --top-k 1 for greedy"
        )
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0: no limit), got {args.top_k}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu" and dtype == torch.float16:
        raise UserError("--dtype float16 is not supported on CPU; use bfloat16 or float32")
    prompt = read_prompt(args.start)

    if args.checkpoint is not None:
        model, tokenizer, description = load_checkpoint_model(
            args.checkpoint, args.storage_path, device
        )
    else:
        model, tokenizer, description = load_pretrained_model(args.init_from, device)
    ids = encode_prompt(tokenizer, prompt)
    print(f"[raygpt] sampling from {description} on {device}", file=sys.stderr, flush=True)

    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]
    top_k = args.top_k or None
    with torch.no_grad(), autocast:
        for _ in range(args.num_samples):
            y = model.generate(
                x,
                args.max_new_tokens,
                temperature=args.temperature,
                top_k=top_k,
                generator=generator,
            )
            print(tokenizer.decode(y[0].tolist()))
            print(SEPARATOR, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
