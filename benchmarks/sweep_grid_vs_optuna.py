"""Grid search vs Optuna + ASHA with the same number of trials, side by side in one run.

    python benchmarks/sweep_grid_vs_optuna.py --data-file ../shared/data/tinyshakespeare.txt \
        [--experiment experiments/shakespeare_char_cpu.toml] [--max-steps 2000] \
        [--optimizers adamw,sgd] [--grid-points 5] [--grace-steps 250] \
        [--reduction-factor 3] [--storage-path DIR] [--json OUT]

The issue's check: on Tiny Shakespeare with the CPU preset, Optuna + ASHA should come
within 0.03 of the grid's best validation loss at well under half its training steps.
Both sweeps run in one process on one Ray cluster; the grid runs every point to the end
(FIFO), Optuna + ASHA gets as many trials as the grid has points, with ASHA rungs at
grace, grace x rf, ... steps (250, 750 and the end by default: the first rung at the
first evaluation). Also reported: each sweep's wall time against the sum of its trials'
training time (sum of step times), and from those the overhead per trial: what each trial
costs beyond its training steps (Ray Train start-up and tear-down, evaluations,
checkpoints), with as many trials at once as the cluster fits.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import pyarrow.parquet as pq

from raygpt import sweep


def run_one(label: str, args: list[str]) -> dict:
    sweep_cfg, train_cfg = sweep.configs_from_argv(args)
    summary = sweep.run(sweep_cfg, train_cfg)
    wall = summary["sweep_seconds"]
    trials = pq.read_table(f"{summary['sweep_dir']}/trials.parquet").to_pylist()
    ok = [t for t in trials if t["status"] in ("completed", "stopped_early")]
    best = min(ok, key=lambda t: t["best_val_loss"])
    train_seconds = sum(t["train_seconds"] or 0.0 for t in trials)
    trial_wall = sum(t["wall_seconds"] or 0.0 for t in trials)
    return {
        "search": label,
        "trials": len(trials),
        "best_val_loss": best["best_val_loss"],
        "best": f"{best['optimizer']} lr={best['learning_rate']:.3g}",
        "steps": sum(t["steps"] for t in trials),
        "sweep_wall_s": round(wall, 1),
        "sum_train_s": round(train_seconds, 1),
        "sum_trial_wall_s": round(trial_wall, 1),
        # Trial wall beyond its steps, per trial: start-up, evals, checkpoints, tear-down.
        "overhead_per_trial_s": round((trial_wall - train_seconds) / len(trials), 1),
        "concurrency": summary.get("max_concurrent_trials"),
        "statuses": {
            s: sum(t["status"] == s for t in trials) for s in {t["status"] for t in trials}
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="experiments/shakespeare_char_cpu.toml")
    p.add_argument("--data-file", required=True)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--optimizers", default="adamw,sgd")
    p.add_argument("--grid-points", type=int, default=5)
    p.add_argument("--grace-steps", type=int, default=250)
    p.add_argument("--reduction-factor", type=int, default=3)
    p.add_argument("--storage-path", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    storage = a.storage_path or tempfile.mkdtemp(prefix="raygpt-sweep-bench-")
    n_trials = a.grid_points * len(a.optimizers.split(","))
    common = [
        a.experiment,
        "--data-file", a.data_file,
        "--max-steps", str(a.max_steps), "--lr-decay-steps", str(a.max_steps),
        "--optimizers", a.optimizers, "--storage-path", storage, "--overwrite",
        "--log-interval", str(a.max_steps),
    ]  # fmt: skip
    grid = run_one(
        "grid (FIFO)",
        [*common, "--search", "grid", "--grid-points", str(a.grid_points),
         "--scheduler", "fifo", "--name", "bench-grid"],
    )  # fmt: skip
    optuna = run_one(
        "optuna + ASHA",
        [*common, "--search", "optuna", "--num-samples", str(n_trials), "--scheduler", "asha",
         "--grace-steps", str(a.grace_steps), "--reduction-factor", str(a.reduction_factor),
         "--name", "bench-optuna"],
    )  # fmt: skip
    rows = [grid, optuna]
    print(f"\n{'search':<15}{'trials':>7}{'best val':>10}  {'best':<22}{'steps':>8}"
          f"{'sweep wall s':>14}{'sum train s':>13}{'wall/train':>11}{'overhead/trial s':>18}")  # fmt: skip
    for r in rows:
        print(
            f"{r['search']:<15}{r['trials']:>7}{r['best_val_loss']:>10.4f}  {r['best']:<22}"
            f"{r['steps']:>8}{r['sweep_wall_s']:>14}{r['sum_train_s']:>13}"
            f"{r['sweep_wall_s'] / max(r['sum_train_s'], 1e-9):>10.2f}x"
            f"{r['overhead_per_trial_s']:>18}"
        )
    gap = optuna["best_val_loss"] - grid["best_val_loss"]
    ratio = optuna["steps"] / grid["steps"]
    print(f"\noptuna+ASHA best - grid best = {gap:+.4f} (target <= 0.03); "
          f"steps ratio {ratio:.2f} (target < 0.5)")  # fmt: skip
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"rows": rows, "gap": gap, "steps_ratio": ratio}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
