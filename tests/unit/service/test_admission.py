"""raygpt.service.admission: the queue's decisions (fair share, quotas, priority, what Ray
reports free) and the refusals at submit, as pure functions, with no Ray."""

from __future__ import annotations

import math
import random

import pytest

from raygpt.errors import UserError
from raygpt.service.admission import (
    Demand,
    QueuedSweep,
    Quota,
    Quotas,
    RunningSweep,
    check_submittable,
    decide,
)

ONE_GPU = {"CPU": 1.0, "GPU": 1.0}


def queued(sid, owner, *, priority=0, at=0.0, trial=None, most=1) -> QueuedSweep:
    return QueuedSweep(
        id=sid,
        owner=owner,
        priority=priority,
        submitted_at=at,
        demand=Demand(trial=trial or ONE_GPU, max_concurrent=most),
        name=sid,
    )


def quotas(gpus=4.0, cpus=64.0, **per_user: Quota) -> Quotas:
    return Quotas(default=Quota(gpus=gpus, cpus=cpus), per_user=per_user)


def test_one_gpu_quota_admits_the_user_who_holds_nothing_and_names_the_holder():
    running = [RunningSweep("a0", "alice", {"GPU": 1.0, "CPU": 1.0})]
    decision = decide(
        [queued("a1", "alice", at=1.0), queued("b1", "bob", at=2.0)],
        running,
        quotas(gpus=1),
        free={"CPU": 15.0, "GPU": 3.0},
        totals={"CPU": 16.0, "GPU": 4.0},
    )
    assert [a.sweep_id for a in decision.admit] == ["b1"]
    assert decision.admit[0].reserved == {"GPU": 1.0, "CPU": 1.0}
    assert decision.waiting == {
        "a1": "waiting: alice holds 1 of their 1 GPU, the sweep needs 1 at once"
    }


def test_fair_share_serves_the_owner_holding_less_of_their_quota_first():
    # alice holds more GPUs (2 vs 1) but less of her quota (2/8 vs 1/2): she goes first.
    running = [
        RunningSweep("a0", "alice", {"GPU": 2.0, "CPU": 2.0}),
        RunningSweep("b0", "bob", {"GPU": 1.0, "CPU": 1.0}),
    ]
    decision = decide(
        [queued("b1", "bob", at=1.0), queued("a1", "alice", at=2.0)],
        running,
        quotas(bob=Quota(gpus=2, cpus=64), alice=Quota(gpus=8, cpus=64)),
        free={"CPU": 20.0, "GPU": 1.0},
        totals={"CPU": 32.0, "GPU": 4.0},
    )
    assert [a.sweep_id for a in decision.admit] == ["a1"]
    assert decision.waiting["b1"] == (
        "waiting: the cluster has 0 GPUs free once alice's sweep a1 starts, "
        "the sweep needs 1 at once"
    )


def test_each_admission_counts_at_once_so_owners_alternate():
    decision = decide(
        [
            queued("a1", "alice", at=1.0),
            queued("a2", "alice", at=2.0),
            queued("a3", "alice", at=3.0),
            queued("b1", "bob", at=4.0),
        ],
        [],
        quotas(gpus=4),
        free={"CPU": 16.0, "GPU": 3.0},
        totals={"CPU": 16.0, "GPU": 3.0},
    )
    # a1 (tie at 0 held: older first), then bob (0 held), then alice again.
    assert [a.sweep_id for a in decision.admit] == ["a1", "b1", "a2"]
    assert decision.waiting["a3"].startswith("waiting: the cluster has 0 GPUs free once ")


def test_priority_then_age_orders_one_owners_sweeps_and_the_rest_wait_behind():
    decision = decide(
        [
            queued("low", "alice", priority=1, at=1.0),
            queued("high", "alice", priority=5, at=2.0),
            queued("high-later", "alice", priority=5, at=3.0),
        ],
        [],
        quotas(gpus=4),
        free={"CPU": 8.0, "GPU": 1.0},
        totals={"CPU": 8.0, "GPU": 4.0},
    )
    assert [a.sweep_id for a in decision.admit] == ["high"]
    assert decision.waiting["high-later"] == (
        "waiting: the cluster has 0 GPUs free once alice's sweep high starts, "
        "the sweep needs 1 at once"
    )
    assert decision.waiting["low"] == "waiting: alice's sweep high-later (priority 5) goes first"


def test_what_ray_reports_free_gates_admission_not_what_was_requested():
    # No sweep of the service runs, quota allows 8, but a job outside it holds 7 GPUs.
    decision = decide(
        [queued("s", "alice", trial={"CPU": 2.0, "GPU": 2.0})],
        [],
        quotas(gpus=8),
        free={"CPU": 30.0, "GPU": 1.0, "memory": 1e12},
        totals={"CPU": 32.0, "GPU": 8.0},
    )
    assert decision.admit == []
    assert decision.waiting == {
        "s": "waiting: the cluster has 1 GPU free, the sweep needs 2 at once"
    }


def test_a_reservation_not_yet_placed_still_counts_against_what_ray_reports_free():
    # bob's sweep was admitted with 4 GPUs a moment ago; Ray does not see its trials yet.
    decision = decide(
        [queued("a1", "alice", most=8)],
        [RunningSweep("b0", "bob", {"GPU": 4.0, "CPU": 4.0})],
        quotas(gpus=math.inf, cpus=math.inf),
        free={"CPU": 16.0, "GPU": 8.0},
        totals={"CPU": 16.0, "GPU": 8.0},
    )
    (admission,) = decision.admit
    assert admission.concurrency == 4
    assert admission.reserved == {"GPU": 4.0, "CPU": 4.0}


def test_concurrency_is_what_fits_both_quota_and_free_up_to_the_max():
    decision = decide(
        [queued("a1", "alice", most=8), queued("b1", "bob", most=2)],
        [],
        quotas(gpus=3),
        free={"CPU": 64.0, "GPU": 8.0},
        totals={"CPU": 64.0, "GPU": 8.0},
    )
    assert [(a.sweep_id, a.concurrency) for a in decision.admit] == [("a1", 3), ("b1", 2)]


def test_fractional_gpu_shares_add_up_as_ray_counts_them():
    # 10 x 0.1 is 1.0000000000000002 in floating point; Ray places ten 0.1-GPU trials on 1 GPU.
    decision = decide(
        [queued("s", "alice", trial={"CPU": 1.0, "GPU": 0.1}, most=10)],
        [],
        quotas(gpus=1),
        free={"CPU": 16.0, "GPU": 1.0},
        totals={"CPU": 16.0, "GPU": 1.0},
    )
    assert decision.admit[0].concurrency == 10
    assert decision.admit[0].reserved["GPU"] == pytest.approx(1.0)


def test_a_large_sweep_ahead_holds_back_what_it_needs_but_cpu_work_still_starts():
    decision = decide(
        [
            queued("big", "alice", at=1.0, trial={"CPU": 4.0, "GPU": 2.0}),
            queued("small", "bob", at=2.0),
            queued("cpu", "carol", at=3.0, trial={"CPU": 4.0}),
        ],
        [],
        quotas(gpus=4),
        free={"CPU": 12.0, "GPU": 1.0},
        totals={"CPU": 16.0, "GPU": 4.0},
    )
    assert [a.sweep_id for a in decision.admit] == ["cpu"]
    assert decision.waiting == {
        "big": "waiting: the cluster has 1 GPU free, the sweep needs 2 at once",
        "small": "waiting: alice's sweep big (priority 0) goes first",
    }


@pytest.mark.parametrize(
    ("alice_gpus", "admitted", "alice_reason", "bob_reason"),
    [
        # Blocked by her quota, alice's sweep holds nothing back: bob's starts.
        (4, ["b1"], "waiting: alice holds 3 of their 4 GPUs, the sweep needs 2 at once", None),
        # Blocked by what is free, it holds back the free GPU: bob's waits behind it.
        (
            8,
            [],
            "waiting: the cluster has 1 GPU free, the sweep needs 2 at once",
            "waiting: alice's sweep a1 (priority 0) goes first",
        ),
    ],
)
def test_only_a_sweep_waiting_for_free_resources_holds_them_back(
    alice_gpus, admitted, alice_reason, bob_reason
):
    # alice holds 3 (of 4 or 8), bob 7 of 8: alice's share is lower, so she is served first.
    decision = decide(
        [
            queued("a1", "alice", at=2.0, trial={"CPU": 1.0, "GPU": 2.0}),
            queued("b1", "bob", at=1.0),
        ],
        [
            RunningSweep("a0", "alice", {"GPU": 3.0, "CPU": 3.0}),
            RunningSweep("b0", "bob", {"GPU": 7.0, "CPU": 7.0}),
        ],
        quotas(alice=Quota(gpus=alice_gpus, cpus=64), bob=Quota(gpus=8, cpus=64)),
        free={"CPU": 20.0, "GPU": 1.0},
        totals={"CPU": 32.0, "GPU": 16.0},
    )
    assert [a.sweep_id for a in decision.admit] == admitted
    assert decision.waiting.get("a1") == alice_reason
    assert decision.waiting.get("b1") == bob_reason


def test_a_trial_over_a_quota_lowered_after_submit_says_it_cannot_start():
    decision = decide(
        [queued("s", "alice", trial={"CPU": 1.0, "GPU": 2.0})],
        [],
        quotas(gpus=1),
        free={"CPU": 8.0, "GPU": 4.0},
        totals={"CPU": 8.0, "GPU": 4.0},
    )
    assert decision.waiting["s"] == (
        "waiting: one trial needs 2 GPUs, more than alice's quota of 1 GPU: "
        "cancel it or ask for a larger quota"
    )


def test_every_queued_sweep_is_admitted_or_waits_and_admissions_stay_within_limits():
    rng = random.Random(0)
    for _ in range(300):
        owners = ["alice", "bob", "carol"][: rng.randint(1, 3)]
        limits = {o: Quota(gpus=rng.choice([0, 1, 2, 4]), cpus=rng.choice([2, 8])) for o in owners}
        running = [
            RunningSweep(f"r{i}", o, {"GPU": float(rng.randint(0, 1)), "CPU": 1.0})
            for i, o in enumerate(rng.choices(owners, k=rng.randint(0, 3)))
        ]
        queue = [
            queued(
                f"q{i}",
                rng.choice(owners),
                priority=rng.randint(0, 2),
                at=float(i),
                trial={"CPU": float(rng.randint(1, 2)), "GPU": rng.choice([0.0, 0.5, 1.0, 2.0])},
                most=rng.randint(1, 4),
            )
            for i in range(rng.randint(0, 6))
        ]
        totals = {"CPU": 16.0, "GPU": 4.0}
        free = {"CPU": float(rng.randint(0, 16)), "GPU": float(rng.randint(0, 4))}
        decision = decide(
            queue, running, Quotas(default=Quota(0, 0), per_user=limits), free, totals
        )

        admitted = [a.sweep_id for a in decision.admit]
        assert sorted(admitted + list(decision.waiting)) == sorted(s.id for s in queue)
        assert all(line.startswith("waiting: ") for line in decision.waiting.values())
        taken = {r: sum(a.reserved[r] for a in decision.admit) for r in ("CPU", "GPU")}
        service = {r: sum(s.holds[r] for s in running) for r in ("CPU", "GPU")}
        for r in ("CPU", "GPU"):
            assert taken[r] <= min(free[r], totals[r] - service[r]) + 1e-9
        for owner in owners:
            ids = {s.id for s in queue if s.owner == owner}
            mine = [a for a in decision.admit if a.sweep_id in ids]
            for r, limit in (("GPU", limits[owner].gpus), ("CPU", limits[owner].cpus)):
                got = sum(a.reserved[r] for a in mine)
                held = sum(s.holds[r] for s in running if s.owner == owner)
                # A sweep that takes none of a resource may start while its owner is over
                # that resource's quota; one that takes some stays within it.
                assert got == 0 or held + got <= limit + 1e-9


# --------------------------------------------------------------------------- submit


def test_check_submittable_passes_a_sweep_that_fits():
    check_submittable(
        "alice", Demand(ONE_GPU, max_concurrent=4), quotas(gpus=4), {"CPU": 8.0, "GPU": 4.0}
    )


@pytest.mark.parametrize(
    ("trial", "most", "limits", "totals", "fragments"),
    [
        (
            {"CPU": 1.0, "GPU": 2.0},
            4,
            quotas(gpus=4),
            {"CPU": 64.0, "GPU": 16.0},
            [
                "needs 8 GPUs at once (2 per trial x 4 concurrent trials)",
                "alice's quota of 4 GPUs",
                "--max-concurrent-trials to 2",
            ],
        ),
        (
            {"CPU": 1.0, "GPU": 8.0},
            1,
            quotas(gpus=4),
            {"CPU": 64.0, "GPU": 16.0},
            [
                "one trial of this sweep needs 8 GPUs, over alice's quota of 4 GPUs",
                "--gpus-per-trial",
            ],
        ),
        (
            {"CPU": 16.0, "GPU": 0.0},
            1,
            quotas(cpus=8),
            {"CPU": 64.0, "GPU": 16.0},
            ["needs 16 CPUs, over alice's quota of 8 CPUs", "--cpus-per-worker"],
        ),
        (
            {"CPU": 1.0, "GPU": 1.0},
            16,
            quotas(gpus=math.inf, cpus=math.inf),
            {"CPU": 64.0, "GPU": 8.0},
            ["needs 16 GPUs at once", "the cluster's 8 GPUs", "--max-concurrent-trials to 8"],
        ),
    ],
)
def test_check_submittable_refuses_naming_the_quota_and_the_numbers(
    trial, most, limits, totals, fragments
):
    with pytest.raises(UserError) as err:
        check_submittable("alice", Demand(trial, max_concurrent=most), limits, totals)
    text = str(err.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text


@pytest.mark.parametrize(
    ("trial", "most"),
    [({"GPU": 1.0}, 0), ({"GPU": -1.0}, 1), ({"CPU": math.nan}, 1), ({"GPU": 1.0}, 1.5)],
)
def test_check_submittable_refuses_a_bad_demand(trial, most):
    with pytest.raises(UserError):
        check_submittable("alice", Demand(trial, max_concurrent=most), quotas(), {"GPU": 8.0})
