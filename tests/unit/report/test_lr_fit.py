"""raygpt.report.transfer.fit and lr_trend on synthetic loss curves with a known best lr (fast).

The curves are loss = 2 + C (ln lr - ln lr*)^2 + noise: the parabola in ln lr that the
fit assumes, so its vertex and its sampling spread have closed forms to check against.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from raygpt.errors import UserError
from raygpt.report.transfer import fit as lr_fit
from raygpt.report.transfer.fit import best_lr
from raygpt.report.transfer.trend import fit_trend

BEST = 3e-3
CURVATURE = 0.1
# A factor-2 grid whose points miss BEST (1e-3 * 2^k): the vertex must come from the fit.
GRID = 1e-3 * 2.0 ** np.arange(-3, 5)


def curve(grid, best, seeds, noise, rng):
    lrs = np.repeat(grid, seeds)
    losses = 2 + CURVATURE * (np.log(lrs) - math.log(best)) ** 2
    return lrs, losses + rng.normal(0, noise, len(lrs))


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- one size


def test_noise_free_vertex_is_the_true_minimum():
    lrs, losses = curve(GRID, BEST, 1, 0.0, np.random.default_rng(0))
    fit = best_lr(lrs, losses)
    assert fit.lr == pytest.approx(BEST, rel=1e-9)
    assert fit.edge is None and fit.fit == "parabola"
    # The window: the lowest point (4e-3, of 1.25e-4..1.6e-2) and 2 either side.
    assert fit.window == (GRID[3], GRID[7])
    # No noise: the residuals are zero, every draw is the vertex.
    assert fit.interval == "residuals"
    assert fit.low == pytest.approx(BEST) and fit.high == pytest.approx(BEST)


def test_vertex_matches_a_hand_fit_of_the_seed_means():
    rng = np.random.default_rng(3)
    lrs, losses = curve(GRID, BEST, 2, 0.02, rng)
    fit = best_lr(lrs, losses, seed=1)
    # By hand: the mean per lr, the lowest, the 2 points either side, np.polyfit.
    means = np.array([losses[lrs == g].mean() for g in GRID])
    i = int(np.argmin(means))
    sl = slice(max(0, i - 2), min(len(GRID), i + 3))
    a, b, _ = np.polyfit(np.log(GRID[sl]), means[sl], 2)
    assert fit.lr == pytest.approx(math.exp(-b / (2 * a)), rel=1e-9)
    assert fit.mean_loss == pytest.approx(tuple(means))
    assert fit.seeds == (2,) * len(GRID)
    assert fit.interval == "seeds"
    assert fit.low < fit.lr < fit.high


def _delta_sd(grid, best, seeds, noise) -> float:
    """The sd of the fitted vertex ln(lr*) by the delta method, with the true noise: the
    window is the lowest point of the noise-free curve and 2 either side."""
    x = np.log(grid)
    i = int(np.argmin((x - math.log(best)) ** 2))
    xw = x[max(0, i - 2) : i + 3]
    design = np.column_stack([xw**2, xw, np.ones_like(xw)])
    cov = noise**2 / seeds * np.linalg.inv(design.T @ design)
    a = CURVATURE
    b = -2 * CURVATURE * math.log(best)
    grad = np.array([b / (2 * a**2), -1 / (2 * a), 0.0])  # of -b / 2a
    return float(math.sqrt(grad @ cov @ grad))


@pytest.mark.parametrize("seeds", [1, 2, 3])
def test_bootstrap_interval_width_and_coverage_against_the_delta_method(seeds):
    """Over repeated synthetic sweeps: the 90% interval covers the true best lr about 90%
    of the time, and its median width is the delta method's 2 x sd x t_dof(0.95): the
    noise level is estimated, from dof degrees of freedom."""
    noise, reps = 0.02, 150
    sd = _delta_sd(GRID, BEST, seeds, noise)
    # The noise's degrees of freedom: the seeds' n - 1 per point, or the 5-point window's
    # residuals less the parabola's 3 parameters.
    dof = len(GRID) * (seeds - 1) if seeds > 1 else 2
    expected = 2 * sd * stats.t.ppf(0.95, dof)
    covered, widths, errors = 0, [], []
    rng = np.random.default_rng(11)
    for r in range(reps):
        lrs, losses = curve(GRID, BEST, seeds, noise, rng)
        fit = best_lr(lrs, losses, seed=r, n_boot=1000)
        covered += fit.low <= BEST <= fit.high
        widths.append(math.log(fit.high / fit.low))
        errors.append(math.log(fit.lr / BEST))
    # The point estimate's own spread is the delta method's.
    assert np.std(errors) == pytest.approx(sd, rel=0.25)
    assert np.median(widths) == pytest.approx(expected, rel=0.25)
    assert 0.84 <= covered / reps <= 0.97


def test_single_seed_3_points_gives_the_grid_bracket():
    grid = np.array([1e-3, 2e-3, 4e-3])
    fit = best_lr(grid, [2.10, 2.00, 2.05])
    assert fit.interval == "bracket"
    assert (fit.low, fit.high) == (1e-3, 4e-3)
    assert 1e-3 < fit.lr < 4e-3
    assert np.all((fit.draws >= math.log(1e-3)) & (fit.draws <= math.log(4e-3)))


def test_minimum_at_the_lowest_lr_is_flagged_and_one_sided():
    rng = np.random.default_rng(5)
    lrs, losses = curve(GRID[3:], BEST / 4, 2, 0.01, rng)  # the optimum is below the grid
    fit = best_lr(lrs, losses)
    assert fit.edge == "lowest"
    assert fit.low is None and fit.high is not None
    # Never extrapolated past the grid.
    assert fit.lr >= GRID[3] * (1 - 1e-12)
    assert any("extend the grid down" in n for n in fit.notes)
    assert "open" in fit.describe()


def test_minimum_at_the_highest_lr_with_divergence_above():
    rng = np.random.default_rng(6)
    lrs, losses = curve(GRID[:5], BEST * 8, 2, 0.01, rng)
    lrs = np.append(lrs, [GRID[5], GRID[5]])
    losses = np.append(losses, [math.inf, 2.5])  # one seed diverged: the lr's mean is inf
    fit = best_lr(lrs, losses)
    assert fit.edge == "highest" and fit.high is None and fit.low is not None
    assert fit.diverged_lrs == (GRID[5],) and fit.diverged_above
    assert fit.lr <= GRID[4] * (1 + 1e-12)
    assert any("a larger lr diverged" in n for n in fit.notes)


def test_fewer_than_3_learning_rates_is_one_line():
    with pytest.raises(UserError) as err:
        best_lr([1e-3, 1e-3, 2e-3], [2.0, 2.1, 2.2], label="adamw at n_embd=64")
    assert one_line(err).startswith("adamw at n_embd=64: 2 learning rate(s) with a finite loss")
    assert "at least 3" in str(err.value)
    with pytest.raises(UserError, match="at least 3"):
        best_lr([1e-3, 2e-3, 4e-3], [2.0, 1.9, math.nan])  # one diverged: 2 left


def test_deterministic_for_a_seed():
    lrs, losses = curve(GRID, BEST, 2, 0.02, np.random.default_rng(1))
    one, two = best_lr(lrs, losses, seed=4), best_lr(lrs, losses, seed=4)
    assert np.array_equal(one.draws, two.draws) and one == two
    assert not np.array_equal(one.draws, best_lr(lrs, losses, seed=5).draws)


def test_usable_trials_from_trials_parquet_rows():
    rows = [
        {"optimizer": "adamw", "learning_rate": 1e-3, "status": "completed", "final_val_loss": 2.0},
        {"optimizer": "adamw", "learning_rate": 2e-3, "status": "diverged", "final_val_loss": 0.5},
        {
            "optimizer": "adamw",
            "learning_rate": 4e-3,
            "status": "stopped_early",
            "final_val_loss": 1,
        },
        {"optimizer": "adamw", "learning_rate": 8e-3, "status": "error", "final_val_loss": None},
        {"optimizer": "sgd", "learning_rate": 1e-1, "final_val_loss": 3.0},  # no status
    ]
    found = lr_fit.usable_trials(rows)
    assert found == {"adamw": ([1e-3, 2e-3], [2.0, math.inf]), "sgd": ([1e-1], [3.0])}
    found = lr_fit.usable_trials(
        [
            {"optimizer": o, "learning_rate": lr, "final_val_loss": loss}
            for o in ("adamw", "lion")
            for lr, loss in zip(*curve(GRID, BEST, 1, 0.0, np.random.default_rng(0)), strict=True)
        ]
    )
    assert sorted(found) == ["adamw", "lion"]
    assert best_lr(*found["adamw"]).lr == pytest.approx(BEST)


def test_to_dict_is_json():
    import json

    lrs, losses = curve(GRID, BEST, 2, 0.02, np.random.default_rng(1))
    record = best_lr(lrs, losses).to_dict()
    assert json.loads(json.dumps(record))["interval"] == "seeds"


# --------------------------------------------------------------------------- across sizes


def sweep_sizes(widths, slope, rng, seeds=2, noise=0.02, base=3e-3, n_boot=1000):
    """Best-lr fits at each width, from curves whose optimum is base * (w / 64)^slope, on
    one fixed grid (as a sweep runs it)."""
    grid = 3e-3 * 2.0 ** np.arange(-8, 4)
    fits = []
    for i, w in enumerate(widths):
        lrs, losses = curve(grid, base * (w / 64) ** slope, seeds, noise, rng)
        fits.append(best_lr(lrs, losses, seed=i, n_boot=n_boot))
    return [{"n_embd": w, "n_layer": 2} for w in widths], fits


def test_trend_recovers_the_slope_and_predicts_the_target():
    rng = np.random.default_rng(21)
    sizes, fits = sweep_sizes([64, 128, 256, 512], -1.0, rng)
    trend = fit_trend(sizes, fits, {"n_embd": 1024})
    assert trend.axes == ("n_embd",)
    lo, hi = trend.slope_intervals["n_embd"]
    assert lo < -1.0 < hi and trend.slopes["n_embd"] == pytest.approx(-1.0, abs=0.05)
    truth = 3e-3 * (1024 / 64) ** -1.0
    assert trend.low < truth < trend.high
    assert trend.lr == pytest.approx(truth, rel=0.1)
    assert trend.extrapolation == {"n_embd": 2.0}
    assert any("2.0x the largest proxy" in n for n in trend.notes)
    assert "from 4 proxies" in trend.describe()


def test_trend_flat_under_transfer_and_coverage_of_the_slope():
    """Slope 0 (muP's promise): the interval covers 0; over repeats, the slope's 90%
    interval covers the truth about 90% of the time."""
    covered, reps = 0, 60
    for r in range(reps):
        rng = np.random.default_rng(100 + r)
        sizes, fits = sweep_sizes([64, 128, 256], 0.0, rng, n_boot=500)
        trend = fit_trend(sizes, fits, {"n_embd": 512})
        lo, hi = trend.slope_intervals["n_embd"]
        covered += lo <= 0.0 <= hi
    assert 0.8 <= covered / reps <= 1.0


def test_trend_propagates_the_intervals():
    """Noisier curves give a wider slope interval: the sizes' intervals carry into it."""
    quiet = fit_trend(
        *sweep_sizes([64, 128, 256], -1.0, np.random.default_rng(1), noise=0.005), {"n_embd": 512}
    )
    loud = fit_trend(
        *sweep_sizes([64, 128, 256], -1.0, np.random.default_rng(1), noise=0.05), {"n_embd": 512}
    )
    width = lambda t: np.diff(t.slope_intervals["n_embd"])[0]  # noqa: E731
    assert width(loud) > 3 * width(quiet)


def test_target_smaller_than_the_proxies_is_refused():
    sizes, fits = sweep_sizes([64, 128, 256], -1.0, np.random.default_rng(2))
    with pytest.raises(UserError) as err:
        fit_trend(sizes, fits, {"n_embd": 32})
    assert one_line(err) == (
        "target n_embd=32 is smaller than the proxies (64..256); a transfer predicts upward"
    )


def test_trend_on_two_axes_and_an_axis_not_varied():
    rng = np.random.default_rng(8)
    grid = 3e-3 * 2.0 ** np.arange(-8, 4)
    sizes, fits = [], []
    for i, (w, d) in enumerate([(64, 2), (128, 2), (256, 2), (64, 4), (64, 8), (128, 8)]):
        lrs, losses = curve(grid, 3e-3 * (w / 64) ** -1.0 * (d / 2) ** -0.5, 2, 0.01, rng)
        sizes.append({"n_embd": w, "n_layer": d})
        fits.append(best_lr(lrs, losses, seed=i))
    trend = fit_trend(sizes, fits, {"n_embd": 512, "n_layer": 12})
    assert trend.axes == ("n_embd", "n_layer")
    assert trend.slopes["n_embd"] == pytest.approx(-1.0, abs=0.1)
    assert trend.slopes["n_layer"] == pytest.approx(-0.5, abs=0.1)
    truth = 3e-3 * 8**-1.0 * 6**-0.5
    assert trend.low < truth < trend.high
    # Width only: n_layer=2 everywhere, so the depth of the target is noted, not fitted.
    only = fit_trend(sizes[:3], fits[:3], {"n_embd": 512, "n_layer": 12})
    assert only.axes == ("n_embd",)
    assert any("n_layer is 2 at every proxy" in n for n in only.notes)


def test_edge_sizes_are_left_out_and_too_few_refused():
    rng = np.random.default_rng(9)
    sizes, fits = sweep_sizes([64, 128, 256], -1.0, rng)
    grid = 3e-3 * 2.0 ** np.arange(0, 6)
    lrs, losses = curve(grid, 3e-4, 2, 0.01, rng)  # its optimum is below this grid
    edge = best_lr(lrs, losses)
    assert edge.edge == "lowest"
    trend = fit_trend([*sizes, {"n_embd": 512, "n_layer": 2}], [*fits, edge], {"n_embd": 1024})
    assert len(trend.sizes) == 3
    assert trend.excluded == (
        ({"n_embd": 512, "n_layer": 2}, "best lr at the grid's lowest point"),
    )
    with pytest.raises(UserError) as err:
        fit_trend(
            [sizes[0], {"n_embd": 512, "n_layer": 2}],
            [fits[0], edge],
            {"n_embd": 1024},
            label="adamw",
        )
    assert one_line(err).startswith("adamw: 1 proxy size(s) with an interior best lr")
    assert "widen the learning-rate grid" in str(err.value)


def test_axes_that_vary_together_are_refused():
    rng = np.random.default_rng(10)
    grid = 3e-3 * 2.0 ** np.arange(-8, 4)
    sizes, fits = [], []
    for i, (w, d) in enumerate([(64, 2), (128, 4), (256, 8)]):
        lrs, losses = curve(grid, 3e-3 * (w / 64) ** -1.0, 2, 0.01, rng)
        sizes.append({"n_embd": w, "n_layer": d})
        fits.append(best_lr(lrs, losses, seed=i))
    with pytest.raises(UserError, match="vary together"):
        fit_trend(sizes, fits, {"n_embd": 512, "n_layer": 16})
