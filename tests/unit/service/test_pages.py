"""raygpt.service.pages: the list of sweeps and one sweep's page, read back with
html.parser: every value escaped, every sweep and trial shown, the equal-budget winner
named, and the refresh script only while something is queued or running. No Ray."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

from raygpt import status
from raygpt.service import pages

NOW = 1_700_000_000.0
EVIL = "<script>alert('x')</script>"


class Parsed(HTMLParser):
    """A page's tables (rows of cell texts, with each row's attributes), the text of each
    element with an id, every start tag with its attributes, and the scripts' bodies."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tables: list[list[tuple[dict[str, str], list[str]]]] = []
        self.by_id: dict[str, str] = {}
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.scripts: list[str] = []
        self._open_ids: list[tuple[str, str, list[str]]] = []  # (tag, id, text parts)
        self._cell: list[str] | None = None
        self._in_script = False
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attrs))
        if "id" in attrs:
            self._open_ids.append((tag, attrs["id"], []))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append((attrs, []))
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "script":
            self._in_script = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1][1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "script":
            self._in_script = False
        if self._open_ids and self._open_ids[-1][0] == tag:
            _, ident, parts = self._open_ids.pop()
            self.by_id[ident] = " ".join("".join(parts).split())

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
            return
        if self._cell is not None:
            self._cell.append(data)
        for _, _, parts in self._open_ids:
            parts.append(data)

    def rows(self, table: int) -> list[list[str]]:
        """A table's body rows (its header dropped)."""
        return [cells for _, cells in self.tables[table][1:]]


def trial(trial_id, optimizer, lr, state, steps, final, best=None, **params):
    return {
        "trial_id": trial_id,
        "optimizer": optimizer,
        "learning_rate": lr,
        "params": json.dumps({"optimizer": optimizer, "learning_rate": lr, **params}),
        "status": state,
        "error": None,
        "steps": steps,
        "final_val_loss": final,
        "best_val_loss": final if best is None else best,
        "gpu_hours": 0.5,
        "device_seconds": 1800.0,
        "flops": 1e15,
    }


def sweep_trials():
    """An ASHA sweep: the lowest val belongs to a trial stopped at step 100, which must not
    beat the completed trials at step 400."""
    return [
        trial("t1", "adamw", 3e-3, status.COMPLETED, 400, 1.50, weight_decay=0.1),
        trial("t2", "adamw", 1e-2, status.STOPPED_EARLY, 100, 1.40, weight_decay=0.01),
        trial("t3", "sgd", 0.1, status.COMPLETED, 400, 1.80, weight_decay=0.1),
        trial("t4", "lion", 1e-3, status.DIVERGED, 60, float("nan"), best=2.9),
        trial("t5", "muon", 0.02, status.RUNNING, 250, 1.60, weight_decay=0.1),
        {**trial("t6", "adamw", 5e-3, status.ERROR, 10, None), "error": "CUDA out of memory"},
    ]


# --------------------------------------------------------------------------- list page


def list_sweeps():
    return [
        {
            "id": "s1",
            "owner": "alice",
            "name": "lr-scan",
            "url": "/sweeps/s1",
            "status": "running",
            "started_at": NOW - 600,
            "steps_done": 1_000,
            "steps_planned": 4_000,
            "best_val_loss": 1.4321,
            "best_optimizer": "adamw",
            "best_learning_rate": 3e-3,
            "gpu_hours": 1.25,
        },
        {
            "id": "s2",
            "owner": "bob",
            "name": "muon-vs-adamw",
            "url": "/sweeps/s2",
            "status": "queued",
            "reason": "waiting: bob holds 4 of their 4 GPUs, the sweep needs 1 at once",
        },
        {
            "id": "s3",
            "owner": "carol",
            "name": "done-one",
            "url": "/sweeps/s3",
            "status": "done",
            "started_at": NOW - 7200,
            "finished_at": NOW - 3600,
            "steps_done": 900,
            "steps_planned": 900,
            "best_val_loss": 1.8,
            "best_optimizer": "sgd",
            "best_learning_rate": 0.1,
            "gpu_hours": 0.0,
        },
    ]


def test_the_list_shows_every_sweep_with_its_status_best_steps_and_eta():
    page = Parsed(pages.render_sweep_list(list_sweeps(), NOW))
    rows = page.rows(0)
    assert [r[:2] for r in rows] == [
        ["alice", "lr-scan"],
        ["bob", "muon-vs-adamw"],
        ["carol", "done-one"],
    ]
    running, queued_row, done = rows
    assert running[2:] == ["running", "1.4321", "adamw lr 0.003", "1.2", "1,000/4,000", "≤ 30m00s"]
    assert queued_row[2] == "queued waiting: bob holds 4 of their 4 GPUs, the sweep needs 1 at once"
    assert queued_row[3:] == ["-", "-", "-", "-", "-"]
    assert done[2:] == ["done", "1.8000", "sgd lr 0.1", "0", "900/900", "-"]
    links = [a["href"] for tag, a in page.tags if tag == "a"]
    assert links == ["/sweeps/s1", "/sweeps/s2", "/sweeps/s3"]


def test_the_list_refreshes_only_while_a_sweep_is_queued_or_running():
    active = Parsed(pages.render_sweep_list(list_sweeps(), NOW))
    live = [a for tag, a in active.tags if a.get("id") == pages.LIVE_ID]
    assert live[0]["data-refresh"] == str(pages.REFRESH_S)
    assert len(active.scripts) == 1 and 'getElementById("live")' in active.scripts[0]

    finished = Parsed(pages.render_sweep_list(list_sweeps()[2:], NOW))
    live = [a for tag, a in finished.tags if a.get("id") == pages.LIVE_ID]
    assert "data-refresh" not in live[0]
    assert finished.scripts == []


def test_a_malicious_name_is_shown_as_text_never_as_markup():
    sweep = {
        "id": "s1",
        "owner": '"><img src=x onerror=alert(1)>',
        "name": EVIL,
        "url": "javascript:alert(1)",
        "status": "queued",
        "reason": f"waiting: {EVIL}'s sweep (priority 1) goes first",
        "best_optimizer": "<b>adamw</b>",
        "best_learning_rate": 1e-3,
    }
    html = pages.render_sweep_list([sweep], NOW, title=EVIL)
    page = Parsed(html)
    (row,) = page.rows(0)
    assert row[0] == sweep["owner"] and row[1] == EVIL
    assert row[2] == f"queued {sweep['reason']}"
    assert row[4] == "<b>adamw</b> lr 0.001"
    # Only the page's own refresh script runs; no user text became a tag or a link.
    assert len(page.scripts) == 1 and "alert" not in page.scripts[0]
    assert not [t for t, _ in page.tags if t in ("img", "b", "a")]
    assert "&lt;script&gt;" in html


# --------------------------------------------------------------------------- sweep page


def sweep_dict(**extra):
    return {
        "id": "s1",
        "owner": "alice",
        "name": "lr-scan",
        "status": "running",
        "started_at": NOW - 600,
        "total_trials": 8,
        "max_steps": 400,
        **extra,
    }


def test_the_sweep_page_lists_every_trial_and_names_the_equal_budget_winner():
    trials = sweep_trials()
    plots = ["/sweeps/s1/plots/lr_sensitivity.png", "/sweeps/s1/plots/loss_curves.png"]
    page = Parsed(pages.render_sweep_page(sweep_dict(), trials, plots, NOW))

    # The stopped t2 has the lowest val, but only t1, t3 and t5 are compared at step 400
    # (t5 running, at its last step 250, is not at 400): adamw at 3e-3 wins.
    assert page.by_id["answer"] == (
        "best at equal budget: adamw lr 0.003 weight_decay=0.1, val 1.5000 at step 400, trial t1"
    )
    trials_table = next(t for t in page.tables if t[0][1][:2] == ["trial", "optimizer"])
    rows = [cells for _, cells in trials_table[1:]]
    assert [r[0] for r in rows] == ["t1", "t2", "t3", "t4", "t5", "t6"]
    assert rows[0] == ["t1", "adamw", "0.003", "weight_decay=0.1", "completed", "400", "1.5000",
                       "1.5000"]  # fmt: skip
    assert rows[1][4] == "stopped early"
    assert rows[3][4:] == ["diverged", "60", "nan", "2.9000"]
    assert rows[5][4] == "error CUDA out of memory"
    winners = [cells[0] for attrs, cells in trials_table[1:] if attrs.get("class") == "winner"]
    assert winners == ["t1"]

    ranking = next(t for t in page.tables if t[0][1] == ["configuration", "val loss", "seeds"])
    assert [cells[0] for _, cells in ranking[1:]] == [
        "adamw lr 0.003 weight_decay=0.1",
        "sgd lr 0.1 weight_decay=0.1",
    ]
    images = [a["src"] for tag, a in page.tags if tag == "img"]
    assert images == plots


def test_the_sweep_page_compares_at_every_rung_given_the_evals():
    evals = {"t1": {100: 1.7, 400: 1.5}, "t2": {100: 1.4}, "t3": {100: 2.0, 400: 1.8}}
    page = Parsed(pages.render_sweep_page(sweep_dict(), sweep_trials()[:3], [], NOW, evals=evals))
    budgets = next(t for t in page.tables if t[0][1][:2] == ["step", "best there"])
    assert [cells[:3] for _, cells in budgets[1:]] == [
        ["100", "adamw lr 0.01 weight_decay=0.01", "1.4000"],
        ["400", "adamw lr 0.003 weight_decay=0.1", "1.5000"],
    ]


def test_the_live_line_is_the_consoles_and_agrees_with_the_list_numbers():
    from raygpt.sweep.live_view import progress_line

    trials = sweep_trials()
    page = Parsed(pages.render_sweep_page(sweep_dict(), trials, [], NOW))
    line = progress_line(trials, 8, 400, 600).removeprefix("[sweep] ")
    assert line.startswith("10m00s | trials 8: 1 running, 2 completed, 1 stopped early")
    assert line in page.by_id[pages.LIVE_ID]

    progress = pages.sweep_progress(trials, total_trials=8, max_steps=400)
    done, planned = re.search(r"steps ([\d,]+)/([\d,]+)", line).groups()
    assert progress["steps_done"] == int(done.replace(",", ""))
    assert progress["steps_planned"] == int(planned.replace(",", ""))
    assert (progress["best_optimizer"], progress["best_val_loss"]) == ("adamw", 1.40)
    assert progress["gpu_hours"] == 3.0


def test_a_queued_sweep_page_says_why_it_waits_and_keeps_refreshing():
    reason = "waiting: the cluster has 1 GPU free, the sweep needs 2 at once"
    sweep = sweep_dict(status="queued", started_at=None, reason=reason)
    page = Parsed(pages.render_sweep_page(sweep, [], [], NOW))
    live = [a for tag, a in page.tags if a.get("id") == pages.LIVE_ID]
    assert live[0]["data-refresh"] == str(pages.REFRESH_S)
    assert f"status queued {reason}" in page.by_id[pages.LIVE_ID]
    assert page.by_id["answer"].startswith("best: none yet")
    assert not any(t[0][1][:1] == ["trial"] for t in page.tables)


def test_the_sweep_page_escapes_trial_values_and_drops_script_urls():
    trials = [
        {
            **trial("t1", "adamw", 1e-3, status.ERROR, 5, None, note=EVIL),
            "trial_id": EVIL,
            "error": EVIL,
        }
    ]
    sweep = sweep_dict(name=EVIL, owner=EVIL, status="done", finished_at=NOW)
    plots = ["javascript:alert(1)", '/p/"onerror=alert(1).png']
    html = pages.render_sweep_page(sweep, trials, plots, NOW, home_url="javascript:alert(1)")
    page = Parsed(html)
    assert page.scripts == []  # finished: no refresh, and no user text became a script
    (row,) = page.rows(next(i for i, t in enumerate(page.tables) if t[0][1][0] == "trial"))
    assert row[0] == EVIL and row[3] == f"note={EVIL}" and row[4] == f"error {EVIL}"
    assert [a["src"] for tag, a in page.tags if tag == "img"] == ['/p/"onerror=alert(1).png']
    assert all(not a.get("href", "").startswith("javascript") for _, a in page.tags)
    assert not any("onerror" in attrs for _, attrs in page.tags)
