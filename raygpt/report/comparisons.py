"""Fair comparisons between a sweep's trials: at equal budget, and over seeds.

Equal budget. ASHA stops most trials at a rung; their val there is not comparable
with a completed trial's val at max_steps (under a cosine schedule a stopped
trial's learning rate has not even decayed). So trials are compared only at a step
every one of them reached: each "budget" is a step at which some trial's last
evaluation happened (ASHA's rungs and max_steps), and at a budget each trial that
reached it contributes its val at that very step. The sweep's answer is the best
configuration at the largest budget.

Seeds. A configuration is every parameter but the seed (sweep/search.py: config_key);
its value at a budget is the mean over its seeds, with the sample sd. Whether the
winner's lead over the runner-up exceeds the seed noise is a one-sided Welch t-test
(H1: the winner's mean is lower), as optimizer speedrun records test a new record
against the old.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from raygpt import status

SIGNIFICANCE = 0.05  # the p-value below which a lead counts as beyond the noise


@dataclass
class ConfigResult:
    """One configuration at one budget: its seeds' vals there."""

    key: str
    optimizer: str
    learning_rate: float | None
    params: dict[str, Any]
    values: list[float] = field(default_factory=list)
    trial_ids: list[str] = field(default_factory=list)
    steps_to_target: list[int | None] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    def label(self) -> str:
        extra = {
            k: v
            for k, v in self.params.items()
            if k not in ("optimizer", "learning_rate", "seed", "momentum")
        }
        text = f"{self.optimizer} lr {_g(self.learning_rate)}"
        if self.params.get("momentum") is not None and self.optimizer == "momentum":
            text += f" momentum {_g(self.params['momentum'])}"
        return text + "".join(f" {k}={_g(v)}" for k, v in sorted(extra.items()))

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": self.label(),
            "optimizer": self.optimizer,
            "learning_rate": self.learning_rate,
            "params": self.params,
            "mean": self.mean,
            "sd": self.sd,
            "n": self.n,
            "values": self.values,
            "trial_ids": self.trial_ids,
            "steps_to_target": self.steps_to_target,
        }


def _g(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def comparable(row: dict[str, Any]) -> bool:
    """Diverged and errored trials never win; running and stopped ones count where they got."""
    return row["status"] in status.CAN_WIN


def val_at_steps(
    rows: list[dict[str, Any]], evals: dict[str, dict[int, float]]
) -> dict[str, dict[int, float]]:
    """Each trial's val loss by evaluated step: from its step rows (`evals`), or else from
    the trials table alone (its final val at its last step)."""
    out = {}
    for row in rows:
        found = evals.get(row["trial_id"])
        if found:
            out[row["trial_id"]] = found
        elif _finite(row.get("final_val_loss")) and row.get("steps"):
            out[row["trial_id"]] = {int(row["steps"]): float(row["final_val_loss"])}
    return out


def budgets(rows: list[dict[str, Any]], vals: dict[str, dict[int, float]]) -> list[int]:
    """The steps at which trials are compared: each comparable trial's last evaluation."""
    ends = {max(vals[r["trial_id"]]) for r in rows if comparable(r) and vals.get(r["trial_id"])}
    return sorted(ends)


def at_budget(
    rows: list[dict[str, Any]], vals: dict[str, dict[int, float]], step: int
) -> list[ConfigResult]:
    """Configurations whose trials reached `step`, each with its seeds' vals there, best
    (lowest mean) first."""
    configs: dict[str, ConfigResult] = {}
    for row in rows:
        value = vals.get(row["trial_id"], {}).get(step)
        if not comparable(row) or not _finite(value):
            continue
        params = json.loads(row["params"]) if row.get("params") else {}
        if row.get("momentum") is not None:  # its own column in tables that predate params
            params.setdefault("momentum", row["momentum"])
        key = row.get("config_key") or row["trial_id"]
        result = configs.setdefault(
            key,
            ConfigResult(
                key=key,
                optimizer=row["optimizer"],
                learning_rate=row.get("learning_rate"),
                params={k: v for k, v in params.items() if k != "seed"},
            ),
        )
        result.values.append(float(value))
        result.trial_ids.append(row["trial_id"])
        result.steps_to_target.append(row.get("steps_to_target"))
    return sorted(configs.values(), key=lambda c: (c.mean, c.label()))


def one_sided_welch(winner: list[float], runner_up: list[float]) -> float | None:
    """p-value of a one-sided Welch t-test that the winner's mean is lower; None when
    either side has fewer than two seeds (no estimate of the noise)."""
    if len(winner) < 2 or len(runner_up) < 2:
        return None
    from scipy import stats

    if statistics.stdev(winner) == 0 and statistics.stdev(runner_up) == 0:
        return 0.0 if statistics.fmean(winner) < statistics.fmean(runner_up) else 1.0
    return float(stats.ttest_ind(winner, runner_up, equal_var=False, alternative="less").pvalue)


def compare(rows: list[dict[str, Any]], evals: dict[str, dict[int, float]]) -> dict[str, Any]:
    """The equal-budget comparison of a sweep: every budget's best, the ranking at the
    largest budget, and the winner's test against the runner-up."""
    vals = val_at_steps(rows, evals)
    steps = budgets(rows, vals)
    per_budget = []
    for step in steps:
        ranked = at_budget(rows, vals, step)
        if ranked:
            per_budget.append({"step": step, "configs": len(ranked), "best": ranked[0].as_dict()})
    out: dict[str, Any] = {"budgets": per_budget, "top_budget": None, "ranking": [], "test": None}
    if not steps:
        return out
    top = steps[-1]
    ranked = at_budget(rows, vals, top)
    # With seeds, the answer comes from the configurations that have them: a single
    # lucky seed of an unconfirmed configuration is not an answer.
    seeded = [c for c in ranked if c.n > 1]
    contenders = seeded or ranked
    out["top_budget"] = top
    out["ranking"] = [c.as_dict() for c in ranked]
    out["ranked_over"] = "configurations with 2+ seeds" if seeded else "all configurations"
    if len(contenders) >= 2:
        winner, runner_up = contenders[0], contenders[1]
        p = one_sided_welch(winner.values, runner_up.values)
        out["test"] = {
            "winner": winner.label(),
            "runner_up": runner_up.label(),
            "lead": runner_up.mean - winner.mean,
            "p_value": p,
            "n": [winner.n, runner_up.n],
            "beyond_noise": None if p is None else p < SIGNIFICANCE,
        }
    if contenders:
        out["answer"] = contenders[0].as_dict()
    return out


def describe_test(test: dict[str, Any] | None) -> str | None:
    """One line on whether the winner's lead exceeds the seed noise."""
    if not test:
        return None
    lead = f"{test['winner']} leads {test['runner_up']} by {test['lead']:.4f}"
    if test["p_value"] is None:
        return f"{lead}; one seed each, so the noise is unknown: rerun with --seeds 3"
    verdict = "beyond the seed noise" if test["beyond_noise"] else "within the seed noise"
    n1, n2 = test["n"]
    return (
        f"{lead}: p = {test['p_value']:.3g} (one-sided Welch t-test, {n1} vs {n2} seeds), {verdict}"
    )
