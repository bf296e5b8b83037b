"""Token shards and dataset folders of every kind, and batches across shards (no Ray).

llm.c and nanoGPT files are written here by independent writers (plain numpy, as
llm.c's `write_datafile` and nanoGPT's prepare.py write them), never by raygpt.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from builders import (
    BS,
    LEGACY_BATCHES_SHA256,
    batches_sha256,
    tiny_encoding,
    write_text,
)

from raygpt.data import cli, prepare, sampler, tokenizers
from raygpt.data import manifest as data_manifest
from raygpt.data.shards import read_header, write_shard
from raygpt.errors import UserError


def llmc_write(path: Path, tokens, magic: int = 20240520, version: int = 1, dtype=np.uint16):
    """llm.c's dev/data/data_common.py write_datafile, restated."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.array(tokens, dtype=dtype).tobytes())


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("dtype, version", [("uint16", 1), ("uint32", 2)])
def test_shard_round_trips(tmp_path, dtype, version):
    import pyarrow.fs as pafs

    top = 70_000 if dtype == "uint32" else 65_535
    tokens = np.random.default_rng(0).integers(0, top + 1, size=5000).astype(dtype)
    tokens[:2] = (0, top)
    path = tmp_path / "s.bin"
    sha = write_shard(str(path), tokens, dtype)
    raw = path.read_bytes()
    assert sha == hashlib.sha256(raw).hexdigest()
    expected_header = np.zeros(256, np.int32)
    expected_header[:3] = (20240520, version, len(tokens))
    assert raw[:1024] == expected_header.tobytes()  # llm.c's header, byte for byte
    assert raw[1024:] == tokens.tobytes() and len(raw) == 1024 + tokens.nbytes
    head = read_header(pafs.LocalFileSystem(), str(path))
    assert (head.dtype, head.tokens) == (dtype, len(tokens))
    shard = {"path": str(path), "tokens": len(tokens), "offset": 1024}
    split = sampler.TokenSplit(str(tmp_path), [shard], dtype)
    assert split.read(0, len(tokens)).tolist() == tokens.tolist()
    assert split.read(4990, 10).tolist() == tokens[4990:].tolist()


def test_llmc_shards_from_an_independent_writer_load(tmp_path):
    rng = np.random.default_rng(1)
    val = rng.integers(0, 50257, 3000)
    train = [rng.integers(0, 50257, n) for n in (4000, 2500)]
    folder = tmp_path / "edu_fineweb10B"
    folder.mkdir()
    llmc_write(folder / "edu_fineweb_val_000000.bin", val)
    llmc_write(folder / "edu_fineweb_train_000001.bin", train[0])
    llmc_write(folder / "edu_fineweb_train_000002.bin", train[1])
    meta = data_manifest.load_meta(folder)
    assert (meta["format"], meta["tokenizer"], meta["vocab_size"]) == ("llm.c", "gpt2", 50257)
    assert (meta["train_tokens"], meta["val_tokens"]) == (6500, 3000)
    whole = np.concatenate(train)
    s = sampler.BatchSampler(folder, "train", 64, seed=2)
    seen_boundary = False
    for step in range(20):
        starts = s.sample_indices(step, 0, 0, 8, 1, 1)
        x, y = s.get_batch(step, 0, 0, 8, 1, 1)
        for row, st in enumerate(starts.tolist()):
            assert x[row].tolist() == whole[st : st + 64].tolist()
            assert y[row].tolist() == whole[st + 1 : st + 65].tolist()
            seen_boundary |= st < 4000 < st + 65
    assert seen_boundary  # some window was read across the two shards

    # Through the run config, as --dataset-dir PATH.
    from raygpt.config.train import TrainConfig

    cfg = TrainConfig(dataset_dir=str(folder), block_size=64).validate()
    got_dir, got_meta = prepare.prepare_from_config(cfg)
    assert got_dir == str(folder) and got_meta["train_tokens"] == 6500
    assert cfg.default_name().startswith("edu_fineweb10B-")

    llama = tmp_path / "llama"
    llama.mkdir()
    for name, n in (("val_0.bin", 300), ("train_0.bin", 700)):
        llmc_write(llama / name, rng.integers(0, 128_256, n), 20240801, 7, np.uint32)
    meta = data_manifest.load_meta(llama)
    assert (meta["dtype"], meta["vocab_size"], meta["train_tokens"]) == ("uint32", 128256, 700)


def test_nanogpt_bins_load_as_they_are(tmp_path):
    folder = tmp_path / "shakespeare_char"
    folder.mkdir()
    ids = np.random.default_rng(3).integers(0, 65, 9000).astype(np.uint16)
    ids[:900].tofile(folder / "val.bin")  # nanoGPT: headerless uint16
    ids[900:].tofile(folder / "train.bin")
    itos = {i: chr(40 + i) for i in range(65)}
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65, "itos": itos, "stoi": {c: i for i, c in itos.items()}}, f)
    meta = data_manifest.load_meta(folder)
    assert (meta["format"], meta["tokenizer"], meta["vocab_size"]) == ("nanogpt", "char", 65)
    assert meta["itos"] == [itos[i] for i in range(65)]
    assert (meta["train_tokens"], meta["val_tokens"]) == (8100, 900)
    x, _ = sampler.BatchSampler(folder, "val", 32, seed=0).get_batch(0, 0, 0, 4, 1, 1)
    assert set(x.flatten().tolist()) <= set(ids[:900].tolist())
    assert tokenizers.tokenizer_from_meta(meta).decode([0, 1]) == "()"

    (folder / "meta.pkl").unlink()  # OpenWebText's folder has no meta.pkl: GPT-2
    assert data_manifest.load_meta(folder)["vocab_size"] == 50257

    with open(folder / "meta.pkl", "wb") as f:  # a pickle naming a class is not read
        pickle.dump(OrderedDict(vocab_size=65), f)
    with pytest.raises(UserError, match=r"meta\.pkl.*only plain data") as err:
        data_manifest.load_meta(folder)
    one_line_error(err)


def test_bad_shards_are_one_line_and_touch_nothing(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    llmc_write(folder / "val_a.bin", range(100))
    llmc_write(folder / "train_a.bin", range(200))
    (folder / "train_b.bin").write_bytes(np.arange(300, dtype=np.int32).tobytes())
    before = listing(folder)
    with pytest.raises(UserError, match=re.escape(str(folder / "train_b.bin"))) as err:
        data_manifest.load_meta(folder)
    assert "magic 0, expected 20240520" in one_line_error(err)
    (folder / "train_b.bin").unlink()
    cut = (folder / "train_a.bin").read_bytes()[:-2]
    (folder / "train_a.bin").write_bytes(cut)
    before = listing(folder)
    with pytest.raises(UserError, match=r"train_a\.bin.*truncated or corrupt") as err:
        sampler.BatchSampler(folder, "train", 8, seed=0)
    one_line_error(err)
    (folder / "train_a.bin").write_bytes(cut[:100])  # shorter than its header
    with pytest.raises(UserError, match=r"train_a\.bin is truncated or corrupt"):
        data_manifest.load_meta(folder)
    (folder / "train_a.bin").write_bytes(cut)
    assert listing(folder) == before


def test_manifest_sha256_mismatch_is_one_line(tmp_path):
    d = prepare.prepare(
        data_file=write_text(tmp_path / "t.txt", "abcdefgh" * 500), data_dir=tmp_path
    )
    shard = d / "train_000000.bin"
    raw = bytearray(shard.read_bytes())
    raw[2000] ^= 1  # same size, same header: only the hash can tell
    shard.write_bytes(bytes(raw))
    before = listing(d)
    with pytest.raises(UserError, match=re.escape(str(shard)) + ".*sha256.*manifest.json") as err:
        data_manifest.load_meta(d)
    one_line_error(err)
    with pytest.raises(UserError, match="sha256"):
        cli.main.__wrapped__(["verify", str(d)])
    assert listing(d) == before


def test_one_shard_datasets_give_the_batches_they_always_gave(legacy):
    assert batches_sha256(legacy) == LEGACY_BATCHES_SHA256


def test_a_split_reads_the_same_however_it_is_sharded(resharded):
    meta = data_manifest.load_meta(resharded)
    assert [s["tokens"] for s in meta["shards"]["train"]] == [5000, 1, 7344, 5655]
    assert batches_sha256(resharded) == LEGACY_BATCHES_SHA256  # windows across boundaries


def test_two_ranks_never_share_a_window_across_shards(resharded):
    s = sampler.BatchSampler(resharded, "train", BS, seed=3)
    mb, ws, ga = 3, 2, 2
    seen: list[int] = []
    for step in range(s.steps_per_epoch(mb, ws, ga)):
        by_rank = [
            {x for m in range(ga) for x in s.sample_indices(step, r, m, mb, ws, ga).tolist()}
            for r in range(ws)
        ]
        assert not by_rank[0] & by_rank[1]
        seen += [x for r in by_rank for x in r]
    assert len(seen) == len(set(seen))  # and no window twice in an epoch
    bounds = np.cumsum(
        [sh["tokens"] for sh in data_manifest.load_meta(resharded)["shards"]["train"]]
    )
    assert any(a < b < a + BS + 1 for a in seen for b in bounds[:-1])  # some span a boundary


def test_sampler_resumes_exactly(resharded):
    mb, ws, ga = 4, 2, 1
    running = sampler.BatchSampler(resharded, "train", BS, seed=9)
    per_epoch = running.steps_per_epoch(mb, ws, ga)
    steps = range(per_epoch - 3, per_epoch + 3)  # across an epoch boundary
    first = {}
    for step in range(0, steps.stop):  # an uninterrupted run draws every step in order
        batch = [running.get_batch(step, r, 0, mb, ws, ga) for r in range(ws)]
        if step in steps:
            first[step] = batch
    resumed = pickle.loads(pickle.dumps(sampler.BatchSampler(resharded, "train", BS, seed=9)))
    for step in steps:  # a resumed run starts at a step, in a fresh process
        for r in range(ws):
            x, y = resumed.get_batch(step, r, 0, mb, ws, ga)
            assert x.equal(first[step][r][0]) and y.equal(first[step][r][1])


def test_bpe_manifest_records_the_encoding_identity(tmp_path):
    enc = tiny_encoding()
    d = prepare.prepare(data_file=write_text(tmp_path / "s.txt", "the thin end. " * 300),
                     tokenizer="gpt2", data_dir=tmp_path, encoding=enc)  # fmt: skip
    tok = json.loads((d / data_manifest.MANIFEST).read_text())["tokenizer"]
    assert tok["encoding"] == "tiny-gpt2" and len(tok["encoding_sha256"]) == 64
    meta = data_manifest.load_meta(d)
    assert tokenizers.tokenizer_from_meta(meta, encoding=enc).vocab_size == tok["vocab_size"]
    # Same name and vocabulary size, another pre-tokenizing pattern: other token ids.
    spec = tokenizers.encoding_spec(enc)
    other = tokenizers.build_encoding({**spec, "pat_str": r"\S+|\s+"})
    with pytest.raises(UserError, match="another BPE encoding"):
        tokenizers.tokenizer_from_meta(meta, encoding=other)
