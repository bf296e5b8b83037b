"""The team service on Ray Serve: one replica that serves the HTTP app and runs the queue.

`start(storage_path, db_url, host, port, rebuild)` checks the database at once (an
unreachable one is one line), may rebuild its index from the storage path, joins the
cluster raygpt joins everywhere else (RAY_ADDRESS, or the one `ray start` runs here; the
service lives on the cluster, so a command that would only start a private one refuses),
starts Serve's HTTP proxy on host:port and runs the Serve application "raygpt-service".
`stop()` deletes the application (the sweeps' Ray jobs run on); `status()` says whether it
runs, where, and how many sweeps are queued and running.

The replica (`Service`) builds the FastAPI app (app.build_app) with its own database
engine and itself as the Runner, and runs the queue (queue.tick) in a background asyncio
task every TICK_S seconds and at once on wake(). Every fact lives in the database and in
Ray, none in the replica: one that dies is restarted by Serve, and its first pass takes up
the queue and the running sweeps where the last one left them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ray import serve

from raygpt.errors import UserError, first_line
from raygpt.redact import redact
from raygpt.service import db as schema
from raygpt.service import index, jobs, queue

APP_NAME = "raygpt-service"
DEPLOYMENT_NAME = "Service"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
START_TIMEOUT_S = 120.0
# How long after a cancel stopped a sweep's job the queue leaves the sweep for the cancel
# to mark (it does so at once; this only bounds a cancel that died half way).
STOP_GRACE_S = 30.0
HEAD_NODE = "node:__internal_head__"  # the resource only Ray's head node has
DB_URL_FILE = "~/.raygpt/service-db-url"  # a database URL with a password (mode 0600)

logger = logging.getLogger("ray.serve")


@serve.deployment(
    name=DEPLOYMENT_NAME,
    num_replicas=1,
    # The cores go to the sweeps' trials: the service waits on HTTP, its database and Ray.
    # On the head, beside the HTTP proxy, the job server and a SQLite file's folder.
    ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE: 0.001}},
    health_check_period_s=10,
    graceful_shutdown_timeout_s=10,
)
@serve.ingress()
class Service:
    """One replica: the HTTP app over the database, and the queue's background task."""

    async def __init__(self, storage_path: str, db_url: str | None, db_url_file: str | None):
        self.storage_path = storage_path
        if db_url_file is not None:  # a URL with a password: see _secret_free
            db_url = Path(db_url_file).read_text().strip()
        self._db_url = db_url
        self.db = schema.connect(db_url)
        self.jobs = jobs.Jobs()
        # One writer of queue work at a time: a pass, or a cancel's last read of a folder.
        self._queue_lock = threading.Lock()
        self._logged: set[str] = set()
        self._stopping: dict[str, float] = {}  # job id -> when a cancel stopped it
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = self._loop.create_task(self._run_queue())

    def __serve_build_asgi_app__(self) -> Any:
        from raygpt.service import app

        return app.build_app(self.db, self, self.storage_path)

    # ----------------------------------------------------------------- Runner

    def wake(self) -> None:
        """A sweep was queued or cancelled: run a pass of the queue now. Safe from any
        thread (FastAPI runs sync routes in its thread pool)."""
        self._loop.call_soon_threadsafe(self._wake.set)

    def stop_job(self, job_id: str) -> None:
        """Stop a sweep's Ray job, wait until what it held is free, and read its folder
        once more; the caller (a cancel) then marks the sweep. Until it has, for a grace
        period, the queue's passes leave the sweep alone."""
        self._stopping[job_id] = time.monotonic()
        self.jobs.stop(job_id)
        with self._queue_lock:
            queue.ingest_job(self.db, job_id)
        self._stopping[job_id] = time.monotonic()  # the grace runs from here

    def job_logs(self, job_id: str) -> str:
        return self.jobs.logs(job_id)

    def cluster(self) -> tuple[dict, dict]:
        """(free, totals): Ray's available and total CPUs and GPUs."""
        import ray

        free, totals = ray.available_resources(), ray.cluster_resources()
        return (
            {r: float(free.get(r, 0.0)) for r in ("CPU", "GPU")},
            {r: float(totals.get(r, 0.0)) for r in ("CPU", "GPU")},
        )

    # ----------------------------------------------------------------- the queue

    async def _run_queue(self) -> None:
        while True:
            self._wake.clear()  # a wake during the pass asks for another one after it
            # The pass blocks (database, Ray's job server, folder reads): not on the loop.
            await asyncio.to_thread(self._pass)
            with contextlib.suppress(TimeoutError):  # no wake: the next pass on time
                await asyncio.wait_for(self._wake.wait(), queue.TICK_S)

    def _pass(self) -> None:
        try:
            free, totals = self.cluster()
            now = time.monotonic()
            for job_id, since in list(self._stopping.items()):
                if now - since > STOP_GRACE_S:
                    del self._stopping[job_id]
            with self._queue_lock:
                # The live dict, not a copy: a cancel that begins during the pass counts.
                done = queue.tick(self.db, self.jobs, free, totals, hold=self._stopping)
            problems = done.problems
        except Exception as err:  # the next pass tries again; the loop must live on
            problems = [f"queue pass failed: {first_line(err, with_type=True)}"]
        # Each problem once while it lasts, not every pass.
        for line in set(problems) - self._logged:
            logger.warning("[raygpt-service] %s", redact(line))
        self._logged = set(problems)

    def check_health(self) -> None:
        """Serve restarts a replica whose queue task has ended."""
        if self._task.done():
            raise RuntimeError("the queue's background task ended; the replica restarts")

    def describe(self) -> dict[str, Any]:
        """The database (password masked), storage path and sweep counts, for status()."""
        return {
            "database": redact(self._db_url or schema.DEFAULT_PATH),
            "storage_path": self.storage_path,
            "sweeps": queue.counts(self.db),
        }


# --------------------------------------------------------------------------- control


def start(
    storage_path: str,
    db_url: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    rebuild: bool = False,
) -> str:
    """Run the service on the cluster; return the URL it serves on (see the module
    docstring). A one-line UserError for a database, storage or cluster it cannot use."""
    from raygpt import storage

    if redact(storage_path) != storage_path:
        raise UserError(
            f"--storage-path {redact(storage_path)} holds a credential, which every sweep's "
            "job command line would show; give it through the environment "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the URI without it"
        )
    engine = schema.connect(db_url)  # an unreachable database fails here, in one line
    try:
        store = storage.resolve(storage_path)
        if rebuild:
            done = index.rebuild(engine, store)
            print(
                f"[service] indexed {len(done.indexed)} sweep folder(s) under "
                f"{store.display()}, skipped {len(done.skipped)}",
                flush=True,
            )
            for uri, why in done.skipped.items():
                print(f"[service] skipped {uri}: {why}", flush=True)
    finally:
        engine.dispose()
    _join()
    jobs.Jobs()  # the cluster's job server answers, or one line says it does not
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    url = _check_http(host, port)
    try:
        serve.run(
            Service.bind(store.uri, *_secret_free(db_url)),
            name=APP_NAME,
            route_prefix="/",
            blocking=False,
        )
    except Exception as err:  # the replica's constructor failed: its first line says why
        _delete()
        raise UserError(
            f"the service did not start on the cluster ({redact(first_line(err))}); "
            "see `serve status` and the replica's log in /tmp/ray/session_latest/logs/serve"
        ) from None
    return url


def _secret_free(db_url: str | None) -> tuple[str | None, str | None]:
    """(db_url, db_url_file) for the replica. Serve keeps a deployment's arguments in the
    cluster's store, so a URL with a password goes into a file only this user reads, on
    the head node where start runs and the replica is pinned, and the replica is given
    the file's path."""
    if not db_url or "://" not in db_url:
        return db_url, None
    import sqlalchemy as sa

    try:
        password = sa.make_url(db_url).password
    except Exception:  # schema.connect has accepted it; a URL it reads, this reads too
        password = None
    if not password:
        return db_url, None
    folder = Path(DB_URL_FILE).expanduser().parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = Path(DB_URL_FILE).expanduser()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(db_url + "\n")
    os.chmod(path, 0o600)  # an older file keeps its mode through O_CREAT
    return None, str(path)


def stop() -> None:
    """Delete the service's Serve application; the sweeps' Ray jobs run on, and the next
    start takes them up again."""
    _join()
    _delete()


def status() -> dict[str, Any]:
    """Whether the service runs, its URL, and its database's sweep counts:
    {"running": bool, "status": Serve's word, "url", "database", "storage_path",
    "queued": n, "running_sweeps": n} (the last four only while it runs)."""
    _join()
    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return {"running": False, "status": "not running", "url": None}
    said = str(getattr(app.status, "value", app.status))  # RUNNING, DEPLOYING, ...
    found: dict[str, Any] = {"running": said == "RUNNING", "status": said, "url": _url()}
    if found["running"]:
        handle = serve.get_app_handle(APP_NAME)
        described = handle.describe.remote().result(timeout_s=30)
        counts = described.pop("sweeps")
        found |= described | {
            "queued": counts[schema.QUEUED],
            "running_sweeps": counts[schema.RUNNING],
        }
    return found


def _join() -> None:
    """Join the cluster raygpt joins everywhere else; never start a private one, which
    would end with this command and take the service with it."""
    import ray

    from raygpt.cluster import connect

    if ray.is_initialized():
        return
    target, source = connect.find_cluster(None)
    if target is None:
        raise UserError(
            f"no Ray cluster to run the service on ({source}); start one with "
            "`ray start --head` (or `ray up`), or set RAY_ADDRESS to it"
        )
    connect.connect(None, log_to_driver=False)


def _check_http(host: str, port: int) -> str:
    """The proxy's URL; a one-line UserError where Serve already listens elsewhere (its
    HTTP options are the cluster's, fixed when Serve first started)."""
    url = _url()
    if url != f"http://{host}:{port}":
        raise UserError(
            f"Serve on this cluster already listens on {url}, not {host}:{port}; start the "
            "service there, or run `serve shutdown` first (it stops every Serve app)"
        )
    return url


def _url() -> str:
    from ray.serve.context import _get_global_client

    config = _get_global_client().http_config
    return f"http://{config.host}:{config.port}"


def _delete() -> None:
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
        deadline = time.monotonic() + START_TIMEOUT_S
        while APP_NAME in serve.status().applications and time.monotonic() < deadline:
            time.sleep(0.5)
