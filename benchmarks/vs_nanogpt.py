"""nanoGPT and raygpt side by side, as whole commands, on the same config and device.

    python benchmarks/vs_nanogpt.py cpu --data-file tinyshakespeare.txt [--max-steps 2000]
        [--tiny]
    python benchmarks/vs_nanogpt.py gpu [--batch-size 12] [--max-batch]     (on a CUDA machine)

nanoGPT's own scripts run from a copy of --nanogpt (default ../shared/reference/nanoGPT,
which this project never imports); raygpt runs its CLIs. Both in one run, one after
the other, nothing else on the machine.

cpu: nanoGPT README's CPU command (`train.py config/train_shakespeare_char.py
     --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64
     --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
     --lr_decay_iters=2000 --dropout=0.0`) against `python -m raygpt.train
     experiments/shakespeare_char_cpu.toml --data-file FILE` (the same recipe), with
     one change to nanoGPT's: its log_interval is raygpt's (the experiment's 50, not 1),
     so both read the loss back and print a line equally often. --max-steps sets both
     sides' max and lr-decay steps. raygpt runs with `--address local`: its one worker
     in the command's own process (Ray Train's local mode), as on a laptop. Prints both
     wall times (process start to exit, Ray's start-up included), their ratio (target
     <= 1.10) and each one's reported val loss at the last step. Each reports its own
     estimator (nanoGPT: 20 random batches; raygpt: a fixed set); to compare model
     quality on one estimator over seeds, use `benchmarks/nanogpt_parity.py train`.
     --tiny shrinks the model and the evals on both sides alike (a smoke run, no figure).
gpu: GPT-2 124M, batch 12 x 1024, bf16 + compile: nanoGPT's bench.py (synthetic
     data) against `python -m raygpt.bench` on the same shapes, and, with --max-batch,
     the largest micro-batch that fits for raygpt. Prints tokens/s and MFU of each.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_NANOGPT = REPO.parent / "shared" / "reference" / "nanoGPT"
EXPERIMENT = REPO / "experiments" / "shakespeare_char_cpu.toml"
TARGET_RATIO = 1.10
# nanoGPT README's CPU command, on top of config/train_shakespeare_char.py; max_iters and
# lr_decay_iters come from --max-steps, log_interval from raygpt's experiment.
CPU_FLAGS = [
    "--device=cpu", "--compile=False", "--eval_iters=20", "--block_size=64",
    "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0",
]  # fmt: skip
# --tiny, both sides (nanoGPT's names; raygpt's are the same with dashes, except those
# in RAYGPT_NAMES): a model and evals small enough for a smoke test.
TINY = {
    "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16, "batch_size": 4,
    "eval_interval": 5, "eval_iters": 2, "warmup_iters": 2,
}  # fmt: skip
RAYGPT_NAMES = {"warmup_iters": "warmup_steps"}


def log_interval() -> int:
    """raygpt's experiment's log_interval: what both sides log at."""
    with EXPERIMENT.open("rb") as fh:
        return int(tomllib.load(fh)["log_interval"])


def nanogpt_copy(source: Path, data_file: Path | None) -> Path:
    """A scratch copy of nanoGPT with shakespeare_char prepared from `data_file` (offline)."""
    work = Path(tempfile.mkdtemp(prefix="nanogpt-"))
    shutil.copytree(source, work, dirs_exist_ok=True)
    if data_file is not None:
        data_dir = work / "data" / "shakespeare_char"
        shutil.copy(data_file, data_dir / "input.txt")  # prepare.py then downloads nothing
        subprocess.run([sys.executable, "prepare.py"], cwd=data_dir, check=True,
                       capture_output=True)  # fmt: skip
    return work


def timed(cmd: list[str], cwd: Path, log: Path) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({out.returncode}); see {log}")
    return wall, out.stdout + out.stderr


def cpu(args) -> dict:
    logs = Path(tempfile.mkdtemp(prefix="vs-nanogpt-"))
    work = nanogpt_copy(Path(args.nanogpt), Path(args.data_file))
    steps = args.max_steps
    every = TINY["eval_interval"] if args.tiny else log_interval()
    tiny = TINY if args.tiny else {}
    nano_wall, nano_out = timed(
        [sys.executable, "train.py", "config/train_shakespeare_char.py", *CPU_FLAGS,
         f"--max_iters={steps}", f"--lr_decay_iters={steps}", f"--log_interval={every}",
         *(f"--{k}={v}" for k, v in tiny.items()), f"--out_dir={logs / 'nanogpt-out'}"],
        work, logs / "nanogpt.log",
    )  # fmt: skip
    evals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", nano_out)
    tiny_flags = [
        part
        for k, v in tiny.items()
        for part in (f"--{RAYGPT_NAMES.get(k, k).replace('_', '-')}", str(v))
    ]
    ray_wall, ray_out = timed(
        [sys.executable, "-m", "raygpt.train", str(EXPERIMENT),
         "--data-file", str(Path(args.data_file).resolve()), "--max-steps", str(steps),
         "--lr-decay-steps", str(steps), "--log-interval", str(every), *tiny_flags,
         "--storage-path", str(logs / "raygpt"), "--name", "vs-nanogpt",
         "--address", "local"],
        REPO, logs / "raygpt.log",
    )  # fmt: skip
    final = re.findall(r"done: step (\d+) val loss ([\d.]+)", ray_out)
    result = {
        "steps": steps,
        "nanogpt_wall_s": round(nano_wall, 1),
        "raygpt_wall_s": round(ray_wall, 1),
        "ratio": round(ray_wall / nano_wall, 3),
        "target_ratio": TARGET_RATIO,
        "nanogpt_val": float(evals[-1][2]) if evals else None,
        "raygpt_val": float(final[-1][1]) if final else None,
        "logs": str(logs),
    }
    print(
        f"{steps} steps on CPU: nanoGPT {nano_wall:.1f} s (val {result['nanogpt_val']}), "
        f"raygpt {ray_wall:.1f} s (val {result['raygpt_val']}): ratio {result['ratio']:.3f} "
        f"(target <= {TARGET_RATIO}); logs in {logs}"
    )
    return result


def gpu(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("the gpu comparison needs CUDA; use `cpu` on this machine")
    logs = Path(tempfile.mkdtemp(prefix="vs-nanogpt-"))
    work = nanogpt_copy(Path(args.nanogpt), None)
    _, nano_out = timed(
        [sys.executable, "bench.py", "--real_data=False", f"--batch_size={args.batch_size}",
         "--block_size=1024", "--compile=True", "--profile=False"],
        work, logs / "nanogpt.log",
    )  # fmt: skip
    mfus = [float(m) for m in re.findall(r"mfu ([\d.]+)%", nano_out)]
    times = [float(t) for t in re.findall(r"time per iteration: ([\d.]+)ms", nano_out)]
    nano_tps = args.batch_size * 1024 / (times[-1] / 1000) if times else None
    rows = {}
    sizes = [args.batch_size] + ([16, 24, 32, 48, 64] if args.max_batch else [])
    for batch in sizes:
        out_json = logs / f"raygpt-{batch}.json"
        cmd = [sys.executable, "-m", "raygpt.bench", str(REPO / "experiments" / "gpt2_124m.toml"),
               "--batch-size", str(batch), "--block-size", "1024", "--json", str(out_json)]  # fmt: skip
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if out.returncode != 0:
            rows[batch] = {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
            if batch != args.batch_size:
                break  # out of memory: the previous size was the largest that fits
            continue
        rows[batch] = json.loads(out_json.read_text())
    result = {
        "nanogpt_tokens_per_sec": nano_tps,
        "nanogpt_mfu_percent": mfus[-1] if mfus else None,
        "raygpt": rows,
        "logs": str(logs),
    }
    print(json.dumps(result, indent=2, default=str))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("cpu", "gpu"))
    parser.add_argument("--nanogpt", default=str(DEFAULT_NANOGPT))
    parser.add_argument("--data-file", help="Tiny Shakespeare (cpu mode)")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--max-batch", action="store_true")
    parser.add_argument(
        "--tiny", action="store_true", help="cpu: a tiny model and evals on both sides (smoke)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.mode == "cpu" and not args.data_file:
        parser.error("cpu mode needs --data-file (Tiny Shakespeare)")
    result = cpu(args) if args.mode == "cpu" else gpu(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
