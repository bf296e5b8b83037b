"""The queue's reading of a sweeps row, without a cluster: one trial's demand with the
sweep driver's defaults, what a running sweep holds, the quotas from the users table and
the sweep counts, on SQLite and PostgreSQL. Its passes against Ray's jobs run in
tests/cluster/test_service.py."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from raygpt.service import admission, auth, queue
from raygpt.service import db as schema

CPU_ONLY = {"CPU": 8.0, "GPU": 0.0}
GPUS = {"CPU": 32.0, "GPU": 4.0}


def test_a_trial_takes_the_sweep_drivers_defaults():
    row = {"workers_per_trial": None, "cpus_per_worker": None, "gpus_per_worker": None}
    assert queue.trial_demand(row, CPU_ONLY) == {"CPU": 1.0, "GPU": 0.0}
    # No --gpus-per-trial on a cluster with GPUs: one GPU per worker, as the driver runs it.
    assert queue.trial_demand(row, GPUS) == {"CPU": 1.0, "GPU": 1.0}
    row = {"workers_per_trial": 2, "cpus_per_worker": 3.0, "gpus_per_worker": 0.5}
    assert queue.trial_demand(row, GPUS) == {"CPU": 6.0, "GPU": 1.0}
    assert queue.trial_demand(row | {"gpus_per_worker": 0.0}, GPUS)["GPU"] == 0.0


def test_concurrency_not_given_is_as_many_trials_as_the_cluster_fits():
    row = {"workers_per_trial": 1, "cpus_per_worker": 2.0, "gpus_per_worker": 0.0}
    assert queue.demand(row | {"max_concurrent_trials": None}, CPU_ONLY).max_concurrent == 4
    assert queue.demand(row | {"max_concurrent_trials": 3}, CPU_ONLY) == admission.Demand(
        {"CPU": 2.0, "GPU": 0.0}, 3
    )
    # A running sweep holds one trial times the concurrency it was admitted with.
    assert queue.holds(row | {"max_concurrent_trials": 3}, CPU_ONLY) == {"CPU": 6.0, "GPU": 0.0}


def test_quotas_priorities_and_counts_come_from_the_database(db):
    auth.add_user(db, "ada", gpu_quota=2, cpu_quota=16, priority=3)
    quotas, priority = queue.quotas(db)
    assert quotas.of("ada") == admission.Quota(gpus=2.0, cpus=16.0)
    assert quotas.of("nobody") == admission.Quota(auth.DEFAULT_GPU_QUOTA, auth.DEFAULT_CPU_QUOTA)
    assert priority == {"ada": 3}

    with db.begin() as conn:
        for i, status in enumerate([schema.QUEUED, schema.QUEUED, schema.RUNNING]):
            conn.execute(
                sa.insert(schema.sweeps).values(
                    name=f"s{i}", owner="ada", status=status, storage_path="/r",
                    folder_uri=f"/r/s{i}", submitted_at=time.time(),
                )
            )  # fmt: skip
    counts = queue.counts(db)
    assert counts == dict.fromkeys(schema.SWEEP_STATUSES, 0) | {"queued": 2, "running": 1}


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_tick_with_nothing_to_do_asks_nothing_of_ray(db):
    # No running sweep and no queued one: the pass reads the database only, so no job
    # runner is needed (None would fail on any call).
    done = queue.tick(db, None, {"CPU": 2.0}, {"CPU": 2.0}, now=time.time())
    assert done == queue.Tick()
