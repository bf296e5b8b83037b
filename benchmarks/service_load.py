"""Service load: how fast the team service answers its busiest reads over real HTTP.

    python benchmarks/service_load.py [--sweeps 20] [--trials 2000] [--requests 50]
        [--db postgresql://USER:PASSWORD@HOST:PORT/DATABASE] [--json OUT]

The database: a fresh SQLite file, and with --db also that PostgreSQL database (it must
hold no user and no sweep; the benchmark empties its tables again at the end). Each is
filled the way the service fills it: every sweep folder is written with raygpt's own
writers (sweep.json through the driver's write_record, trials.parquet through results,
rows under TRIAL_SCHEMA with the record in the footer) and indexed by index.ingest. The
sweeps are a random search with ASHA over adamw, muon and sgd at five model sizes: most
ended (completed, stopped early, a few diverged or errored), one in ten still running.
ingest leaves a sweep's owner empty (the service sets it when a sweep is submitted, which
validates each submission in a subprocess of its own, seconds a sweep), so the sweeps are
given to four users with one UPDATE.

The app: `build_app` served by Uvicorn on 127.0.0.1 in a thread of this process, signed
into with a token from auth.add_user (never printed). Its Runner is FixedCluster below:
fixed cluster totals, and job methods that raise, since no read here involves a job; so
no Ray cluster is started or needed (the sweep page imports Ray Tune's live-view code,
nothing more).

Measured, one route after another, each over one kept-alive HTTP connection (as a
browser keeps one): the wall time from sending a request to having read its whole
answer, for `--requests` requests after WARMUP untimed ones (the first of which imports
what a route imports). GET / (the list page), GET /sweeps (the JSON list), GET
/sweeps/{id}/page (each sweep's page in turn) and GET /trials?optimizer=adamw&n_params=
1e7:3e7 (one optimizer of three at two of the five sizes, 11M and 25M: 272 of 2,000).
Printed: the median and p95 (nearest rank) of each, against the targets: the list page
under 200 ms, GET /trials under 100 ms. The JSON also holds what the answers held (the
sweeps listed, the trial rows on a page, the trials the filter matched against the count
written), so a route that answers fast with too little shows. Client and server share
this process; the client waits on its socket while the server works, so what it
measures is the server's answer plus loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WARMUP = 3
USERS = ("ada", "bob", "cy", "dee")
OPTIMIZERS = ("adamw", "muon", "sgd")
# Each optimizer's learning-rate range (log-uniform), as a random search samples it.
LR_RANGES = {"adamw": (1e-4, 3e-3), "muon": (3e-3, 1e-1), "sgd": (1e-2, 1.0)}
# (n_layer, n_embd): non-embedding parameters 3M, 11M, 25M, 85M and 302M.
SHAPES = ((4, 256), (6, 384), (8, 512), (12, 768), (24, 1024))
TRIALS_FILTER = {"optimizer": "adamw", "n_params": "1e7:3e7"}
MAX_STEPS = 2000
TOKENS_PER_STEP = 524_288
CONCURRENT = 8  # trials a sweep runs at once
TARGETS_MS = {"GET /": 200.0, "GET /trials": 100.0}


class FixedCluster:
    """The Runner the app asks of Ray, with no Ray: fixed totals; no read here starts,
    stops or reads a job, so those methods raise."""

    def wake(self) -> None:
        pass

    def stop_job(self, job_id: str) -> None:
        raise RuntimeError(f"the benchmark runs no job (asked to stop {job_id})")

    def job_logs(self, job_id: str) -> str:
        raise RuntimeError(f"the benchmark runs no job (asked for {job_id}'s log)")

    def cluster(self) -> tuple[dict, dict]:
        totals = {"CPU": 64.0, "GPU": 8.0}
        return dict(totals), dict(totals)


# --------------------------------------------------------------------------- the data


def n_params(n_layer: int, n_embd: int) -> int:
    """Non-embedding parameters of a GPT block stack (attention 4d^2 + MLP 8d^2 a layer)."""
    return 12 * n_layer * n_embd * n_embd


def sweep_record(name: str, n_layer: int, n_embd: int, planned: int) -> dict[str, Any]:
    """sweep.json as the sweep driver writes it."""
    from raygpt.config.train import TrainConfig
    from raygpt.redact import redact_config
    from raygpt.sweep.config import SweepConfig

    settings = SweepConfig(
        optimizers=list(OPTIMIZERS), search="random", num_samples=planned, scheduler="asha",
        search_space=["weight_decay=0.0:0.2", "beta2=0.95,0.99"], gpus_per_trial=1.0,
        max_concurrent_trials=CONCURRENT,
    )  # fmt: skip
    train = TrainConfig(
        n_layer=n_layer, n_embd=n_embd, n_head=max(4, n_embd // 64), block_size=1024,
        max_steps=MAX_STEPS, eval_interval=200, dataset="fineweb_edu",
    )  # fmt: skip
    return redact_config(
        {
            "sweep": dict(vars(settings)) | {"name": name},
            "config": train.to_dict(),
            "environment": {"python": sys.version.split()[0]},
            "cluster": {"nodes": 2, "GPU": 8},
            "data": {"vocab_size": 50304},
        }
    )


def trial_rows(
    rng: random.Random, prefix: str, count: int, shape: tuple[int, int], t0: float, running: bool
) -> list[dict[str, Any]]:
    """A sweep's trials.parquet rows, every column as the trials table fills it. An ended
    sweep's trials ended as ASHA ends them (1 in 9 trains to max_steps, the rest stop at a
    rung, a few diverge or raise); a running sweep's last CONCURRENT trials still run."""
    from raygpt import results
    from raygpt.sweep.search import config_key

    n_layer, n_embd = shape
    size = n_params(n_layer, n_embd)
    floor = 4.2 - 0.35 * math.log10(size / 3e6)  # a bigger model reaches a lower loss
    step_s = 0.05 * size / 3e6 + 0.1
    rows = []
    for i in range(count):
        optimizer = OPTIMIZERS[i % len(OPTIMIZERS)]
        lo, hi = LR_RANGES[optimizer]
        lr = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        params = {
            "optimizer": optimizer, "learning_rate": lr,
            "weight_decay": round(rng.uniform(0.0, 0.2), 4), "beta2": rng.choice([0.95, 0.99]),
            "seed": 1337,
        }  # fmt: skip
        # The loss grows with the distance from the range's middle, in decades.
        miss = abs(math.log10(lr) - (math.log10(lo) + math.log10(hi)) / 2)
        loss = floor + 0.4 * miss**2 + rng.gauss(0, 0.02)
        draw = rng.random()
        live = running and i >= count - CONCURRENT
        if live:
            status, steps = "running", rng.randrange(50, MAX_STEPS)
        elif draw < 0.04:
            status, steps = "diverged", rng.randrange(20, 200)
        elif draw < 0.05:
            status, steps = "error", rng.randrange(1, 50)
        elif draw < 0.16:
            status, steps = "completed", MAX_STEPS
        else:
            status, steps = "stopped_early", rng.choice([200, 600])
        best = loss + 1.5 * (1 - steps / MAX_STEPS) ** 2
        final = best + abs(rng.gauss(0, 0.01))
        if status == "diverged":
            final = math.nan
        elif status == "error":
            best = final = None
        start = t0 + (i // CONCURRENT) * 600 + rng.uniform(0, 30)
        train_s = steps * step_s
        row = {name: None for name in results.TRIAL_SCHEMA.names} | {
            "trial_id": f"{prefix}_{i:05d}", "optimizer": optimizer, "learning_rate": lr,
            "params": json.dumps(params), "status": status, "steps": steps,
            "error": "RuntimeError: CUDA error: an illegal memory access was encountered"
            if status == "error" else None,
            "best_val_loss": best, "final_val_loss": final,
            "final_train_loss": None if final is None else final - 0.03,
            "wall_seconds": train_s + 40, "train_seconds": train_s,
            "tokens": steps * TOKENS_PER_STEP,
            "mean_tokens_per_sec": TOKENS_PER_STEP / step_s, "mean_mfu": 0.38,
            "checkpoint_path": f"{prefix}/trial_{i:05d}/checkpoint_{steps:06d}",
            "seed": 1337, "config_key": config_key(params), "phase": "search",
            "queued_at": start - 5, "started_at": start, "workers_up_at": start + 20,
            "first_step_at": start + 30, "last_step_at": start + 30 + train_s,
            "torn_down_at": None if live else start + 40 + train_s,
            "overhead_seconds": 40.0, "cooldown_seconds": 0.0,
            "n_params": size, "n_layer": n_layer, "n_embd": n_embd, "parametrization": "sp",
            "flops": 6.0 * size * steps * TOKENS_PER_STEP, "device_seconds": train_s,
            "gpu_hours": train_s / 3600,
        }  # fmt: skip
        rows.append(row)
    return rows


def write_sweep(root: str, name: str, record: dict, rows: list[dict]) -> str:
    """A sweep folder under the storage root `root`, written with raygpt's own writers."""
    import pyarrow as pa

    from raygpt import results, storage
    from raygpt.service import index
    from raygpt.train import preflight

    store = storage.resolve(root, check=False)
    path = store.path(name)
    preflight.write_record(store, f"{path}/{results.SWEEP_FILE}", record)
    table = pa.Table.from_pylist(rows, schema=results.TRIAL_SCHEMA)
    results.write_table(
        store, f"{path}/{results.TRIALS_FILE}", results.with_metadata(table, record)
    )
    return index.folder_uri(store, name)


def fill(engine, root: str, n_sweeps: int, n_trials: int) -> dict[str, Any]:
    """Write and ingest the sweeps; what the filter of GET /trials should then match."""
    import sqlalchemy as sa

    from raygpt.service import db as schema
    from raygpt.service import index

    rng = random.Random(0)
    now = time.time()
    expected = 0
    per, extra = divmod(n_trials, n_sweeps)
    n_running = max(1, n_sweeps // 10)
    for s in range(n_sweeps):
        count = per + (s < extra)
        shape = SHAPES[s % len(SHAPES)]
        running = s >= n_sweeps - n_running
        # An ended sweep ran days ago; a running one started hours ago, with trials to come.
        t0 = now - 3600 * 3 if running else now - 86400 * (n_sweeps - s)
        name = f"{USERS[s % len(USERS)]}-{shape[0]}x{shape[1]}-{s:02d}"
        record = sweep_record(name, *shape, planned=count + (3 * CONCURRENT if running else 0))
        rows = trial_rows(rng, f"{s:03d}{rng.randrange(16**5):05x}", count, shape, t0, running)
        sid = index.ingest(engine, write_sweep(root, name, record, rows))
        # The service sets the owner when a sweep is submitted; ingest leaves it empty.
        with engine.begin() as conn:
            conn.execute(
                sa.update(schema.sweeps)
                .where(schema.sweeps.c.id == sid)
                .values(owner=USERS[s % len(USERS)])
            )
        lo, hi = (float(x) for x in TRIALS_FILTER["n_params"].split(":"))
        expected += sum(
            1
            for r in rows
            if r["optimizer"] == TRIALS_FILTER["optimizer"] and lo <= r["n_params"] <= hi
        )
    return {"expected_trials_matched": expected}


def counts(engine) -> dict[str, int]:
    import sqlalchemy as sa

    from raygpt.service import db as schema

    with engine.connect() as conn:
        return {
            t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
            for t in (schema.users, schema.sweeps, schema.trials)
        }


def refuse_unless_empty(engine, shown: str) -> None:
    """Exit with one line unless the database holds no user and no sweep: the benchmark
    empties its tables at the end, which must lose nobody's data."""
    before = counts(engine)
    if before["users"] or before["sweeps"]:
        raise SystemExit(
            f"error: database {shown} holds {before['users']} users and {before['sweeps']} "
            "sweeps; give an empty one (the benchmark empties its tables at the end)"
        )


def empty(engine) -> None:
    """Delete every row, children first: the database is left as the benchmark found it."""
    from raygpt.service import db as schema

    with engine.begin() as conn:
        for table in reversed(schema.metadata.sorted_tables):
            conn.execute(table.delete())


# --------------------------------------------------------------------------- serving


@contextlib.contextmanager
def serve(app) -> Iterator[int]:
    """`app` through Uvicorn on 127.0.0.1 in a thread; the port it listens on."""
    import uvicorn

    # No access log: a line a request would be the benchmark's own cost, not the service's.
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off", access_log=False))
    # Bound before the server starts: the port is ours, with no race for a free one.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def get(conn: http.client.HTTPConnection, path: str, token: str) -> tuple[float, bytes]:
    """(seconds, body) of one GET; anything but 200 stops the benchmark."""
    start = time.perf_counter()
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    body = response.read()
    took = time.perf_counter() - start
    if response.status != 200:
        raise RuntimeError(f"GET {path} answered {response.status}: {body[:300]!r}")
    return took, body


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile: a value that was measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def measure(port: int, token: str, sweep_ids: list[int], n: int) -> tuple[dict, dict]:
    """Each route's timings, and what its answers held."""
    from urllib.parse import urlencode

    query = urlencode(TRIALS_FILTER)
    routes = {
        "GET /": lambda i: "/",
        "GET /sweeps": lambda i: "/sweeps",
        "GET /sweeps/{id}/page": lambda i: f"/sweeps/{sweep_ids[i % len(sweep_ids)]}/page",
        "GET /trials": lambda i: f"/trials?{query}",
    }
    timings: dict[str, dict] = {}
    seen: dict[str, Any] = {}
    for route, path in routes.items():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        took: list[float] = []
        try:
            for i in range(WARMUP + n):
                seconds, body = get(conn, path(i), token)
                if i >= WARMUP:
                    took.append(seconds * 1000)
        finally:
            conn.close()
        # What the last answer held, so a route that answers quickly with too little shows.
        text = body.decode()
        if route == "GET /":
            seen["sweeps_on_list_page"] = sum(f'href="/sweeps/{s}/page"' in text for s in sweep_ids)
        elif route == "GET /sweeps":
            seen["sweeps_listed"] = len(json.loads(text)["sweeps"])
        elif route == "GET /sweeps/{id}/page":
            seen["trial_rows_on_last_page"] = text.split("<h2>Trials</h2>", 1)[-1].count("<tr")
            seen["trial_rows_on_last_page"] -= 1  # the table's header row
        else:
            seen["trials_matched"] = len(json.loads(text)["trials"])
        timings[route] = {
            "path": path(0) if route != "GET /sweeps/{id}/page" else "/sweeps/{id}/page",
            "n": len(took),
            "median_ms": statistics.median(took),
            "p95_ms": percentile(took, 0.95),
            "mean_ms": statistics.fmean(took),
            "min_ms": min(took),
            "max_ms": max(took),
            "target_ms": TARGETS_MS.get(route),
        }
    return timings, seen


def bench(url: str | None, shown: str, args: argparse.Namespace) -> dict[str, Any]:
    """Fill one database, serve it, and time the routes."""
    import sqlalchemy as sa

    from raygpt.service import auth
    from raygpt.service import db as schema
    from raygpt.service.app import build_app

    with tempfile.TemporaryDirectory(prefix="service-load-") as tmp:
        engine = schema.connect(url or str(Path(tmp) / "service.db"))
        try:
            refuse_unless_empty(engine, shown)
            try:
                root = str(Path(tmp) / "results")
                start = time.perf_counter()
                for user in USERS:
                    auth.add_user(engine, user)
                filled = fill(engine, root, args.sweeps, args.trials)
                fill_s = time.perf_counter() - start
                token = auth.add_user(engine, "bench")
                rows = counts(engine)
                app = build_app(engine, FixedCluster(), root)
                with engine.connect() as conn:
                    ids = sorted(conn.execute(sa.select(schema.sweeps.c.id)).scalars())
                with serve(app) as port:
                    timings, seen = measure(port, token, ids, args.requests)
            finally:
                if url:
                    empty(engine)
        finally:
            engine.dispose()
    return {
        "database": shown,
        "fill_s": round(fill_s, 2),
        "sweeps": rows["sweeps"],
        "trials": rows["trials"],
        **filled,
        **seen,
        "routes": timings,
    }


def commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, default=20)
    parser.add_argument("--trials", type=int, default=2000, help="in all, over the sweeps")
    parser.add_argument("--requests", type=int, default=50, help="timed requests per route")
    parser.add_argument(
        "--db",
        default=None,
        help="also a PostgreSQL database, postgresql://USER:PASSWORD@HOST:PORT/DATABASE "
        "(empty; emptied again at the end)",
    )
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if args.sweeps < 1 or args.trials < args.sweeps or args.requests < 1:
        parser.error("give --sweeps >= 1, --trials >= --sweeps and --requests >= 1")

    import sqlalchemy as sa

    from raygpt.redact import redact

    databases: list[tuple[str, str | None, str]] = [("sqlite", None, "a fresh SQLite file")]
    if args.db:
        from raygpt.errors import UserError
        from raygpt.service import db as schema

        if not args.db.startswith(("postgresql://", "postgres://")):
            parser.error("--db takes a PostgreSQL URL (the SQLite database is always run)")
        try:
            shown = redact(sa.make_url(args.db).render_as_string(hide_password=True))
            engine = schema.connect(args.db)
        except (UserError, sa.exc.ArgumentError) as err:
            print(f"error: {redact(str(err))}", file=sys.stderr)
            return 1
        try:  # before the SQLite run: a database that cannot be used fails at once
            refuse_unless_empty(engine, shown)
        finally:
            engine.dispose()
        databases.append(("postgresql", args.db, shown))
    out: dict[str, Any] = {
        "commit": commit(),
        "sweeps": args.sweeps,
        "trials": args.trials,
        "requests": args.requests,
        "warmup": WARMUP,
        "trials_filter": TRIALS_FILTER,
        "databases": {},
    }
    for key, url, shown in databases:
        result = bench(url, shown, args)
        out["databases"][key] = result
        print(
            f"{key}: {result['sweeps']} sweeps, {result['trials']} trials (filled in "
            f"{result['fill_s']:.1f} s); {args.requests} requests a route after {WARMUP} warm-ups"
        )
        for route, t in result["routes"].items():
            target = t["target_ms"]
            if not target:
                verdict = "no target"
            elif t["p95_ms"] < target:
                verdict = f"target < {target:.0f} ms: met"
            elif t["median_ms"] < target:
                verdict = f"target < {target:.0f} ms: median met, p95 over"
            else:
                verdict = f"target < {target:.0f} ms: MISSED"
            print(
                f"  {route:22s} median {t['median_ms']:7.1f} ms  p95 {t['p95_ms']:7.1f} ms  "
                f"{verdict}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
