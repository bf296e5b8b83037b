"""Small datasets, prepared once in this process into the machine's cache.

A registered small dataset or a local text file is read whole, tokenized as one
stream, and split nanoGPT's way: the last `val_fraction` of the tokens is the
validation split. Each split becomes one llm.c-format shard beside a manifest.json:
the one-shard case of the format large corpora use, so there is one reader.
The train/val token arrays are exactly those of raygpt's earlier flat files
(train.bin/val.bin), so batches, and the parity with nanoGPT, are unchanged.

Large corpora go through `prepare_corpus` (Ray Data) instead; see corpus.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from raygpt.config.choices import check_bpe_vocab_size
from raygpt.data.cache import data_root, discard, file_lock, safe_name
from raygpt.data.common import BPE_FILE, DEFAULT_DATASET, DEFAULT_VAL_FRACTION, TOKENIZERS
from raygpt.data.hub_corpora import CORPORA
from raygpt.data.manifest import (
    FORMAT,
    MANIFEST,
    build_manifest,
    load_meta,
    manifest_bytes,
    shard_name,
    versions,
)
from raygpt.data.shards import write_shard
from raygpt.data.sources import DATASETS, Source, read_data_file
from raygpt.data.tokenizers import (
    BPETokenizer,
    _tokenize,
    load_gpt2_encoding,
    train_bpe,
)
from raygpt.errors import UserError

log = logging.getLogger(__name__)


def _is_ready(dataset_dir: Path) -> bool:
    """A complete raygpt dataset (an old flat train.bin/meta.json cache is not one)."""
    try:
        return load_meta(dataset_dir)["format"] == FORMAT
    except UserError:
        return False


def _write_dataset(tmp: Path, ids: np.ndarray, meta: dict, val_fraction: float) -> dict:
    """The contiguous tail split of `ids`, as one shard per split plus the manifest.

    `meta` holds the dataset name, the tokenizer fields and the source fields.
    """
    n = len(ids)
    split_at = int(n * (1.0 - val_fraction))
    parts = {"train": ids[:split_at], "val": ids[split_at:]}
    if len(parts["train"]) < 2 or len(parts["val"]) < 2:
        raise UserError(
            f"dataset {meta['dataset']} has only {n} tokens, too few to split into train and "
            f"val with val_fraction {val_fraction:g}; use a longer text"
        )
    tok_keys = ("tokenizer", "vocab_size", "dtype", "itos", "encoding", "encoding_sha256")
    tokenizer = {k: meta[k] for k in (*tok_keys, "eos_token", "tokenizer_sha256") if k in meta}
    if meta["tokenizer"] == "bpe":
        # The trained BPE is part of the data: a file beside the shards, named by the manifest.
        (tmp / BPE_FILE).write_text(meta["tokenizer_json"], encoding="utf-8")
        tokenizer["tokenizer_file"] = BPE_FILE
    shards = {}
    for split, tokens in parts.items():
        name = shard_name(split, 0)
        sha = write_shard(str(tmp / name), tokens, meta["dtype"])
        shards[split] = [{"file": name, "tokens": len(tokens), "sha256": sha}]
    manifest = build_manifest(
        dataset=meta["dataset"],
        tokenizer=tokenizer,
        shards=shards,
        val_split={
            "method": "tail",
            "fraction": val_fraction,
            "rule": "the contiguous tail, as nanoGPT splits: val = tokens[int(n x (1 - fraction)):]",
        },
        source={
            "description": meta["source"],
            "sha256": meta["source_sha256"],
            **{k: v for k, v in meta.items() if k == "python_version"},
        },
        made_by=versions(*{"gpt2": ["tiktoken"], "bpe": ["tokenizers"]}.get(meta["tokenizer"], [])),
    )
    part = tmp / f"{MANIFEST}.part"
    part.write_bytes(manifest_bytes(manifest))
    os.replace(part, tmp / MANIFEST)  # written last: marks the directory complete
    return manifest


def prepare(
    dataset: str | None = DEFAULT_DATASET,
    *,
    data_file: str | Path | None = None,
    tokenizer: str = "char",
    data_dir: str | Path | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    encoding: Any = None,
    vocab_size: int | None = None,
) -> Path:
    """Prepare a dataset once (cached) and return its directory.

    `dataset` names a registered dataset; `data_file` (with `tokenizer` "char", "gpt2"
    or "bpe") uses a local UTF-8 text, or JSONL with a "text" field per line, instead.
    For registered datasets the tokenizer is the dataset's own, or "bpe". "bpe" trains
    a byte-level BPE of `vocab_size` tokens on the text (see tokenizers.train_bpe),
    stored with the dataset. A large corpus (fineweb_edu, openwebtext) is returned once
    `python -m raygpt.data prepare --dataset NAME` has made it. `encoding` injects a
    tiktoken Encoding for gpt2 (tests), or, for bpe, a BPETokenizer to use instead of
    training one (to score a model's own BPE on new text).
    """
    if tokenizer not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {tokenizer!r}; use one of: {', '.join(TOKENIZERS)}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    given_bpe = tokenizer == "bpe" and isinstance(encoding, BPETokenizer)
    if tokenizer == "bpe" and not given_bpe:
        check_bpe_vocab_size(vocab_size)
    elif vocab_size is not None and tokenizer != "bpe":
        raise UserError(
            f"vocab_size={vocab_size} is for --tokenizer bpe only; the {tokenizer} "
            "tokenizer's vocabulary is fixed by the text or the encoding"
        )
    # A trained BPE's cache name says its size (or which given BPE), so sizes never collide.
    tok_tag = tokenizer
    if tokenizer == "bpe":
        tok_tag = f"bpe-{encoding.sha256[:12]}" if given_bpe else f"bpe{vocab_size}"

    if data_file is not None:
        if dataset not in (None, DEFAULT_DATASET):
            raise UserError(
                f"give either --dataset ({dataset}) or --data-file ({data_file}), not both"
            )
        path = Path(data_file).expanduser()
        documents, sha = read_data_file(path)
        stem = Path(path.stem).stem if path.suffix.lower() == ".gz" else path.stem
        name = f"file-{safe_name(stem)}-{sha[:12]}-{tok_tag}"
        src = Source(documents=documents, description=str(path.resolve()))

        def build(root: Path) -> Source:
            return src

        tok = tokenizer
    else:
        dataset = dataset or DEFAULT_DATASET
        if dataset in CORPORA:
            return _prepared_corpus(dataset, data_dir)
        spec = DATASETS.get(dataset)
        if spec is None:
            raise UserError(
                f"unknown dataset {dataset!r}; available: {', '.join([*DATASETS, *CORPORA])} "
                "(or pass --data-file PATH)"
            )
        if tokenizer not in ("char", "bpe", spec.tokenizer):
            others = [n for n, s in DATASETS.items() if s.tokenizer == tokenizer]
            raise UserError(
                f"dataset {dataset} uses the {spec.tokenizer} tokenizer, not {tokenizer}; "
                f"choose another dataset ({', '.join(others) or 'none'}) or use --data-file"
            )
        name, build, tok = spec.name, spec.build, spec.tokenizer
        if tokenizer == "bpe":  # any registered text, with a BPE trained on it
            name, tok = f"{spec.name}-{tok_tag}", "bpe"
    if val_fraction != DEFAULT_VAL_FRACTION:
        name += f"-val{val_fraction:g}"

    root = data_root(data_dir)
    final = root / name
    if _is_ready(final):
        return final
    with file_lock(root / f".{name}.lock"):
        if _is_ready(final):
            return final  # another process finished it while we waited
        if final.exists():
            log.warning("replacing incomplete or corrupt dataset directory %s", final)
            discard(final)
        if tok == "gpt2" and encoding is None:
            encoding = load_gpt2_encoding()
        source = build(root)
        if tok == "bpe" and not given_bpe:
            encoding = train_bpe(source.documents, vocab_size)
        ids, tok_meta = _tokenize(source, tok, encoding)
        meta: dict[str, Any] = {
            "dataset": name,
            **tok_meta,
            "source": source.description,
            "source_sha256": hashlib.sha256(source.text().encode("utf-8")).hexdigest(),
            **source.extra_meta,
        }
        tmp = root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            _write_dataset(tmp, ids, meta, val_fraction)
            try:
                os.rename(tmp, final)
            except OSError:
                if not _is_ready(final):  # not a lost race: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    load_meta(final)
    return final


def _prepared_corpus(name: str, data_dir: str | Path | None) -> Path:
    """A large corpus's folder in the cache, once `prepare --dataset NAME` has made it."""
    final = data_root(data_dir) / name
    if not _is_ready(final):
        raise UserError(
            f"dataset {name} is not prepared in {final.parent}: it is large, so it is "
            f"tokenized across the Ray cluster once, by `python -m raygpt.data prepare "
            f"--dataset {name}` (or give --dataset-dir with a prepared copy)"
        )
    return final


def prepare_from_config(cfg: Any) -> tuple[Path | str, dict]:
    """The dataset folder of a run config (a TrainConfig) and its `load_meta`.

    `dataset_dir` (a prepared folder, llm.c shards or nanoGPT's train.bin/val.bin,
    local or on object storage) is used as it is; else a data file takes precedence
    over the dataset name, prepared (once) into the cache.
    """
    dataset_dir = getattr(cfg, "dataset_dir", None)
    if dataset_dir:
        return dataset_dir, load_meta(dataset_dir)
    prepared = prepare(
        cfg.dataset if cfg.data_file is None else None,
        data_file=cfg.data_file,
        tokenizer=cfg.tokenizer,
        data_dir=cfg.data_dir,
        vocab_size=getattr(cfg, "vocab_size", None),
    )
    return prepared, load_meta(prepared)
