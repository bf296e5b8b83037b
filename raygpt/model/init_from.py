"""The model a run starts from: a fresh GPT from its config, or the weights `init_from`
names (Hugging Face GPT-2, or a raygpt checkpoint's model), checked against the run's
data and block size before Ray starts (check_init_fit) and again once loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raygpt import checkpoint
from raygpt.data import tokenizers
from raygpt.errors import UserError
from raygpt.model import hf, loading, parametrization
from raygpt.model.gpt import GPT, GPTConfig
from raygpt.model.hf import HUB_GPT2_NAMES, pretrained_shape
from raygpt.model.sizes import padded_vocab_size


def build_model(cfg: Any, vocab_size: int) -> GPT:
    """The GPT a run starts from: fresh from the config (scratch), or the weights
    `init_from` names (model_to_train)."""
    if cfg.init_from == "scratch":
        return GPT(
            GPTConfig(
                block_size=cfg.block_size,
                vocab_size=padded_vocab_size(vocab_size),
                n_layer=cfg.n_layer,
                n_head=cfg.n_head,
                n_embd=cfg.n_embd,
                dropout=cfg.dropout,
                bias=cfg.bias,
                **parametrization.config_keys(cfg),
            )
        )
    return model_to_train(cfg, vocab_size)


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
        return (kind, tokenizers.BPETokenizer(facts["tokenizer_json"]).sha256)
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
        state, _, model_config, where = loading.load_checkpoint_weights(
            cfg.init_from, cfg.storage_path
        )
        facts = state.get("data") if isinstance(state.get("data"), dict) else {}
        shape = {"n_positions": model_config.block_size, "vocab_size": model_config.vocab_size}
        loading.check_same_parametrization(cfg, model_config, where)
    else:
        facts, where = loading.export_data_facts(cfg.init_from), cfg.init_from
        shape = pretrained_shape(cfg.init_from)
        loading.check_same_parametrization(cfg, GPTConfig(), where)  # Hugging Face GPT-2 is sp
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
        _, weights, model_config, where = loading.load_checkpoint_weights(
            cfg.init_from, cfg.storage_path
        )
        loading.check_same_parametrization(cfg, model_config, where)
        model_config.dropout = cfg.dropout
        model = loading.gpt_from_weights(model_config, weights, where)
    else:
        model = hf.from_pretrained(cfg.init_from, {"dropout": cfg.dropout})
        loading.check_same_parametrization(cfg, model.config, cfg.init_from)
        checkpoint.check_finite(model, f"init_from {cfg.init_from}", "use other weights")
    # Again, once loaded: a hub id's shape is known only now.
    _check_fit(cfg.init_from, model.config.block_size, model.config.vocab_size, cfg, vocab_size)
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    return model
