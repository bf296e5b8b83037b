"""Fault injection, for the reliability tests and for drills on a real cluster."""

from __future__ import annotations

import os
import time

# Fault injection for the reliability tests and for drills on a real cluster:
# RAYGPT_FAIL_AT="RANK:STEP[:MODE[:OPTIMIZER]]" makes that rank fail after STEP
# updates, once: a run resumed from a checkpoint does not fail again. MODE is
# "exit" (the process dies abruptly, as on a crash or OOM kill; default), "raise"
# (the loop raises, as on a bad batch) or "stall" (the rank stops for STALL_S, as on
# a hung filesystem, so a drill can kill the driver while a trial is surely mid-run);
# OPTIMIZER limits it to runs of that optimizer, so one trial of a sweep can fail
# while the others go on.
FAIL_AT_ENV = "RAYGPT_FAIL_AT"
STALL_S = 300.0


def maybe_inject_fault(rank: int, step: int, resumed: bool, optimizer: str) -> None:
    spec = os.environ.get(FAIL_AT_ENV)
    if not spec or resumed:
        return
    parts = spec.split(":")
    fail_rank, fail_step = parts[0], parts[1]
    mode = parts[2] if len(parts) > 2 else "exit"
    only_optimizer = parts[3] if len(parts) > 3 else ""
    if rank != int(fail_rank) or step != int(fail_step):
        return
    if only_optimizer and only_optimizer != optimizer:
        return
    print(f"[raygpt] fault injection: rank {rank} fails ({mode}) at step {step}", flush=True)
    if mode == "raise":
        raise RuntimeError(f"injected fault at step {step} on rank {rank}")
    if mode == "stall":
        time.sleep(STALL_S)
        return
    os._exit(1)
