"""The service's queue, one pass at a time: `tick(db, jobs, free, totals, now)`.

A pass does three things, with every fact read afresh from the database and from Ray, so
it holds no state between passes: a replica that Serve restarts, or a service stopped
and started again, goes on where the last pass left off.

1. Reconcile. Each sweep the service marked running (it has a Ray job id) is read from
   Ray: a job still running has its folder ingested (index.ingest), so the database and
   the pages follow its trials; a job that ended is ingested once more and its sweep
   becomes succeeded, failed or cancelled, with the job's end as ended_at; a job the
   cluster does not know (the cluster restarted under it) fails the sweep, and the
   reason says so. A sweep found running in storage with no job (run by hand, indexed by
   a rebuild) is not the service's to settle.
2. Admit. admission.decide over the queued sweeps and those running, with the users'
   quotas and priorities, Ray's free resources and its totals; each admitted sweep is
   submitted as a Ray job (jobs.Jobs.submit) and marked running with its job id, start
   time and the concurrency admission reserved (its max_concurrent_trials from then on,
   so what it holds is one trial's demand times that).
3. Explain. Every sweep still queued gets its one-line reason in queued_reason.

Every write is guarded by the status it expects, so a sweep cancelled while a pass runs
stays cancelled (a job submitted for it meanwhile is stopped), and two passes at once
(two replicas for a moment) cannot start a sweep twice: its job's submission id is fixed
by its row, and the second submit finds the first's job.
"""

from __future__ import annotations

import math
import time
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import sqlalchemy as sa

from raygpt.errors import UserError, first_line
from raygpt.redact import redact
from raygpt.service import admission, auth, index
from raygpt.service import db as schema
from raygpt.service.jobs import JobServerError, JobState

TICK_S = 2.0  # how often the service runs a pass when nothing wakes it sooner
DEFAULT_CPUS_PER_WORKER = 1.0  # the sweep driver's default: one core per trial worker

_S = schema.sweeps
_DEMAND = ("workers_per_trial", "cpus_per_worker", "gpus_per_worker", "max_concurrent_trials")


class JobRunner(Protocol):
    """What a pass needs of the cluster's jobs (jobs.Jobs)."""

    def submit(self, sweep: Mapping[str, Any], concurrency: int) -> str: ...
    def state(self, job_id: str) -> JobState | None: ...
    def stop(self, job_id: str) -> str | None: ...


@dataclass
class Tick:
    """What one pass did, by sweep id."""

    ended: dict[int, str] = field(default_factory=dict)  # -> succeeded, failed, cancelled
    admitted: dict[int, str] = field(default_factory=dict)  # -> its Ray job id
    waiting: dict[int, str] = field(default_factory=dict)  # -> why it still waits
    problems: list[str] = field(default_factory=list)  # one line each, to log


# --------------------------------------------------------------------------- demand


def trial_demand(sweep: Mapping[str, Any], totals: Mapping[str, float]) -> dict[str, float]:
    """One trial's resources from a sweeps row's demand columns, defaults as the sweep
    driver takes them: one worker, one CPU each, one GPU each where the cluster has GPUs
    (a row without gpus_per_worker asked for none explicitly)."""
    workers = int(sweep.get("workers_per_trial") or 1)
    cpus = sweep.get("cpus_per_worker")
    gpus = sweep.get("gpus_per_worker")
    cpus = DEFAULT_CPUS_PER_WORKER if cpus is None else float(cpus)
    if gpus is None:
        gpus = 1.0 if float(totals.get("GPU", 0) or 0) > 0 else 0.0
    return {"CPU": workers * cpus, "GPU": workers * float(gpus)}


def demand(sweep: Mapping[str, Any], totals: Mapping[str, float]) -> admission.Demand:
    """A queued sweep's admission.Demand: its trial, and at most its max concurrent
    trials (none given: as many as the cluster's totals fit, as the driver would run)."""
    trial = trial_demand(sweep, totals)
    most = sweep.get("max_concurrent_trials")
    if not most:
        fits = [
            math.floor(float(totals.get(r, 0) or 0) / need) for r, need in trial.items() if need > 0
        ]
        most = max(1, min(fits, default=1))
    return admission.Demand(trial=trial, max_concurrent=int(most))


def holds(sweep: Mapping[str, Any], totals: Mapping[str, float]) -> dict[str, float]:
    """What a running sweep reserved: one trial times the concurrency it was admitted with."""
    n = int(sweep.get("max_concurrent_trials") or 1)
    return {r: need * n for r, need in trial_demand(sweep, totals).items()}


def quotas(db: sa.Engine) -> tuple[admission.Quotas, dict[str, int]]:
    """Every user's quota, and their priorities."""
    with db.connect() as conn:
        users = conn.execute(sa.select(schema.users)).mappings().all()
    per_user = {u["name"]: admission.Quota(gpus=u["gpu_quota"], cpus=u["cpu_quota"]) for u in users}
    default = admission.Quota(gpus=auth.DEFAULT_GPU_QUOTA, cpus=auth.DEFAULT_CPU_QUOTA)
    return admission.Quotas(default, per_user), {u["name"]: u["priority"] for u in users}


# --------------------------------------------------------------------------- the pass


def tick(
    db: sa.Engine,
    jobs: JobRunner,
    free: Mapping[str, float],
    totals: Mapping[str, float],
    now: float | None = None,
    hold: Container[str] = (),
) -> Tick:
    """One pass of the queue (the module docstring): reconcile, admit, explain.

    `hold`: Ray job ids a cancel is stopping right now; their sweeps are left for the
    cancel to mark, and still count as holding what they reserved."""
    now = time.time() if now is None else now
    done = Tick()
    for row in _rows(db, _S.c.status == schema.RUNNING, _S.c.ray_job_id.is_not(None)):
        if row["ray_job_id"] in hold:
            continue
        try:
            settle(db, jobs, row, now, done)
        except JobServerError as err:  # Ray is asked again next pass; nothing is decided
            done.problems.append(str(err))
            return done
    _admit(db, jobs, free, totals, now, done)
    return done


def settle(
    db: sa.Engine, jobs: JobRunner, row: Mapping[str, Any], now: float, done: Tick | None = None
) -> str:
    """Bring one running sweep up to date with its Ray job: ingest its folder, and end
    it where its job has ended. Return the sweep's status."""
    done = done if done is not None else Tick()
    state = jobs.state(row["ray_job_id"])
    if state is not None and state.status == schema.RUNNING:
        _ingest(db, row, schema.RUNNING, done)
        return schema.RUNNING
    if state is None:
        final = schema.FAILED
        reason = (
            f"failed: the Ray cluster does not know its job {row['ray_job_id']} (the cluster "
            "restarted under it, or the job was deleted); resubmit the sweep"
        )
    else:
        final, reason = state.status, None
    _ingest(db, row, final, done)
    ended = (state.ended_at if state is not None else None) or now
    with db.begin() as conn:
        conn.execute(
            sa.update(_S)
            .where(_S.c.id == row["id"], _S.c.status.in_([schema.RUNNING, final]))
            .values(status=final, ended_at=ended, queued_reason=reason)
        )
    done.ended[row["id"]] = final
    return final


def ingest_job(db: sa.Engine, job_id: str) -> None:
    """Read the folder of the sweep whose Ray job is `job_id` once more, its status left
    as it is: a cancel calls this once the job has stopped, then marks the sweep."""
    done = Tick()
    for row in _rows(db, _S.c.ray_job_id == job_id):
        _ingest(db, row, row["status"], done)


def _ingest(db: sa.Engine, row: Mapping[str, Any], status: str, done: Tick) -> None:
    """The sweep's folder into the database; a folder with no trials yet is skipped.

    The demand columns stay the service's: ingest reads them from sweep.json, where a
    flag not given is null (--gpus-per-trial on a GPU cluster), while the row holds what
    submit resolved and admission reserved, which the next pass counts as held."""
    folder = row["folder_uri"] or index.folder_uri(row["storage_path"], row["name"])
    try:
        index.ingest(db, folder, sweep_id=row["id"], status=status)
    except UserError as err:
        if "(yet?)" not in str(err) and "holds no raygpt" not in str(err):
            done.problems.append(f"sweep {row['id']}: {err}")
        return
    kept = {c: row[c] for c in _DEMAND if row[c] is not None}
    if kept:
        with db.begin() as conn:
            conn.execute(sa.update(_S).where(_S.c.id == row["id"]).values(kept))


def _admit(
    db: sa.Engine,
    jobs: JobRunner,
    free: Mapping[str, float],
    totals: Mapping[str, float],
    now: float,
    done: Tick,
) -> None:
    queued = {row["id"]: row for row in _rows(db, _S.c.status == schema.QUEUED)}
    if not queued:
        return
    running = _rows(db, _S.c.status == schema.RUNNING, _S.c.ray_job_id.is_not(None))
    quota, priority = quotas(db)
    decision = admission.decide(
        [
            admission.QueuedSweep(
                id=str(sid),
                owner=row["owner"] or "",
                priority=priority.get(row["owner"], auth.DEFAULT_PRIORITY),
                submitted_at=row["submitted_at"] or 0.0,
                demand=demand(row, totals),
                name=row["name"],
            )
            for sid, row in queued.items()
        ],
        [
            admission.RunningSweep(str(row["id"]), row["owner"] or "", holds(row, totals))
            for row in running
        ],
        quota,
        free,
        totals,
    )
    reasons = {int(sid): reason for sid, reason in decision.waiting.items()}
    for admitted in decision.admit:
        sid = int(admitted.sweep_id)
        try:
            job_id = jobs.submit(queued[sid], admitted.concurrency)
        except JobServerError as err:
            reasons[sid] = f"waiting: the Ray job server did not take it ({err})"
            continue
        except UserError as err:  # the row itself cannot run (a bad file, bad flags)
            _fail(db, sid, f"failed: {first_line(err)}", now)
            done.ended[sid] = schema.FAILED
            continue
        _mark_running(db, jobs, sid, job_id, admitted.concurrency, now, done)
    for sid, reason in reasons.items():
        if queued[sid]["queued_reason"] != reason:
            with db.begin() as conn:
                conn.execute(
                    sa.update(_S)
                    .where(_S.c.id == sid, _S.c.status == schema.QUEUED)
                    .values(queued_reason=reason)
                )
        done.waiting[sid] = reason


def _mark_running(
    db: sa.Engine, jobs: JobRunner, sid: int, job_id: str, concurrency: int, now: float, done: Tick
) -> None:
    with db.begin() as conn:
        changed = conn.execute(
            sa.update(_S)
            .where(_S.c.id == sid, _S.c.status == schema.QUEUED)
            .values(
                status=schema.RUNNING,
                started_at=now,
                ray_job_id=job_id,
                max_concurrent_trials=concurrency,
                queued_reason=None,
            )
        ).rowcount
        row = conn.execute(sa.select(_S.c.status, _S.c.ray_job_id).where(_S.c.id == sid)).first()
    if changed:
        done.admitted[sid] = job_id
    elif row is None or row.ray_job_id != job_id:
        # Cancelled (or deleted) while its job was being submitted: the job goes too.
        try:
            jobs.stop(job_id)
        except UserError as err:
            done.problems.append(f"sweep {sid}: {redact(str(err))}")


def _fail(db: sa.Engine, sid: int, reason: str, now: float) -> None:
    with db.begin() as conn:
        conn.execute(
            sa.update(_S)
            .where(_S.c.id == sid, _S.c.status == schema.QUEUED)
            .values(status=schema.FAILED, ended_at=now, queued_reason=redact(reason))
        )


def _rows(db: sa.Engine, *where: Any) -> list[dict[str, Any]]:
    with db.connect() as conn:
        query = sa.select(_S).where(*where).order_by(_S.c.id)
        return [dict(row) for row in conn.execute(query).mappings()]


def counts(db: sa.Engine) -> dict[str, int]:
    """How many sweeps are in each status."""
    with db.connect() as conn:
        found = conn.execute(sa.select(_S.c.status, sa.func.count()).group_by(_S.c.status)).all()
    return {status: 0 for status in schema.SWEEP_STATUSES} | {s: int(n) for s, n in found}
