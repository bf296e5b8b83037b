"""Wall time of a run that checkpoints at every eval: synchronous vs asynchronous upload.

    python benchmarks/checkpoint_upload.py [--storage s3|local|both] [--max-steps 40]
        [--eval-interval 5] [--n-layer 6] [--n-embd 384] [--repeats 2] [--no-warmup]
        [--address local] [--json OUT]

Both runs are `raygpt.train` on one Ray cluster, side by side in one process,
with the same model, batches and storage, a checkpoint at every eval
(checkpoint_interval = eval_interval), and differ only in
`--checkpoint-upload sync|async`. With sync, every rank waits while Ray copies
the checkpoint (weights + AdamW state) to storage inside the report; with async,
Ray copies it in a thread while training goes on. Storage: an S3-compatible
server (moto's, on 127.0.0.1, the same one the tests use) and/or a local
folder. Before any timed run, one untimed run per storage (the same model, one
checkpoint) starts the Ray Train workers' imports, the data cache and the storage
connection, so the first timed run is not the only cold one; then the order of the
two modes alternates per repeat (sync first, then async first, ...), so what is left
of warm-up favours neither. Every repeat's figures are printed, and each mode's mean.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # s3server: the same moto server the tests use
MODES = ("sync", "async")


def schedule(kinds: list[str], repeats: int, warmup: bool) -> list[tuple[str, int | None, str]]:
    """The runs in order, as (storage, repeat, mode); repeat None is the untimed warm-up.
    Per storage: the warm-up, then each repeat's pair, sync first in even repeats."""
    runs: list[tuple[str, int | None, str]] = []
    for kind in kinds:
        if warmup:
            runs.append((kind, None, MODES[0]))
        for repeat in range(repeats):
            runs += [(kind, repeat, mode) for mode in (MODES if repeat % 2 == 0 else MODES[::-1])]
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", choices=("s3", "local", "both"), default="both")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--eval-interval", type=int, default=5)
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=384)
    parser.add_argument(
        "--repeats", type=int, default=2, help="pairs of runs, alternating which mode goes first"
    )
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip the untimed run before the timed ones"
    )
    parser.add_argument(
        "--address", default="local", help="Ray cluster to use (default: a private one)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        print(f"error: --repeats must be >= 1, got {args.repeats}", file=sys.stderr)
        return 2

    import s3server

    from raygpt.cluster import connect
    from raygpt.config.train import TrainConfig
    from raygpt.train import driver as train_driver

    os.environ.setdefault("RAYGPT_DATA_DIR", tempfile.mkdtemp(prefix="raygpt-data-"))
    server, endpoint = s3server.start_server()
    s3server.make_bucket(endpoint, "bench")
    connect.connect(args.address)
    kinds = ["s3", "local"] if args.storage == "both" else [args.storage]

    def run(kind: str, label: str, mode: str, max_steps: int) -> tuple[dict, float]:
        where = (
            s3server.s3_uri(endpoint, "bench", f"{kind}-{label}")
            if kind == "s3"
            else tempfile.mkdtemp(prefix="raygpt-ckpt-bench-")
        )
        cfg = TrainConfig(
            name=f"ckpt-{mode}",
            storage_path=where,
            n_layer=args.n_layer,
            n_head=6,
            n_embd=args.n_embd,
            block_size=64,
            batch_size=12,
            max_steps=max_steps,
            eval_interval=args.eval_interval,
            eval_iters=2,
            log_interval=1000,
            checkpoint_interval=args.eval_interval,
            checkpoint_upload=mode,
            compile="false",
        ).validate()
        started = time.perf_counter()
        summary = train_driver.run(cfg)
        return summary, time.perf_counter() - started

    out = []
    try:
        for kind, repeat, mode in schedule(kinds, args.repeats, not args.no_warmup):
            if repeat is None:
                _, wall = run(kind, "warmup", mode, args.eval_interval)
                print(f"[bench] {kind}: untimed warm-up run, {wall:.1f} s", flush=True)
                continue
            summary, wall = run(kind, str(repeat), mode, args.max_steps)
            record = {
                "storage": kind,
                "mode": mode,
                "repeat": repeat,
                "checkpoints": args.max_steps // args.eval_interval,
                "training_seconds": summary["training_seconds"],
                "wall_seconds": wall,
                "val_loss": summary["val_loss"],
            }
            out.append(record)
            print(json.dumps(record), flush=True)
    finally:
        server.stop()
    print()
    for kind in kinds:
        by_mode = {
            m: [r["training_seconds"] for r in out if r["storage"] == kind and r["mode"] == m]
            for m in MODES
        }
        sync, asyn = (sum(v) / len(v) for v in (by_mode["sync"], by_mode["async"]))
        print(
            f"{kind:5s}: sync {sync:6.1f} s, async {asyn:6.1f} s, async/sync {asyn / sync:.2f} "
            f"({args.max_steps // args.eval_interval} checkpoints, {args.n_layer}x{args.n_embd})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
