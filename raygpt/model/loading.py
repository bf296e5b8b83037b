"""A trained model and its tokenizer: what eval, sample and export load, and what a
training run starts from (`init_from`).

Two sources, one result (`Trained`: the GPT in eval mode on the CPU, the tokenizer it
was trained with, the dataset facts that name that tokenizer, and a description):

- a raygpt checkpoint (`from_checkpoint`): the shape is read off the saved weights,
  the tokenizer from the data facts the checkpoint stores, and the padded vocabulary
  rows are dropped, so the model's vocabulary is the tokenizer's;
- Hugging Face GPT-2 weights (`from_pretrained`): a hub name or a directory. A
  directory written by `python -m raygpt.export` carries `raygpt.json`, which names
  its tokenizer (a character vocabulary, a trained BPE, say); any other one is GPT-2 BPE.

Training from either (`init_from`): model/init_from.py. `check_init_fit` there says before
Ray starts whether the weights fit the run's data and block size, and
`model_to_train` builds the GPT the loop trains, with dropout and a cropped context.

`encoding` injects a tiktoken Encoding in place of the downloaded GPT-2 one (tests).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raygpt import checkpoint
from raygpt.config.choices import PARAMETRIZATION_KEYS
from raygpt.config.io import flag_name
from raygpt.config.resume import with_parametrization_defaults
from raygpt.data import common, tokenizers
from raygpt.errors import UserError
from raygpt.model import hf
from raygpt.model.gpt import GPT, GPTConfig, unwrapped_name

# The file `raygpt.export` writes beside the Hugging Face files: where the weights came
# from and the dataset facts that rebuild the exact tokenizer they were trained with.
EXPORT_META_FILE = "raygpt.json"
EXPORT_META_FORMAT = 1
# What an exported directory's raygpt.json records about the data: the checkpoint's own
# data facts, less the BPE tokenizer, which an export writes as its tokenizer.json.
DATA_KEYS = tuple(k for k in checkpoint.DATA_KEYS if k != "tokenizer_json")

_LAYER_RE = re.compile(r"^transformer\.h\.(\d+)\.")


@dataclass
class Trained:
    model: GPT  # eval mode, CPU, float32, vocabulary cut to the tokenizer's
    tokenizer: Any  # tokenizers.CharTokenizer, tokenizers.GPT2Tokenizer or tokenizers.BPETokenizer
    # Tokenizer facts: DATA_KEYS (as far as the source knows them), and a trained BPE's
    # tokenizer_json (which an export writes as its tokenizer.json, not into raygpt.json).
    data: dict[str, Any]
    description: str  # one line: where it came from
    step: int | None = None  # optimizer steps, for a raygpt checkpoint
    dropout: float = 0.0  # what training used (the model itself runs without)


def add_source_arguments(parser: Any) -> None:
    """--checkpoint, --init-from and --storage-path: how every CLI that loads a model
    names it (sample, eval). `parser` is a parser or an argument group."""
    from raygpt.config.train import default_storage_path

    parser.add_argument(
        "--checkpoint",
        metavar="PATH_OR_RUN",
        help="a checkpoint folder, its state.pt, a run folder (its latest checkpoint) or a run "
        "name under --storage-path",
    )
    parser.add_argument(
        "--init-from",
        metavar="NAME_OR_DIR",
        help="Hugging Face GPT-2 weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl or a "
        "directory (one written by raygpt.export brings its own tokenizer)",
    )
    parser.add_argument(
        "--storage-path",
        default=default_storage_path(),
        help="where run names are looked up: a local path or s3://, gs:// "
        "(default $RAYGPT_STORAGE_PATH, else ~/ray_results)",
    )


def from_checkpoint(
    path_or_run: str, storage_path: str = "~/ray_results", *, encoding: Any = None
) -> Trained:
    """A raygpt checkpoint folder, its state.pt, a run folder (its latest checkpoint) or a
    run name under storage_path. A damaged or foreign file is one UserError line."""
    state, weights, model_config, where = load_checkpoint_weights(path_or_run, storage_path)
    data_info = state.get("data") if isinstance(state.get("data"), dict) else {}
    tokenizer = _tokenizer(data_info, f"checkpoint {where}", encoding)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(
            f"checkpoint {where} has a {tokenizer.vocab_size}-token vocabulary but an output "
            f"layer of {model_config.vocab_size}; the checkpoint is inconsistent"
        )
    # Training pads the vocabulary (50257 -> 50304) for faster matmuls; the padding rows
    # are never targets, so they go: no sampled or exported id falls outside the tokenizer.
    model_config.vocab_size = tokenizer.vocab_size
    weights = {
        k: v[: tokenizer.vocab_size] if k in ("lm_head.weight", "transformer.wte.weight") else v
        for k, v in weights.items()
    }
    model = gpt_from_weights(model_config, weights, where)
    step = state.get("step")
    return Trained(
        model=model.float().eval(),
        tokenizer=tokenizer,
        data=data_facts(data_info),
        description=f"{where} (step {step}, {data_info.get('dataset')}, {tokenizer.kind})",
        step=step if isinstance(step, int) else None,
        dropout=float((state.get("config") or {}).get("dropout") or 0.0),
    )


def from_pretrained(name_or_dir: str, *, encoding: Any = None) -> Trained:
    """Hugging Face GPT-2 weights: gpt2 ... gpt2-xl (hub) or a local directory."""
    model = hf.from_pretrained(name_or_dir)
    checkpoint.check_finite(model, str(name_or_dir), "use other weights")
    data_info = export_data_facts(name_or_dir)
    if data_info is not None:
        meta = read_export_meta(Path(str(name_or_dir)).expanduser() / EXPORT_META_FILE)
        description = f"{name_or_dir} (export of {meta.get('source')})"
        step = meta.get("step") if isinstance(meta.get("step"), int) else None
    else:
        # Pretrained GPT-2 speaks GPT-2's BPE (a test's own small BPE stands in for it).
        if encoding is None:
            encoding = tokenizers.load_gpt2_encoding()
        vocab_size = int(encoding.max_token_value) + 1
        data_info = {"dataset": None, "tokenizer": "gpt2", "vocab_size": vocab_size}
        description = f"{name_or_dir} (pretrained GPT-2)"
        step = None
    tokenizer = _tokenizer(data_info, str(name_or_dir), encoding)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"{name_or_dir} has a vocabulary of {model.config.vocab_size} tokens, fewer than its "
            f"tokenizer's {tokenizer.vocab_size}; pass a checkpoint made with that tokenizer"
        )
    return Trained(
        model=model.eval(),
        tokenizer=tokenizer,
        data=data_facts(data_info),
        description=description,
        step=step,
    )


def data_facts(data_info: dict[str, Any]) -> dict[str, Any]:
    """What a Trained keeps of a checkpoint's or export's data facts (see Trained.data)."""
    facts = {k: data_info.get(k) for k in DATA_KEYS}
    if isinstance(data_info.get("tokenizer_json"), str):
        facts["tokenizer_json"] = data_info["tokenizer_json"]
    return facts


def load(
    checkpoint_: str | None,
    init_from: str | None,
    storage_path: str = "~/ray_results",
    *,
    encoding: Any = None,
) -> Trained:
    """Exactly one of a raygpt checkpoint or pretrained weights (the CLIs' two flags)."""
    if (checkpoint_ is None) == (init_from is None):
        raise UserError("give exactly one of --checkpoint PATH_OR_RUN or --init-from NAME_OR_DIR")
    if checkpoint_ is not None:
        return from_checkpoint(checkpoint_, storage_path, encoding=encoding)
    return from_pretrained(str(init_from), encoding=encoding)


def export_data_facts(name_or_dir: str) -> dict[str, Any] | None:
    """The data facts of a directory `raygpt.export` wrote (None for any other weights),
    a trained BPE's tokenizer.json included."""
    directory = Path(str(name_or_dir)).expanduser()
    if not (directory / EXPORT_META_FILE).is_file():
        return None
    facts = dict(read_export_meta(directory / EXPORT_META_FILE)["data"])
    if facts.get("tokenizer") == "bpe" and not facts.get("tokenizer_json"):
        try:
            facts["tokenizer_json"] = (directory / "tokenizer.json").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(
                f"{directory} is a raygpt export of a trained BPE model but its tokenizer.json "
                f"cannot be read ({type(err).__name__}); export it again"
            ) from None
    return facts


def read_export_meta(path: Path) -> dict[str, Any]:
    """raygpt.json of an exported directory, checked enough to rebuild its tokenizer."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"cannot read {path} ({type(err).__name__}: {err})") from None
    if (
        not isinstance(meta, dict)
        or meta.get("format") != EXPORT_META_FORMAT
        or not isinstance(meta.get("data"), dict)
    ):
        raise UserError(
            f"{path} is not a raygpt export record (format {EXPORT_META_FORMAT} with a data "
            "object); delete it to treat the directory as plain GPT-2"
        )
    return meta


def _tokenizer(data_info: dict[str, Any], where: str, encoding: Any) -> Any:
    kind = data_info.get("tokenizer")
    if kind not in common.TOKENIZERS:
        raise UserError(
            f"{where} does not record its tokenizer (data.tokenizer is {kind!r}); "
            "its token ids cannot be matched to text"
        )
    if kind == "char" and not (
        isinstance(data_info.get("itos"), list)
        and all(isinstance(c, str) and len(c) == 1 for c in data_info["itos"])
    ):
        raise UserError(f"{where} lacks its character vocabulary (data.itos)")
    return tokenizers.tokenizer_from_meta(data_info, encoding=encoding)


def load_checkpoint_weights(
    path_or_run: str, storage_path: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor], GPTConfig, str]:
    """(state, weights under bare names, their GPTConfig, where) of a raygpt checkpoint."""
    store, ckpt_dir = checkpoint.resolve(path_or_run, storage_path)
    state = checkpoint.load(ckpt_dir, store)
    where = store.display(ckpt_dir)
    weights = state["model"]
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise UserError(f"checkpoint {where} has no model weights")
    weights = {unwrapped_name(k): v for k, v in weights.items()}
    # Sample, export, eval and --init-from alike: nothing is made from a diverged model.
    checkpoint.check_finite(weights, f"checkpoint {where}")
    saved = state.get("model_config")
    model_config = model_config_from_state(
        weights, state.get("config") or {}, where, saved if isinstance(saved, dict) else None
    )
    return state, weights, model_config, where


def gpt_from_weights(model_config: GPTConfig, weights: dict[str, torch.Tensor], where: str) -> GPT:
    model = GPT(model_config)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        detail = str(err).strip().splitlines()[-1].strip()
        raise UserError(f"checkpoint {where} does not fit the GPT model ({detail})") from None
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to transformer.wte.weight
    if missing or unexpected:
        shown = ", ".join((missing + unexpected)[:4])
        raise UserError(f"checkpoint {where} does not fit the GPT model ({shown})")
    return model


def model_config_from_state(
    weights: dict[str, torch.Tensor],
    config: dict[str, Any],
    where: str,
    saved: dict[str, Any] | None = None,
) -> GPTConfig:
    """The GPTConfig of saved weights: shapes from the tensors, n_head from the model
    config the checkpoint saved (`saved`), else from the run config.

    Reading the shapes off the weights covers the padded vocabulary and runs started from
    pretrained weights (init_from), whose shape is not in the config's n_layer / n_embd.
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
    if saved is not None and "n_head" in saved:
        n_head = saved["n_head"]
    elif init_from in (None, "scratch"):
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
        **_parametrization_of(saved, config),
    )


def _parametrization_of(saved: dict[str, Any] | None, config: dict[str, Any]) -> dict[str, Any]:
    """The parametrization keys of a checkpoint: its model config's, else its run config's;
    a checkpoint with neither (an older raygpt's) is sp."""
    for source in (saved or {}, config):
        if "parametrization" in source:
            return with_parametrization_defaults(
                {k: source[k] for k in PARAMETRIZATION_KEYS if k in source}
            )
    return with_parametrization_defaults({})


def check_same_parametrization(cfg: Any, model_config: GPTConfig, where: str) -> None:
    """Refuse to train weights under another parametrization than theirs: the forward
    multipliers belong to the weights, the optimizer's to the run. Under sp on both sides
    the mup_* keys mean nothing and are not compared."""
    if cfg.parametrization == model_config.parametrization == "sp":
        return
    for key in PARAMETRIZATION_KEYS:
        theirs, ours = getattr(model_config, key), getattr(cfg, key)
        if theirs != ours:
            raise UserError(
                f"init_from {where} was trained with {key}={theirs} but this run has "
                f"{key}={ours}; pass {flag_name(key)} {theirs}, the weights' own (Hugging Face "
                "weights, exports included, are sp), or start from scratch"
            )
