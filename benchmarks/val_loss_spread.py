"""How far apart are val-loss figures of the same recipe? Seeds, samplers and estimators.

    python benchmarks/val_loss_spread.py [EXPERIMENT] --data-file PATH \
        [--seeds 1337,1,2] [--samplers raygpt,random] [--max-steps N] [--json OUT]

A target like "val loss <= 1.89 at step 2000" is one number from one seed, estimated on
eval_iters x batch_size windows. This trains the experiment in-process (no Ray: the
Ray path gives the same losses, see train_vs_plain.py) once per (seed, sampler) and
reports, for the final model:

- `eval set`: raygpt's fixed evaluation batches (what `raygpt.train` reports);
- `whole split`: the mean loss over every val token, at 4 window offsets (the value
  both estimators below are noisy samples of);
- `random x20`: nanoGPT's estimator, 20 batches of random windows, mean and standard
  deviation over 10 repeats.

Samplers: `raygpt` (data_sampler.BatchSampler: per-epoch permutations of shifted,
non-overlapping windows) and `random` (nanoGPT's `torch.randint` window starts).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_EXPERIMENT = REPO / "experiments" / "shakespeare_char_cpu.toml"
SAMPLERS = ("raygpt", "random")


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int):
    idx = starts[:, None] + np.arange(block_size + 1)
    buf = torch.from_numpy(tokens[idx].astype(np.int64))
    return buf[:, :-1], buf[:, 1:]


@torch.no_grad()
def whole_split_loss(model, tokens: np.ndarray, block_size: int, offsets=(0, 16, 32, 48)):
    """Mean next-token loss over the split, tiled by block_size windows at each offset."""
    means = []
    for offset in offsets:
        n = (len(tokens) - 1 - offset) // block_size
        x = torch.from_numpy(tokens[offset : offset + n * block_size].astype(np.int64))
        y = torch.from_numpy(tokens[offset + 1 : offset + 1 + n * block_size].astype(np.int64))
        x, y = x.view(n, block_size), y.view(n, block_size)
        total = 0.0
        for i in range(0, n, 256):
            _, loss = model(x[i : i + 256], y[i : i + 256])
            total += loss.item() * len(x[i : i + 256])
        means.append(total / n)
    return statistics.fmean(means)


def train_once(cfg, sampler: str, threads: int) -> dict:
    from raygpt.data import prepare
    from raygpt.data import sampler as data_sampler
    from raygpt.model import init_from
    from raygpt.train.lr_schedule import lr_at
    from raygpt.train.optim import build_optimizer, set_lr

    torch.set_num_threads(threads)
    dataset_dir, meta = prepare.prepare_from_config(cfg)
    torch.manual_seed(cfg.seed)
    model = init_from.build_model(cfg, meta["vocab_size"])
    optimizer = build_optimizer(model, cfg, "cpu")
    train_batches = data_sampler.BatchSampler(dataset_dir, "train", cfg.block_size, cfg.seed)
    val_batches = data_sampler.BatchSampler(dataset_dir, "val", cfg.block_size, cfg.seed)
    train_tokens = np.asarray(train_batches.data)
    val_tokens = np.asarray(val_batches.data)
    window_rng = torch.Generator().manual_seed(cfg.seed)
    accum = cfg.grad_accum_steps(1)
    B, T = cfg.batch_size, cfg.block_size
    started = time.perf_counter()
    for step in range(cfg.max_steps):
        set_lr(optimizer, lr_at(step, cfg))
        for micro in range(accum):
            if sampler == "raygpt":
                x, y = train_batches.get_batch(step, 0, micro, B, 1, accum)
            else:
                starts = torch.randint(len(train_tokens) - T, (B,), generator=window_rng)
                x, y = _windows(train_tokens, starts.numpy(), T)
            _, loss = model(x, y)
            (loss / accum).backward()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(cfg.max_steps // 4, 1) == 0:
            print(f"  {sampler} seed {cfg.seed}: step {step + 1}/{cfg.max_steps}", flush=True)
    seconds = time.perf_counter() - started

    model.eval()
    with torch.no_grad():
        fixed = val_batches.eval_batches(cfg.eval_iters, B, 0, 1)
        eval_set = statistics.fmean(model(x, y)[1].item() for x, y in fixed)
        eval_rng = torch.Generator().manual_seed(7)
        repeats = []
        for _ in range(10):
            losses = []
            for _ in range(20):
                starts = torch.randint(len(val_tokens) - T, (B,), generator=eval_rng)
                losses.append(model(*_windows(val_tokens, starts.numpy(), T))[1].item())
            repeats.append(statistics.fmean(losses))
        whole = whole_split_loss(model, val_tokens, T)
    return {
        "seed": cfg.seed,
        "sampler": sampler,
        "steps": cfg.max_steps,
        "eval_set": eval_set,
        "whole_split": whole,
        "random20_mean": statistics.fmean(repeats),
        "random20_std": statistics.pstdev(repeats),
        "train_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    from raygpt.config.train import load_train_config
    from raygpt.errors import UserError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", nargs="?", default=str(DEFAULT_EXPERIMENT))
    p.add_argument("--data-file", default=None)
    p.add_argument("--seeds", default="1337,1,2")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    samplers = a.samplers.split(",")
    bad = [s for s in samplers if s not in SAMPLERS]
    if bad:
        print(f"error: unknown sampler {bad[0]!r}; use {', '.join(SAMPLERS)}", file=sys.stderr)
        return 2
    rows = []
    try:
        for seed in [int(s) for s in a.seeds.split(",")]:
            flags: dict = {"seed": seed}
            if a.data_file:
                flags["data_file"] = a.data_file
            if a.max_steps:
                flags |= {"max_steps": a.max_steps, "lr_decay_steps": a.max_steps}
            cfg = load_train_config(a.experiment, flags)
            for sampler in samplers:
                rows.append(train_once(cfg, sampler, a.threads))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\n{'sampler':<8}{'seed':>6}{'eval set':>10}{'whole split':>13}{'random x20':>18}")
    for r in rows:
        rand = f"{r['random20_mean']:.4f}±{r['random20_std']:.4f}"
        print(
            f"{r['sampler']:<8}{r['seed']:>6}{r['eval_set']:>10.4f}{r['whole_split']:>13.4f}"
            f"{rand:>18}"
        )
    for sampler in samplers:
        whole = [r["whole_split"] for r in rows if r["sampler"] == sampler]
        spread = statistics.stdev(whole) if len(whole) > 1 else 0.0
        print(
            f"{sampler}: whole-split val over {len(whole)} seed(s) "
            f"{statistics.fmean(whole):.4f} ± {spread:.4f}"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
