"""The service's pages in a real browser (headless Chromium, tests/browser.py), with no
Ray: build_app served by Uvicorn on 127.0.0.1 over SQLite, and a sweep folder written
the way a running sweep writes it (sweep.json once, trials.parquet rewritten as trials
start, advance and end), indexed with index.ingest after each write as the service's
queue indexes a running sweep's folder.

The browser signs in as a person does, with the token once in the list page's URL (the
service answers with a cookie), follows the sweep's link, and then only watches: the
sweep page re-fetches itself every pages.REFRESH_S seconds while the sweep runs, so new
trials and changed statuses must appear with no reload (a marker set on the window
before them is still there after), and once the sweep has ended the page stops
refreshing. Each page is saved as a PNG in tmp_path, and in $RAYGPT_SCREENSHOTS where
that is set.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from browser import chromium, png_size, screenshot, wait_for
from conftest import write_trials_parquet
from service_http import FixedCluster, served_over_http

from raygpt import results, storage
from raygpt.config.train import TrainConfig
from raygpt.redact import redact_config
from raygpt.service import auth, index, pages
from raygpt.service import db as schema
from raygpt.service.app import COOKIE, build_app
from raygpt.sweep.config import SweepConfig
from raygpt.sweep.search import config_key
from raygpt.train import preflight

NAME = "browser-sweep"
MAX_STEPS = 100
SWAP_S = 13.0  # one refresh (1 s here, see served), with room for a loaded machine
FIRST_S = 30.0  # a first load: the first sweep page imports the live view (Ray Tune)


def record() -> dict:
    """sweep.json as the sweep driver writes it: a grid of 2 optimizers x 2 learning rates."""
    settings = SweepConfig(optimizers=["adamw", "muon"], search="grid", grid_points=2,
                           scheduler="fifo", max_concurrent_trials=2)  # fmt: skip
    train = TrainConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, max_steps=MAX_STEPS)
    return redact_config(
        {
            "sweep": dict(vars(settings)) | {"name": NAME},
            "config": train.to_dict(),
            "environment": {"python": "3.11"},
            "cluster": {"nodes": 1},
            "data": {"vocab_size": 65},
        }
    )


def trial(n: int, optimizer: str, lr: float, status: str, steps: int, best: float | None) -> dict:
    """A trials.parquet row as the trials table writes it while the trial runs or when it ends."""
    params = {"optimizer": optimizer, "learning_rate": lr, "seed": 1337}
    start = time.time() - 60 + 5 * n
    ended = status != "running"
    return {name: None for name in results.TRIAL_SCHEMA.names} | {
        "trial_id": f"b0a1c_{n:05d}", "optimizer": optimizer, "learning_rate": lr,
        "params": json.dumps(params), "status": status, "steps": steps,
        "best_val_loss": best, "final_val_loss": None if best is None else best + 0.01,
        "seed": 1337, "config_key": config_key(params), "phase": "search",
        "queued_at": start - 1, "started_at": start, "first_step_at": start + 1,
        "last_step_at": start + 1 + steps / 10,
        "torn_down_at": start + 2 + steps / 10 if ended else None,
        "tokens": steps * 2048, "n_params": 98_304, "n_layer": 2, "n_embd": 64,
        "parametrization": "sp", "device_seconds": steps / 10, "gpu_hours": 0.0,
    }  # fmt: skip


def write(root: Path, rows: list[dict]) -> str:
    """The sweep's folder as the driver leaves it after a trials-table write; its URI."""
    store = storage.resolve(str(root), check=False)
    path = store.path(NAME)
    meta = record()
    preflight.write_record(store, f"{path}/{results.SWEEP_FILE}", meta)
    write_trials_parquet(Path(path), rows, meta)
    return index.folder_uri(store, NAME)


def trials_shown(driver) -> dict[str, str]:
    """The sweep page's trials table as {trial id: status}, read from the browser's DOM."""
    # One script call: the page may swap its live part between two WebDriver calls.
    return driver.execute_script(
        """
        const tables = [...document.querySelectorAll("#live table")];
        const table = tables.find(t => t.tHead && t.tHead.innerText.includes("searched keys"));
        if (!table) return {};
        const out = {};
        for (const row of table.tBodies[0].rows) {
          out[row.cells[0].innerText.trim()] = row.cells[4].querySelector(".status").innerText;
        }
        return out;
        """
    )


def wait_shown(driver, wanted: dict[str, str], timeout: float = SWAP_S) -> None:
    deadline = time.monotonic() + timeout
    while (shown := trials_shown(driver)) != wanted:
        assert time.monotonic() < deadline, f"the page shows {shown}, not {wanted}"
        time.sleep(0.2)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """(the app's URL, ada's token, the SQLite engine) with Uvicorn in a thread."""
    # Pages refresh every second rather than every 5: the same script and swaps, and the
    # test waits for two of them in about 2 s instead of 10.
    monkeypatch.setattr(pages, "REFRESH_S", 1)
    db = schema.connect(str(tmp_path / "service.db"))
    token = auth.add_user(db, "ada")
    try:
        with served_over_http(build_app(db, FixedCluster(), str(tmp_path / "results"))) as url:
            yield url, token, db
    finally:
        db.dispose()


def test_the_sweep_page_shows_new_trials_and_statuses_as_the_sweep_runs(served, tmp_path):
    base, token, db = served
    root = tmp_path / "results"
    shots: list[Path] = []
    uri = write(root, [trial(0, "adamw", 1e-3, "running", 30, 2.9),
                       trial(1, "adamw", 1e-2, "running", 20, None)])  # fmt: skip
    sweep_id = index.ingest(db, uri)

    with chromium() as driver:
        driver.get(f"{base}/?token={token}")
        # The token became an HttpOnly cookie, and the address bar (and history) no longer
        # holds it. Compared as a bool: a failed assert would print the URL, token and all.
        moved = driver.current_url == f"{base}/"
        assert moved, "the list page kept ?token= in its URL"
        assert driver.get_cookie(COOKIE)["httpOnly"]
        link = wait_for(driver, f'#live a[href="/sweeps/{sweep_id}/page"]', NAME, FIRST_S)
        assert "running" in wait_for(driver, "#live tbody tr", text=NAME).text
        shots.append(screenshot(driver, tmp_path / "list-running.png"))

        link.click()
        wait_for(driver, "h1", NAME, FIRST_S)
        assert driver.current_url == f"{base}/sweeps/{sweep_id}/page"
        wait_shown(driver, {"b0a1c_00000": "running", "b0a1c_00001": "running"}, timeout=10)
        assert wait_for(driver, "#live").get_attribute("data-refresh") == str(pages.REFRESH_S)
        shots.append(screenshot(driver, tmp_path / "sweep-started.png"))
        driver.execute_script("window.notReloaded = true;")

        # Trial 0 ends, trial 1 advances, trial 2 starts: the next refresh shows them.
        index.ingest(db, write(root, [
            trial(0, "adamw", 1e-3, "completed", MAX_STEPS, 2.1),
            trial(1, "adamw", 1e-2, "running", 60, 2.6),
            trial(2, "muon", 2e-2, "running", 10, None),
        ]))  # fmt: skip
        wait_shown(driver, {"b0a1c_00000": "completed", "b0a1c_00001": "running",
                            "b0a1c_00002": "running"})  # fmt: skip
        assert driver.execute_script("return window.notReloaded === true;")
        shots.append(screenshot(driver, tmp_path / "sweep-running.png"))

        # Every trial has ended: the sweep has, and its page stops refreshing.
        index.ingest(db, write(root, [
            trial(0, "adamw", 1e-3, "completed", MAX_STEPS, 2.1),
            trial(1, "adamw", 1e-2, "diverged", 70, None),
            trial(2, "muon", 2e-2, "completed", MAX_STEPS, 1.9),
            trial(3, "muon", 2e-1, "completed", MAX_STEPS, 2.3),
        ]))  # fmt: skip
        wait_shown(driver, {"b0a1c_00000": "completed", "b0a1c_00001": "diverged",
                            "b0a1c_00002": "completed", "b0a1c_00003": "completed"})  # fmt: skip
        assert driver.execute_script("return window.notReloaded === true;")
        wait_for(driver, "#live p", text="status succeeded")
        assert wait_for(driver, "#live").get_attribute("data-refresh") is None
        # The equal-budget answer is the lowest val loss at the full budget: muon's.
        assert "muon" in wait_for(driver, "#answer").text
        shots.append(screenshot(driver, tmp_path / "sweep-ended.png"))

        driver.get(f"{base}/")  # the cookie still signs in
        row = wait_for(driver, "#live tbody tr", text=NAME)
        assert "succeeded" in row.text and "1.9000" in row.text
        shots.append(screenshot(driver, tmp_path / "list-ended.png"))

    wanted = os.environ.get("RAYGPT_SCREENSHOTS")
    for shot in shots:
        width, height = png_size(shot)
        assert width >= 800 and height >= 600, (shot.name, width, height)
        if wanted:
            Path(wanted).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(wanted) / shot.name)
