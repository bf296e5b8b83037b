"""Per-step loss, gradient norm and time, kept on the device and read back in batches.

Reading a device value (`.item()`) makes the host wait until the device has
finished everything queued so far, so reading every step's loss serialises host
and device once per step. The loop instead records each step's tensors here and
reads the whole window at log intervals, evaluations and reports: one wait and,
across DDP ranks, one all-reduce per window instead of per step.

A step's time runs from the end of the step before it to its own end, so it holds
everything the loop does per step, the host's work between updates (batches, the
learning rate, Python) included: tokens/s and MFU then read low, not high, when the
host is the bottleneck. After work that is not a step (an evaluation, a report, a
sample) the loop restarts the clock with `start_step`. On CUDA the ends are events
recorded on the stream (the device's own clock, no waiting); on CPU, where every op
finishes before the next Python line, they are host clock readings.

The first step of an attempt (`start_attempt`) also holds the compile and the
warm-up (allocator, kernel selection); its reading says so (`first`), and the loop
and the bench leave it out of throughput and MFU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class StepReading:
    step: int
    train_loss: float  # mean over ranks
    grad_norm: float  # mean over ranks (equal on all ranks after DDP's all-reduce)
    seconds: float  # slowest rank's step time: the one every rank waits for
    first: bool = False  # the attempt's first step: compile and warm-up included


@dataclass(slots=True)
class _Pending:
    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    start: object  # a CUDA event, or perf_counter seconds
    end: object
    first: bool


class StepStats:
    """Collects steps between readings; `read()` returns them in order, then forgets them."""

    def __init__(self, device: torch.device, world_size: int):
        self.device = device
        self.world_size = world_size
        self.cuda = device.type == "cuda"
        self._pending: list[_Pending] = []
        self._start: object = None
        self._first = True

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start_attempt(self) -> None:
        """The clock starts; the next step is the attempt's first (compile, warm-up)."""
        self._start = self._now()
        self._first = True

    def start_step(self) -> None:
        """The next step's time starts now, after work that is no step's (evaluation, report)."""
        self._start = self._now()

    def end_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Step `step` ended now; the next one's time starts here."""
        if self._start is None:
            raise RuntimeError("StepStats.end_step before start_attempt")
        end = self._now()
        self._pending.append(_Pending(step, loss, grad_norm, self._start, end, self._first))
        self._start, self._first = end, False

    def __len__(self) -> int:
        return len(self._pending)

    def read(self) -> list[StepReading]:
        """Wait for the pending steps, average across ranks, and return one reading each.

        Every rank must call this at the same steps (it all-reduces)."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        values = torch.stack(
            [torch.stack([p.loss.float(), p.grad_norm.float()]) for p in pending]
        ).to(torch.float64)
        if self.cuda:
            pending[-1].end.synchronize()
            seconds = [p.start.elapsed_time(p.end) / 1000.0 for p in pending]
        else:
            seconds = [p.end - p.start for p in pending]
        times = torch.tensor(seconds, dtype=torch.float64, device=values.device)
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= self.world_size
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
        rows = values.tolist()
        return [
            StepReading(p.step, loss, norm, secs, p.first)
            for p, (loss, norm), secs in zip(pending, rows, times.tolist(), strict=True)
        ]
