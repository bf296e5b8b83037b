"""CPU seconds spent writing step rows over a 10,000-step run: before and after parts.

    python benchmarks/step_rows_io.py [--steps 10000] [--report-every 250 50] [--json OUT]

Both writers get the same 10,000 rows, handed over one report at a time as the
training loop does (a report every `--report-every` steps: the default
eval_interval is 250; 50 is a small-model sweep's cadence).

before: the code of commit 74685ec, loaded from git history (`git show`), so the
        comparison is against what really ran. Rank 0 appended each report's rows
        to an fsynced steps.jsonl; the driver's callback tailed it, merged the rows
        into its table, rewrote the whole steps.parquet and added the new rows to
        TensorBoard, at every report. Measured: the driver's CPU seconds (tail,
        merge, Parquet rewrite, TensorBoard) and, apart, rank 0's appends.
after:  rank 0 writes each report's rows as one Parquet part and one TensorBoard
        event file (results.write_step_part / train.tensorboard.write_part); the driver
        writes no step row at all. Measured: rank 0's CPU seconds, on a local
        folder and on an S3-compatible server (moto's, on 127.0.0.1), and the
        driver's one read of all parts at the end (what the sweep callback does
        when a trial ends, and what raygpt.report does).

CPU seconds are the process's user+system time (time.process_time), so I/O
waits (the S3 round trips) do not count; wall seconds are printed beside them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BEFORE_COMMIT = "74685ec"
sys.path.insert(0, str(REPO / "tests"))  # s3server: the same moto server the tests use


def rows(steps: int) -> list[dict[str, Any]]:
    out = []
    for step in range(1, steps + 1):
        out.append(
            {
                "run": "bench", "trial_id": "", "optimizer": "adamw", "learning_rate": 1e-3,
                "step": step, "tokens_seen": step * 524_288, "train_loss": 3.0 - step * 1e-4,
                "val_loss": 3.1 if step % 250 == 0 else None,
                "eval_train_loss": 3.0 if step % 250 == 0 else None, "lr": 1e-3,
                "grad_norm": 0.5, "step_time_ms": 100.0, "tokens_per_sec": 5.2e6, "mfu": 0.4,
            }
        )  # fmt: skip
    return out


def load_before() -> Any:
    """raygpt/metrics.py as of BEFORE_COMMIT, as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{BEFORE_COMMIT}:raygpt/metrics.py"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "metrics_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("metrics_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chunks(all_rows: list[dict[str, Any]], every: int):
    for start in range(0, len(all_rows), every):
        yield all_rows[start : start + every]


def before(all_rows: list[dict[str, Any]], every: int) -> dict[str, float]:
    old = load_before()
    folder = Path(tempfile.mkdtemp(prefix="rows-before-"))
    log = old.RowLog(old.rows_path(folder))
    tail = old.RowTail(old.rows_path(folder))
    table = old.StepLog(folder / "steps.parquet", {"config": {"name": "bench"}})
    tensorboard = old.TensorBoardLog(folder / "tensorboard")
    rank0 = driver = 0.0
    wall = time.perf_counter()
    for chunk in chunks(all_rows, every):
        t = time.process_time()
        log.append(chunk)
        rank0 += time.process_time() - t
        t = time.process_time()
        fresh = table.add(tail.read_new())  # RunOutputs.after_report, as it was
        table.write()
        tensorboard.add(fresh)
        driver += time.process_time() - t
    tensorboard.close()
    return {
        "driver_cpu_s": driver,
        "rank0_cpu_s": rank0,
        "wall_s": time.perf_counter() - wall,
        "rows_in_file": len(table),
    }


def after(all_rows: list[dict[str, Any]], every: int, uri: str) -> dict[str, float]:
    from raygpt import results, storage
    from raygpt.train import tensorboard

    store = storage.resolve(uri)
    run_path = store.path("bench")
    metadata = {"config": {"name": "bench"}}
    rank0 = 0.0
    wall = time.perf_counter()
    for chunk in chunks(all_rows, every):
        t = time.process_time()
        results.write_step_part(store, run_path, chunk, metadata)
        tensorboard.write_part(store, f"{run_path}/tensorboard", chunk)
        rank0 += time.process_time() - t
    wall_s = time.perf_counter() - wall
    t = time.process_time()
    table, _ = results.read_steps(store, run_path)
    read = time.process_time() - t
    return {
        "driver_cpu_s": 0.0,
        "rank0_cpu_s": rank0,
        "wall_s": wall_s,
        "read_all_cpu_s": read,
        "rows_in_file": table.num_rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--report-every", type=int, nargs="+", default=[250, 50])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import s3server

    server, endpoint = s3server.start_server()
    s3server.make_bucket(endpoint, "bench")
    all_rows = rows(args.steps)
    out = []
    try:
        for every in args.report_every:
            local = tempfile.mkdtemp(prefix="rows-after-")
            s3 = s3server.s3_uri(endpoint, "bench", f"every-{every}")
            result = {
                "steps": args.steps,
                "report_every": every,
                "reports": -(-args.steps // every),
                "before_local": before(all_rows, every),
                "after_local": after(all_rows, every, local),
                "after_s3": after(all_rows, every, s3),
            }
            out.append(result)
            print(f"{args.steps} steps, a report every {every} ({result['reports']} reports):")
            for name in ("before_local", "after_local", "after_s3"):
                r = result[name]
                extra = f", read all {r['read_all_cpu_s']:.2f} s" if "read_all_cpu_s" in r else ""
                print(
                    f"  {name:13s} driver CPU {r['driver_cpu_s']:7.2f} s | rank 0 CPU "
                    f"{r['rank0_cpu_s']:6.2f} s | wall {r['wall_s']:6.2f} s{extra} | "
                    f"{r['rows_in_file']} rows"
                )
    finally:
        server.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
