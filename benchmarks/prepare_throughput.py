"""Prepare throughput and memory: raygpt's Ray Data pipeline vs nanoGPT's approach.

    python benchmarks/prepare_throughput.py [--gb 2.0] [--work DIR] [--merges 50000]
        [--runs raygpt-1,raygpt-2,nanogpt-2] [--address local] [--tiny] [--json OUT]

One generated corpus (Parquet, a `text` column, ~4 KB documents), one BPE encoding,
three whole commands, each in a fresh process, side by side in one run:

* ``raygpt-1`` / ``raygpt-2``: ``raygpt.data.prepare_corpus`` with 1 and 2 workers
  (CPUs), on a private Ray cluster the command starts itself, as
  ``python -m raygpt.data prepare --input ... --address local`` does (``--address``
  names a running cluster instead: then its start-up and daemons are not measured).
* ``nanogpt-2``: nanoGPT's data/openwebtext/prepare.py, restated here (Hugging Face
  ``datasets``: ``load_dataset``, ``train_test_split``, ``.map(num_proc=2)`` with
  ``encode_ordinary`` + <|endoftext|> per document, then everything written into
  one ``np.memmap`` per split in 1,024 batches, fewer for a split of fewer documents).

Both sides tokenize with the same tiktoken Encoding and use val fraction 0.0005 (nanoGPT's
test_size). The GPT-2 vocabulary cannot be downloaded here, so the encoding is
GPT-2-shaped instead: GPT-2's pre-tokenizer pattern and byte-level BPE with ``--merges``
merges (GPT-2 has 50,000) trained on the corpus's own paragraphs by Hugging Face
``tokenizers``, plus <|endoftext|>. The corpus's documents are 2 to 40 paragraphs drawn
at random from the text this machine has offline (the standard library's docstrings and
source, Tiny Shakespeare, licence texts). Tokens/s is tokens written / wall seconds of the whole
command (start-up, reading, tokenizing, writing); tokens per CPU-second divides by the
CPU time of the command's whole process tree instead, which other load on the machine
does not inflate. Memory is sampled every 0.25 s over that process tree (Ray's daemons
and workers, datasets' pool): the peak of the summed PSS (shared pages counted once)
and of the summed RSS. Both sides' workers run at nice 0 (Ray's default is 15).

``--tiny`` (a smoke run, no figure): row groups of TINY_DOCS_PER_ROW_GROUP documents, so
``--gb`` can be a few MB, the BPE trained on the first TINY_BPE_PARAGRAPHS paragraphs,
and val fraction TINY_VAL_FRACTION on both sides (a few hundred documents would leave
nanoGPT's 0.0005 an empty val split).

Needs ``pip install 'raygpt[corpora]'`` (datasets) besides the dev extras (tokenizers).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"  # used if present
VAL_FRACTION = 0.0005  # nanoGPT's test_size
DOCS_PER_ROW_GROUP = 8192
TINY_DOCS_PER_ROW_GROUP = 64
TINY_BPE_PARAGRAPHS = 2000
TINY_VAL_FRACTION = 0.05


# --------------------------------------------------------------------------- corpus


@functools.cache
def paragraphs() -> list[str]:
    """Text available offline, split at blank lines: the standard library's docstrings
    and source, Tiny Shakespeare (if present), the system's licence texts."""
    sys.path.insert(0, str(REPO))
    from raygpt.data.sources import pydocs_documents, pydocs_files

    texts = list(pydocs_documents())
    for path in pydocs_files():
        texts += path.read_text(encoding="utf-8", errors="ignore").split("\n\n")
    if SHAKESPEARE.is_file():
        texts += SHAKESPEARE.read_text(encoding="utf-8").split("\n\n")
    licenses = Path("/usr/share/common-licenses")
    if licenses.is_dir():
        for f in sorted(licenses.iterdir()):
            if f.is_file():
                texts += f.read_text(encoding="utf-8", errors="ignore").split("\n\n")
    return [t.strip() for t in texts if len(t.strip()) > 20]


def build_corpus(
    folder: Path, gb: float, seed: int = 0, docs_per_row_group: int = DOCS_PER_ROW_GROUP
) -> dict:
    """~`gb` GB of text as Parquet files of ~256 MB of text each (cached in `folder`),
    written in row groups of `docs_per_row_group` documents until the text reaches `gb`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = folder / "corpus.json"
    if done.is_file():
        cached = json.loads(done.read_text())
        if (cached["gb"], cached.get("docs_per_row_group", DOCS_PER_ROW_GROUP)) == (
            gb,
            docs_per_row_group,
        ):
            return cached
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    pool = paragraphs()
    rng = np.random.default_rng(seed)
    target, written, docs, part = int(gb * 1e9), 0, 0, 0
    writer, in_part = None, 0
    while written < target:
        if writer is None:
            writer = pq.ParquetWriter(
                folder / f"part-{part:03d}.parquet", pa.schema([("text", pa.string())])
            )
            in_part = 0
        counts = rng.integers(2, 41, docs_per_row_group)  # paragraphs per document
        picks = rng.integers(0, len(pool), int(counts.sum())).tolist()
        ends = np.cumsum(counts).tolist()
        batch = [
            "\n\n".join(pool[i] for i in picks[a:b])
            for a, b in zip([0, *ends[:-1]], ends, strict=True)
        ]
        size = sum(len(t.encode()) for t in batch)
        writer.write_table(pa.table({"text": batch}))
        written, docs, in_part = written + size, docs + len(batch), in_part + size
        if in_part >= 256e6:
            writer.close()
            writer, part = None, part + 1
    if writer is not None:
        writer.close()
    info = {
        "gb": gb,
        "docs_per_row_group": docs_per_row_group,
        "text_bytes": written,
        "documents": docs,
        "files": sorted(str(p) for p in folder.glob("*.parquet")),
        "disk_bytes": sum(p.stat().st_size for p in folder.glob("*.parquet")),
        "paragraph_pool": len(pool),
    }
    done.write_text(json.dumps(info))
    return info


# --------------------------------------------------------------------------- encoding


def build_encoding(path: Path, merges: int, max_paragraphs: int | None = None) -> dict:
    """A GPT-2-shaped tiktoken encoding, saved as JSON (raygpt's encoding_to_json),
    trained on the first `max_paragraphs` paragraphs (default: all)."""
    if path.is_file():
        return json.loads(path.read_text())["about"]
    sys.path.insert(0, str(REPO))
    import tiktoken
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from raygpt.data.tokenizers import encoding_to_json

    gpt2_pattern = (
        r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=256 + merges,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    started = time.perf_counter()
    texts = paragraphs()[:max_paragraphs]
    tok.train_from_iterator(texts, trainer)
    learned = json.loads(tok.to_str())["model"]["merges"]
    # Byte-level BPE writes bytes as printable characters (GPT-2's bytes_to_unicode).
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    to_byte = {chr(c): b for b, c in zip(printable, chars, strict=True)}
    ranks = {bytes([b]): b for b in range(256)}
    for merge in learned:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(to_byte[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    enc = tiktoken.Encoding(
        name=f"gpt2-shaped-{len(ranks) - 256}",
        pat_str=gpt2_pattern,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": len(ranks)},
    )
    about = {
        "merges": len(ranks) - 256,
        "vocab_size": enc.n_vocab,
        "trained_on_paragraphs": len(texts),
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    path.write_text(json.dumps({**encoding_to_json(enc), "about": about}))
    return about


# --------------------------------------------------------------------------- the runs

RAYGPT = """
import json, sys, time
sys.path.insert(0, {repo!r})
from raygpt.data import corpus as data_corpus, manifest
from raygpt.data.tokenizers import encoding_from_json
spec = json.load(open({encoding!r}))
spec.pop("about")
enc = encoding_from_json(spec)
out = data_corpus.prepare_corpus({files!r}, {out!r}, name="bench", encoding=enc, workers={workers},
                          val_fraction={val}, address={address!r})
meta = manifest.load_meta(out, verify=False)
print("RESULT", json.dumps({{"tokens": meta["train_tokens"] + meta["val_tokens"]}}))
"""

# nanoGPT's data/openwebtext/prepare.py, restated on the same Parquet files and encoding.
NANOGPT = """
import json, os, sys
import numpy as np
from datasets import load_dataset
sys.path.insert(0, {repo!r})
from raygpt.data.tokenizers import encoding_from_json
spec = json.load(open({encoding!r}))
spec.pop("about")
enc = encoding_from_json(spec)
num_proc = {workers}
dataset = load_dataset("parquet", data_files={files!r}, num_proc=num_proc)
split_dataset = dataset["train"].train_test_split(test_size={val}, seed=2357, shuffle=True)
split_dataset["val"] = split_dataset.pop("test")

def process(example):
    ids = enc.encode_ordinary(example["text"])
    ids.append(enc.eot_token)
    return {{"ids": ids, "len": len(ids)}}

tokenized = split_dataset.map(process, remove_columns=["text"], desc="tokenizing the splits",
                              num_proc=num_proc)
total = 0
for split, dset in tokenized.items():
    arr_len = np.sum(dset["len"], dtype=np.uint64)
    filename = os.path.join({out!r}, f"{{split}}.bin")
    arr = np.memmap(filename, dtype=np.uint16, mode="w+", shape=(arr_len,))
    total_batches = min(1024, len(dset))  # nanoGPT's 1024 needs >= 1024 documents per split
    idx = 0
    for batch_idx in range(total_batches):
        batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
        arr_batch = np.concatenate(batch["ids"])
        arr[idx : idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
    total += int(arr_len)
print("RESULT", json.dumps({{"tokens": total}}))
"""


def measure(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Run `cmd`; wall seconds and the peak summed PSS/RSS of its process tree."""
    import psutil

    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        root = psutil.Process(proc.pid)
        peak: dict = {"pss": 0, "rss": 0, "processes": 0, "at_peak": {}}
        cpu: dict[int, float] = {}  # pid -> user + system seconds, the latest seen
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                try:
                    tree = [root, *root.children(recursive=True)]
                except psutil.Error:
                    continue
                parts = []
                for p in tree:
                    try:
                        info = p.memory_full_info()
                        parts.append((_label(p, root), info.pss, info.rss))
                        times = p.cpu_times()
                        cpu[p.pid] = times.user + times.system
                    except psutil.Error:
                        pass
                pss, rss = sum(x[1] for x in parts), sum(x[2] for x in parts)
                if pss > peak["pss"]:
                    peak["at_peak"] = _group(parts)
                peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
                peak["processes"] = max(peak["processes"], len(tree))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        stop.set()
        sampler.join()
    wall = time.perf_counter() - started
    text = log.read_text()
    if code != 0:
        raise SystemExit(f"{cmd[:3]} failed ({code}); see {log}:\n{text[-3000:]}")
    result = json.loads(text.rsplit("RESULT", 1)[1].splitlines()[0])
    return {**result, "wall_s": round(wall, 1), "cpu_s": round(sum(cpu.values()), 1),
            "peak_pss_mb": peak["pss"] / 2**20,
            "peak_rss_mb": peak["rss"] / 2**20, "max_processes": peak["processes"],
            "pss_mb_at_peak": peak["at_peak"]}  # fmt: skip


def _label(p, root) -> str:
    """What a process is: the command, Ray's daemons and workers, datasets' pool."""
    if p.pid == root.pid:
        return "command"
    line = " ".join(p.cmdline())
    if "ray::MapBatches" in line:
        return "tokenizing workers"
    if "ray::_StatsActor" in line or "ray::_Autoscaling" in line:
        return "ray data actors"
    if "ray::IDLE" in line:
        return "idle ray workers"
    if "/ray/" in line or "ray::" in line:
        return "ray daemons"  # gcs, raylet, monitors, dashboard (minimal), agents
    return "child processes"  # datasets' map pool


def _group(parts: list) -> dict:
    out: dict[str, float] = {}
    for label, pss, _ in parts:
        out[label] = round(out.get(label, 0) + pss / 2**20)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="text in the corpus (1e9 bytes)")
    parser.add_argument("--work", default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--merges", type=int, default=50_000)
    parser.add_argument("--runs", default="raygpt-1,raygpt-2,nanogpt-2")
    parser.add_argument(
        "--address", default="local", help="raygpt's Ray cluster (default: a private one each run)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="small row groups and BPE training (a smoke run)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="raygpt-prepare-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    group = TINY_DOCS_PER_ROW_GROUP if args.tiny else DOCS_PER_ROW_GROUP
    corpus = build_corpus(work / "corpus", args.gb, docs_per_row_group=group)
    print(f"corpus: {corpus['text_bytes'] / 1e9:.2f} GB of text, {corpus['documents']:,} "
          f"documents, {len(corpus['files'])} Parquet files ({corpus['disk_bytes'] / 1e9:.2f} GB "
          f"on disk) [{time.perf_counter() - t0:.0f} s]", flush=True)  # fmt: skip
    encoding = work / f"encoding-{args.merges}{'-tiny' if args.tiny else ''}.json"
    about = build_encoding(encoding, args.merges, TINY_BPE_PARAGRAPHS if args.tiny else None)
    print(f"encoding: {about}", flush=True)

    results = {}
    for run in args.runs.split(","):
        kind, workers = run.rsplit("-", 1)
        out = work / "out" / run
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        out.mkdir(parents=True)
        template = {"raygpt": RAYGPT, "nanogpt": NANOGPT}[kind]
        code = template.format(repo=str(REPO), encoding=str(encoding), files=corpus["files"],
                               out=str(out), workers=int(workers),
                               val=TINY_VAL_FRACTION if args.tiny else VAL_FRACTION,
                               address=args.address)  # fmt: skip
        # Ray runs its workers at nice 15; at 0, like datasets' pool, neither side yields
        # more to whatever else runs on the machine.
        env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf-cache" / run),
               "RAY_ADDRESS": "", "RAY_worker_niceness": "0",
               "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        subprocess.run(["rm", "-rf", str(work / "hf-cache" / run)], check=True)
        res = measure([sys.executable, "-c", code], env, work / f"{run}.log")
        res["tokens_per_s"] = res["tokens"] / res["wall_s"]
        res["tokens_per_cpu_s"] = res["tokens"] / res["cpu_s"]
        results[run] = res
        print(f"{run:>10}: {res['tokens']:,} tokens in {res['wall_s']:.1f} s = "
              f"{res['tokens_per_s'] / 1e6:.2f} M tokens/s ({res['tokens_per_cpu_s'] / 1e6:.2f} M "
              f"per CPU-second); peak PSS {res['peak_pss_mb']:.0f} MB, "
              f"RSS {res['peak_rss_mb']:.0f} MB over <= {res['max_processes']} processes; "
              f"PSS at the peak: {res['pss_mb_at_peak']}", flush=True)  # fmt: skip

    counts = {r["tokens"] for r in results.values()}
    print(f"same tokens on every side: {len(counts) == 1} ({sorted(counts)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"corpus": corpus, "encoding": about,
                                               "runs": results}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
