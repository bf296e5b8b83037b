"""Large-corpus prepare on a real local Ray cluster (Ray Data), and reading its shards.

The corpora are written here (Parquet, JSONL, gzipped JSONL, text); BPE is a small
real tiktoken Encoding (test_data.tiny_encoding), since the GPT-2 vocabulary cannot be
downloaded. Killed drivers are real subprocesses, killed with SIGKILL; object storage
is the moto S3 server of tests/s3server.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import tiny_encoding
from conftest import REPO

from raygpt.data import corpus as data_corpus
from raygpt.data import manifest as data_manifest
from raygpt.data import sampler
from raygpt.errors import UserError

TESTS = Path(__file__).resolve().parents[1]  # conftest, builders and s3server
WORDS = [
    "the",
    "thin",
    "thread",
    "in",
    "winter",
    "their",
    "theory",
    "then",
    "other",
    "café",
    "東京",
    "🙂",
]
SETTINGS = dict(name="corpus", unit_mb=0.05, val_fraction=0.2)  # ~30 units, 20% val


def documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(5, 120))) for _ in range(n)]


def write_corpus(folder: Path, n: int, seed: int = 0) -> list[str]:
    """Parquet (several row groups), JSONL, gzipped JSONL and text; returns every
    document in reading order (files by name, rows/lines in file order)."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = documents(n, seed)
    docs[5] = docs[4]  # an exact duplicate: it lands in the same split
    q = n // 4
    parts = {"a.jsonl": docs[:q], "b.parquet": docs[q : 2 * q], "c.txt": docs[2 * q : 3 * q]}
    parts["d.jsonl.gz"] = docs[3 * q :]
    with open(folder / "a.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(parts["a.jsonl"]):
            f.write(json.dumps({"id": i, "text": d, "extra": [1, 2]}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"text": ""}) + "\n")  # an empty document is left out
    table = pa.table({"url": [f"u{i}" for i in range(q)], "text": parts["b.parquet"]})
    pq.write_table(table, folder / "b.parquet", row_group_size=max(1, q // 7))
    (folder / "c.txt").write_text("\n".join(parts["c.txt"]) + "\n", encoding="utf-8")
    lines = "".join(json.dumps({"text": d}) + "\n" for d in parts["d.jsonl.gz"])
    (folder / "d.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    return [d for name in sorted(parts) for d in parts[name]]


def is_val(text: str, fraction: float) -> bool:
    """The split rule, restated: blake2b-64 of the UTF-8 text below fraction x 2^64."""
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return h < int(fraction * 2**64)


def files(folder: Path) -> dict[str, bytes]:
    """Shards, manifest and receipts by relative path (not the lock file)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus") / "in"
    return folder, write_corpus(folder, 2400)


@pytest.fixture(scope="module")
def reference(ray_cluster, corpus, tmp_path_factory):
    """The corpus prepared on one worker: what every other way must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "corpus"
    data_corpus.prepare_corpus(
        [str(corpus[0])], str(out), encoding=tiny_encoding(), workers=1, **SETTINGS
    )
    return out


def test_prepare_on_two_workers_writes_the_same_bytes_as_on_one(ray_cluster, corpus, reference,
                                                                tmp_path):  # fmt: skip
    out = tmp_path / "corpus"
    enc = tiny_encoding()
    data_corpus.prepare_corpus([str(corpus[0])], str(out), encoding=enc, workers=2, **SETTINGS)
    ref = files(reference)
    assert files(out) == ref
    assert sum(1 for name in ref if name.endswith(".bin")) > 20  # many units, in parallel

    # What is in the shards: every document once, in its split, followed by <|endoftext|>.
    meta = data_manifest.load_meta(out)
    assert (meta["vocab_size"], meta["eos_token"], meta["dtype"]) == (263, 262, "uint16")
    docs = corpus[1]
    for split in ("train", "val"):
        tokens = np.asarray(sampler.read_tokens(out, split)).tolist()
        assert tokens[-1] == enc.eot_token
        got = enc.decode(tokens).split("<|endoftext|>")[:-1]
        want = [d for d in docs if is_val(d, 0.2) == (split == "val")]
        assert got == want  # file order within units, units in order
    assert 0.1 < meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"]) < 0.3
    manifest = json.loads((out / data_manifest.MANIFEST).read_text())
    assert manifest["val_split"]["method"] == "document-hash"
    assert manifest["source"]["documents"]["train"] + manifest["source"]["documents"]["val"] == 2400
    assert {f["format"] for f in manifest["source"]["files"]} == {"parquet", "jsonl", "text"}

    # Run again: nothing to do, nothing rewritten.
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    data_corpus.prepare_corpus([str(corpus[0])], str(out), encoding=enc, workers=2, **SETTINGS)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.bin")} == before


def _driver(script: str, *args: str) -> subprocess.Popen:
    """A prepare driver in its own process, joining the test's Ray cluster."""
    import ray

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}", "RAY_AUTH_MODE": "token"}
    address = ray.get_runtime_context().gcs_address
    return subprocess.Popen(
        [sys.executable, "-c", script, address, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


PREPARE_SCRIPT = """
import resource, sys
from builders import tiny_encoding
from raygpt.data import corpus as data_corpus, manifest as data_manifest, sampler
address, workers, *jobs = sys.argv[1:]
for src, out, unit_mb in zip(jobs[::3], jobs[1::3], jobs[2::3]):
    data_corpus.prepare_corpus([src], out, name="corpus", encoding=tiny_encoding(), workers=int(workers),
                        unit_mb=float(unit_mb), val_fraction=0.2, address=address)
    print("peak_rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def test_killed_prepare_resumes_where_it_stopped(ray_cluster, corpus, reference, tmp_path):
    out = tmp_path / "corpus"
    proc = _driver(PREPARE_SCRIPT, "1", str(corpus[0]), str(out), str(SETTINGS["unit_mb"]))
    receipts = out / data_manifest.RECEIPTS
    deadline = time.monotonic() + 120
    while not any(receipts.glob("0*.json")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no unit finished"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (out / data_manifest.MANIFEST).exists(), "the driver finished before it was killed"
    done = {json.loads(p.read_text())["index"] for p in receipts.glob("0*.json")}
    assert 1 <= len(done) < 20
    kept = {p: p.stat().st_mtime_ns for i in done for p in out.glob(f"*_{i:06d}.bin")}

    data_corpus.prepare_corpus(
        [str(corpus[0])], str(out), encoding=tiny_encoding(), workers=2, **SETTINGS
    )
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # done units were not redone
    assert files(out) == files(reference)
    assert not list(out.glob(".*.tmp"))


def test_driver_memory_does_not_grow_with_the_corpus(ray_cluster, tmp_path):
    """One driver prepares a 1 MB corpus, then a 30 MB one: its peak RSS after the
    first (imports, Ray, Ray Data all warm) must hardly move in the second."""
    jobs, sizes = [], []
    for label, n_docs, words in (("small", 250, 800), ("big", 2500, 2400)):
        src = tmp_path / label
        src.mkdir()
        rng = np.random.default_rng(len(label))
        with open(src / "docs.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n_docs):
                f.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=words))}) + "\n")
        sizes.append((src / "docs.jsonl").stat().st_size)
        # Eight units either way: only the amount of data grows.
        jobs += [str(src), str(tmp_path / f"out-{label}"), str(sizes[-1] / 8 / 2**20)]
    proc = _driver(PREPARE_SCRIPT, "2", *jobs)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    small, big = (int(line.split()[1]) * 1024 for line in out.splitlines() if "peak_rss_kb" in line)
    data_grew = sizes[1] - sizes[0]
    assert data_grew > 25e6
    assert big - small < data_grew / 5, (small, big, sizes)  # holding the text would not fit


# --------------------------------------------------------------------------- bad input


def one_line(excinfo) -> str:
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_bad_input_is_one_line_and_overwrites_nothing(ray_cluster, reference, tmp_path):
    enc = tiny_encoding()
    existing = files(reference)
    out = tmp_path / "out"

    def prepare(src, dest=out):
        return data_corpus.prepare_corpus(
            [str(src)], str(dest), encoding=enc, workers=2, **SETTINGS
        )

    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"content": ["a b c"]}), bad / "x.parquet")
    with pytest.raises(
        UserError, match=r"x\.parquet has no 'text' column \(its columns: content\)"
    ):
        prepare(bad)
    assert not out.exists()  # found from the Parquet footer, before anything is written
    (bad / "x.parquet").unlink()

    (bad / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"x\.jsonl \(byte 17\): the JSON line has no 'text'") as e:
        prepare(bad)
    one_line(e)
    (bad / "x.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"x\.jsonl \(byte 30\) is not valid UTF-8") as e:
        prepare(bad)
    one_line(e)
    (bad / "x.jsonl").unlink()
    (bad / "y.txt").write_bytes(b"ok\n" + "naïve".encode("latin-1") + b"\n")
    with pytest.raises(UserError, match=r"y\.txt \(byte 5\) is not valid UTF-8") as e:
        prepare(bad)
    one_line(e)
    (bad / "y.txt").write_text("")
    with pytest.raises(UserError, match="are empty: no documents") as e:
        prepare(bad)
    (bad / "y.txt").write_text("\n  \n\n")
    with pytest.raises(UserError, match="hold no documents") as e:
        prepare(bad)
    one_line(e)
    with pytest.raises(UserError, match="matches no files"):
        prepare(bad / "*.parquet")
    assert not (
        out / data_manifest.MANIFEST
    ).exists()  # no half-made dataset passes for a finished one

    # A finished dataset of other inputs is never replaced without --overwrite, and a
    # folder that is not a dataset is never written into.
    other = tmp_path / "other"
    write_corpus(other, 40, seed=7)
    with pytest.raises(UserError, match=r"prepared from other inputs.*--overwrite"):
        prepare(other, reference)
    assert files(reference) == existing
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a raygpt dataset"):
        prepare(other, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------- object storage


def test_prepare_and_read_on_object_storage(ray_cluster, corpus, reference, s3_storage):
    from raygpt import storage

    base, _, query = s3_storage.partition("?")
    store = storage.resolve(s3_storage, check=False)
    for path in sorted(corpus[0].iterdir()):  # as they are: no compression on the way
        with store.fs.open_output_stream(store.path("in", path.name), compression=None) as f:
            f.write(path.read_bytes())
    out = f"{base}/corpus?{query}"
    data_corpus.prepare_corpus([f"{base}/in/*?{query}"], out, encoding=tiny_encoding(), workers=2,
                        **SETTINGS)  # fmt: skip
    remote = storage.resolve(out, check=False)
    local = files(reference)
    for name, raw in local.items():
        if name.endswith(".bin"):
            assert remote.read_bytes(remote.path(name)) == raw, name  # the same shards
    far_manifest = json.loads(remote.read_bytes(remote.path(data_manifest.MANIFEST)))
    near_manifest = json.loads(local[data_manifest.MANIFEST])
    assert far_manifest["source"]["files"][0]["path"].startswith("s3://")
    del far_manifest["source"], near_manifest["source"]  # the input paths differ
    assert far_manifest == near_manifest

    # The loader reads windows with ranged reads, and they are the local windows.
    for split in ("train", "val"):
        far = sampler.BatchSampler(out, split, 64, seed=4)
        near = sampler.BatchSampler(reference, split, 64, seed=4)
        for step in (0, 3):
            a, b = far.get_batch(step, 1, 0, 6, 2, 1), near.get_batch(step, 1, 0, 6, 2, 1)
            assert a[0].equal(b[0]) and a[1].equal(b[1])
        assert far.eval_batches(2, 3, 0, 1)[1][0].equal(near.eval_batches(2, 3, 0, 1)[1][0])
