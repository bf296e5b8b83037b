"""What a dataset folder holds, and the one description of it the rest of raygpt reads.

Three kinds of folder load, locally or on object storage (s3://, gs://):

* raygpt's: ``manifest.json`` (the tokenizer with its vocabulary or BPE identity,
  every shard with its token count and sha256, the validation split, the source and
  the versions that made it) beside llm.c-format shards, and the ``tokenizer.json``
  of a BPE trained on the data. The manifest is written last, so its presence marks
  the folder complete.
* llm.c's or modded-nanogpt's shards without a manifest (``*train*.bin``,
  ``*val*.bin``, in name order): GPT-2 BPE, or llama-3 for llm.c's uint32 shards.
* nanoGPT's headerless uint16 ``train.bin`` and ``val.bin`` (its ``meta.pkl``, if
  present, gives the vocabulary; otherwise GPT-2 BPE).

`load_meta` turns any of them into one flat dict (`dataset`, `tokenizer`,
`vocab_size`, `dtype`, `train_tokens`, `val_tokens`, `shards`, ...), checking every
shard's header and size. sha256s are checked for local shards small enough to hash in
a moment (`VERIFY_LIMIT_BYTES`); `python -m raygpt.data verify` checks any size.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from raygpt.data.common import GPT2_VOCAB_SIZE, LLAMA3_VOCAB_SIZE, SPLITS, TOKENIZERS, one_line
from raygpt.data.shards import (
    HEADER_BYTES,
    MAGIC,
    WRITE_VERSION,
    choose_dtype,
    fs_sha256,
    read_header,
)
from raygpt.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "raygpt-token-shards"
FORMAT_VERSION = 1
RECEIPTS = "receipts"  # per-work-unit records of an unfinished (or finished) prepare_corpus
SHARD_NAME = re.compile(r"^(train|val)_(\d{6})\.bin$")
VERIFY_LIMIT_BYTES = 256 << 20

_verified: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) hashed in this process


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def versions(*extra: str) -> dict[str, str]:
    """Versions of what made a dataset (raygpt, Python, numpy, and `extra` modules)."""
    import importlib.metadata

    import raygpt

    out = {"raygpt": raygpt.__version__, "python": ".".join(map(str, sys.version_info[:3]))}
    for name in ("numpy", *extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def build_manifest(
    *,
    dataset: str,
    tokenizer: dict[str, Any],
    shards: dict[str, list[dict[str, Any]]],
    val_split: dict[str, Any],
    source: dict[str, Any],
    made_by: dict[str, str],
) -> dict[str, Any]:
    """The manifest of a dataset: `tokenizer` holds tokenizer, vocab_size, dtype and
    itos (char), or encoding, encoding_sha256, eos_token (GPT-2 BPE), or tokenizer_file,
    tokenizer_sha256, eos_token (a trained BPE, "bpe"); `shards` per split
    [{file, tokens, sha256}] in reading order."""
    dtype = tokenizer["dtype"]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "tokenizer": tokenizer,
        "shard_format": {
            "header": "256 little-endian int32: magic, version, token count, zeros",
            "magic": MAGIC,
            "version": WRITE_VERSION[dtype],
            "dtype": dtype,
        },
        "splits": {
            split: {"tokens": sum(s["tokens"] for s in shards[split]), "shards": shards[split]}
            for split in SPLITS
        },
        "val_split": val_split,
        "source": source,
        "versions": made_by,
    }


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


# --------------------------------------------------------------------------- locations


class Location:
    """A dataset folder: a local path, or a URI on object storage."""

    def __init__(self, dataset_dir: str | Path):
        text = str(dataset_dir)
        if "://" in text:
            from raygpt import storage

            store = storage.resolve(text, check=False)
            self.fs, self.root, self.local = store.fs, store.root, False
            self.uri = store.uri
            self._display = store.display
        else:
            import pyarrow.fs as pafs

            path = Path(text).expanduser().absolute()
            self.fs, self.root, self.local = pafs.LocalFileSystem(), str(path), True
            self.uri = str(path)
            self._display = None

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def display(self, fs_path: str | None = None) -> str:
        fs_path = self.root if fs_path is None else fs_path
        return self._display(fs_path) if self._display else fs_path

    def names(self) -> list[str] | None:
        """Sorted file names in the folder; None when it does not exist."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.root)
        if info.type != pafs.FileType.Directory:
            return None
        selector = pafs.FileSelector(self.root, recursive=False)
        return sorted(i.base_name for i in self.fs.get_file_info(selector))

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name), compression=None) as stream:
            return stream.read()


def _prepare_hint(location: Location) -> str:
    from raygpt.data.hub_corpora import CORPORA
    from raygpt.data.sources import DATASETS

    name = location.root.rstrip("/").rsplit("/", 1)[-1]
    if name in DATASETS or name in CORPORA:
        cmd = f"python -m raygpt.data prepare --dataset {name}"
    else:
        cmd = "python -m raygpt.data prepare ..."
    return f"re-run `{cmd}` or delete {location.display()}"


# --------------------------------------------------------------------------- load_meta


def load_meta(dataset_dir: str | Path, *, verify: bool | None = None) -> dict:
    """The flat description of a dataset folder (any of the three kinds), checked.

    `verify`: hash every shard against the manifest (True), never (False), or when the
    shards are local and at most VERIFY_LIMIT_BYTES in all (None).
    """
    location = Location(dataset_dir)
    names = location.names()
    if names is None:
        raise UserError(
            f"dataset directory {location.display()} does not exist; "
            "run `python -m raygpt.data prepare`"
        )
    if MANIFEST in names:
        return _from_manifest(location, verify)
    unfinished = RECEIPTS in names or any(SHARD_NAME.match(n) for n in names)
    if not unfinished:
        if found := _from_llmc_shards(location, names):
            return found
        if {"train.bin", "val.bin"} <= set(names):
            return _from_nanogpt_bins(location, names)
    raise UserError(
        f"{location.display(location.path(MANIFEST))} is missing (dataset not prepared or "
        f"incomplete); {_prepare_hint(location)}"
        if unfinished or not names
        else f"{location.display()} holds no {MANIFEST}, no llm.c shards (*train*.bin, "
        "*val*.bin) and no nanoGPT train.bin/val.bin; give a prepared dataset folder"
    )


def _from_manifest(location: Location, verify: bool | None) -> dict:
    where = location.display(location.path(MANIFEST))
    hint = _prepare_hint(location)

    def bad(problem: str) -> UserError:
        return UserError(f"{where} {problem}; {hint}")

    try:
        manifest = json.loads(location.read_bytes(MANIFEST).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"is unreadable or not valid JSON ({one_line(exc)})") from exc
    if not isinstance(manifest, dict):
        raise bad("is not a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise bad(
            f"has format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    for key in ("dataset", "tokenizer", "splits", "val_split", "source"):
        if key not in manifest:
            raise bad(f"lacks the field {key!r}")
    tok = manifest["tokenizer"]
    if not isinstance(tok, dict) or tok.get("tokenizer") not in TOKENIZERS:
        raise bad(f"has an unknown tokenizer {tok!r}")
    vocab = tok.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise bad(f"has invalid vocab_size {vocab!r}")
    if tok.get("dtype") != choose_dtype(vocab):
        raise bad(f"has dtype {tok.get('dtype')!r}, which does not fit vocab_size {vocab}")
    if tok["tokenizer"] == "char":
        itos = tok.get("itos")
        if (
            not isinstance(itos, list)
            or len(itos) != vocab
            or not all(isinstance(c, str) and len(c) == 1 for c in itos)
            or len(set(itos)) != len(itos)
        ):
            raise bad("has an invalid itos (expected vocab_size distinct single characters)")
    if tok["tokenizer"] == "bpe":
        tok = {**tok, "tokenizer_json": _trained_bpe(location, tok, bad)}

    shards: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        entry = manifest["splits"].get(split) if isinstance(manifest["splits"], dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
            raise bad(f"lacks the {split} split's shards")
        shards[split] = []
        for s in entry["shards"]:
            if not (
                isinstance(s, dict)
                and isinstance(s.get("file"), str)
                and "/" not in s["file"]
                and isinstance(s.get("tokens"), int)
                and s["tokens"] >= 0
                and isinstance(s.get("sha256"), str)
            ):
                raise bad(f"has an invalid {split} shard entry {s!r}")
            shards[split].append(
                {"path": location.path(s["file"]), "tokens": s["tokens"], "offset": HEADER_BYTES}
            )
    total = _check_shards(location, manifest, shards, hint)
    if verify or (verify is None and location.local and total <= VERIFY_LIMIT_BYTES):
        _verify_sha256(location, manifest, hint)

    source = manifest["source"] if isinstance(manifest["source"], dict) else {}
    val_split = manifest["val_split"] if isinstance(manifest["val_split"], dict) else {}
    meta = {
        "format": FORMAT,
        "dataset": manifest["dataset"],
        **tok,
        "train_tokens": sum(s["tokens"] for s in shards["train"]),
        "val_tokens": sum(s["tokens"] for s in shards["val"]),
        "val_fraction": val_split.get("fraction"),
        "source": source.get("description"),
        "source_sha256": source.get("sha256"),
        **{k: v for k, v in source.items() if k in ("python_version",)},
    }
    return {**meta, "location": location.uri, "shards": shards}


def _trained_bpe(location: Location, tok: dict[str, Any], bad: Any) -> str:
    """The tokenizer.json a trained-BPE dataset carries, checked against its sha256."""
    import hashlib

    name = tok.get("tokenizer_file")
    if not isinstance(name, str) or "/" in name:
        raise bad(f"names no valid tokenizer_file ({name!r}) for its trained BPE")
    try:
        raw = location.read_bytes(name)
    except (OSError, FileNotFoundError) as exc:
        raise bad(f"names {name}, which cannot be read ({one_line(exc)})") from None
    if hashlib.sha256(raw).hexdigest() != tok.get("tokenizer_sha256"):
        raise bad(f"records another sha256 for {name} than the file has (changed or damaged)")
    return raw.decode("utf-8")


def _check_shards(
    location: Location, manifest: dict, shards: dict[str, list[dict]], hint: str
) -> int:
    """Every shard's header and size against the manifest; their total size in bytes.

    On object storage each check is a request or two, so they run 16 at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    dtype = manifest["tokenizer"]["dtype"]
    entries = [s for split in SPLITS for s in shards[split]]

    def check(s: dict) -> int:
        where = location.display(s["path"])
        try:
            head = read_header(location.fs, s["path"], where)
        except UserError as exc:
            raise UserError(f"{exc}; {hint}") from None
        except OSError as exc:
            raise UserError(f"cannot read {where} ({one_line(exc)}); {hint}") from None
        if head.dtype != dtype or head.tokens != s["tokens"]:
            raise UserError(
                f"{where} holds {head.tokens} {head.dtype} tokens but {MANIFEST} says "
                f"{s['tokens']} {dtype}; the file is truncated or corrupt; {hint}"
            )
        return head.size

    if location.local or len(entries) < 2:
        return sum(map(check, entries))
    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(check, entries))


def _verify_sha256(location: Location, manifest: dict, hint: str) -> None:
    import pyarrow.fs as pafs

    for split in SPLITS:
        for s in manifest["splits"][split]["shards"]:
            path = location.path(s["file"])
            info = location.fs.get_file_info(path)
            key = (location.uri + "/" + s["file"], info.size, info.mtime_ns or 0)
            if location.local and key in _verified:
                continue
            digest = fs_sha256(location.fs, path)
            if digest != s["sha256"]:
                raise UserError(
                    f"{location.display(path)} has sha256 {digest[:16]}... but {MANIFEST} says "
                    f"{s['sha256'][:16]}...; the shard was changed or damaged; {hint}"
                )
            if info.type == pafs.FileType.File:
                _verified.add(key)


def _from_llmc_shards(location: Location, names: list[str]) -> dict | None:
    """llm.c / modded-nanogpt shards without a manifest, or None if there are none."""
    bins = [n for n in names if n.endswith(".bin")]
    split_of = {n: ("val" if "val" in n else "train" if "train" in n else None) for n in bins}
    candidates = [n for n in bins if split_of[n]]
    if not candidates or (set(candidates) == {"train.bin", "val.bin"} and _headerless(location)):
        return None
    shards: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    dtypes = set()
    for name in candidates:
        path = location.path(name)
        head = read_header(location.fs, path, location.display(path))
        dtypes.add(head.dtype)
        shards[split_of[name]].append({"path": path, "tokens": head.tokens, "offset": HEADER_BYTES})
    for split in SPLITS:
        if not shards[split]:
            raise UserError(
                f"{location.display()} has llm.c shards but none for the {split} split "
                f"(a file name with '{split}' in it)"
            )
    if len(dtypes) > 1:
        raise UserError(f"{location.display()} mixes uint16 and uint32 shards")
    dtype = dtypes.pop()
    llama = dtype == "uint32"
    return {
        "format": "llm.c",
        "dataset": location.root.rstrip("/").rsplit("/", 1)[-1],
        "tokenizer": "llama-3" if llama else "gpt2",
        "encoding": "llama-3" if llama else "gpt2",
        "vocab_size": LLAMA3_VOCAB_SIZE if llama else GPT2_VOCAB_SIZE,
        "dtype": dtype,
        "eos_token": 128001 if llama else GPT2_VOCAB_SIZE - 1,
        "train_tokens": sum(s["tokens"] for s in shards["train"]),
        "val_tokens": sum(s["tokens"] for s in shards["val"]),
        "source": f"llm.c shards in {location.display()}",
        "source_sha256": None,
        "location": location.uri,
        "shards": shards,
    }


def _headerless(location: Location) -> bool:
    """Whether train.bin starts with something other than a shard magic (nanoGPT's)."""
    with location.fs.open_input_file(location.path("train.bin")) as f:
        raw = f.read_at(min(f.size(), 4), 0)
    return len(raw) < 4 or int(np.frombuffer(raw, "<i4")[0]) not in (MAGIC, 20240801)


class _PlainData(pickle.Unpickler):
    """Reads nanoGPT's meta.pkl as data: a pickle that names any class or function is
    refused, so opening a dataset never runs code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it refers to {module}.{name}; only plain data is read")


def _from_nanogpt_bins(location: Location, names: list[str]) -> dict:
    """nanoGPT's train.bin/val.bin: headerless uint16, vocabulary from meta.pkl or GPT-2."""
    meta: dict[str, Any] = {"tokenizer": "gpt2", "encoding": "gpt2", "vocab_size": GPT2_VOCAB_SIZE}
    meta["eos_token"] = GPT2_VOCAB_SIZE - 1
    if "meta.pkl" in names:
        where = location.display(location.path("meta.pkl"))
        try:
            import io

            raw = _PlainData(io.BytesIO(location.read_bytes("meta.pkl"))).load()
            vocab = int(raw["vocab_size"])
            itos = raw.get("itos")
            if isinstance(itos, dict):
                itos = [itos[i] for i in range(vocab)]
        except Exception as exc:  # any malformed pickle: one line
            raise UserError(f"{where} is not nanoGPT's meta.pkl ({one_line(exc)})") from None
        meta = {"tokenizer": "char", "vocab_size": vocab, "eos_token": None}
        if isinstance(itos, list) and len(itos) == vocab:
            meta["itos"] = itos
        else:
            meta["tokenizer"] = "unknown"
    if choose_dtype(meta["vocab_size"]) != "uint16":
        raise UserError(f"{location.display()}: nanoGPT's .bin files hold uint16 tokens only")
    shards: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        path = location.path(f"{split}.bin")
        size = location.fs.get_file_info(path).size
        if size % 2:
            raise UserError(
                f"{location.display(path)} has an odd number of bytes ({size}), so it is not "
                "uint16 tokens; the file is truncated or corrupt"
            )
        shards[split] = [{"path": path, "tokens": size // 2, "offset": 0}]
    return {
        "format": "nanogpt",
        "dataset": location.root.rstrip("/").rsplit("/", 1)[-1],
        **meta,
        "dtype": "uint16",
        "train_tokens": shards["train"][0]["tokens"],
        "val_tokens": shards["val"][0]["tokens"],
        "source": f"nanoGPT train.bin/val.bin in {location.display()}",
        "source_sha256": None,
        "location": location.uri,
        "shards": shards,
    }
