"""Token shards in llm.c's format, so llm.c and modded-nanogpt shards load unchanged.

A shard is a header of 256 little-endian int32 (magic 20240520, a version, the token
count, then zeros) followed by the tokens: uint16 under version 1, llm.c's GPT-2
shards; uint32 under version 2, raygpt's own, for vocabularies over 65,535 ids. llm.c's
llama-3 shards (magic 20240801, version 7, uint32) are read as well.

Shards are read through a pyarrow filesystem, so the same checks run on a local
disk and on object storage; the sampler memory-maps local shards itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from raygpt.errors import UserError

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# (magic, version) -> token dtype. Version 2 is raygpt's: llm.c gives uint32 tokens only
# a magic of their own (llama-3), which llm.c's GPT-2 loader would then refuse.
VERSIONS = {(MAGIC, 1): "uint16", (MAGIC, 2): "uint32", (20240801, 7): "uint32"}
WRITE_VERSION = {"uint16": 1, "uint32": 2}
MAX_TOKENS = 2**31 - 1  # the count is an int32
_UINT16_MAX_VOCAB = 65535
_CHUNK = 1 << 22


def choose_dtype(vocab_size: int) -> str:
    """The token dtype for a vocabulary: "uint16" up to 65535 ids, else "uint32"."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return "uint16" if vocab_size <= _UINT16_MAX_VOCAB else "uint32"


def header(n_tokens: int, dtype: str) -> bytes:
    """The 1024-byte header of a shard of `n_tokens` tokens of `dtype`."""
    if not 0 <= n_tokens <= MAX_TOKENS:
        raise ValueError(f"a shard holds at most {MAX_TOKENS} tokens, got {n_tokens}")
    head = np.zeros(HEADER_INTS, dtype="<i4")
    head[:3] = (MAGIC, WRITE_VERSION[dtype], n_tokens)
    return head.tobytes()


@dataclass(frozen=True)
class ShardHeader:
    dtype: str
    tokens: int

    @property
    def size(self) -> int:
        """The file's size in bytes."""
        return HEADER_BYTES + self.tokens * np.dtype(self.dtype).itemsize


def parse_header(raw: bytes, where: str, file_size: int | None = None) -> ShardHeader:
    """The header at the start of a shard; UserError naming `where` if it is not one."""
    if len(raw) < HEADER_BYTES:
        raise UserError(
            f"{where} is truncated or corrupt: {len(raw)} bytes, shorter than the "
            f"{HEADER_BYTES}-byte shard header"
        )
    magic, version, count = (int(v) for v in np.frombuffer(raw[:12], dtype="<i4"))
    if magic not in {m for m, _ in VERSIONS}:
        raise UserError(
            f"{where} is not a token shard: it starts with magic {magic}, expected {MAGIC} "
            "(llm.c's format)"
        )
    dtype = VERSIONS.get((magic, version))
    if dtype is None:
        known = ", ".join(f"{v} ({d})" for (m, v), d in VERSIONS.items() if m == magic)
        raise UserError(f"{where} has shard version {version}; known versions: {known}")
    if count < 0:
        raise UserError(f"{where} is truncated or corrupt: its header counts {count} tokens")
    shard = ShardHeader(dtype, count)
    if file_size is not None and file_size != shard.size:
        raise UserError(
            f"{where} has {file_size} bytes but its header says {count} {dtype} tokens "
            f"({shard.size} bytes); the file is truncated or corrupt"
        )
    return shard


class ShardWriter:
    """Writes one shard to a local file as tokens arrive; the header goes in last.

    The count is known only at the end, so the file starts with a zeroed header that
    `close()` overwrites, then hashes the finished file (just written: read back from
    the page cache).
    """

    def __init__(self, path: str, dtype: str):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.tokens = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close() or abort()
        self._file.write(bytes(HEADER_BYTES))

    def append(self, tokens: np.ndarray) -> None:
        if len(tokens):
            self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
            self.tokens += len(tokens)

    def close(self) -> str:
        """Finish the file (header, fsync); return its sha256."""
        if self.tokens > MAX_TOKENS:
            self.abort()
            raise UserError(
                f"{self.path}: {self.tokens} tokens exceed a shard's {MAX_TOKENS}; "
                "use smaller work units (--unit-mb)"
            )
        self._file.seek(0)
        self._file.write(header(self.tokens, self.dtype.name))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return local_sha256(self.path)

    def abort(self) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def write_shard(path: str, tokens: np.ndarray, dtype: str) -> str:
    """Write a whole shard at once; return its sha256."""
    writer = ShardWriter(path, dtype)
    try:
        writer.append(tokens)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def local_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fs_sha256(fs: Any, path: str) -> str:
    """sha256 of a file on a pyarrow filesystem, streamed."""
    h = hashlib.sha256()
    with fs.open_input_stream(path, compression=None) as stream:
        while chunk := stream.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_header(fs: Any, path: str, where: str | None = None) -> ShardHeader:
    """The header of the shard at `path` on `fs`, checked against the file's size."""
    where = where or path
    try:
        with fs.open_input_file(path) as f:
            size = f.size()
            raw = f.read_at(min(size, HEADER_BYTES), 0) if size else b""
    except FileNotFoundError:
        raise UserError(f"{where} is missing") from None
    return parse_header(bytes(raw), where, size)
