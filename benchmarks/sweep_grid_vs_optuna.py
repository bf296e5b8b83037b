"""Grid search vs Optuna + ASHA with the same number of trials, side by side in one run.

    python benchmarks/sweep_grid_vs_optuna.py --data-file ../shared/data/tinyshakespeare.txt \
        [--experiment experiments/shakespeare_char_cpu.toml] [--max-steps 2000] \
        [--optimizers adamw,sgd] [--grid-points 5] [--grace-steps 250] \
        [--reduction-factor 3] [--storage-path DIR] [--json OUT]

The check: on Tiny Shakespeare with the CPU preset, Optuna + ASHA should come
within 0.03 of the grid's best validation loss at well under half its training steps.
Both sweeps run in one process on one Ray cluster; the grid runs every point to the end
(FIFO), Optuna + ASHA gets as many trials as the grid has points, with ASHA rungs at
grace, grace x rf, ... steps (250, 750 and the end by default: the first rung at the
first evaluation). ASHA ranks each rung on a cooled-down copy (rung_cooldown.py): the
copies' training steps and seconds count on the Optuna side, beside the trials' own
(a trial at rung s trains max(1, round(rung_cooldown x s)) copy steps there). Also
reported: each sweep's wall time against the sum of its training time (step times and
cooldowns), and from those the overhead per trial: what each trial costs beyond its
training (Ray Train start-up and tear-down, evaluations, checkpoints), with as many
trials at once as the cluster fits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile

from raygpt import results, storage
from raygpt.sweep import cli as sweep_cli
from raygpt.sweep import driver as sweep_driver
from raygpt.train import rung_cooldown


def cooldown_steps(sweep_dir: str, sweep_cfg, train_cfg) -> int:
    """Training steps of the rung cooldowns' copies: one cooldown at each step row that
    holds a cooled val (schedule-free optimizers run none, so have no such row)."""
    store = storage.resolve(sweep_dir, check=False)
    table, _ = results.read_steps(store, store.root)
    if table is None:
        return 0
    cfg = dataclasses.replace(train_cfg, rung_cooldown=sweep_cfg.trial_rung_cooldown())
    return sum(
        rung_cooldown.cooldown_steps(cfg, r["step"])
        for r in table.select(["step", "cooled_val_loss"]).to_pylist()
        if r["cooled_val_loss"] is not None
    )


def run_one(label: str, args: list[str]) -> dict:
    sweep_cfg, train_cfg = sweep_cli.configs_from_argv(args)
    summary = sweep_driver.run(sweep_cfg, train_cfg)
    wall = summary["sweep_seconds"]
    store = storage.resolve(summary["sweep_dir"], check=False)
    trials = results.read_table(store, f"{store.root}/{results.TRIALS_FILE}").to_pylist()
    ok = [t for t in trials if t["status"] in ("completed", "stopped_early")]
    best = min(ok, key=lambda t: t["best_val_loss"])
    trial_steps = sum(t["steps"] for t in trials)
    copy_steps = cooldown_steps(summary["sweep_dir"], sweep_cfg, train_cfg)
    step_seconds = sum(t["train_seconds"] or 0.0 for t in trials)
    cooldown_seconds = sum(t["cooldown_seconds"] or 0.0 for t in trials)
    train_seconds = step_seconds + cooldown_seconds
    trial_wall = sum(t["wall_seconds"] or 0.0 for t in trials)
    return {
        "search": label,
        "trials": len(trials),
        "best_val_loss": best["best_val_loss"],
        "best": f"{best['optimizer']} lr={best['learning_rate']:.3g}",
        # Every training step: the trials' own and their rung cooldowns' copies.
        "steps": trial_steps + copy_steps,
        "trial_steps": trial_steps,
        "cooldown_steps": copy_steps,
        "sweep_wall_s": round(wall, 1),
        "sum_train_s": round(train_seconds, 1),
        "sum_cooldown_s": round(cooldown_seconds, 1),
        "sum_trial_wall_s": round(trial_wall, 1),
        # Trial wall beyond its training, per trial: start-up, evals, checkpoints, tear-down.
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
    where = a.storage_path or tempfile.mkdtemp(prefix="raygpt-sweep-bench-")
    n_trials = a.grid_points * len(a.optimizers.split(","))
    common = [
        a.experiment,
        "--data-file", a.data_file,
        "--max-steps", str(a.max_steps), "--lr-decay-steps", str(a.max_steps),
        "--optimizers", a.optimizers, "--storage-path", where, "--overwrite",
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
          f"{'of which cooldown':>19}{'sweep wall s':>14}{'sum train s':>13}{'wall/train':>11}"
          f"{'overhead/trial s':>18}")  # fmt: skip
    for r in rows:
        print(
            f"{r['search']:<15}{r['trials']:>7}{r['best_val_loss']:>10.4f}  {r['best']:<22}"
            f"{r['steps']:>8}{r['cooldown_steps']:>19}{r['sweep_wall_s']:>14}{r['sum_train_s']:>13}"
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
