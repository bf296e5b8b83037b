"""Tests for raygpt.data: preparation, caching, tokenizers, downloads and batch sampling.

Everything here is offline: downloads use file:// URLs made by the tests, and the GPT-2
path runs with a small real tiktoken Encoding injected in place of the downloaded one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from builders import BS, MERGES, tiny_encoding, write_text
from conftest import REPO

from raygpt.data import cache, manifest, prepare, sampler, shards, sources, tokenizers
from raygpt.errors import UserError

PREPARE = sys.modules["raygpt.data.prepare"]  # the module (prepare.prepare is its function)


SAMPLE_TEXT = (
    'She said "the \\ path" then\n\ttabbed, then the end.\r\n'
    "Unicode: café, naïve, 東京, €5, 🙂 and the others.\n\n"
    "Their theory: the thin thread in winter.\n"
) * 40


def read_bin(dataset_dir: Path, split: str, meta: dict) -> np.ndarray:
    return np.asarray(sampler.read_tokens(dataset_dir, split))


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "raygpt.data", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def pydocs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pydocs-root")
    started = time.perf_counter()
    d = prepare.prepare("pydocs_char", data_dir=root)
    return d, manifest.load_meta(d), time.perf_counter() - started


def test_pydocs_prepare_size_vocab_and_meta(pydocs):
    d, meta, _ = pydocs
    assert d.name == "pydocs_char"
    assert meta["format"] == manifest.FORMAT and meta["dataset"] == "pydocs_char"
    assert meta["tokenizer"] == "char" and meta["dtype"] == "uint16"
    assert 80 <= meta["vocab_size"] <= 100
    assert meta["vocab_size"] == len(meta["itos"])
    total = meta["train_tokens"] + meta["val_tokens"]
    assert total > 1_000_000
    assert meta["val_tokens"] == total - int(total * 0.9)
    assert meta["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert set(meta["itos"]) <= set(chr(c) for c in range(32, 127)) | {"\n"}


def test_pydocs_is_deterministic_and_decodes_to_corpus(pydocs):
    d, meta, _ = pydocs
    corpus = sources.build_pydocs_corpus()  # a second, independent build
    assert hashlib.sha256(corpus.encode()).hexdigest() == meta["source_sha256"]
    tok = tokenizers.tokenizer_from_meta(meta)
    ids = np.concatenate([read_bin(d, "train", meta), read_bin(d, "val", meta)])
    assert tok.decode(ids.tolist()) == corpus


def test_prepare_reuses_the_cached_directory(pydocs):
    d, _, _ = pydocs
    before = (d / manifest.MANIFEST).stat().st_mtime_ns
    started = time.perf_counter()
    assert prepare.prepare(data_dir=d.parent) == d
    assert time.perf_counter() - started < 1.0
    assert (d / manifest.MANIFEST).stat().st_mtime_ns == before
    assert not [p for p in d.parent.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_pydocs_files_skip_tests_and_site_packages():
    files = sources.pydocs_files()
    assert files and files == sorted(files, key=str)
    parts = {part for f in files for part in f.parts}
    assert not parts & {"site-packages", "test", "tests", "idlelib", "lib2to3", "ensurepip"}


def test_char_vocab_round_trips_through_meta_json(tmp_path):
    f = write_text(tmp_path / "sample.txt", SAMPLE_TEXT)
    d = prepare.prepare(data_file=f, data_dir=tmp_path / "cache")
    sha = hashlib.sha256(SAMPLE_TEXT.encode()).hexdigest()
    assert d.name == f"file-sample-{sha[:12]}-char"
    raw = json.loads((d / manifest.MANIFEST).read_text(encoding="utf-8"))["tokenizer"]
    assert raw["itos"] == sorted(set(SAMPLE_TEXT))
    for c in ['"', "\\", "\n", "\r", "\t", "é", "東", "🙂"]:
        assert c in raw["itos"]
    meta = manifest.load_meta(d)
    assert meta["source_sha256"] == sha
    tok = tokenizers.tokenizer_from_meta(meta)
    ids = np.concatenate([read_bin(d, "train", meta), read_bin(d, "val", meta)])
    assert tok.decode(ids.tolist()) == SAMPLE_TEXT
    assert tok.encode(SAMPLE_TEXT) == ids.tolist()
    assert tok.decode(tok.encode('"\\\n')) == '"\\\n'


def test_char_encode_unknown_character_names_it(tmp_path):
    d = prepare.prepare(
        data_file=write_text(tmp_path / "abc.txt", "abcabc" * 10), data_dir=tmp_path
    )
    tok = tokenizers.tokenizer_from_meta(manifest.load_meta(d))
    with pytest.raises(UserError, match="'z'"):
        tok.encode("abz")


def test_data_file_gpt2_with_injected_encoding(tmp_path):
    enc = tiny_encoding()
    f = write_text(tmp_path / "story.txt", SAMPLE_TEXT)
    d = prepare.prepare(data_file=f, tokenizer="gpt2", data_dir=tmp_path, encoding=enc)
    assert d.name.endswith("-gpt2")
    meta = manifest.load_meta(d)
    assert meta["tokenizer"] == "gpt2" and "itos" not in meta
    assert meta["vocab_size"] == enc.n_vocab == 256 + len(MERGES) + 1
    assert meta["eos_token"] == enc.eot_token and meta["dtype"] == "uint16"
    assert meta["encoding"] == "tiny-gpt2"
    ids = np.concatenate([read_bin(d, "train", meta), read_bin(d, "val", meta)])
    assert enc.eot_token not in ids  # a single file: no <|endoftext|>
    assert ids.tolist() == enc.encode_ordinary(SAMPLE_TEXT)
    assert (ids >= 256).any()  # merges were used
    tok = tokenizers.tokenizer_from_meta(meta, encoding=enc)
    assert tok.decode(ids.tolist()) == SAMPLE_TEXT


def test_gpt2_puts_endoftext_between_documents_only():
    enc = tiny_encoding()
    docs = ["the first", "then the second", "third"]
    ids, meta = tokenizers._tokenize(sources.Source(docs, "docs"), "gpt2", enc)
    first, second, third = (enc.encode_ordinary(doc) for doc in docs)
    assert ids.tolist() == [*first, enc.eot_token, *second, enc.eot_token, *third]
    assert meta["eos_token"] == enc.eot_token


def test_choose_dtype_and_uint32_for_a_big_vocab(tmp_path):
    assert shards.choose_dtype(96) == "uint16"
    assert shards.choose_dtype(50257) == "uint16"
    assert shards.choose_dtype(65535) == "uint16"
    assert shards.choose_dtype(65536) == "uint32"
    enc = tiny_encoding(eot_id=70_000, name="tiny-big")
    text = "the thin end. " * 300 + "<|endoftext|> stays text"
    f = write_text(tmp_path / "big.txt", text)
    d = prepare.prepare(data_file=f, tokenizer="gpt2", data_dir=tmp_path, encoding=enc)
    meta = manifest.load_meta(d)
    assert meta["vocab_size"] == 70_001 and meta["dtype"] == "uint32"
    assert (d / "train_000000.bin").stat().st_size == 1024 + 4 * meta["train_tokens"]
    ids = np.concatenate([read_bin(d, "train", meta), read_bin(d, "val", meta)])
    assert 70_000 not in ids  # the special token's text is encoded as ordinary text
    assert tokenizers.tokenizer_from_meta(meta, encoding=enc).decode(ids.tolist()) == text
    x, y = sampler.BatchSampler(d, "train", 8, seed=0).get_batch(0, 0, 0, 2, 1, 1)
    assert x.dtype == y.dtype and str(x.dtype) == "torch.int64"


def test_missing_and_non_utf8_data_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError, match=re.escape(str(missing))):
        prepare.prepare(data_file=missing, data_dir=tmp_path)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match=re.escape(str(bad)) + ".*UTF-8"):
        prepare.prepare(data_file=bad, data_dir=tmp_path)
    empty = write_text(tmp_path / "empty.txt", "")
    with pytest.raises(UserError, match="empty"):
        prepare.prepare(data_file=empty, data_dir=tmp_path)


def test_bad_arguments_raise_user_error(tmp_path):
    with pytest.raises(UserError, match=r"unknown dataset 'nope'.*pydocs_char"):
        prepare.prepare("nope", data_dir=tmp_path)
    with pytest.raises(UserError, match="unknown tokenizer"):
        prepare.prepare(data_file=tmp_path / "x.txt", tokenizer="wordpiece", data_dir=tmp_path)
    with pytest.raises(UserError, match="shakespeare_char uses the char tokenizer"):
        prepare.prepare("shakespeare_char", tokenizer="gpt2", data_dir=tmp_path)
    with pytest.raises(UserError, match="val_fraction"):
        prepare.prepare(val_fraction=1.5, data_dir=tmp_path)
    with pytest.raises(UserError, match="too few"):
        prepare.prepare(data_file=write_text(tmp_path / "t.txt", "abc"), data_dir=tmp_path)


def test_data_dir_from_environment_and_val_fraction(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.DATA_DIR_ENV, str(tmp_path / "env-root"))
    f = write_text(tmp_path / "t.txt", "hello world, " * 100)
    d = prepare.prepare(data_file=f)
    assert d.parent == tmp_path / "env-root"
    d2 = prepare.prepare(data_file=f, val_fraction=0.25)
    assert d2 != d and d2.name.endswith("-val0.25")
    meta = manifest.load_meta(d2)
    assert meta["val_tokens"] == 1300 - int(1300 * 0.75)


def test_download_file_url_with_correct_sha(tmp_path):
    src = write_text(tmp_path / "remote.txt", SAMPLE_TEXT)
    raw = src.read_bytes()
    dest = tmp_path / "cache" / "copy.txt"
    sha = hashlib.sha256(raw).hexdigest()
    got = sources.download(src.as_uri(), dest, sha256=sha, size=len(raw))
    assert got == dest and dest.read_bytes() == raw
    src.unlink()  # cached now: no second fetch
    assert sources.download(src.as_uri(), dest, sha256=sha, size=len(raw)) == dest
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.txt"]


def test_download_with_wrong_sha_caches_nothing(tmp_path):
    src = write_text(tmp_path / "remote.txt", SAMPLE_TEXT)
    dest = tmp_path / "cache" / "copy.txt"
    with pytest.raises(UserError, match="nothing was cached") as err:
        sources.download(src.as_uri(), dest, sha256="0" * 64)
    assert src.as_uri() in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="1 bytes"):
        sources.download(
            src.as_uri(), dest, sha256=hashlib.sha256(src.read_bytes()).hexdigest(), size=1
        )
    assert list(dest.parent.iterdir()) == []


def test_unreachable_url_names_url_and_alternative(tmp_path):
    url = (tmp_path / "does-not-exist.txt").as_uri()
    with pytest.raises(UserError) as err:
        sources.download(url, tmp_path / "cache" / "x.txt", sha256="0" * 64, timeout=5)
    msg = str(err.value)
    assert url in msg and "--data-file PATH" in msg and "\n" not in msg
    assert list((tmp_path / "cache").iterdir()) == []


def test_shakespeare_datasets_share_one_verified_download(tmp_path, monkeypatch):
    src = write_text(tmp_path / "input.txt", SAMPLE_TEXT)
    raw = src.read_bytes()
    monkeypatch.setattr(sources, "SHAKESPEARE_URL", src.as_uri())
    monkeypatch.setattr(sources, "SHAKESPEARE_SIZE", len(raw))
    monkeypatch.setattr(sources, "SHAKESPEARE_SHA256", hashlib.sha256(raw).hexdigest())
    root = tmp_path / "root"
    d_char = prepare.prepare("shakespeare_char", data_dir=root)
    src.unlink()  # the gpt2 variant must reuse the cached download
    enc = tiny_encoding()
    d_bpe = prepare.prepare("shakespeare", data_dir=root, encoding=enc)
    assert (d_char.name, d_bpe.name) == ("shakespeare_char", "shakespeare")
    m_char, m_bpe = manifest.load_meta(d_char), manifest.load_meta(d_bpe)
    assert m_char["source_sha256"] == m_bpe["source_sha256"] == sources.SHAKESPEARE_SHA256
    ids = np.concatenate([read_bin(d_bpe, "train", m_bpe), read_bin(d_bpe, "val", m_bpe)])
    assert enc.decode(ids.tolist()) == SAMPLE_TEXT


def test_shakespeare_sha_mismatch_leaves_nothing(tmp_path, monkeypatch):
    src = write_text(tmp_path / "input.txt", SAMPLE_TEXT)
    monkeypatch.setattr(sources, "SHAKESPEARE_URL", src.as_uri())
    root = tmp_path / "root"
    with pytest.raises(UserError, match="nothing was cached"):
        prepare.prepare("shakespeare_char", data_dir=root)
    leftovers = [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert leftovers == [] and not (root / "shakespeare_char").exists()


def _assert_gpt2_message(err: UserError) -> None:
    msg = str(err)
    assert "\n" not in msg
    assert tokenizers.GPT2_VOCAB_URL in msg
    assert "TIKTOKEN_CACHE_DIR" in msg and "--tokenizer char" in msg


def test_offline_gpt2_fails_fast_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(tokenizers, "_probe_vocab_url", lambda: "Name or service not known")
    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        tokenizers.load_gpt2_encoding()
    assert time.perf_counter() - started < 2.0
    _assert_gpt2_message(err.value)
    # prepare goes through the same loader and leaves nothing behind
    f = write_text(tmp_path / "t.txt", SAMPLE_TEXT)
    with pytest.raises(UserError) as err:
        prepare.prepare(data_file=f, tokenizer="gpt2", data_dir=tmp_path / "root")
    _assert_gpt2_message(err.value)
    assert not [p for p in (tmp_path / "root").iterdir() if p.is_dir()]


def test_hanging_gpt2_download_times_out(tmp_path):
    def hang(name):
        time.sleep(30)

    started = time.perf_counter()
    with pytest.raises(UserError, match=r"no vocabulary after 0\.3 s") as err:
        tokenizers.load_gpt2_encoding(0.3, get_encoding=hang, probe=lambda: None)
    assert time.perf_counter() - started < 3.0
    _assert_gpt2_message(err.value)


def test_gpt2_load_error_becomes_user_error():
    def refuse(name):
        raise ConnectionError("HTTPSConnectionPool: Max retries exceeded\nwith url")

    with pytest.raises(UserError, match="ConnectionError") as err:
        tokenizers.load_gpt2_encoding(get_encoding=refuse, probe=lambda: None)
    _assert_gpt2_message(err.value)
    enc = tiny_encoding()
    assert tokenizers.load_gpt2_encoding(get_encoding=lambda n: enc, probe=lambda: None) is enc


def test_losing_the_rename_race_is_tolerated(tmp_path, monkeypatch):
    """Without the lock (e.g. a filesystem without flock), a rival finishing first wins."""
    monkeypatch.setattr(PREPARE, "file_lock", lambda path: contextlib.nullcontext())
    f = write_text(tmp_path / "race.txt", SAMPLE_TEXT)
    real_write = PREPARE._write_dataset
    rival: list[Path] = []

    def write_then_get_overtaken(tmp, ids, meta, val_fraction):
        out = real_write(tmp, ids, meta, val_fraction)
        if not rival:  # the rival's own nested prepare must not recurse
            rival.append(Path())
            rival[0] = prepare.prepare(data_file=f, data_dir=tmp_path / "root")
        return out

    monkeypatch.setattr(PREPARE, "_write_dataset", write_then_get_overtaken)
    d = prepare.prepare(data_file=f, data_dir=tmp_path / "root")
    assert d == rival[0]
    manifest.load_meta(d)
    assert [p.name for p in (tmp_path / "root").iterdir()] == [d.name]


@pytest.fixture
def small_dataset(tmp_path):
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefgh \n"), size=4000))
    return prepare.prepare(data_file=write_text(tmp_path / "small.txt", text), data_dir=tmp_path)


def test_corrupt_manifest_names_the_file(small_dataset):
    meta_path = small_dataset / manifest.MANIFEST
    meta_path.write_text("{not json")
    with pytest.raises(UserError, match="prepare") as err:
        manifest.load_meta(small_dataset)
    assert str(meta_path) in str(err.value) and "\n" not in str(err.value)
    meta_path.write_text(
        json.dumps({"format": manifest.FORMAT, "format_version": 1, "dataset": "x"})
    )
    with pytest.raises(UserError, match=re.escape(str(meta_path)) + ".*lacks"):
        manifest.load_meta(small_dataset)
    meta_path.unlink()
    with pytest.raises(UserError, match=re.escape(f"{meta_path} is missing")):
        manifest.load_meta(small_dataset)


def test_truncated_or_missing_shard_names_the_file(small_dataset):
    train = small_dataset / "train_000000.bin"
    good = train.read_bytes()
    train.write_bytes(good[:-2])
    with pytest.raises(UserError, match=re.escape(str(train)) + ".*truncated.*delete"):
        manifest.load_meta(small_dataset)
    with pytest.raises(UserError, match=re.escape(str(train))):
        sampler.BatchSampler(small_dataset, "train", 8, seed=0)
    train.write_bytes(good)
    manifest.load_meta(small_dataset)
    (small_dataset / "val_000000.bin").unlink()
    with pytest.raises(UserError, match=re.escape(str(small_dataset / "val_000000.bin"))):
        manifest.load_meta(small_dataset)


def test_prepare_replaces_a_broken_directory(small_dataset, tmp_path):
    (small_dataset / "train_000000.bin").write_bytes(b"")
    d = prepare.prepare(data_file=tmp_path / "small.txt", data_dir=tmp_path)
    assert d == small_dataset
    manifest.load_meta(d)


def starts_of_step(s: sampler.BatchSampler, step: int, mb: int, ws: int, ga: int) -> list[list]:
    """Per (micro_step, rank): the window starts."""
    return [s.sample_indices(step, r, m, mb, ws, ga).tolist() for m in range(ga) for r in range(ws)]


def test_ranks_never_share_a_window_within_an_epoch(legacy):
    s = sampler.BatchSampler(legacy, "train", BS, seed=3)
    mb, ws, ga = 3, 4, 2
    steps = s.steps_per_epoch(mb, ws, ga)
    assert steps == s.num_windows // (mb * ws * ga) >= 10
    seen: list[int] = []
    for step in range(steps):
        per_slot = starts_of_step(s, step, mb, ws, ga)
        flat = [x for slot in per_slot for x in slot]
        assert len(flat) == len(set(flat)) == mb * ws * ga
        seen.extend(flat)
    assert len(seen) == len(set(seen))  # the whole epoch: every window at most once
    shift = seen[0] % BS
    assert all(x % BS == shift for x in seen)  # one window grid per epoch: no overlaps
    assert max(seen) + BS + 1 <= s.n_tokens
    next_epoch = set(x for slot in starts_of_step(s, steps, mb, ws, ga) for x in slot)
    first = set(x for slot in starts_of_step(s, 0, mb, ws, ga) for x in slot)
    assert next_epoch != first


def test_two_ranks_b_equal_one_rank_2b_per_step(legacy):
    s = sampler.BatchSampler(legacy, "train", BS, seed=11)
    for step in [0, 1, 5, 40, 123]:
        two = set(x for slot in starts_of_step(s, step, 4, 2, 1) for x in slot)
        one = set(x for slot in starts_of_step(s, step, 8, 1, 1) for x in slot)
        accum = set(x for slot in starts_of_step(s, step, 4, 1, 2) for x in slot)
        assert two == one == accum and len(one) == 8


def test_same_step_gives_identical_batch_resume(legacy):
    a = sampler.BatchSampler(legacy, "train", BS, seed=5)
    xa, ya = a.get_batch(37, 1, 1, 4, 2, 2)
    a.get_batch(900, 0, 0, 4, 2, 2)  # move its epoch cache elsewhere
    b = pickle.loads(pickle.dumps(sampler.BatchSampler(legacy, "train", BS, seed=5)))
    xb, yb = b.get_batch(37, 1, 1, 4, 2, 2)
    xa2, ya2 = a.get_batch(37, 1, 1, 4, 2, 2)
    assert xa.equal(xb) and ya.equal(yb) and xa.equal(xa2) and ya.equal(ya2)
    xc, _ = sampler.BatchSampler(legacy, "train", BS, seed=6).get_batch(37, 1, 1, 4, 2, 2)
    assert not xa.equal(xc)


def test_batch_contents_shapes_and_shift(legacy):
    s = sampler.BatchSampler(legacy, "val", BS, seed=0)
    raw = np.asarray(sampler.read_tokens(legacy, "val"))
    starts = s.sample_indices(2, 0, 0, 5, 1, 1)
    x, y = s.get_batch(2, 0, 0, 5, 1, 1)
    assert tuple(x.shape) == tuple(y.shape) == (5, BS)
    assert str(x.dtype) == "torch.int64" and x.device.type == "cpu"
    assert x.is_contiguous() and y.is_contiguous()
    for row, st in enumerate(starts):
        assert x[row].tolist() == raw[st : st + BS].tolist()
        assert y[row].tolist() == raw[st + 1 : st + BS + 1].tolist()


def test_sampler_pickles_small_after_use(legacy):
    s = sampler.BatchSampler(legacy, "train", BS, seed=0)
    s.get_batch(0, 0, 0, 4, 1, 1)
    assert s.tokens._maps  # the shard is open (memory-mapped) ...
    assert len(pickle.dumps(s)) < 2000  # ... and not pickled


def test_eval_batches_fixed_and_disjoint_across_ranks(legacy):
    s = sampler.BatchSampler(legacy, "val", BS, seed=7)
    first = s.eval_batches(3, 2, 0, 2)
    s.get_batch(50, 0, 0, 2, 1, 1)  # training progress must not move the eval set
    again = sampler.BatchSampler(legacy, "val", BS, seed=7).eval_batches(3, 2, 0, 2)
    assert len(first) == 3
    assert all(a[0].equal(b[0]) and a[1].equal(b[1]) for a, b in zip(first, again, strict=True))
    r0 = [x for arr in s.eval_indices(3, 2, 0, 2) for x in arr.tolist()]
    r1 = [x for arr in s.eval_indices(3, 2, 1, 2) for x in arr.tolist()]
    assert len(set(r0)) == 6 and not set(r0) & set(r1)
    single = [x for arr in s.eval_indices(3, 4, 0, 1) for x in arr.tolist()]
    assert set(single) == set(r0) | set(r1)


def test_eval_larger_than_the_split_cycles_through_passes(legacy):
    s = sampler.BatchSampler(legacy, "val", BS, seed=7)
    k = s.num_windows
    iters = (2 * k) // 8 + 3  # more than two passes over the split
    per_rank = [np.concatenate(s.eval_indices(iters, 4, r, 2)).reshape(iters, 4) for r in range(2)]
    order = np.stack(per_rank, axis=1).reshape(-1)  # global eval order: iter, rank, sample
    assert len(order) == iters * 8 > 2 * k
    assert len(set(order[:k].tolist())) == k  # first pass: every window exactly once
    assert len(set(order[k : 2 * k].tolist())) == k
    assert all(x >= 0 and x + BS + 1 <= s.n_tokens for x in order.tolist())
    first = s.eval_indices(2, 4, 0, 2)
    assert all((a == b).all() for a, b in zip(first, per_rank[0][:2], strict=True))


def test_block_size_too_large_names_the_numbers(legacy):
    meta = manifest.load_meta(legacy)
    n_val = meta["val_tokens"]
    with pytest.raises(UserError) as err:
        sampler.BatchSampler(legacy, "val", n_val, seed=0)
    assert f"block_size {n_val}" in str(err.value) and f"{n_val} tokens" in str(err.value)
    tight = sampler.BatchSampler(legacy, "val", n_val - 1, seed=0)  # exactly one window
    assert tight.num_windows == 1
    x, _ = tight.get_batch(3, 0, 0, 1, 1, 1)
    assert tuple(x.shape) == (1, n_val - 1)
    s = sampler.BatchSampler(legacy, "val", 256, seed=0)
    with pytest.raises(UserError) as err:
        s.get_batch(0, 0, 0, 8, 2, 1)
    msg = str(err.value)
    assert "block_size 256" in msg and f"{n_val} tokens" in msg and "16 sequences" in msg


def test_cli_bad_input_exits_2_with_one_error_line(tmp_path):
    missing = tmp_path / "missing.txt"
    for args in (
        ["prepare", "--data-file", str(missing), "--data-dir", str(tmp_path)],
        ["prepare", "--tokenizer", "bpe"],
        ["prepare", "--dataset", "nope", "--data-dir", str(tmp_path)],
        [],
    ):
        res = run_cli(*args)
        assert res.returncode == 2, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
        assert "Traceback" not in res.stderr and res.stdout == ""
    assert str(missing) in run_cli("prepare", "--data-file", str(missing)).stderr


def test_cli_list_and_prepare(tmp_path):
    res = run_cli("list")
    assert res.returncode == 0
    for name in ("pydocs_char", "shakespeare_char", "shakespeare"):
        assert name in res.stdout
    f = write_text(tmp_path / "t.txt", SAMPLE_TEXT)
    res = run_cli("prepare", "--data-file", str(f), "--data-dir", str(tmp_path / "root"))
    assert res.returncode == 0, res.stderr
    out = res.stdout.strip().splitlines()
    assert len(out) == 2 and Path(out[0]).is_dir()
    meta = manifest.load_meta(out[0])
    assert (
        f"{meta['train_tokens']:,} train" in out[1] and f"vocab_size {meta['vocab_size']}" in out[1]
    )


def test_concurrent_prepares_agree(tmp_path):
    f = write_text(tmp_path / "t.txt", SAMPLE_TEXT * 20)
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "raygpt.data", "prepare", "--data-file", str(f)]
    procs = [
        subprocess.Popen(
            [*cmd, "--data-dir", str(root)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    dirs = {out.splitlines()[0] for out, _ in outs}
    assert len(dirs) == 1
    manifest.load_meta(dirs.pop())
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        f"file-t-{hashlib.sha256((SAMPLE_TEXT * 20).encode()).hexdigest()[:12]}-char"
    ]
