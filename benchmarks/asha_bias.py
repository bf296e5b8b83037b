"""ASHA's bias against high learning rates under lr decay, before and after rung cooldowns.

    python -m raygpt.sweep experiments/shakespeare_char_cpu.toml \
        --data-file ../shared/data/tinyshakespeare.txt --optimizers adamw --search grid \
        --grid-points 5 --lr-range adamw=1e-3:3e-2 --scheduler fifo --grace-steps 250 \
        --reduction-factor 3 --rung-cooldown 0.2 --eval-train false --name asha-bias
    python benchmarks/asha_bias.py ~/ray_results/asha-bias [--reduction-factor 3]

The grid runs every learning rate to max_steps (FIFO), so its final val is the ground
truth. FIFO with --grace-steps still has ASHA's rungs (grace x reduction_factor^k), and
at each the trials also evaluate a cooled-down copy (rung_cooldown.py) without stopping.
For each rung this prints the ranking ASHA would see before (plain val: what it ranks
without cooldowns) and after (the cooled copy's val), against the final ranking:
- whether the grid's winner survives the rung (top 1/reduction_factor kept, as ASHA does),
- Spearman's rank correlation with the final ranking,
- the rank ASHA gives the grid's winner.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from scipy import stats

from raygpt.errors import UserError
from raygpt.report import tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--reduction-factor", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        trials, steps, _ = tables.load(args.sweep_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = steps.to_pylist() if steps is not None else []
    lrs = {t["trial_id"]: t["learning_rate"] for t in trials.to_pylist()}
    rungs = sorted({r["step"] for r in rows if r["cooled_val_loss"] is not None})
    problem = None
    if len(lrs) < 2:
        problem = f"holds {len(lrs)} trial(s); a ranking needs two or more learning rates"
    elif not rungs:
        problem = "holds no cooled val at any rung (a sweep without rung cooldowns)"
    if problem:
        print(
            f"error: {args.sweep_dir} {problem}; run the grid in this script's docstring "
            "(FIFO with --grace-steps and --rung-cooldown)",
            file=sys.stderr,
        )
        return 2
    final_step = max(r["step"] for r in rows)
    final = {r["trial_id"]: r["val_loss"] for r in rows if r["step"] == final_step}
    order = sorted(final, key=final.get)
    winner = order[0]
    out = {
        "final_step": final_step,
        "final": {f"{lrs[t]:.3g}": round(final[t], 4) for t in order},
        "winner_lr": lrs[winner],
        "rungs": [],
    }
    keep = max(1, math.ceil(len(final) / args.reduction_factor))
    for rung in rungs:
        at = {r["trial_id"]: r for r in rows if r["step"] == rung}
        entry = {"step": rung, "kept": keep}
        for label, key in (("before", "val_loss"), ("after", "cooled_val_loss")):
            ranked = sorted(at, key=lambda t, key=key: at[t][key])
            rho = stats.spearmanr([at[t][key] for t in order], [final[t] for t in order])[0]
            entry[label] = {
                "ranking": [f"{lrs[t]:.3g}" for t in ranked],
                "winner_rank": ranked.index(winner) + 1,
                "winner_survives": winner in ranked[:keep],
                "spearman_vs_final": round(float(rho), 3),
            }
        out["rungs"].append(entry)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
