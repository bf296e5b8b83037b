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

Training from either (`init_from`, see the last section): `check_init_fit` says before
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

from raygpt import checkpoint, data
from raygpt.errors import UserError
from raygpt.model import GPT, HUB_GPT2_NAMES, GPTConfig, pretrained_shape, unwrapped_name

# The file `raygpt.export` writes beside the Hugging Face files: where the weights came
# from and the dataset facts that rebuild the exact tokenizer they were trained with.
EXPORT_META_FILE = "raygpt.json"
EXPORT_META_FORMAT = 1
# What an exported directory records about the data (the checkpoint's own data facts).
DATA_KEYS = ("dataset", "tokenizer", "vocab_size", "itos", "source_sha256")

_LAYER_RE = re.compile(r"^transformer\.h\.(\d+)\.")


@dataclass
class Trained:
    model: GPT  # eval mode, CPU, float32, vocabulary cut to the tokenizer's
    tokenizer: Any  # data.CharTokenizer, data.GPT2Tokenizer or data.BPETokenizer
    # Tokenizer facts: DATA_KEYS (as far as the source knows them), and a trained BPE's
    # tokenizer_json (which an export writes as its tokenizer.json, not into raygpt.json).
    data: dict[str, Any]
    description: str  # one line: where it came from
    step: int | None = None  # optimizer steps, for a raygpt checkpoint
    dropout: float = 0.0  # what training used (the model itself runs without)


def add_source_arguments(parser: Any) -> None:
    """--checkpoint, --init-from and --storage-path: how every CLI that loads a model
    names it (sample, eval). `parser` is a parser or an argument group."""
    from raygpt.config import default_storage_path

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
    state, weights, model_config, where = _load_checkpoint(path_or_run, storage_path)
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
    model = _gpt_from_weights(model_config, weights, where)
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
    model = GPT.from_pretrained(name_or_dir)
    data_info = export_data_facts(name_or_dir)
    if data_info is not None:
        meta = read_export_meta(Path(str(name_or_dir)).expanduser() / EXPORT_META_FILE)
        description = f"{name_or_dir} (export of {meta.get('source')})"
        step = meta.get("step") if isinstance(meta.get("step"), int) else None
    else:
        # Pretrained GPT-2 speaks GPT-2's BPE (a test's own small BPE stands in for it).
        if encoding is None:
            encoding = data.tokenizers.load_gpt2_encoding()
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
    if kind not in data.TOKENIZERS:
        raise UserError(
            f"{where} does not record its tokenizer (data.tokenizer is {kind!r}); "
            "its token ids cannot be matched to text"
        )
    if kind == "char" and not (
        isinstance(data_info.get("itos"), list)
        and all(isinstance(c, str) and len(c) == 1 for c in data_info["itos"])
    ):
        raise UserError(f"{where} lacks its character vocabulary (data.itos)")
    return data.tokenizer_from_meta(data_info, encoding=encoding)


def _load_checkpoint(
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
    saved = state.get("model_config")
    model_config = model_config_from_state(
        weights, state.get("config") or {}, where, saved if isinstance(saved, dict) else None
    )
    return state, weights, model_config, where


def _gpt_from_weights(model_config: GPTConfig, weights: dict[str, torch.Tensor], where: str) -> GPT:
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
    )


# --------------------------------------------------------------------------- init_from


def init_kind(init_from: str, storage_path: str = "~/ray_results") -> str:
    """What `init_from` names: "scratch", "hf" (a hub name or a Hugging Face directory)
    or "raygpt" (a checkpoint folder, its state.pt, a run folder, a run name under
    storage_path, or any of these on s3://, gs://)."""
    if init_from == "scratch":
        return "scratch"
    if "://" in init_from:
        return "raygpt"  # Hugging Face directories are read locally only
    path = Path(init_from).expanduser()
    if path.exists():
        if (path / "config.json").is_file():
            return "hf"
        if (
            path.name == checkpoint.STATE_FILE
            or (path / checkpoint.STATE_FILE).is_file()
            or checkpoint.latest_in_run(str(path)) is not None
        ):
            return "raygpt"
        raise UserError(
            f"init_from {init_from} holds neither a Hugging Face config.json nor a raygpt "
            "checkpoint (state.pt, or checkpoint_* folders); give gpt2, gpt2-medium, "
            "gpt2-large, gpt2-xl, a Hugging Face GPT-2 directory or a raygpt checkpoint or run"
        )
    if init_from.startswith((".", "/", "~")):
        raise UserError(
            f"init_from {init_from} does not exist; give a Hugging Face GPT-2 directory or a "
            "raygpt checkpoint or run folder"
        )
    if init_from in HUB_GPT2_NAMES:
        return "hf"
    if "/" not in init_from:  # a run name under storage_path, before a hub id
        try:
            checkpoint.resolve(init_from, storage_path)
            return "raygpt"
        except UserError:
            pass
    return "hf"  # any other hub id ("owner/name"); from_pretrained says if it cannot be had


def _tokenizer_identity(facts: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two tokenizers the same: token ids then mean the same text."""
    kind = facts.get("tokenizer")
    if kind == "char":
        return (kind, tuple(facts.get("itos") or ()))
    if kind == "bpe" and isinstance(facts.get("tokenizer_json"), str):
        return (kind, data.BPETokenizer(facts["tokenizer_json"]).sha256)
    return (kind, facts.get("vocab_size"))


def _describe_tokenizer(facts: dict[str, Any]) -> str:
    kind, size, dataset = facts.get("tokenizer"), facts.get("vocab_size"), facts.get("dataset")
    return f"the {size}-token {kind} tokenizer of {dataset}"


def _check_fit(
    init_from: str, n_positions: int, model_vocab: int, cfg: Any, vocab_size: int
) -> None:
    if vocab_size > model_vocab:
        raise UserError(
            f"data vocabulary ({vocab_size} tokens) is larger than {init_from}'s "
            f"({model_vocab}); use --tokenizer gpt2 with pretrained weights"
        )
    if cfg.block_size > n_positions:
        raise UserError(
            f"block_size={cfg.block_size} exceeds {init_from}'s context of "
            f"{n_positions}; use a block_size <= {n_positions}"
        )


def check_init_fit(cfg: Any, meta: dict[str, Any]) -> None:
    """Whether the weights `cfg.init_from` names fit the run's data (`meta`, load_meta's)
    and block size: one UserError line before Ray starts, not from a worker later.

    A raygpt checkpoint or a raygpt export must also have been trained with this data's
    tokenizer (the same characters, the same trained BPE): the same ids, the same text.
    Hub ids other than OpenAI's are checked only once loaded (`model_to_train`).
    """
    kind = init_kind(cfg.init_from, cfg.storage_path)
    if kind == "scratch":
        return
    if kind == "raygpt":
        state, _, model_config, where = _load_checkpoint(cfg.init_from, cfg.storage_path)
        facts = state.get("data") if isinstance(state.get("data"), dict) else {}
        shape = {"n_positions": model_config.block_size, "vocab_size": model_config.vocab_size}
    else:
        facts, where = export_data_facts(cfg.init_from), cfg.init_from
        shape = pretrained_shape(cfg.init_from)
    if facts is not None and _tokenizer_identity(facts) != _tokenizer_identity(meta):
        raise UserError(
            f"init_from {where} was trained with {_describe_tokenizer(facts)}, but this run's "
            f"data uses {_describe_tokenizer(meta)}; the same ids would mean other text: "
            "prepare the data with the same tokenizer, or start from scratch"
        )
    if shape is not None:
        _check_fit(
            cfg.init_from, shape["n_positions"], shape["vocab_size"], cfg, meta["vocab_size"]
        )


def model_to_train(cfg: Any, vocab_size: int) -> GPT:
    """The GPT a run with `init_from` starts from: pretrained Hugging Face GPT-2 weights or
    a raygpt checkpoint's (its model only: optimizer and step start afresh, as when
    finetuning; --resume is what continues a run). Its shape is the weights' own, with
    the run's dropout and its context cropped to the run's block_size."""
    if init_kind(cfg.init_from, cfg.storage_path) == "raygpt":
        _, weights, model_config, where = _load_checkpoint(cfg.init_from, cfg.storage_path)
        model_config.dropout = cfg.dropout
        model = _gpt_from_weights(model_config, weights, where)
    else:
        model = GPT.from_pretrained(cfg.init_from, {"dropout": cfg.dropout})
    # Again, once loaded: a hub id's shape is known only now.
    _check_fit(cfg.init_from, model.config.block_size, model.config.vocab_size, cfg, vocab_size)
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    return model
