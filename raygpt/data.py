"""Datasets: preparation into token files, and deterministic, rank-disjoint batches.

A prepared dataset is a directory holding ``train.bin`` and ``val.bin`` (contiguous
token ids, uint16 or uint32) and ``meta.json`` (written last: its presence marks the
directory complete). Directories are built under a temporary name and renamed into
place, so a crash never leaves half a dataset and concurrent preparers cannot corrupt
one another.

Registered datasets (``python -m raygpt.data list``):

* ``pydocs_char`` -- docstrings of the running Python's standard library, character
  level; built locally, no download (the default).
* ``shakespeare_char`` -- Tiny Shakespeare, character level (downloaded once).
* ``shakespeare`` -- Tiny Shakespeare in GPT-2 BPE (tiktoken "gpt2").

Any local UTF-8 text file can be used with ``--data-file PATH --tokenizer char|gpt2``.

Batches come from :class:`BatchSampler`: windows of ``block_size + 1`` tokens that do
not overlap within an epoch, visited in a permutation drawn from ``(seed, epoch)``; the
window a sample gets depends only on its global sample counter, so a run resumes
exactly, different ranks never share a window in a step, and 2 ranks x micro-batch B
see the same windows per step as 1 rank x micro-batch 2B.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import sys
import sysconfig
import threading
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raygpt.errors import UserError, exit_on_user_error

log = logging.getLogger(__name__)

FORMAT = 1
DEFAULT_DATASET = "pydocs_char"
DATA_DIR_ENV = "RAYGPT_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/raygpt"
TOKENIZERS = ("char", "gpt2")
SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.1
DOC_SEPARATOR = "\n\n"  # joins documents for character-level datasets
EOT = "<|endoftext|>"

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SIZE = 1_115_394
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT_S = 30.0

GPT2_VOCAB_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
GPT2_ENCODER_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
GPT2_VOCAB_SIZE = 50257
GPT2_LOAD_TIMEOUT_S = 120.0  # whole vocabulary download, once connectivity is confirmed
GPT2_PROBE_TIMEOUT_S = 5.0  # connectivity check before handing over to tiktoken

# Directory names never descended into when building the pydocs corpus.
PYDOCS_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "__pycache__",
    }
)
_PYDOCS_CHARS = frozenset(chr(c) for c in range(32, 127)) | {"\n"}

EVAL_EPOCH = 2**32 - 1  # epoch id of the fixed evaluation permutation
_UINT16_MAX_VOCAB = 65535


# --------------------------------------------------------------------------- helpers


def _one_line(text: object) -> str:
    """Collapse whitespace (newlines included) so a message stays on one line."""
    return " ".join(str(text).split())


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def choose_dtype(vocab_size: int) -> str:
    """The token dtype for a vocabulary: "uint16" up to 65535 ids, else "uint32"."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return "uint16" if vocab_size <= _UINT16_MAX_VOCAB else "uint32"


def data_root(data_dir: str | Path | None = None) -> Path:
    """The cache root: `data_dir`, else $RAYGPT_DATA_DIR, else ~/.cache/raygpt (created)."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    root = Path(data_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create data directory {root} ({_one_line(exc)}); "
            f"pass --data-dir DIR (or set {DATA_DIR_ENV}) to a writable directory"
        ) from exc
    return root


# --------------------------------------------------------------------------- sources


@dataclass
class Source:
    """Raw text of a dataset, as documents (a single file is one document)."""

    documents: list[str]
    description: str
    extra_meta: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        return DOC_SEPARATOR.join(self.documents)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    tokenizer: str
    description: str
    build: Callable[[Path], Source]  # argument: the cache root (for downloads)


def _iter_docstring_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Module, class and function nodes in source order (depth first)."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, kinds):
            yield node
        stack.extend(reversed(list(ast.iter_child_nodes(node))))


def pydocs_files(stdlib: str | Path | None = None) -> list[Path]:
    """The standard-library *.py files the pydocs corpus reads, in sorted order."""
    root = Path(stdlib if stdlib is not None else sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in PYDOCS_SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def pydocs_documents(stdlib: str | Path | None = None) -> list[str]:
    """Printable-ASCII docstrings of the standard library (parsed with ast, never imported)."""
    docs: list[str] = []
    for path in pydocs_files(stdlib):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. SyntaxWarning: invalid escape sequence
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError, RecursionError, MemoryError):
            continue
        for node in _iter_docstring_nodes(tree):
            doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
            if doc and _PYDOCS_CHARS.issuperset(doc):
                docs.append(doc)
    return docs


def build_pydocs_corpus(stdlib: str | Path | None = None) -> str:
    """The pydocs_char corpus text (docstrings joined by blank lines)."""
    return DOC_SEPARATOR.join(pydocs_documents(stdlib))


def _python_version() -> str:
    return ".".join(str(v) for v in sys.version_info[:3])


def _source_pydocs(root: Path) -> Source:
    return Source(
        documents=pydocs_documents(),
        description=f"docstrings of the Python {_python_version()} standard library",
        extra_meta={"python_version": _python_version()},
    )


def _source_shakespeare(root: Path) -> Source:
    path = download(
        SHAKESPEARE_URL,
        root / "downloads" / "tinyshakespeare.txt",
        sha256=SHAKESPEARE_SHA256,
        size=SHAKESPEARE_SIZE,
    )
    return Source(documents=[read_text_file(path)], description=SHAKESPEARE_URL)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "pydocs_char",
            "char",
            "Python standard-library docstrings, character level (built locally, no download)",
            _source_pydocs,
        ),
        DatasetSpec(
            "shakespeare_char",
            "char",
            "Tiny Shakespeare, character level (downloads 1.1 MB once)",
            _source_shakespeare,
        ),
        DatasetSpec(
            "shakespeare",
            "gpt2",
            "Tiny Shakespeare, GPT-2 BPE via tiktoken (downloads 1.1 MB once)",
            _source_shakespeare,
        ),
    )
}


def read_text_file(path: str | Path) -> str:
    """A local UTF-8 text file; missing, unreadable, non-UTF-8 or empty -> UserError."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"data file not found: {path}; pass --data-file with an existing file")
    if not path.is_file():
        raise UserError(f"data file is not a regular file: {path}; pass a text file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read data file {path} ({_one_line(exc)})") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"data file {path} is not valid UTF-8 (bad byte at offset {exc.start}); "
            "convert it to UTF-8 text"
        ) from exc
    if not text:
        raise UserError(f"data file {path} is empty; pass a file with text in it")
    return text


# --------------------------------------------------------------------------- download


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str,
    size: int | None = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> Path:
    """Fetch `url` to `dest` once, verified by size and sha256.

    An existing `dest` with the right sha256 is reused. The download goes to a
    temporary file that is renamed into place only after it checks out, so a failure
    or a mismatch leaves nothing cached. Failures raise UserError naming the URL.
    """
    dest = Path(dest)
    if dest.is_file() and _file_sha256(dest) == sha256:
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {dest.parent} ({_one_line(exc)})") from exc
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex}.part")
    alternative = (
        "download it elsewhere and run with --data-file PATH pointing at a local copy "
        f"(or put the file at {dest})"
    )
    try:
        h = hashlib.sha256()
        n = 0
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                for chunk in iter(lambda: resp.read(1 << 16), b""):
                    h.update(chunk)
                    out.write(chunk)
                    n += len(chunk)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise UserError(
                f"could not download {url} ({_one_line(reason)}); {alternative}"
            ) from exc
        digest = h.hexdigest()
        if (size is not None and n != size) or digest != sha256:
            expected = f"{size} bytes, " if size is not None else ""
            raise UserError(
                f"download from {url} is not the expected file (got {n} bytes, sha256 "
                f"{digest}; expected {expected}sha256 {sha256}); nothing was cached; "
                f"{alternative}"
            )
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return dest


# --------------------------------------------------------------------------- tiktoken


_GPT2_ENCODING: Any = None


def _tiktoken_cache_dir() -> str:
    """Where tiktoken caches downloaded files (mirrors tiktoken.load.read_file_cached)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    import tempfile

    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _gpt2_files_cached() -> bool:
    cache_dir = _tiktoken_cache_dir()
    if not cache_dir:
        return False
    return all(
        os.path.isfile(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()))
        for url in (GPT2_VOCAB_URL, GPT2_ENCODER_URL)
    )


def _run_with_timeout(
    fn: Callable[[], Any], timeout: float
) -> tuple[bool, Any, BaseException | None]:
    """Run fn in a daemon thread: (finished, result, exception or None)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # reported to the caller
            box["error"] = exc

    t = threading.Thread(target=target, name="raygpt-tiktoken-load", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return False, None, None
    return True, box.get("result"), box.get("error")


def _probe_vocab_url(timeout: float = GPT2_PROBE_TIMEOUT_S) -> str | None:
    """None if the vocabulary URL answers an HTTP HEAD within `timeout`, else why not.

    urllib honours the same proxy variables as `requests`. DNS lookups ignore socket
    timeouts, so the whole probe also runs under a thread timeout.
    """

    def head() -> None:
        req = urllib.request.Request(GPT2_VOCAB_URL, method="HEAD")
        try:
            with urllib.request.urlopen(req, timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass  # the server answered: reachable; tiktoken reports any real problem

    done, _, err = _run_with_timeout(head, timeout + 1.0)
    if not done:
        return f"no answer within {timeout:g} s"
    if err is not None:
        return _one_line(getattr(err, "reason", None) or err)
    return None


def _gpt2_error(reason: str) -> UserError:
    return UserError(
        f"cannot load the GPT-2 BPE vocabulary: tiktoken downloads it from {GPT2_VOCAB_URL} "
        f"(and encoder.json) on first use and that failed ({_one_line(reason)}); run once "
        "with network access, or set TIKTOKEN_CACHE_DIR to a directory that holds the "
        "cached files, or use --tokenizer char"
    )


def load_gpt2_encoding(
    timeout: float = GPT2_LOAD_TIMEOUT_S,
    *,
    get_encoding: Callable[[str], Any] | None = None,
    probe: Callable[[], str | None] | None = None,
) -> Any:
    """tiktoken's "gpt2" Encoding, failing fast with a UserError when offline.

    tiktoken fetches its vocabulary with `requests` and no timeout, which can hang for
    minutes where packets are dropped. So unless the files are in tiktoken's cache, first
    check that the URL answers an HTTP HEAD within a few seconds, then run the load
    itself under `timeout` (in a daemon thread, abandoned if it overruns).
    `get_encoding` and `probe` are for tests; the real encoding is memoized.
    """
    global _GPT2_ENCODING
    real = get_encoding is None
    if real and _GPT2_ENCODING is not None:
        return _GPT2_ENCODING
    if get_encoding is None:
        try:
            import tiktoken
        except ImportError as exc:
            raise UserError(
                "the gpt2 tokenizer needs tiktoken: pip install tiktoken, or use --tokenizer char"
            ) from exc
        get_encoding = tiktoken.get_encoding
        cached = _gpt2_files_cached()
    else:
        cached = False
    if not cached:
        why = (probe or _probe_vocab_url)()
        if why is not None:
            raise _gpt2_error(why)
    done, enc, err = _run_with_timeout(lambda: get_encoding("gpt2"), timeout)
    if not done:
        raise _gpt2_error(f"no vocabulary after {timeout:g} s")
    if err is not None:
        raise _gpt2_error(f"{type(err).__name__}: {err}") from err
    if real:
        _GPT2_ENCODING = enc
    return enc


def _encoding_vocab_size(enc: Any) -> int:
    return int(enc.max_token_value) + 1


def _encoding_eot(enc: Any) -> int | None:
    return enc.encode_single_token(EOT) if EOT in enc.special_tokens_set else None


# --------------------------------------------------------------------------- tokenizers


class CharTokenizer:
    """Character-level tokenizer from meta.json's ``itos``."""

    kind = "char"

    def __init__(self, itos: Sequence[str]):
        self.itos = list(itos)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.eos_token = None

    def encode(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError as exc:
            raise UserError(
                f"character {exc.args[0]!r} is not in this dataset's vocabulary of "
                f"{self.vocab_size} characters; use only characters from the training text"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        itos = self.itos
        try:
            return "".join(itos[int(i)] for i in ids)
        except IndexError:
            bad = next(int(i) for i in ids if not 0 <= int(i) < self.vocab_size)
            raise ValueError(
                f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})"
            ) from None


class GPT2Tokenizer:
    """GPT-2 BPE through a tiktoken Encoding."""

    kind = "gpt2"

    def __init__(self, encoding: Any):
        self.encoding = encoding
        self.vocab_size = _encoding_vocab_size(encoding)
        self.eos_token = _encoding_eot(encoding)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special={EOT} & self.encoding.special_tokens_set)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])


def tokenizer_from_meta(meta: dict, *, encoding: Any = None) -> CharTokenizer | GPT2Tokenizer:
    """The tokenizer a prepared dataset was made with (`encoding` injects a tiktoken one)."""
    if meta.get("tokenizer") == "char":
        return CharTokenizer(meta["itos"])
    if meta.get("tokenizer") == "gpt2":
        tok = GPT2Tokenizer(encoding if encoding is not None else load_gpt2_encoding())
        if tok.vocab_size != meta.get("vocab_size"):
            raise UserError(
                f"the gpt2 encoding has {tok.vocab_size} tokens but the dataset "
                f"{meta.get('dataset')} was prepared with {meta.get('vocab_size')}; "
                "re-prepare the dataset with this tokenizer"
            )
        return tok
    raise UserError(f"unknown tokenizer {meta.get('tokenizer')!r} in meta; expected char or gpt2")


def _tokenize(source: Source, tokenizer: str, encoding: Any) -> tuple[np.ndarray, dict]:
    """Token ids of a source and the tokenizer's meta fields."""
    if tokenizer == "char":
        text = source.text()
        if not text:
            raise UserError(f"dataset text is empty ({source.description})")
        itos = sorted(set(text))
        stoi = {c: i for i, c in enumerate(itos)}
        dtype = choose_dtype(len(itos))
        ids = np.fromiter((stoi[c] for c in text), dtype=dtype, count=len(text))
        return ids, {"tokenizer": "char", "vocab_size": len(itos), "itos": itos, "dtype": dtype}
    vocab_size = _encoding_vocab_size(encoding)
    eot = _encoding_eot(encoding)
    docs = [d for d in source.documents if d]
    pieces: list[list[int]] = []
    for i, doc in enumerate(docs):
        if i:
            if eot is None:
                raise UserError(f"the BPE encoding has no {EOT} token to separate documents")
            pieces.append([eot])
        pieces.append(encoding.encode_ordinary(doc))
    dtype = choose_dtype(vocab_size)
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces] or [np.zeros(0, int)])
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError("tokenizer produced ids outside its vocabulary")
    meta = {
        "tokenizer": "gpt2",
        "encoding": getattr(encoding, "name", None),
        "vocab_size": vocab_size,
        "dtype": dtype,
        "eos_token": eot,
    }
    return ids.astype(dtype), meta


# --------------------------------------------------------------------------- meta


def _prepare_hint(dataset_dir: Path) -> str:
    name = dataset_dir.name
    if name in DATASETS:
        cmd = f"python -m raygpt.data prepare --dataset {name}"
    else:
        cmd = "python -m raygpt.data prepare --data-file PATH ..."
    return f"re-run `{cmd}` or delete {dataset_dir}"


def prepare_from_config(cfg) -> tuple[Path, dict]:
    """`prepare` + `load_meta` for a run config (a TrainConfig: dataset, data_file,
    tokenizer, data_dir); a data file takes precedence over the dataset name."""
    dataset_dir = prepare(
        cfg.dataset if cfg.data_file is None else None,
        data_file=cfg.data_file,
        tokenizer=cfg.tokenizer,
        data_dir=cfg.data_dir,
    )
    return dataset_dir, load_meta(dataset_dir)


def load_meta(dataset_dir: str | Path) -> dict:
    """meta.json of a prepared dataset, checked against the token files next to it."""
    d = Path(dataset_dir)
    hint = _prepare_hint(d)
    meta_path = d / "meta.json"
    if not d.is_dir():
        raise UserError(
            f"dataset directory {d} does not exist; run `python -m raygpt.data prepare`"
        )
    if not meta_path.is_file():
        raise UserError(f"{meta_path} is missing (dataset not prepared or incomplete); {hint}")

    def bad(problem: str, path: Path = meta_path) -> UserError:
        return UserError(f"{path} {problem}; {hint}")

    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"is unreadable or not valid JSON ({_one_line(exc)})") from exc
    if not isinstance(meta, dict):
        raise bad("is not a JSON object")
    if meta.get("format") != FORMAT:
        raise bad(f"has format {meta.get('format')!r}, expected {FORMAT}")
    for key in ("dataset", "tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens"):
        if key not in meta:
            raise bad(f"lacks the field {key!r}")
    if meta["tokenizer"] not in TOKENIZERS:
        raise bad(f"has unknown tokenizer {meta['tokenizer']!r}")
    vocab = meta["vocab_size"]
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise bad(f"has invalid vocab_size {vocab!r}")
    if meta["dtype"] != choose_dtype(vocab):
        raise bad(f"has dtype {meta['dtype']!r}, which does not fit vocab_size {vocab}")
    if meta["tokenizer"] == "char":
        itos = meta.get("itos")
        if (
            not isinstance(itos, list)
            or len(itos) != vocab
            or not all(isinstance(c, str) and len(c) == 1 for c in itos)
            or len(set(itos)) != len(itos)
        ):
            raise bad("has an invalid itos (expected vocab_size distinct single characters)")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        n = meta[f"{split}_tokens"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise bad(f"has invalid {split}_tokens {n!r}")
        bin_path = d / f"{split}.bin"
        if not bin_path.is_file():
            raise UserError(f"{bin_path} is missing; {hint}")
        size = bin_path.stat().st_size
        if size != n * itemsize:
            raise bad(
                f"has {size} bytes but meta.json says {n} {meta['dtype']} tokens "
                f"({n * itemsize} bytes); the file is truncated or corrupt",
                bin_path,
            )
    return meta


# --------------------------------------------------------------------------- prepare


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (saves duplicate work; atomic rename keeps it correct)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_ready(dataset_dir: Path) -> bool:
    try:
        load_meta(dataset_dir)
    except UserError:
        return False
    return True


def _discard(path: Path) -> None:
    """Move a directory aside atomically, then delete it."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "data"


def _write_dataset(tmp: Path, ids: np.ndarray, meta: dict, val_fraction: float) -> dict:
    n = len(ids)
    split_at = int(n * (1.0 - val_fraction))
    train, val = ids[:split_at], ids[split_at:]
    if len(train) < 2 or len(val) < 2:
        raise UserError(
            f"dataset {meta['dataset']} has only {n} tokens, too few to split into train and "
            f"val with val_fraction {val_fraction:g}; use a longer text"
        )
    train.tofile(tmp / "train.bin")
    val.tofile(tmp / "val.bin")
    meta = {**meta, "train_tokens": len(train), "val_tokens": len(val)}
    part = tmp / "meta.json.part"
    part.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    os.replace(part, tmp / "meta.json")  # written last: marks the directory complete
    return meta


def prepare(
    dataset: str | None = DEFAULT_DATASET,
    *,
    data_file: str | Path | None = None,
    tokenizer: str = "char",
    data_dir: str | Path | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    encoding: Any = None,
) -> Path:
    """Prepare a dataset once (cached) and return its directory.

    `dataset` names a registered dataset; `data_file` (with `tokenizer` "char" or
    "gpt2") uses a local UTF-8 text instead. For registered datasets the tokenizer is
    the dataset's own. `encoding` injects a tiktoken Encoding for gpt2 (tests).
    """
    if tokenizer not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {tokenizer!r}; use one of: {', '.join(TOKENIZERS)}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")

    if data_file is not None:
        if dataset not in (None, DEFAULT_DATASET):
            raise UserError(
                f"give either --dataset ({dataset}) or --data-file ({data_file}), not both"
            )
        path = Path(data_file).expanduser()
        text = read_text_file(path)
        sha = _sha256_bytes(text.encode("utf-8"))
        name = f"file-{_safe_name(path.stem)}-{sha[:12]}-{tokenizer}"
        src = Source(documents=[text], description=str(path.resolve()))

        def build(root: Path) -> Source:
            return src

        tok = tokenizer
    else:
        dataset = dataset or DEFAULT_DATASET
        spec = DATASETS.get(dataset)
        if spec is None:
            raise UserError(
                f"unknown dataset {dataset!r}; available: {', '.join(DATASETS)} "
                "(or pass --data-file PATH)"
            )
        if tokenizer != "char" and tokenizer != spec.tokenizer:
            others = [n for n, s in DATASETS.items() if s.tokenizer == tokenizer]
            raise UserError(
                f"dataset {dataset} uses the {spec.tokenizer} tokenizer, not {tokenizer}; "
                f"choose another dataset ({', '.join(others) or 'none'}) or use --data-file"
            )
        name, build, tok = spec.name, spec.build, spec.tokenizer
    if val_fraction != DEFAULT_VAL_FRACTION:
        name += f"-val{val_fraction:g}"

    root = data_root(data_dir)
    final = root / name
    if _is_ready(final):
        return final
    with _file_lock(root / f".{name}.lock"):
        if _is_ready(final):
            return final  # another process finished it while we waited
        if final.exists():
            log.warning("replacing incomplete or corrupt dataset directory %s", final)
            _discard(final)
        if tok == "gpt2" and encoding is None:
            encoding = load_gpt2_encoding()
        source = build(root)
        ids, tok_meta = _tokenize(source, tok, encoding)
        meta: dict[str, Any] = {
            "format": FORMAT,
            "dataset": name,
            **tok_meta,
            "source": source.description,
            "source_sha256": _sha256_bytes(source.text().encode("utf-8")),
            "val_fraction": val_fraction,
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


# --------------------------------------------------------------------------- batches


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class BatchSampler:
    """Deterministic, rank-disjoint, resumable batches from one split of a dataset.

    The split holds K = (n_tokens - block_size) // block_size non-overlapping windows of
    block_size + 1 tokens (at least 1 when n_tokens > block_size), starting at
    shift_e + j * block_size; the shift in [0, block_size) is drawn per epoch from
    (seed, epoch) and K is the count every shift allows, so it is the same each epoch.
    Global sample g (of a step with N = micro_batch * world_size * grad_accum samples)
    lies in epoch e = g // E, E = N * (K // N) (a step never straddles two epochs, so
    its windows are all distinct), and takes window perm_e[g % E] with
    perm_e = np.random.default_rng([seed, e, split_id]).permutation(K).
    """

    def __init__(self, dataset_dir: str | Path, split: str, block_size: int, seed: int):
        if split not in SPLITS:
            raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.block_size = _check_positive("block_size", block_size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {seed!r}")
        self.dataset_dir = Path(dataset_dir)
        meta = load_meta(self.dataset_dir)
        self.split = split
        self.split_id = SPLITS.index(split)
        self.seed = int(seed)
        self.dtype = meta["dtype"]
        self.n_tokens = int(meta[f"{split}_tokens"])
        n, bs = self.n_tokens, self.block_size
        self.num_windows = max((n - bs) // bs, 1 if n - 1 >= bs else 0)
        if self.num_windows < 1:
            raise UserError(
                f"block_size {bs} is too large for the {split} split of {self.dataset_dir} "
                f"({n} tokens; a window needs block_size + 1 = {bs + 1}); "
                "use a smaller block size or more data"
            )
        self.max_shift = min(bs - 1, n - 1 - self.num_windows * bs)
        self._data: np.ndarray | None = None
        self._epoch_cache: tuple[int, np.ndarray, int] | None = None

    # Ray ships samplers to workers: keep the pickle small, reopen the memmap there.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_data"] = None
        state["_epoch_cache"] = None
        return state

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            path = self.dataset_dir / f"{self.split}.bin"
            self._data = np.memmap(path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        return self._data

    def _epoch(self, epoch: int) -> tuple[np.ndarray, int]:
        cache = self._epoch_cache
        if cache is None or cache[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch, self.split_id]).permutation(
                self.num_windows
            )
            shift_rng = np.random.default_rng([self.seed, epoch, self.split_id, 1])
            shift = int(shift_rng.integers(0, self.max_shift + 1))
            cache = self._epoch_cache = (epoch, perm, shift)
        return cache[1], cache[2]

    def samples_per_epoch(self, global_batch: int) -> int:
        """E: samples per epoch for a global batch (K rounded down to whole steps)."""
        global_batch = _check_positive("global batch", global_batch)
        if self.num_windows < global_batch:
            raise UserError(
                f"block_size {self.block_size} leaves only {self.num_windows} windows in the "
                f"{self.split} split ({self.n_tokens} tokens), fewer than one global batch of "
                f"{global_batch} sequences; use a smaller block size or batch, or more data"
            )
        return (self.num_windows // global_batch) * global_batch

    def steps_per_epoch(self, micro_batch: int, world_size: int = 1, grad_accum: int = 1) -> int:
        n = micro_batch * world_size * grad_accum
        return self.samples_per_epoch(n) // n

    def sample_indices(
        self,
        step: int,
        rank: int,
        micro_step: int,
        micro_batch: int,
        world_size: int,
        grad_accum: int,
    ) -> np.ndarray:
        """Start offsets (int64, into the split) of the windows of one micro-batch."""
        mb = _check_positive("micro_batch", micro_batch)
        ws = _check_positive("world_size", world_size)
        ga = _check_positive("grad_accum", grad_accum)
        if not 0 <= rank < ws:
            raise ValueError(f"rank {rank} is outside 0..{ws - 1}")
        if not 0 <= micro_step < ga:
            raise ValueError(f"micro_step {micro_step} is outside 0..{ga - 1}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        n = mb * ws * ga
        per_epoch = self.samples_per_epoch(n)
        first = int(step) * n
        epoch = first // per_epoch
        k0 = micro_step * ws * mb + rank * mb
        pos = (first % per_epoch) + k0 + np.arange(mb, dtype=np.int64)
        perm, shift = self._epoch(epoch)
        return shift + perm[pos].astype(np.int64) * self.block_size

    def _windows(self, starts: np.ndarray) -> tuple[Any, Any]:
        import torch

        idx = starts[:, None] + np.arange(self.block_size + 1, dtype=np.int64)
        buf = torch.from_numpy(np.asarray(self.data[idx], dtype=np.int64))
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()

    def get_batch(
        self,
        step: int,
        rank: int,
        micro_step: int,
        micro_batch: int,
        world_size: int,
        grad_accum: int,
    ) -> tuple[Any, Any]:
        """(x, y): int64 CPU tensors of shape (micro_batch, block_size), y = x shifted by 1."""
        starts = self.sample_indices(step, rank, micro_step, micro_batch, world_size, grad_accum)
        return self._windows(starts)

    def _eval_pass(self, p: int) -> tuple[np.ndarray, int]:
        """Permutation and shift of pass p over the split's windows for evaluation."""
        key = [self.seed, EVAL_EPOCH, self.split_id]
        perm = np.random.default_rng(key if p == 0 else [*key, p]).permutation(self.num_windows)
        shift = int(np.random.default_rng([*key, p, 1]).integers(0, self.max_shift + 1))
        return perm, shift

    def eval_indices(
        self, eval_iters: int, micro_batch: int, rank: int, world_size: int
    ) -> list[np.ndarray]:
        """Window starts of this rank's fixed evaluation batches, one array per iteration.

        The eval set is the first eval_iters * micro_batch * world_size entries of a
        permutation drawn from (seed, EVAL_EPOCH, split), independent of the training
        step; iteration i of rank r takes entries [(i * world_size + r) * micro_batch,
        +micro_batch), so ranks never share a window. When that is more windows than the
        split holds (K), further passes with their own permutation and shift follow, so
        a small split is simply evaluated more than once (windows then repeat).
        """
        iters = _check_positive("eval_iters", eval_iters)
        mb = _check_positive("micro_batch", micro_batch)
        ws = _check_positive("world_size", world_size)
        if not 0 <= rank < ws:
            raise ValueError(f"rank {rank} is outside 0..{ws - 1}")
        k = self.num_windows
        passes: dict[int, tuple[np.ndarray, int]] = {}
        out = []
        for i in range(iters):
            pos = (i * ws + rank) * mb + np.arange(mb, dtype=np.int64)
            starts = np.empty(mb, dtype=np.int64)
            for p in np.unique(pos // k).tolist():
                if p not in passes:
                    passes[p] = self._eval_pass(p)
                perm, shift = passes[p]
                sel = pos // k == p
                starts[sel] = shift + perm[pos[sel] % k].astype(np.int64) * self.block_size
            out.append(starts)
        return out

    def eval_batches(
        self, eval_iters: int, micro_batch: int, rank: int, world_size: int
    ) -> list[tuple[Any, Any]]:
        """The fixed evaluation batches of this rank: eval_iters (x, y) pairs."""
        return [
            self._windows(s) for s in self.eval_indices(eval_iters, micro_batch, rank, world_size)
        ]

    def __repr__(self) -> str:
        return (
            f"BatchSampler({str(self.dataset_dir)!r}, {self.split!r}, "
            f"block_size={self.block_size}, seed={self.seed})"
        )


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{_one_line(message)} (see {self.prog} --help)")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m raygpt.data", description="Prepare and list raygpt datasets.")
    sub = p.add_subparsers(dest="command", metavar="{prepare,list}", parser_class=_Parser)
    sub.required = True
    pp = sub.add_parser("prepare", help="prepare a dataset (cached) and print its directory")
    pp.add_argument(
        "--dataset", default=None, help=f"registered dataset (default {DEFAULT_DATASET})"
    )
    pp.add_argument("--data-file", default=None, metavar="PATH", help="a local UTF-8 text file")
    pp.add_argument(
        "--tokenizer", choices=TOKENIZERS, default=None, help="for --data-file (default char)"
    )
    pp.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help=f"cache root (default ${DATA_DIR_ENV} or {DEFAULT_DATA_DIR})",
    )
    pp.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION)
    sub.add_parser("list", help="list the registered datasets")
    return p


def _run(argv: Sequence[str] | None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "list":
        for spec in DATASETS.values():
            default = " (default)" if spec.name == DEFAULT_DATASET else ""
            print(f"{spec.name:<18} {spec.tokenizer:<5} {spec.description}{default}")
        print(f"{'--data-file PATH':<18} {'char|gpt2':<5} any local UTF-8 text (--tokenizer)")
        return 0
    if args.data_file is not None and args.dataset is not None:
        raise UserError("give either --dataset or --data-file, not both")
    if args.data_file is None and args.tokenizer is not None:
        spec = DATASETS.get(args.dataset or DEFAULT_DATASET)
        if spec is not None and spec.tokenizer != args.tokenizer:
            raise UserError(
                f"--tokenizer {args.tokenizer} does not apply to dataset {spec.name} "
                f"({spec.tokenizer}); --tokenizer is for --data-file"
            )
    path = prepare(
        args.dataset,
        data_file=args.data_file,
        tokenizer=args.tokenizer or "char",
        data_dir=args.data_dir,
        val_fraction=args.val_fraction,
    )
    meta = load_meta(path)
    print(path)
    print(
        f"{meta['dataset']}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
        f"vocab_size {meta['vocab_size']} ({meta['tokenizer']}, {meta['dtype']})"
    )
    return 0


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: a UserError becomes `error: ...` on stderr and exit status 2."""
    return _run(argv)


if __name__ == "__main__":
    sys.exit(main())
