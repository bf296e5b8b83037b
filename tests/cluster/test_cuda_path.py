"""The compiled bf16 DDP path, the GPU path's nearest stand-in on CPU: two workers through
inductor, a rank killed and restarted, the same losses bit for bit as an uninterrupted
run (the rest of the CUDA path's CPU checks are in tests/unit/runtime/).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import step_rows, tiny_config

from raygpt.train import driver as train_driver
from raygpt.train.faults import FAIL_AT_ENV

CPU = torch.device("cpu")


# Inductor on CPU, bf16 autocast, two DDP ranks: the GPU path's compile, autocast, no_sync
# (two micro-batches per step) and checkpoint code, on a model that compiles in seconds.
COMPILED_DDP = dict(
    n_layer=1,
    n_head=2,
    n_embd=32,
    block_size=16,
    batch_size=2,
    tokens_per_step=2 * 16 * 2 * 2,  # 2 ranks x 2 micro-batches of 2 sequences
    num_workers=2,
    cpus_per_worker=1,
    compile="true",
    dtype="bfloat16",
    max_steps=6,
    lr_decay_steps=6,
    warmup_steps=2,
    eval_interval=3,
    eval_iters=1,
    eval_train=False,
    log_interval=3,
    in_process="false",
)


@pytest.mark.timeout(400)
def test_compiled_bf16_ddp_restart_equals_the_uninterrupted_run(
    ray_cluster, storage, monkeypatch, capfd
):
    whole = train_driver.run(tiny_config(storage, name="whole", **COMPILED_DDP))
    # Rank 1 dies after step 5; the group restarts from the step-3 checkpoint.
    monkeypatch.setitem(os.environ, FAIL_AT_ENV, "1:5")
    crash = train_driver.run(tiny_config(storage, name="crash", max_failures=1, **COMPILED_DDP))
    assert whole["step"] == crash["step"] == 6
    out = capfd.readouterr().out
    assert "2 rank(s) on cpu, bfloat16, compiled" in out and "resumed from step 3" in out
    rows = {name: step_rows(storage / name) for name in ("whole", "crash")}
    a, b = ({r["step"]: r["train_loss"] for r in rows[name]} for name in ("whole", "crash"))
    assert sorted(a) == sorted(b) == list(range(1, 7))
    # The same compiled kernels on the same batches, on CPU: bit for bit.
    assert a == b
    # Each attempt's first step compiled (seconds, against milliseconds for a step) and
    # is flagged: the restarted attempt's too.
    for name, firsts in (("whole", {1}), ("crash", {1, 4})):
        times = {r["step"]: r["step_time_ms"] for r in rows[name]}
        assert {r["step"] for r in rows[name] if r["tokens_per_sec"] is None} == firsts
        steady = max(t for s, t in times.items() if s not in firsts)
        assert all(times[s] > 20 * steady for s in firsts), times
    workers = json.loads((storage / "whole" / "run.json").read_text())["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
