"""The team service on the session's Ray cluster: the real Serve app over real HTTP, its
queue admitting sweeps as Ray jobs, cancels, a killed replica, a restart, and the index.

One service (SQLite) serves the killed-replica test; the queue's core, a restart and the
index's rebuild run on a PostgreSQL database (SQLite where none can start), and the
module ends Serve. Each sweep is a two-trial grid of a
model that trains in seconds on the embedded corpus; a sweep that must outlive a kill or
a restart has steps enough to run until it is cancelled.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import TINY_SWEEP, free_port
from postgres import fresh_database

from raygpt.service import auth, deployment, index, queue
from raygpt.service import db as schema

HOST = "127.0.0.1"
# The grid's points come from the experiment file: a sweep with two trials proves the
# job read it (without it the grid has five).
EXPERIMENT = "[sweep]\ngrid_points = 2\n"
_FLAGS = [
    word
    for flag, value in zip(TINY_SWEEP[::2], TINY_SWEEP[1::2], strict=True)
    if flag not in ("--grid-points", "--max-concurrent-trials")
    for word in (flag, value)
]
SWEEP_DONE_S = 150  # a sweep's job: Python, torch and Tune start, two trials of 10 steps


def short(name: str, concurrent: int) -> list[str]:
    """Flags of a two-trial sweep that ends in seconds, `concurrent` trials at once."""
    return [*_FLAGS, "--name", name, "--max-concurrent-trials", str(concurrent)]


def long(name: str) -> list[str]:
    """A sweep that holds both CPUs until it is cancelled."""
    flags = short(name, 2)
    flags += ["--max-steps", "100000", "--eval-interval", "50000", "--log-interval", "50000"]
    return flags


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Service:
    """The service as the tests drive it: over HTTP, and its database read directly."""

    storage: Path
    db_url: str
    port: int
    tokens: dict[str, str] = field(default_factory=dict)
    db: sa.Engine | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        assert deployment.start(str(self.storage), self.db_url, HOST, self.port) == self.url
        if self.db is None:
            self.db = schema.connect(self.db_url)
            for user in ("alice", "bob"):
                # A quota as large as the cluster: only what is free keeps a sweep waiting.
                self.tokens[user] = auth.add_user(self.db, user, gpu_quota=0, cpu_quota=2)

    def call(self, method: str, path: str, token: str | None, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with _OPENER.open(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def submit(self, user: str, flags: list[str]) -> int:
        body = {"experiment_toml": EXPERIMENT, "flags": flags, "files": {}}
        status, made = self.call("POST", "/sweeps", self.tokens[user], body)
        assert status == 201, made
        return made["id"]

    def cancel(self, user: str, sweep_id: int) -> tuple[int, Any]:
        return self.call("POST", f"/sweeps/{sweep_id}/cancel", self.tokens[user])

    def row(self, sweep_id: int) -> dict[str, Any]:
        with self.db.connect() as conn:
            query = sa.select(schema.sweeps).where(schema.sweeps.c.id == sweep_id)
            return dict(conn.execute(query).mappings().one())

    def wait(self, sweep_id: int, status: str, timeout_s: float = SWEEP_DONE_S) -> dict:
        return wait_for(
            lambda: (row := self.row(sweep_id))["status"] == status and row,
            timeout_s,
            lambda: f"sweep {sweep_id} {status}: it is {self.row(sweep_id)}",
        )


def wait_for(check, timeout_s: float, what) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"waited {timeout_s:g} s for {what()}"
        time.sleep(0.5)
    return found


def job_status(job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    from raygpt.service import jobs

    return str(JobSubmissionClient(jobs.dashboard_url()).get_job_status(job_id).value)


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    """The service on SQLite, with users alice and bob; Serve ends with the module."""
    from ray import serve

    root = tmp_path_factory.mktemp("service")
    running = Service(root / "results", str(root / "service.db"), free_port())
    running.start()
    yield running
    deployment.stop()
    serve.shutdown()


def queue_core(service: Service, restart: bool) -> tuple[int, int]:
    """Alice's sweep holds both CPUs, so Bob's waits, with the reason; the 401 and 403
    answers; Bob's starts once Alice's ends. With `restart`, the service is stopped while
    Bob's runs and started after its job ended: the start reconciles it from Ray."""
    first = service.submit("alice", short("alice-first", 2))
    second = service.submit("bob", short("bob-second", 1))
    running = service.wait(first, schema.RUNNING, 30)
    assert running["max_concurrent_trials"] == 2 and running["ray_job_id"]
    waiting = wait_for(
        lambda: service.row(second)["queued_reason"], 30, lambda: f"a reason {service.row(second)}"
    )
    assert service.row(second)["status"] == schema.QUEUED
    assert waiting.startswith("waiting: the cluster has 0 CPUs free"), waiting

    status, said = service.call("GET", "/sweeps", "not-a-token")
    assert status == 401 and "unknown or revoked" in said["error"]
    assert service.call("GET", "/sweeps", None)[0] == 401
    status, said = service.cancel("alice", second)
    assert status == 403 and "bob's" in said["error"]
    assert service.row(second)["status"] == schema.QUEUED

    ended = service.wait(first, schema.SUCCEEDED)
    started = service.wait(second, schema.RUNNING, 30)
    assert started["started_at"] >= ended["ended_at"] - 1
    if restart:
        deployment.stop()
        wait_for(lambda: job_status(started["ray_job_id"]) == "SUCCEEDED", SWEEP_DONE_S, str)
        assert service.row(second)["status"] == schema.RUNNING  # nothing ran the queue
        service.start()
    done = service.wait(second, schema.SUCCEEDED)
    assert done["ended_at"] >= done["started_at"] and done["n_trials"] == 2

    status, found = service.call("GET", "/trials?sweep=alice-first", service.tokens["bob"])
    assert status == 200 and len(found["trials"]) == 2
    assert {t["status"] for t in found["trials"]} == {"completed"}
    assert {t["owner"] for t in found["trials"]} == {"alice"}
    return first, second


def look_at_the_pages(service: Service, running: int, queued: int, folder: Path) -> None:
    """The list and the running sweep's page in headless Chromium, served by the Serve
    replica while the sweep's job trains: both sweeps listed with their status, and the
    running sweep's trials in its table as the queue ingested them. Screenshots go to
    `folder`, and to $RAYGPT_SCREENSHOTS where set."""
    from browser import chromium, png_size, screenshot
    from browser import wait_for as wait_shown

    names = {running: service.row(running)["name"], queued: service.row(queued)["name"]}
    with service.db.connect() as conn:
        query = sa.select(schema.trials.c.trial_id).where(schema.trials.c.sweep_id == running)
        trial_ids = sorted(conn.execute(query).scalars())
    assert len(trial_ids) == 2
    shots = [folder / "service-list.png", folder / "service-sweep.png"]
    with chromium() as driver:
        driver.get(f"{service.url}/?token={service.tokens['alice']}")
        assert "running" in wait_shown(driver, "#live tbody tr", text=names[running]).text
        assert "queued" in wait_shown(driver, "#live tbody tr", text=names[queued]).text
        screenshot(driver, shots[0])
        driver.get(f"{service.url}/sweeps/{running}/page")
        wait_shown(driver, "h1", text=names[running])
        for trial_id in trial_ids:
            assert "running" in wait_shown(driver, "#live tbody tr", text=trial_id).text
        screenshot(driver, shots[1])
    keep = os.environ.get("RAYGPT_SCREENSHOTS")
    for shot in shots:
        assert min(png_size(shot)) > 100
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(keep) / shot.name)


def test_killed_replica_restart_and_cancel(service, tmp_path):
    import ray
    from ray.util import state

    held = service.submit("bob", long("bob-long"))
    later = service.submit("alice", short("alice-later", 1))
    job_id = service.wait(held, schema.RUNNING, 30)["ray_job_id"]
    wait_for(lambda: service.row(later)["queued_reason"], 30, lambda: "a reason")

    # Serve restarts a killed replica; the queue and the running sweep live in the
    # database and in Ray, so the new replica takes them up.
    def replica() -> Any:
        alive = state.list_actors(filters=[("state", "=", "ALIVE")], detail=True)
        return next((a for a in alive if a.class_name.endswith(deployment.DEPLOYMENT_NAME)), None)

    killed = replica()
    ray.kill(ray.get_actor(killed.name, namespace=killed.ray_namespace), no_restart=True)
    wait_for(lambda: (r := replica()) is not None and r.actor_id != killed.actor_id, 60, str)
    wait_for(lambda: service.call("GET", "/healthz", None)[0] == 200, 60, str)
    # The new replica's queue ingests the running sweep's trials.
    wait_for(lambda: service.row(held)["n_trials"] == 2, 60, lambda: f"{service.row(held)}")
    assert service.row(held)["status"] == schema.RUNNING
    assert service.row(held)["ray_job_id"] == job_id and job_status(job_id) == "RUNNING"
    assert service.row(later)["status"] == schema.QUEUED
    look_at_the_pages(service, held, later, tmp_path)

    # A restart: the running sweep goes on; one whose job the cluster does not know fails.
    deployment.stop()
    assert deployment.status() == {"running": False, "status": "not running", "url": None}
    with service.db.begin() as conn:
        lost = conn.execute(
            sa.insert(schema.sweeps)
            .values(
                name="bob-lost", owner="bob", status=schema.RUNNING, started_at=time.time(),
                storage_path=str(service.storage), ray_job_id="raygpt-sweep-0-gone",
                folder_uri=index.folder_uri(str(service.storage), "bob-lost"),
            )
            .returning(schema.sweeps.c.id)
        ).scalar_one()  # fmt: skip
    service.start()
    failed = service.wait(lost, schema.FAILED, 30)
    assert "does not know its job raygpt-sweep-0-gone" in failed["queued_reason"]
    assert failed["ended_at"] is not None
    assert service.row(held)["status"] == schema.RUNNING and job_status(job_id) == "RUNNING"
    assert service.row(later)["status"] == schema.QUEUED
    shown = deployment.status()
    assert shown["running"] and shown["url"] == service.url
    assert (shown["queued"], shown["running_sweeps"]) == (1, 1)
    assert shown["database"] == service.db_url

    # Cancels: a queued sweep at once; a running one once its job stopped and freed
    # both CPUs.
    status, said = service.cancel("alice", later)
    assert status == 200 and said["status"] == schema.CANCELLED, said
    status, said = service.cancel("bob", held)
    assert status == 200 and said["status"] == schema.CANCELLED, said
    assert job_status(job_id) == "STOPPED"
    total = ray.cluster_resources()["CPU"]
    # Ray's view of what is free follows the freed actors within a heartbeat or two.
    wait_for(lambda: ray.available_resources().get("CPU") == total, 10, ray.available_resources)
    cancelled = service.row(held)
    assert cancelled["status"] == schema.CANCELLED and cancelled["ended_at"] is not None
    assert service.row(later)["ray_job_id"] is None  # it never ran
    assert queue.counts(service.db)[schema.RUNNING] == 0


@pytest.fixture
def queue_db_url(request, tmp_path) -> Any:
    """A fresh PostgreSQL database's URL; a SQLite file's where no PostgreSQL server can
    start here (the skip's reason is printed), so the queue's core always runs."""
    try:
        server = request.getfixturevalue("postgres_server")
    except pytest.skip.Exception as why:
        print(f"[test] no PostgreSQL ({why}): the queue's core runs on SQLite")
        yield str(tmp_path / "queue.db")
        return
    with fresh_database(server) as url:
        yield url


def test_the_queue_on_postgresql_a_restart_and_a_rebuild(
    service, queue_db_url, tmp_path, monkeypatch
):
    """The queue's core on a PostgreSQL database, the service restarted while a sweep
    runs; then the storage's folders, rebuilt into a fresh SQLite index, give the rows
    the live service wrote. (The SQLite service of the killed-replica test runs the same
    queue, and tests/unit/service runs every query on both databases.)"""
    # The URL holds the server's password: it reaches the replica through this file.
    monkeypatch.setattr(deployment, "DB_URL_FILE", str(tmp_path / "db-url"))
    deployment.stop()
    url = queue_db_url
    live = Service(service.storage.parent / "on-postgres", url, service.port)
    try:
        live.start()
        assert live.db.dialect.name == ("sqlite" if url.endswith(".db") else "postgresql")
        first, second = queue_core(live, restart=True)
        finished = {"alice-first": first, "bob-second": second}
    finally:
        deployment.stop()
    try:
        rebuilt = schema.connect(str(tmp_path / "rebuilt.db"))
        found = index.rebuild(rebuilt, str(live.storage))
        uris = {name: index.folder_uri(str(live.storage), name) for name in finished}
        assert set(found.indexed) >= set(uris.values())
        for name, live_id in finished.items():
            now, again = live.row(live_id), _sweep(rebuilt, uris[name])
            # The folder's columns; gpus_per_worker is the service's resolved demand
            # (0 here), which sweep.json leaves null when no --gpus-per-trial was given.
            decided = set(index.sweep_values(index.read_folder(uris[name])))
            decided -= {"gpus_per_worker"}
            assert {k: now[k] for k in decided} == {k: again[k] for k in decided}, name
            assert (now["status"], again["status"]) == (schema.SUCCEEDED, schema.SUCCEEDED)
            assert _trials(live.db, live_id) == _trials(rebuilt, again["id"])
            assert len(_trials(rebuilt, again["id"])) == 2
    finally:
        live.db.dispose()


def _sweep(db: sa.Engine, uri: str) -> dict[str, Any]:
    with db.connect() as conn:
        query = sa.select(schema.sweeps).where(schema.sweeps.c.folder_uri == uri)
        return dict(conn.execute(query).mappings().one())


def _trials(db: sa.Engine, sweep_id: int) -> list[dict[str, Any]]:
    with db.connect() as conn:
        query = sa.select(schema.trials).where(schema.trials.c.sweep_id == sweep_id)
        rows = conn.execute(query.order_by(schema.trials.c.trial_id)).mappings()
        return [{k: v for k, v in row.items() if k != "sweep_id"} for row in rows]
