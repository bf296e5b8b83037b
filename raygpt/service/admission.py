"""The team service's queue: which queued sweeps start now, and why each of the rest waits.

Pure functions over plain data, with no Ray and no database: the Serve app reads the
queued and running sweeps from its database, what is free from
`ray.available_resources()` and the totals from `ray.cluster_resources()`, and calls
`decide`; `check_submittable` runs when a sweep is submitted. Resources are Ray-shaped
dicts ({"CPU": 6.0, "GPU": 2.0}); only CPU and GPU count, other keys are ignored. A
trial's demand is everything one trial holds: its Tune trial process and its workers.

The rules, in the order they apply:

- Submit. A sweep whose one trial, or whose peak (one trial x its max concurrent trials),
  exceeds its owner's quota or the cluster's totals is refused with a UserError: it
  could never run as asked.
- Fair share between owners. The owner who holds the least relative to their quota (the
  larger of GPUs held / GPU quota and CPUs held / CPU quota) is served first. Each
  admission counts at once, so one decision alternates between owners.
- Within one owner, higher priority first, then the older submission. While an owner's
  sweep waits, that owner's later sweeps wait behind it.
- Concurrency. A sweep is admitted when ONE trial fits in both its owner's quota left and
  what is free. It reserves as many trials at once as fit in both, up to its max
  concurrent trials, and runs with that many (the service passes `Admission.concurrency`
  as --max-concurrent-trials). It does not grow later, so a sweep never holds more than
  it reserved and the quotas stay true while it runs.
- Free resources. Free is what Ray reports free, so jobs started outside the service are
  respected, and at most the totals less what the service's running sweeps reserved: a
  sweep admitted a moment ago has not placed its trials yet, and Ray still counts them
  free. Sweeps admitted earlier in the same decision count too.
- No starvation. A sweep next in fair-share order that does not fit what is free holds
  back what one of its trials needs (as far as it is free) from the sweeps after it, so a
  stream of small sweeps cannot keep a large one waiting forever, while a CPU-only sweep
  may still start beside one waiting for GPUs. A sweep waiting on its owner's quota holds
  nothing back: only that owner's own sweeps end its wait.

Amounts are counted in Ray's units of 1e-4, so ten 0.1-GPU trials fill one GPU exactly
as Ray places them (cluster/resources.py's bundles_that_fit counts the same way).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from raygpt.errors import UserError

RESOURCES = ("GPU", "CPU")  # the order checks and reasons take them in: GPUs are scarcer
_UNITS = 10_000  # Ray's resource granularity is 1e-4
_NO_LIMIT = 10**18  # a quota of math.inf, in units
# The flags that shrink one trial's demand, for the submit errors.
_PER_TRIAL_FLAGS = {"GPU": "--gpus-per-trial", "CPU": "--cpus-per-worker"}

Units = dict[str, int]


@dataclass(frozen=True)
class Quota:
    """What one user's sweeps may hold at once (math.inf: no limit)."""

    gpus: float
    cpus: float

    def resources(self) -> dict[str, float]:
        return {"GPU": self.gpus, "CPU": self.cpus}


@dataclass(frozen=True)
class Quotas:
    """Per-user quotas, and the default for users without one."""

    default: Quota
    per_user: Mapping[str, Quota] = field(default_factory=dict)

    def of(self, owner: str) -> Quota:
        return self.per_user.get(owner, self.default)


@dataclass(frozen=True)
class Demand:
    """One trial's resources ({"CPU": 2, "GPU": 1}) and how many trials may run at once."""

    trial: Mapping[str, float]
    max_concurrent: int = 1

    @property
    def peak(self) -> dict[str, float]:
        return {r: float(self.trial.get(r, 0) or 0) * self.max_concurrent for r in RESOURCES}


@dataclass(frozen=True)
class QueuedSweep:
    id: str
    owner: str
    priority: int  # higher goes first, among one owner's sweeps only
    submitted_at: float  # Unix seconds
    demand: Demand
    name: str = ""  # what reasons call it; the id where empty

    @property
    def label(self) -> str:
        return self.name or self.id


@dataclass(frozen=True)
class RunningSweep:
    id: str
    owner: str
    holds: Mapping[str, float]  # what it reserved when admitted (Admission.reserved)


@dataclass(frozen=True)
class Admission:
    sweep_id: str
    concurrency: int  # trials at once: the sweep's --max-concurrent-trials
    reserved: dict[str, float]  # one trial's demand x concurrency; RunningSweep.holds after


@dataclass(frozen=True)
class Decision:
    admit: list[Admission]  # in the order to start them
    waiting: dict[str, str]  # every other queued sweep's id: one line, "waiting: ..."


# --------------------------------------------------------------------------- submit


def check_submittable(
    owner: str, demand: Demand, quotas: Quotas, cluster_totals: Mapping[str, float]
) -> None:
    """Refuse (UserError) a sweep that could never run as asked: a bad demand, or one
    trial or its peak over its owner's quota or over the cluster's totals."""
    if not isinstance(demand.max_concurrent, int) or demand.max_concurrent < 1:
        raise UserError(
            f"max concurrent trials is {demand.max_concurrent!r}; give a whole number >= 1"
        )
    for r in RESOURCES:
        value = demand.trial.get(r, 0) or 0
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise UserError(f"a trial's {r} demand is {value!r}; give a finite number >= 0")
    trial = _units(demand.trial)
    n = demand.max_concurrent
    limits = (
        (_units(quotas.of(owner).resources()), f"{owner}'s quota of", "or ask for a larger quota"),
        (_units(cluster_totals), "the cluster's", "or add nodes"),
    )
    for r in RESOURCES:
        for limit, whose, ask in limits:
            if trial[r] > limit[r]:
                raise UserError(
                    f"one trial of this sweep needs {_amount(trial[r], r)}, over {whose} "
                    f"{_amount(limit[r], r)}; give each trial less ({_PER_TRIAL_FLAGS[r]}, "
                    f"--workers-per-trial) {ask}"
                )
    for r in RESOURCES:
        for limit, whose, ask in limits:
            if trial[r] * n > limit[r]:
                raise UserError(
                    f"this sweep needs {_amount(trial[r] * n, r)} at once ({_num(trial[r])} per "
                    f"trial x {n} concurrent trials), over {whose} {_amount(limit[r], r)}; "
                    f"lower --max-concurrent-trials to {limit[r] // trial[r]} {ask}"
                )


# --------------------------------------------------------------------------- decide


def decide(
    queued: Iterable[QueuedSweep],
    running: Iterable[RunningSweep],
    quotas: Quotas,
    free: Mapping[str, float],
    totals: Mapping[str, float],
) -> Decision:
    """Which queued sweeps to admit now, in order, and one line for each that waits.

    `free` is `ray.available_resources()` now and `totals` `ray.cluster_resources()`; the
    rules are the module's docstring's.
    """
    held: dict[str, Units] = {}
    reserved = _zero()
    for sweep in running:
        holds = _units(sweep.holds)
        _add(held.setdefault(sweep.owner, _zero()), holds)
        _add(reserved, holds)
    total = _units(totals)
    ray_free = _units(free)
    room = {r: max(0, min(ray_free[r], total[r] - reserved[r])) for r in RESOURCES}
    start_room = dict(room)

    queues: dict[str, list[QueuedSweep]] = {}
    for sweep in queued:
        queues.setdefault(sweep.owner, []).append(sweep)
    for sweeps in queues.values():
        sweeps.sort(key=lambda s: (-s.priority, s.submitted_at, s.id))

    admit: list[Admission] = []
    taken: list[tuple[QueuedSweep, Units]] = []  # sweeps admitted in this decision
    waiting: dict[str, str] = {}
    held_back = _zero()
    holders: list[tuple[QueuedSweep, Units]] = []  # sweeps that wait, holding back units

    def fair_share(owner: str) -> tuple[float, float, str]:
        share = _share(held.get(owner, _zero()), _units(quotas.of(owner).resources()))
        return (share, queues[owner][0].submitted_at, owner)

    while queues:
        owner = min(queues, key=fair_share)
        sweep = queues[owner].pop(0)
        own = held.setdefault(owner, _zero())
        trial = _units(sweep.demand.trial)
        quota = _units(quotas.of(owner).resources())
        avail = {r: max(0, room[r] - held_back[r]) for r in RESOURCES}
        reason = _quota_reason(sweep, trial, own, quota, total)
        if reason is None and not _fits(trial, avail):
            reason = _cluster_reason(trial, room, avail, start_room, taken, holders)
            hold = {r: min(trial[r], avail[r]) for r in RESOURCES}
            _add(held_back, hold)
            holders.append((sweep, hold))
        if reason is None:
            concurrency = _concurrency(sweep.demand.max_concurrent, trial, quota, own, avail)
            take = {r: trial[r] * concurrency for r in RESOURCES}
            _add(own, take)
            for r in RESOURCES:
                room[r] -= take[r]
            admit.append(Admission(sweep.id, concurrency, _plain(take)))
            taken.append((sweep, take))
        else:
            waiting[sweep.id] = reason
            # An owner's sweeps go in their order: the rest wait behind this one.
            for later in queues[owner]:
                waiting[later.id] = _goes_first(sweep)
            queues[owner] = []
        if not queues[owner]:
            del queues[owner]
    return Decision(admit=admit, waiting=waiting)


def _quota_reason(
    sweep: QueuedSweep, trial: Units, own: Units, quota: Units, total: Units
) -> str | None:
    """Why the owner's quota (or the cluster's size) keeps one trial out, or None."""
    for r in RESOURCES:
        if trial[r] > total[r]:
            return (
                f"waiting: one trial needs {_amount(trial[r], r)}, more than the cluster's "
                f"{_amount(total[r], r)} in all: cancel it or add nodes"
            )
        if trial[r] > quota[r]:
            return (
                f"waiting: one trial needs {_amount(trial[r], r)}, more than {sweep.owner}'s "
                f"quota of {_amount(quota[r], r)}: cancel it or ask for a larger quota"
            )
        if own[r] + trial[r] > quota[r]:
            return (
                f"waiting: {sweep.owner} holds {_num(own[r])} of their {_amount(quota[r], r)}, "
                f"the sweep needs {_num(trial[r])} at once"
            )
    return None


def _cluster_reason(
    trial: Units,
    room: Units,
    avail: Units,
    start_room: Units,
    taken: list[tuple[QueuedSweep, Units]],
    holders: list[tuple[QueuedSweep, Units]],
) -> str:
    """Why what is free keeps one trial out: a waiting sweep ahead holds it back, sweeps
    admitted in this decision took it, or the cluster has not got it free."""
    short = next(r for r in RESOURCES if trial[r] > avail[r])
    if trial[short] <= room[short]:
        ahead = next(s for s, hold in holders if hold[short] > 0)
        return _goes_first(ahead)
    after = ""
    took = [s for s, take in taken if take[short] > 0]
    if trial[short] <= start_room[short] and took:
        first = took[0]
        after = f" once {first.owner}'s sweep {first.label} starts"
        if len(took) > 1:
            after = f" once {first.owner}'s sweep {first.label} and {len(took) - 1} more start"
    return (
        f"waiting: the cluster has {_amount(room[short], short)} free{after}, "
        f"the sweep needs {_num(trial[short])} at once"
    )


def _goes_first(ahead: QueuedSweep) -> str:
    return f"waiting: {ahead.owner}'s sweep {ahead.label} (priority {ahead.priority}) goes first"


def _concurrency(most: int, trial: Units, quota: Units, own: Units, avail: Units) -> int:
    """Trials at once that fit both the quota left and what is free, 1..most."""
    fits = [min(quota[r] - own[r], avail[r]) // trial[r] for r in RESOURCES if trial[r] > 0]
    return max(1, min([most, *fits]))


def _share(held: Units, quota: Units) -> float:
    """What an owner holds relative to their quota: the larger of the two resources'."""
    shares = [0.0]
    for r in RESOURCES:
        if quota[r] > 0:
            shares.append(held[r] / quota[r])
        elif held[r] > 0:
            shares.append(math.inf)
    return max(shares)


# --------------------------------------------------------------------------- amounts


def _zero() -> Units:
    return dict.fromkeys(RESOURCES, 0)


def _units(resources: Mapping[str, float]) -> Units:
    out = _zero()
    for r in RESOURCES:
        value = float(resources.get(r, 0) or 0)
        out[r] = _NO_LIMIT if math.isinf(value) else round(value * _UNITS)
    return out


def _plain(units: Units) -> dict[str, float]:
    return {r: units[r] / _UNITS for r in RESOURCES}


def _add(into: Units, more: Units) -> None:
    for r in RESOURCES:
        into[r] += more[r]


def _fits(need: Units, avail: Units) -> bool:
    return all(need[r] <= avail[r] for r in RESOURCES)


def _num(units: int) -> str:
    return "unlimited" if units >= _NO_LIMIT else f"{units / _UNITS:g}"


def _amount(units: int, resource: str) -> str:
    """1 GPU, 2 GPUs, 0.5 GPUs, 8 CPUs."""
    return f"{_num(units)} {resource}{'' if units == _UNITS else 's'}"
