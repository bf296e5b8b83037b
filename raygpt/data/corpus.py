"""Large corpora: tokenized across the Ray cluster with Ray Data into llm.c shards.

The pipeline is ``ray.data.from_items(work units)`` then ``map_batches``: one task
per unit, at most one per CPU, streams the unit's documents through tiktoken
(``encode_ordinary_batch``; on one thread, the same calls without its thread pool)
into the unit's own shards.

Why work units, not ``read_parquet``/``read_json`` blocks: shard contents must not
depend on how many workers ran or how Ray cut the input into blocks (which follows
the cluster's size and Ray's own block-size targets). A unit comes from the input
listing alone (Parquet row groups, newline-aligned byte ranges; see inputs.py), its
documents are read in file order, and it writes its own shards (one per split), so
the output is byte-identical on 1 worker or 64, and units are written in parallel
with no coordination. ``preserve_order`` would give the same bytes, but only by
funnelling every token through one writer.

* **Split:** each document goes to val when a 64-bit blake2b hash of its UTF-8 text is
  below ``val_fraction x 2^64``: by content, never by arrival order, and exact
  duplicates land on the same side. Every document is followed by <|endoftext|>.
* **Resumable:** a unit's receipt (``receipts/NNNNNN.json``: its inputs' fingerprint,
  shards, sizes and sha256s) is written after its shards. A rerun keeps each unit
  whose receipt matches and whose shards still hash right, and redoes the rest.
  ``manifest.json`` is written last, when every unit is done.
* **Memory:** the driver holds the unit list and one receipt per unit, never tokens
  or text, so its peak RSS does not grow with the corpus; a worker holds one read
  step (2 MB of text or 256 Parquet rows) and its tokens at a time.
* **Bad input** (a missing column, text that is not UTF-8, an empty corpus) is one
  UserError; what was written is new files only, and an existing finished dataset of
  other inputs is never replaced without ``overwrite``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from raygpt.data.cache import data_root, file_lock
from raygpt.data.common import DEFAULT_VAL_FRACTION, EOT, SPLITS, one_line
from raygpt.data.inputs import iter_documents, list_inputs, plan_units
from raygpt.data.manifest import (
    MANIFEST,
    RECEIPTS,
    SHARD_NAME,
    build_manifest,
    manifest_bytes,
    shard_name,
    versions,
)
from raygpt.data.shards import ShardWriter, fs_sha256, read_header
from raygpt.data.tokenizers import (
    bpe_meta,
    encoding_from_json,
    encoding_sha256,
    encoding_to_json,
    load_gpt2_encoding,
)
from raygpt.errors import UserError
from raygpt.run_folder import check_name

DEFAULT_UNIT_MB = 256  # of input text per work unit: ~60M GPT-2 tokens, a ~120 MB shard
ENCODING_FILE = f"{RECEIPTS}/encoding.json"  # the BPE ranks, for the workers
SPLIT_HASH = "blake2b-64 of the document's UTF-8 text, little-endian, < fraction x 2^64"


def _is_val(text: str, threshold: int) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < threshold


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- one unit


def _receipt_path(out: Any, index: int) -> str:
    return out.path(RECEIPTS, f"{index:06d}.json")


def _intact(out: Any, receipt: dict[str, Any]) -> bool:
    """Whether every shard a receipt names is there, whole, with its sha256."""
    for entry in receipt["shards"].values():
        if entry is None:
            continue
        path = out.path(entry["file"])
        try:
            if read_header(out.fs, path).tokens != entry["tokens"]:
                return False
            if fs_sha256(out.fs, path) != entry["sha256"]:
                return False
        except (UserError, OSError):
            return False
    return True


def run_unit(unit: dict[str, Any], enc: Any, settings: dict[str, Any], out: Any) -> dict:
    """Tokenize one work unit into its shards (or keep them, if already done); return
    its receipt. `out` is the output Storage."""
    index = unit["index"]
    receipt_path = _receipt_path(out, index)
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
        old = json.loads(out.read_bytes(receipt_path))
        if old["fingerprint"] == unit["fingerprint"] and _intact(out, old):
            return {**old, "reused": True}

    threshold = int(settings["val_fraction"] * 2**64)
    eot, dtype = settings["eot"], settings["dtype"]
    scratch = None if out.is_local else tempfile.mkdtemp(prefix="raygpt-shards-")
    writers: dict[str, ShardWriter] = {}
    documents = dict.fromkeys(SPLITS, 0)

    def writer(split: str) -> ShardWriter:
        if split not in writers:
            name = f".{shard_name(split, index)}.{uuid.uuid4().hex[:12]}.tmp"
            folder = out.root if scratch is None else scratch
            writers[split] = ShardWriter(os.path.join(folder, name), dtype)
        return writers[split]

    try:
        for texts in iter_documents(unit, settings["text_column"]):
            if settings["threads"] > 1:
                token_lists = enc.encode_ordinary_batch(texts, num_threads=settings["threads"])
            else:  # what encode_ordinary_batch does, without a thread pool per call (~8%)
                token_lists = list(map(enc.encode_ordinary, texts))
            flat: dict[str, list[int]] = {split: [] for split in SPLITS}
            for text, tokens in zip(texts, token_lists, strict=True):
                split = "val" if _is_val(text, threshold) else "train"
                flat[split].extend(tokens)
                flat[split].append(eot)
                documents[split] += 1
            for split, tokens in flat.items():
                if tokens:
                    writer(split).append(np.array(tokens, dtype=dtype))
        shards: dict[str, dict[str, Any] | None] = dict.fromkeys(SPLITS)
        for split, w in writers.items():
            sha = w.close()
            final = out.path(shard_name(split, index))
            if out.is_local:
                os.replace(w.path, final)
            else:
                out.upload_file(w.path, final)
            shards[split] = {"file": shard_name(split, index), "tokens": w.tokens, "sha256": sha}
    finally:
        for w in writers.values():
            with contextlib.suppress(OSError, ValueError):
                w.abort()
        if scratch is not None:
            with contextlib.suppress(OSError):
                os.rmdir(scratch)
    receipt = {
        "index": index,
        "fingerprint": unit["fingerprint"],
        "documents": documents,
        "shards": shards,
    }
    out.write_bytes(receipt_path, json.dumps(receipt, indent=1).encode())
    return receipt


_ENCODINGS: dict[str, Any] = {}  # per worker process, by sha256: built once, reused


def _encoding(settings: dict[str, Any], out: Any) -> Any:
    """The run's BPE encoding, from the output folder where the driver left it (every
    node sees that folder; the ranks then travel once per process, not per unit)."""
    sha = settings["encoding_sha256"]
    if sha not in _ENCODINGS:
        enc = encoding_from_json(json.loads(out.read_bytes(out.path(ENCODING_FILE))))
        if encoding_sha256(enc) != sha:
            raise RuntimeError("the encoding in the output folder changed during the prepare")
        _ENCODINGS[sha] = enc
    return _ENCODINGS[sha]


def _tokenize_units(
    batch: dict[str, np.ndarray], settings: dict[str, Any], out: Any
) -> dict[str, np.ndarray]:
    """The Ray Data map: work units in, receipts (JSON) out."""
    enc = _encoding(settings, out)
    receipts = []
    for text in batch["unit"]:
        unit = json.loads(str(text))
        started = time.perf_counter()
        try:
            receipt = run_unit(unit, enc, settings, out)
        except UserError as exc:  # returned, not raised: one line, no worker traceback
            receipt = {"index": unit["index"], "error": str(exc)}
        except OSError as exc:
            receipt = {"index": unit["index"], "error": f"storage failed ({one_line(exc)})"}
        receipt["seconds"] = time.perf_counter() - started
        receipts.append(json.dumps(receipt))
    return {"receipt": np.array(receipts, dtype=object)}


# --------------------------------------------------------------------------- driver


def _out_state(out: Any) -> tuple[str, dict | None]:
    """("empty" | "complete" | "partial" | "foreign", the manifest if complete)."""
    names = [n for n in out.list_dir(out.root) if not n.startswith(".")]
    if not names:
        return "empty", None
    if MANIFEST in names:
        with contextlib.suppress(OSError, ValueError):
            return "complete", json.loads(out.read_bytes(out.path(MANIFEST)))
        return "partial", None
    if RECEIPTS in names or any(SHARD_NAME.match(n) for n in names):
        return "partial", None
    return "foreign", None


def _final_name(out: str) -> str:
    """The last folder name of an output path or URI as written ('..' stays '..')."""
    path = out.split("?", 1)[0].split("://", 1)[-1]
    return path.rstrip("/").rsplit("/", 1)[-1] or out


def prepare_corpus(
    inputs: list[str],
    out: str | None = None,
    *,
    name: str | None = None,
    encoding: Any = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    text_column: str = "text",
    input_format: str = "auto",
    workers: int | None = None,
    unit_mb: float = DEFAULT_UNIT_MB,
    address: str | None = None,
    overwrite: bool = False,
    data_dir: str | None = None,
    description: str | None = None,
) -> str:
    """Tokenize a large corpus into `out` across the Ray cluster; return `out`.

    `inputs`: local or s3://, gs:// files, folders or globs (Parquet, JSONL, text).
    `out`: a folder or URI (default: the data cache, under `name`). `encoding`: a
    tiktoken Encoding (default GPT-2's). `workers`: units tokenized at once, one CPU
    each (default: every CPU of the cluster). `address`: the Ray cluster, as
    `raygpt.train --address` (default: the running one, else a private one).
    """
    from raygpt import storage
    from raygpt.cluster.connect import connect

    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if not unit_mb > 0:
        raise UserError(f"--unit-mb must be > 0, got {unit_mb}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if name is not None:  # it names the default output folder: one plain folder name
        check_name(name, "dataset name")
    if out is not None:  # `--out /`, `--out ..` or a hidden folder: never a dataset's own
        check_name(_final_name(out), f"--out {out}: folder name")
    enc = encoding if encoding is not None else load_gpt2_encoding()
    tokenizer = bpe_meta(enc)
    if tokenizer["eos_token"] is None:
        raise UserError(f"the BPE encoding {enc.name!r} has no {EOT} token to end documents")
    unit_bytes = max(1, int(unit_mb * (1 << 20)))

    files = list_inputs(list(inputs), input_format)
    if not any(f.size for f in files):
        raise UserError(f"the inputs ({', '.join(inputs)}) are empty: no documents to prepare")
    units = plan_units(files, unit_bytes, text_column)
    if not units:
        raise UserError(f"the inputs ({', '.join(inputs)}) hold no rows: no documents to prepare")
    settings = {
        "text_column": text_column,
        "val_fraction": val_fraction,
        "eot": tokenizer["eos_token"],
        "dtype": tokenizer["dtype"],
        "encoding_sha256": tokenizer["encoding_sha256"],
        "unit_bytes": unit_bytes,
        "threads": 1,
    }
    listing = [[f.display, f.size, f.mtime_ns, f.format, f.compression] for f in files]
    fingerprint = _sha256_json({"files": listing, "settings": settings})
    for unit in units:
        unit["fingerprint"] = _sha256_json({"unit": unit, "settings": settings})

    if out is None:
        out = str(data_root(data_dir) / (name or f"corpus-{fingerprint[:12]}"))
    store = storage.resolve(out)  # writable (or creatable), reachable: else one line
    dataset = name or store.root.rstrip("/").rsplit("/", 1)[-1]
    state, old = _out_state(store)
    if state == "foreign":
        raise UserError(
            f"{store.display()} already holds files that are not a raygpt dataset; "
            "give an empty or new folder as the output"
        )
    if state == "complete" and old is not None:
        if old.get("source", {}).get("sha256") == fingerprint and old.get("dataset") == dataset:
            print(f"[raygpt] {store.display()} is already prepared from these inputs", flush=True)
            return store.display()
        if not overwrite:
            raise UserError(
                f"{store.display()} holds a dataset prepared from other inputs or settings "
                f"({old.get('dataset')}); pass --overwrite to replace it, or another output"
            )
    lock = file_lock(Path(store.root) / ".lock") if store.is_local else contextlib.nullcontext()
    if store.is_local:
        os.makedirs(store.root, exist_ok=True)
    with lock:
        if state == "complete":
            store.delete_file(store.path(MANIFEST))  # --overwrite: no longer a finished dataset
        if store.is_local:  # shards of a killed run never renamed into place
            for stale in Path(store.root).glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        receipts = _run(units, enc, settings, store, workers, address, connect)
        return _finish(
            store,
            receipts,
            dataset=dataset,
            tokenizer=tokenizer,
            files=files,
            inputs=inputs,
            settings=settings,
            fingerprint=fingerprint,
            description=description,
        )


def _run(units, enc, settings, store, workers, address, connect) -> list[dict]:
    import logging

    import ray

    from raygpt.cluster import storage_check

    connect(address, dashboard=False)
    storage_check.preflight(store)  # shards are written from every node: it must be shared
    store.write_bytes(store.path(ENCODING_FILE), json.dumps(encoding_to_json(enc)).encode())
    # Ray Data's own progress lines would bury the per-unit ones printed below.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = min(workers, len(units))
    print(
        f"[raygpt] tokenizing {len(units)} work unit(s) on {workers} worker(s) into "
        f"{store.display()}",
        flush=True,
    )
    items = [{"unit": json.dumps(u)} for u in units]
    # One task per unit, at most `workers` at once, one CPU each (tiktoken runs on one
    # thread in it): a free CPU takes the next unit, so the tail stays short.
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _tokenize_units,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=workers),
        num_cpus=1,
        fn_kwargs={"settings": settings, "out": store},
    )
    receipts: dict[int, dict] = {}
    tokens = 0
    for row in ds.iter_rows():
        receipt = json.loads(row["receipt"])
        if "error" in receipt:
            raise UserError(receipt["error"])
        receipts[receipt["index"]] = receipt
        made = sum(s["tokens"] for s in receipt["shards"].values() if s)
        tokens += made
        how = "kept (already done)" if receipt.get("reused") else f"{receipt['seconds']:.1f} s"
        print(
            f"[raygpt] unit {receipt['index'] + 1}/{len(units)}: {made:,} tokens, {how}; "
            f"{len(receipts)}/{len(units)} done, {tokens:,} tokens",
            flush=True,
        )
    missing = sorted(set(range(len(units))) - set(receipts))
    if missing:  # pragma: no cover - Ray Data returns every row or raises
        raise RuntimeError(f"work units {missing[:5]} returned nothing")
    return [receipts[i] for i in range(len(units))]


def _finish(store, receipts, *, dataset, tokenizer, files, inputs, settings, fingerprint,
            description) -> str:  # fmt: skip
    documents = {split: sum(r["documents"][split] for r in receipts) for split in SPLITS}
    if not sum(documents.values()):
        raise UserError(
            f"the inputs ({', '.join(inputs)}) hold no documents (every text is empty); "
            "nothing to prepare"
        )
    for split in SPLITS:
        if not documents[split]:
            raise UserError(
                f"no document landed in the {split} split ({documents['train']} train, "
                f"{documents['val']} val, val_fraction {settings['val_fraction']:g}); "
                "change --val-fraction or give more documents"
            )
    shards = {
        split: [r["shards"][split] for r in receipts if r["shards"][split]] for split in SPLITS
    }
    keep = {s["file"] for split in SPLITS for s in shards[split]}
    for stale in store.list_dir(store.root):  # shards of an earlier plan of this folder
        if SHARD_NAME.match(stale) and stale not in keep:
            store.delete_file(store.path(stale))
    manifest = build_manifest(
        dataset=dataset,
        tokenizer=tokenizer,
        shards=shards,
        val_split={
            "method": "document-hash",
            "fraction": settings["val_fraction"],
            "hash": SPLIT_HASH,
            "end_of_text": "after every document",
        },
        source={
            "description": description or f"{len(files)} file(s): {', '.join(inputs)}",
            "sha256": fingerprint,
            "files": [{"path": f.display, "format": f.format, "bytes": f.size} for f in files],
            "text_column": settings["text_column"],
            "documents": documents,
            "unit_bytes": settings["unit_bytes"],
        },
        made_by=versions("tiktoken", "pyarrow", "ray"),
    )
    store.write_bytes(store.path(MANIFEST), manifest_bytes(manifest))  # last: marks it done
    total = sum(manifest["splits"][s]["tokens"] for s in SPLITS)
    print(
        f"[raygpt] {dataset}: {manifest['splits']['train']['tokens']:,} train + "
        f"{manifest['splits']['val']['tokens']:,} val tokens ({total:,}) in "
        f"{len(keep)} shard(s), {documents['train'] + documents['val']:,} documents",
        flush=True,
    )
    return store.display()
