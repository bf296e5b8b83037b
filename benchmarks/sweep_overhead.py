"""What a sweep pays per trial beyond training, read from its trials.parquet.

    python benchmarks/sweep_overhead.py run [--label L] -- SWEEP ARGS...   # times the command
    python benchmarks/sweep_overhead.py analyze SWEEP_DIR [--wall S] [--concurrency N]

`run` runs `python -m raygpt.sweep SWEEP ARGS...` as its own process (so the wall
time is the command's own, Ray start-up included) and then analyses its folder.

Figures:
- per-trial overhead: the trial's time outside its steps and evaluations. From the
  timeline columns (overhead_seconds: start of the trial's process to its first step,
  plus last step to teardown); for a folder written before those columns existed,
  wall_seconds - train_seconds (which also counts evaluations, so it errs high).
- ratio: the sweep's wall time over (summed step time / concurrency): a measure of how close a sweep comes to spending its cores on training steps alone.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq


def analyze(sweep_dir: Path, wall: float | None, concurrency: int | None) -> dict:
    trials = pq.read_table(sweep_dir / "trials.parquet").to_pylist()
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    timeline = all(t.get("overhead_seconds") is not None for t in trials)
    if timeline:
        overheads = [t["overhead_seconds"] for t in trials]
    else:
        overheads = [(t["wall_seconds"] or 0) - (t["train_seconds"] or 0) for t in trials]
    step_seconds = sum(t["train_seconds"] or 0 for t in trials)
    # Rung cooldowns train copies of the model: training steps, though not the trial's own.
    cooldown_seconds = sum(t.get("cooldown_seconds") or 0 for t in trials)
    trial_wall = sum(t["wall_seconds"] or 0 for t in trials)
    out = {
        "sweep_dir": str(sweep_dir),
        "trials": len(trials),
        "overhead_from": "timeline" if timeline else "wall - step time",
        "overhead_per_trial_mean_s": round(statistics.mean(overheads), 2),
        "overhead_per_trial_max_s": round(max(overheads), 2),
        "summed_step_seconds": round(step_seconds, 1),
        "summed_cooldown_seconds": round(cooldown_seconds, 1),
        "summed_trial_wall_seconds": round(trial_wall, 1),
        "statuses": {
            s: sum(t["status"] == s for t in trials) for s in {t["status"] for t in trials}
        },
    }
    if timeline:
        start = [t["first_step_at"] - t["started_at"] for t in trials]
        end = [t["torn_down_at"] - t["last_step_at"] for t in trials]
        queued = [t["started_at"] - t["queued_at"] for t in trials if t["queued_at"]]
        out |= {
            "startup_mean_s": round(statistics.mean(start), 2),
            "teardown_mean_s": round(statistics.mean(end), 2),
            "queued_mean_s": round(statistics.mean(queued), 2) if queued else None,
        }
    ok = [t for t in trials if t["status"] in ("completed", "stopped_early") and t["best_val_loss"]]
    if ok:
        best = min(ok, key=lambda t: t["best_val_loss"])
        out["best"] = (
            f"{best['optimizer']} lr={best['learning_rate']:.3g} val={best['best_val_loss']:.4f}"
        )
    if wall is not None:
        conc = concurrency or meta.get("sweep", {}).get("max_concurrent_trials") or 2
        out["concurrency"] = conc
        out["wall_seconds"] = round(wall, 1)
        out["ratio_wall_to_steps_per_slot"] = round(wall / (step_seconds / conc), 3)
        out["ratio_wall_to_steps_and_cooldowns_per_slot"] = round(
            wall / ((step_seconds + cooldown_seconds) / conc), 3
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run_p = sub.add_parser("run")
    run_p.add_argument("--label", default="sweep")
    run_p.add_argument("--concurrency", type=int, default=None)
    run_p.add_argument("sweep_args", nargs=argparse.REMAINDER)
    an = sub.add_parser("analyze")
    an.add_argument("sweep_dir", type=Path)
    an.add_argument("--wall", type=float, default=None)
    an.add_argument("--concurrency", type=int, default=None)
    args = parser.parse_args(argv)
    if args.cmd == "analyze":
        print(json.dumps(analyze(args.sweep_dir, args.wall, args.concurrency), indent=2))
        return 0
    sweep_args = [a for a in args.sweep_args if a != "--"]
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "raygpt.sweep", *sweep_args], capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        return proc.returncode
    where = re.findall(r"results in (\S+)", proc.stdout)[-1]
    in_sweep = re.findall(r"wall (\d+)s after ([\d.]+)s Ray start-up", proc.stdout)[-1]
    conc = re.findall(r"up to (\d+) (?:trial\(s\) )?at once", proc.stdout)
    result = analyze(Path(where), wall, args.concurrency or (int(conc[0]) if conc else None))
    result |= {
        "label": args.label,
        "command_wall_seconds": round(wall, 1),
        "sweep_seconds": float(in_sweep[0]),
        "ray_startup_seconds": float(in_sweep[1]),
        "ratio_sweep_seconds_to_steps_per_slot": round(
            float(in_sweep[0]) / (result["summed_step_seconds"] / result["concurrency"]), 3
        ),
        "ratio_sweep_seconds_to_steps_and_cooldowns_per_slot": round(
            float(in_sweep[0])
            / (
                (result["summed_step_seconds"] + result["summed_cooldown_seconds"])
                / result["concurrency"]
            ),
            3,
        ),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
