"""The team service's web pages, rendered on the server: the list of sweeps, one sweep's page.

Pure functions from plain dicts (the database's rows) to an HTML string, so the Serve app
and the tests call them with no Ray, no database and no front-end build. Names, config
values and error text come from users: every value goes through html.escape, and a link
is kept only when it is relative or http(s). While a page shows a sweep queued or running,
a little inline script re-fetches the page every REFRESH_S seconds and swaps its live part
(everything but the plots) in place; it stops once nothing on the page is active.

The words are the console's: the live line is sweep/live_view.py's, and the equal-budget
summary is report/comparisons.py's comparison (its labels and its noise verdict), with
compute counted by report/compute.py.

Keys read (a missing key shows as "-"):

- a sweep, both pages: `owner`, `name` (the id where empty), `id`, `status` ("queued" and
  "running" are active; any other, such as done, failed or cancelled, is shown as given),
  `reason` (a queued sweep's line from admission.decide), `started_at` and `finished_at`
  (Unix seconds or None).
- a sweep, list page only: `url` (its page), `steps_done`, `steps_planned`,
  `best_val_loss`, `best_optimizer`, `best_learning_rate`, `gpu_hours`; `sweep_progress`
  computes all but the url from the sweep's trials.
- a sweep, sweep page only: `total_trials` and `max_steps`, the plan its live line counts
  steps against (the trials seen and their largest step count where absent).
- a trial, sweep page: a row of trials.parquet (results.TRIAL_SCHEMA): `trial_id`,
  `optimizer`, `learning_rate`, `params` (JSON text or a dict), `status`, `error`, `steps`,
  `final_val_loss`, `best_val_loss`, and for the comparison and compute `config_key`,
  `momentum`, `steps_to_target`, `device_seconds`, `gpu_hours`, `flops`.
"""

from __future__ import annotations

import json
import math
import re
import time
from html import escape
from typing import Any
from urllib.parse import urlsplit

from raygpt import status
from raygpt.report import comparisons, compute
from raygpt.train.metrics import format_duration

QUEUED = "queued"
RUNNING = "running"
ACTIVE = (QUEUED, RUNNING)  # sweep statuses whose page keeps refreshing
REFRESH_S = 5
LIVE_ID = "live"  # the element the script swaps (_SCRIPT names it too)

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.reason { color: #666; font-size: 90%; } span.reason { display: block; }
.status-queued { color: #8a6d00; } .status-running { color: #0b5cad; }
.status-error, .status-failed, .status-diverged { color: #b00020; }
tr.winner { background: #eef7ee; }
.live-line { font-family: ui-monospace, monospace; margin: 0.5em 0 1em; }
figure { display: inline-block; margin: 0 1em 1em 0; } img { max-width: 640px; }
"""

# Re-fetch this page and swap its live part in place, every data-refresh seconds, while the
# live part (element id "live", LIVE_ID) still carries data-refresh.
_SCRIPT = """
(() => {
  async function refresh() {
    const current = document.getElementById("live");
    if (!current || !current.dataset.refresh) return;
    try {
      const response = await fetch(window.location.href, { cache: "no-store" });
      if (response.ok) {
        const page = new DOMParser().parseFromString(await response.text(), "text/html");
        const fresh = page.getElementById("live");
        if (fresh) current.replaceWith(document.adoptNode(fresh));
      }
    } catch (err) {
      // a missed refresh: the next one tries again
    }
    schedule();
  }
  function schedule() {
    const live = document.getElementById("live");
    if (live && live.dataset.refresh) setTimeout(refresh, 1000 * Number(live.dataset.refresh));
  }
  schedule();
})();
"""


# --------------------------------------------------------------------------- list page


def render_sweep_list(sweeps: list[dict[str, Any]], now: float, title: str = "Sweeps") -> str:
    """The list of sweeps, in the order given: owner, name (a link), status (a queued one's
    reason under it), best so far, GPU-hours, steps done/planned and ETA."""
    header = ["owner", "sweep", "status", "best val loss", "best at", "GPU-hours", "steps", "ETA"]
    rows = []
    for sweep in sweeps:
        name = _text(sweep.get("name") or sweep.get("id"))
        url = _safe_url(sweep.get("url"))
        best_at = "-"
        if sweep.get("best_optimizer"):
            best_at = f"{_text(sweep['best_optimizer'])} lr {_lr(sweep.get('best_learning_rate'))}"
        rows.append(
            "<tr>"
            + _td(_text(sweep.get("owner")))
            + _td(f'<a href="{escape(url)}">{name}</a>' if url else name)
            + _td(_status_cell(sweep.get("status"), sweep.get("reason")))
            + _td(_loss(sweep.get("best_val_loss")), num=True)
            + _td(best_at)
            + _td(_hours(sweep.get("gpu_hours")), num=True)
            + _td(_steps(sweep.get("steps_done"), sweep.get("steps_planned")), num=True)
            + _td(_eta(sweep, now), num=True)
            + "</tr>"
        )
    active = any(s.get("status") in ACTIVE for s in sweeps)
    table = _table(header, rows) if rows else "<p>No sweeps yet.</p>"
    body = f"<h1>{_text(title)}</h1>\n{_live(table, now, active)}"
    return _page(title, body, active)


def sweep_progress(
    trials: list[dict[str, Any]], total_trials: int, max_steps: int
) -> dict[str, Any]:
    """A sweep's list-page numbers from its trials, counted as the live line counts them
    (sweep/live_view.py): planned steps are max_steps for each trial running or not yet
    started and the steps trained for each finished one; the best so far is the lowest
    best val loss among trials that can win (status.CAN_WIN)."""
    started = len(trials)
    done = sum(t.get("steps") or 0 for t in trials)
    planned = sum(
        max_steps if _status(t) == status.RUNNING else (t.get("steps") or 0) for t in trials
    )
    planned += max(0, total_trials - started) * max_steps
    can_win = [
        t for t in trials if _status(t) in status.CAN_WIN and _finite(t.get("best_val_loss"))
    ]
    best = min(can_win, key=lambda t: t["best_val_loss"], default=None)
    return {
        "steps_done": done,
        "steps_planned": planned,
        "best_val_loss": best["best_val_loss"] if best else None,
        "best_optimizer": best.get("optimizer") if best else None,
        "best_learning_rate": best.get("learning_rate") if best else None,
        "gpu_hours": compute.totals(trials)["gpu_hours"],
    }


# --------------------------------------------------------------------------- sweep page


def render_sweep_page(
    sweep: dict[str, Any],
    trials: list[dict[str, Any]],
    plots: list[str],
    now: float,
    evals: dict[str, dict[int, float]] | None = None,
    home_url: str = "/",
) -> str:
    """One sweep's page: its live line (or why it waits), the equal-budget summary, its
    trials (in the order given) and its plots (`plots`: image URLs).

    `evals` is each trial's val loss by evaluated step (report/tables.py's
    evals_by_trial), so trials compare at every rung; without it each trial counts at
    its last step with its final val loss, which still compares at equal budget.
    """
    rows = [_comparison_row(t) for t in trials]
    name = _text(sweep.get("name") or sweep.get("id"))
    state = sweep.get("status")
    head = (
        f"<p>owner {_text(sweep.get('owner'))} · status "
        f"{_status_cell(state, sweep.get('reason'))}</p>"
    )
    compared = comparisons.compare(rows, evals or {})
    answer = compared.get("answer") or {}
    live = (
        head
        + "\n"
        + _live_line(sweep, rows, now)
        + _summary(compared, rows)
        + "<h2>Trials</h2>\n"
        + _trials_table(rows, set(answer.get("trial_ids") or []))
    )
    figures = "".join(
        f'<figure><img src="{escape(url)}" alt="{escape(_plot_name(url))}">'
        f"<figcaption>{escape(_plot_name(url))}</figcaption></figure>"
        for url in (_safe_url(p) for p in plots)
        if url
    )
    home = _safe_url(home_url) or "/"
    body = (
        f'<p><a href="{escape(home)}">all sweeps</a></p>\n<h1>{name}</h1>\n'
        f"{_live(live, now, state in ACTIVE)}\n"
        + (f"<h2>Plots</h2>\n<div class='plots'>{figures}</div>\n" if figures else "")
    )
    return _page(str(sweep.get("name") or sweep.get("id") or "sweep"), body, state in ACTIVE)


def _live_line(sweep: dict[str, Any], rows: list[dict[str, Any]], now: float) -> str:
    """live_view's console line; a sweep that has not started has none (its reason is
    in its status)."""
    started = sweep.get("started_at")
    if not _finite(started):
        return ""
    # live_view imports Ray Tune (its callback lives there): only this page needs it.
    from raygpt.sweep.live_view import progress_line

    end = sweep.get("finished_at") if _finite(sweep.get("finished_at")) else now
    total = sweep.get("total_trials") or len(rows)
    max_steps = sweep.get("max_steps") or max((r["steps"] or 0 for r in rows), default=0)
    line = progress_line(rows, int(total), int(max_steps), end - started)
    return f'<p class="live-line">{_text(line.removeprefix("[sweep] "))}</p>\n'


def _summary(compared: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The equal-budget answer, each budget's best, the ranking at the largest budget,
    the noise verdict and the compute spent."""
    parts = ["<h2>Equal-budget summary</h2>"]
    answer = compared.get("answer")
    if answer:
        trial = f", trial {_text(answer['trial_ids'][0])}" if answer["n"] == 1 else ""
        parts.append(
            f'<p id="answer">best at equal budget: <strong>{_text(answer["config"])}</strong>, '
            f"val {_spread(answer)} at step {compared['top_budget']}{trial}</p>"
        )
    else:
        parts.append('<p id="answer">best: none yet (no trial with a finite val loss)</p>')
    verdict = comparisons.describe_test(compared.get("test"))
    if verdict:
        parts.append(f"<p>{_text(verdict)}</p>")
    budgets = compared.get("budgets") or []
    if len(budgets) > 1:
        parts.append(
            _table(
                ["step", "best there", "val loss", "configurations"],
                [
                    "<tr>"
                    + _td(str(b["step"]), num=True)
                    + _td(_text(b["best"]["config"]))
                    + _td(_spread(b["best"]), num=True)
                    + _td(str(b["configs"]), num=True)
                    + "</tr>"
                    for b in budgets
                ],
                caption="best at each budget (a trial counts only at steps it reached)",
            )
        )
    ranking = compared.get("ranking") or []
    if ranking:
        parts.append(
            _table(
                ["configuration", "val loss", "seeds"],
                [
                    "<tr>"
                    + _td(_text(c["config"]))
                    + _td(_spread(c), num=True)
                    + _td(str(c["n"]), num=True)
                    + "</tr>"
                    for c in ranking
                ],
                caption=f"ranking at step {compared['top_budget']}",
            )
        )
    parts.append(f"<p>compute: {_text(compute.compute_line(compute.totals(rows)))}</p>")
    return "\n".join(parts) + "\n"


def _trials_table(rows: list[dict[str, Any]], winners: set[str]) -> str:
    header = ["trial", "optimizer", "learning rate", "searched keys", "status", "steps"]
    header += ["val loss", "best val loss"]
    body = []
    for row in rows:
        params = json.loads(row["params"]) if row.get("params") else {}
        searched = ", ".join(
            f"{k}={_value(v)}"
            for k, v in sorted(params.items())
            if k not in ("optimizer", "learning_rate")
        )
        mark = ' class="winner"' if row["trial_id"] in winners else ""
        body.append(
            f"<tr{mark}>"
            + _td(_text(row["trial_id"]))
            + _td(_text(row["optimizer"]))
            + _td(_lr(row.get("learning_rate")), num=True)
            + _td(_text(searched or "-"))
            + _td(_status_cell(row["status"], row.get("error")))
            + _td(_text(row["steps"]), num=True)
            + _td(_loss(row.get("final_val_loss")), num=True)
            + _td(_loss(row.get("best_val_loss")), num=True)
            + "</tr>"
        )
    return _table(header, body) if body else "<p>No trials yet.</p>\n"


def _comparison_row(trial: dict[str, Any]) -> dict[str, Any]:
    """A trial as comparisons and live_view read it: every key they index present, the
    status defaulted as report/tables.py's trial_rows defaults it, params as JSON text."""
    row = dict(trial)
    row["trial_id"] = str(row.get("trial_id") or "")
    row["status"] = _status(row)
    row["optimizer"] = row.get("optimizer") or "?"
    row["steps"] = row.get("steps") or 0
    row.setdefault("learning_rate", None)
    row.setdefault("best_val_loss", None)
    if isinstance(row.get("params"), dict):
        row["params"] = json.dumps(row["params"], default=str)
    return row


# --------------------------------------------------------------------------- pieces


def _page(title: str, body: str, active: bool) -> str:
    script = f"<script>{_SCRIPT}</script>\n" if active else ""
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_text(title)} · raygpt</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n{body}\n{script}</body>\n</html>\n"
    )


def _live(inner: str, now: float, active: bool) -> str:
    """The part the script swaps; `data-refresh` keeps it refreshing."""
    refresh = f' data-refresh="{REFRESH_S}"' if active else ""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    return f'<div id="{LIVE_ID}"{refresh}>\n{inner}<p class="reason">as of {stamp}</p>\n</div>'


def _table(header: list[str], rows: list[str], caption: str = "") -> str:
    cap = f"<caption>{_text(caption)}</caption>" if caption else ""
    head = "".join(f"<th>{_text(h)}</th>" for h in header)
    return (
        f"<table>{cap}\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + ("\n</tbody>\n</table>\n")
    )


def _td(html: str, num: bool = False) -> str:
    return f'<td class="num">{html}</td>' if num else f"<td>{html}</td>"


def _status_cell(value: Any, reason: Any) -> str:
    """A status word with a class to colour it, and its reason (or error) under it."""
    word = str(value or "-")
    css = re.sub(r"[^a-z0-9_-]", "", word.lower()) or "unknown"
    cell = f'<span class="status status-{css}">{_text(word.replace("_", " "))}</span>'
    if reason:
        cell += f' <span class="reason">{_text(reason)}</span>'
    return cell


def _eta(sweep: dict[str, Any], now: float) -> str:
    """An upper bound on the time left, from the pace so far, as the live line's ETA."""
    done, planned = sweep.get("steps_done"), sweep.get("steps_planned")
    started = sweep.get("started_at")
    if sweep.get("status") != RUNNING or not (_finite(started) and done and planned):
        return "-"
    elapsed = now - started
    if elapsed <= 0 or planned <= done:
        return "-"
    return f"≤ {format_duration((planned - done) / (done / elapsed))}"


def _safe_url(url: Any) -> str | None:
    """A relative or http(s) URL, or None: a link must not run script (javascript:)."""
    if not isinstance(url, str) or not url:
        return None
    return url if urlsplit(url).scheme.lower() in ("", "http", "https") else None


def _plot_name(url: str) -> str:
    return urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1] or "plot"


def _status(trial: dict[str, Any]) -> str:
    return trial.get("status") or status.RUNNING


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _text(value: Any) -> str:
    return escape("-" if value is None else str(value))


def _value(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _lr(lr: Any) -> str:
    return f"{lr:.3g}" if _finite(lr) else "-"


def _loss(x: Any) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # a diverged trial's inf or nan
    return f"{x:.4f}" if _finite(x) else "-"


def _hours(x: Any) -> str:
    return compute.fmt_hours(x) if _finite(x) else "-"


def _steps(done: Any, planned: Any) -> str:
    if not _finite(done):
        return "-"
    return f"{int(done):,}/{int(planned):,}" if _finite(planned) else f"{int(done):,}"


def _spread(c: dict[str, Any]) -> str:
    """A comparison's val loss, mean ± sd over seeds where there are seeds."""
    if c.get("n", 1) > 1 and _finite(c.get("sd")):
        return f"{c['mean']:.4f} ± {c['sd']:.4f} (n={c['n']})"
    return f"{c['mean']:.4f}"
