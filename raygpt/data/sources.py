"""Where text comes from: the registered datasets, local files, and downloads.

Small datasets are read whole, as documents (a single file is one document), and
tokenized in memory by `prepare`:

* ``pydocs_char`` -- docstrings of the running Python's standard library, character
  level; built locally, no download (the default).
* ``shakespeare_char`` -- Tiny Shakespeare, character level (downloaded once).
* ``shakespeare`` -- Tiny Shakespeare in GPT-2 BPE (tiktoken "gpt2").

Large corpora are downloaded as Parquet files and tokenized across the Ray cluster by
`prepare_corpus` (``pip install 'raygpt[corpora]'``):

* ``fineweb_edu`` -- FineWeb-Edu's sample-10BT, ~10B GPT-2 tokens (~27 GB of Parquet).
* ``openwebtext`` -- OpenWebText, ~9B GPT-2 tokens (21 tar files, ~13 GB, converted to
  Parquet once, as the Hugging Face loading script reads them).
"""

from __future__ import annotations

import ast
import contextlib
import gc
import hashlib
import http.client
import os
import sys
import sysconfig
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raygpt.data.common import DOC_SEPARATOR, one_line
from raygpt.errors import UserError

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SIZE = 1_115_394
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT_S = 30.0

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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- small datasets


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
    """Module, class and function nodes in source order (depth first).

    Only statements hold definitions, so the walk descends through statement lists
    (bodies, branches, handlers, match cases) and never into expressions, which make up
    most of a syntax tree."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    blocks = (ast.stmt, ast.excepthandler, ast.match_case)
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, kinds):
            yield node
        children = [
            child
            for name in node._fields
            if isinstance(value := getattr(node, name, None), list)
            for child in value
            if isinstance(child, blocks)
        ]
        stack.extend(reversed(children))


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
    with _cyclic_gc_paused():
        return _docstrings(pydocs_files(stdlib))


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Parsing makes millions of short-lived syntax nodes, which hold no cycles, so
    reference counting frees them. The cyclic collector's passes over a heap that
    already holds torch and Ray would otherwise take most of the time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _docstrings(files: list[Path]) -> list[str]:
    docs: list[str] = []
    for path in files:
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


JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")


def is_jsonl(path: str | Path) -> bool:
    return str(path).lower().endswith(JSONL_SUFFIXES)


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise UserError(f"data file not found: {path}; pass --data-file with an existing file")
    if not path.is_file():
        raise UserError(f"data file is not a regular file: {path}; pass a text file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read data file {path} ({one_line(exc)})") from exc


def read_data_file(path: str | Path) -> tuple[list[str], str]:
    """A local --data-file as documents, and the sha256 of its bytes (the cache key).

    Plain UTF-8 text is one document. JSONL (.jsonl, .ndjson, optionally gzipped) is one
    JSON object per line with a string field "text", each line a document; blank lines
    are skipped, and a line that is not such an object is a UserError naming its number.
    """
    path = Path(path).expanduser()
    if not is_jsonl(path):
        text = read_text_file(path)
        return [text], hashlib.sha256(text.encode("utf-8")).hexdigest()
    raw = _read_bytes(path)
    sha = hashlib.sha256(raw).hexdigest()
    if path.name.lower().endswith(".gz"):
        import gzip
        import zlib

        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise UserError(f"data file {path} is not valid gzip ({one_line(exc)})") from None
    import json

    docs = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)  # bytes: JSON's own UTF-8 (a bad byte is an error)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(
                f"data file {path} line {number} is not valid JSON ({one_line(exc)}); "
                'each line must be an object with a "text" field'
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            got = "no" if not isinstance(record, dict) or "text" not in record else "a non-string"
            raise UserError(
                f'data file {path} line {number} has {got} "text" field; each line must be '
                'a JSON object like {"text": "..."}'
            )
        docs.append(record["text"])
    if not any(docs):
        raise UserError(f'data file {path} holds no text; give lines like {{"text": "..."}}')
    return docs, sha


def read_text_file(path: str | Path) -> str:
    """A local UTF-8 text file; missing, unreadable, non-UTF-8 or empty -> UserError."""
    path = Path(path).expanduser()
    data = _read_bytes(path)
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
    if dest.is_file() and file_sha256(dest) == sha256:
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {dest.parent} ({one_line(exc)})") from exc
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
                f"could not download {url} ({one_line(reason)}); {alternative}"
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
