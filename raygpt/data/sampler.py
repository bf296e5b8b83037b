"""Deterministic, rank-disjoint, resumable batches over a dataset's shards.

A split is the virtual concatenation of its shards, in manifest order; a window that
spans a shard boundary is read from both. Local shards are memory-mapped and remote
ones (s3://, gs://) read with ranged reads, so a corpus is never loaded whole. With
one shard per split (the small datasets) the windows, and so the batches, are exactly
those of raygpt's earlier flat train.bin/val.bin.

On object storage each request costs tens of milliseconds before its first byte, so
a step's windows (all its micro-batches, `BatchSampler.get_step`) are read together:
the windows of each shard coalesce into as few ranged reads as their gaps allow, and
those run at once on one thread pool that the split keeps until `close()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from raygpt.data.common import SPLITS
from raygpt.data.manifest import load_meta
from raygpt.errors import UserError

EVAL_EPOCH = 2**32 - 1  # epoch id of the fixed evaluation permutation
_REMOTE_READERS = 16  # concurrent ranged reads on object storage, one pool per split
# Windows of a shard less than this apart are one ranged read, the gap read and dropped:
# a request's latency on object storage costs more than a megabyte of transfer.
_COALESCE_GAP_BYTES = 1 << 20
# The largest span one read covers, so that a step's reads of a dense shard still run
# in parallel rather than as one long transfer.
_MAX_READ_BYTES = 16 << 20


class TokenSplit:
    """The tokens of one split, read in place: `read(start, n)` and `windows(starts, n)`.

    Pickles small (shard paths and counts only); files are reopened where it lands.
    """

    def __init__(self, location: str, shards: Sequence[dict[str, Any]], dtype: str):
        self.location = location
        self.shards = [dict(s) for s in shards]
        self.dtype = np.dtype(dtype)
        self.bounds = np.cumsum([0] + [int(s["tokens"]) for s in self.shards], dtype=np.int64)
        self.n_tokens = int(self.bounds[-1])
        self.local = "://" not in location
        self._maps: dict[int, np.ndarray] = {}
        self._files: dict[int, Any] = {}
        self._fs: Any = None
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}, "_files": {}, "_fs": None, "_pool": None}

    def close(self) -> None:
        """Stop the read threads and close the open shards (a later read reopens them)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for file in self._files.values():
            file.close()
        self._files.clear()

    def _memmap(self, i: int) -> np.ndarray:
        if i not in self._maps:
            s = self.shards[i]
            self._maps[i] = np.memmap(
                s["path"], dtype=self.dtype, mode="r", offset=s["offset"], shape=(s["tokens"],)
            )
        return self._maps[i]

    def _open(self, i: int) -> Any:
        """Shard i of a remote split, opened once (pyarrow's read_at is thread-safe)."""
        if self._fs is None:
            from raygpt import storage

            self._fs = storage.resolve(self.location, check=False).fs
        if i not in self._files:
            self._files[i] = self._fs.open_input_file(self.shards[i]["path"])
        return self._files[i]

    def _remote(self, i: int, start: int, n: int) -> np.ndarray:
        size = self.dtype.itemsize
        raw = self._open(i).read_at(n * size, self.shards[i]["offset"] + start * size)
        return np.frombuffer(raw, dtype=self.dtype)

    def _pieces(self, start: int, n: int) -> list[tuple[int, int, int]]:
        """(shard, start in it, count) of tokens [start, start + n) of the split."""
        if start < 0 or start + n > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + n}) outside 0..{self.n_tokens}")
        pieces = []
        i = int(np.searchsorted(self.bounds, start, side="right")) - 1
        while n > 0:
            take = min(n, int(self.bounds[i + 1]) - start)
            if take > 0:
                pieces.append((i, start - int(self.bounds[i]), take))
            start, n, i = start + take, n - take, i + 1
        return pieces

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the split, across shard boundaries."""
        read = self._memmap_slice if self.local else self._remote
        pieces = [read(i, lo, take) for i, lo, take in self._pieces(start, n)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _memmap_slice(self, i: int, start: int, n: int) -> np.ndarray:
        return self._memmap(i)[start : start + n]

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int64 array (len(starts), length): the windows at `starts`."""
        if self.local and len(self.shards) == 1:
            # One gather from the memmap, as the flat files were read.
            idx = starts[:, None] + np.arange(length, dtype=np.int64)
            return np.asarray(self._memmap(0)[idx], dtype=np.int64)
        out = np.empty((len(starts), length), dtype=np.int64)
        if self.local:
            for row, s in enumerate(starts.tolist()):
                out[row] = self.read(s, length)
            return out
        reads = self._coalesced_reads(starts, length)
        if not reads:
            return out
        for i in sorted({shard for shard, _, _, _ in reads}):
            self._open(i)  # here, not racing in the pool's threads

        def fetch(read: tuple[int, int, int, list]) -> np.ndarray:
            return self._remote(*read[:3])

        if len(reads) == 1:
            buffers = [fetch(reads[0])]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_REMOTE_READERS, thread_name_prefix="raygpt-read")
            buffers = self._pool.map(fetch, reads)
        for (_, lo, _, members), tokens in zip(reads, buffers, strict=True):
            for piece_lo, take, row, col in members:
                out[row, col : col + take] = tokens[piece_lo - lo : piece_lo - lo + take]
        return out

    def _coalesced_reads(
        self, starts: np.ndarray, length: int
    ) -> list[tuple[int, int, int, list[tuple[int, int, int, int]]]]:
        """The ranged reads that cover the windows at `starts`: (shard, start, count,
        members), each member a (start in the shard, count, row, column) piece of a window.

        A shard's pieces, in offset order, share a read while the gap to the next is
        under _COALESCE_GAP_BYTES and the read stays within _MAX_READ_BYTES."""
        by_shard: dict[int, list[tuple[int, int, int, int]]] = {}
        for row, s in enumerate(starts.tolist()):
            col = 0
            for i, lo, take in self._pieces(s, length):
                by_shard.setdefault(i, []).append((lo, take, row, col))
                col += take
        gap = _COALESCE_GAP_BYTES // self.dtype.itemsize
        cap = _MAX_READ_BYTES // self.dtype.itemsize
        reads = []
        for i, pieces in sorted(by_shard.items()):
            pieces.sort()
            lo, hi, members = pieces[0][0], pieces[0][0] + pieces[0][1], [pieces[0]]
            for piece in pieces[1:]:
                end = piece[0] + piece[1]
                if piece[0] - hi <= gap and max(hi, end) - lo <= cap:
                    hi = max(hi, end)
                    members.append(piece)
                    continue
                reads.append((i, lo, hi - lo, members))
                lo, hi, members = piece[0], end, [piece]
            reads.append((i, lo, hi - lo, members))
        return reads

    def whole(self) -> np.ndarray:
        """The whole split in memory (a local single shard: its memmap). For small data."""
        if self.local and len(self.shards) == 1:
            return self._memmap(0)
        return self.read(0, self.n_tokens)


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

    Windows are positions in the split's virtual concatenation of shards, so the
    schedule depends only on (seed, step, rank, micro-step) and the split's token
    count, never on how the tokens are cut into shards.
    """

    def __init__(self, dataset_dir: str | Path, split: str, block_size: int, seed: int):
        if split not in SPLITS:
            raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.block_size = _check_positive("block_size", block_size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {seed!r}")
        self.dataset_dir = dataset_dir if "://" in str(dataset_dir) else Path(dataset_dir)
        meta = load_meta(self.dataset_dir)
        self.split = split
        self.split_id = SPLITS.index(split)
        self.seed = int(seed)
        self.dtype = meta["dtype"]
        self.tokens = TokenSplit(meta["location"], meta["shards"][split], meta["dtype"])
        self.n_tokens = self.tokens.n_tokens
        n, bs = self.n_tokens, self.block_size
        self.num_windows = max((n - bs) // bs, 1 if n - 1 >= bs else 0)
        if self.num_windows < 1:
            raise UserError(
                f"block_size {bs} is too large for the {split} split of {self.dataset_dir} "
                f"({n} tokens; a window needs block_size + 1 = {bs + 1}); "
                "use a smaller block size or more data"
            )
        self.max_shift = min(bs - 1, n - 1 - self.num_windows * bs)
        self._epoch_cache: tuple[int, np.ndarray, int] | None = None

    # Ray ships samplers to workers: keep the pickle small, reopen the shards there.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_epoch_cache"] = None
        return state

    @property
    def data(self) -> np.ndarray:
        """The whole split as one array: for small datasets and benchmarks only."""
        return self.tokens.whole()

    def _epoch(self, epoch: int) -> tuple[np.ndarray, int]:
        cache = self._epoch_cache
        if cache is None or cache[0] != epoch:
            perm = _compact(
                np.random.default_rng([self.seed, epoch, self.split_id]).permutation(
                    self.num_windows
                )
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

        buf = torch.from_numpy(self.tokens.windows(starts, self.block_size + 1))
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

    def get_step(
        self, step: int, rank: int, micro_batch: int, world_size: int, grad_accum: int
    ) -> list[tuple[Any, Any]]:
        """This rank's grad_accum micro-batches of one step, in order: get_batch's for each
        micro-step, read together (on object storage, one batch of coalesced reads)."""
        starts = [
            self.sample_indices(step, rank, m, micro_batch, world_size, grad_accum)
            for m in range(grad_accum)
        ]
        return _split(self._windows(np.concatenate(starts)), micro_batch)

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
        """The fixed evaluation batches of this rank: eval_iters (x, y) pairs, read together."""
        starts = self.eval_indices(eval_iters, micro_batch, rank, world_size)
        return _split(self._windows(np.concatenate(starts)), micro_batch)

    def close(self) -> None:
        """Release the split's read threads and open shards (reads after it reopen them)."""
        self.tokens.close()

    def __enter__(self) -> BatchSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"BatchSampler({str(self.dataset_dir)!r}, {self.split!r}, "
            f"block_size={self.block_size}, seed={self.seed})"
        )


def _split(batch: tuple[Any, Any], rows: int) -> list[tuple[Any, Any]]:
    """(x, y) of several micro-batches stacked, as one (x, y) per `rows` rows."""
    x, y = batch
    return [(x[i : i + rows], y[i : i + rows]) for i in range(0, len(x), rows)]


def _compact(perm: np.ndarray) -> np.ndarray:
    """The same permutation in the narrowest unsigned dtype: a 10B-token split at block
    size 1024 has ~10M windows, 78 MB per cached permutation as int64."""
    n = len(perm)
    for dtype in (np.uint16, np.uint32):
        if n <= np.iinfo(dtype).max + 1:
            return perm.astype(dtype)
    return perm


def read_tokens(dataset_dir: str | Path, split: str) -> np.ndarray:
    """A whole split of a (small) dataset as one array, e.g. for a plain PyTorch loop."""
    meta = load_meta(dataset_dir)
    return TokenSplit(meta["location"], meta["shards"][split], meta["dtype"]).whole()
