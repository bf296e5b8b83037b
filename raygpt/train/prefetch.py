"""The next step's batches, built while the device computes the current step.

On CUDA a background thread slices the token windows of step s + 1 into pinned
(page-locked) host memory while step s runs, so the host-to-device copy is a
non-blocking DMA and batch building leaves the critical path. On CPU there is
no device to overlap with (the model's ops use every core), so batches are
built in line.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def to_device(batches: list[Batch], device: torch.device) -> list[Batch]:
    """Micro-batches onto the device; non_blocking pays off for pinned host memory."""
    return [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in batches]


class BatchPrefetcher:
    """`get(step)` returns that step's micro-batches on the device.

    `make(step)` must be a pure function of the step (the sampler's batches are),
    so building ahead changes nothing about which windows a step sees.
    """

    def __init__(self, make: Callable[[int], list[Batch]], device: torch.device, last_step: int):
        self.make = make
        self.device = device
        self.last_step = last_step
        self.pin = device.type == "cuda"
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="raygpt-prefetch") if self.pin else None
        )
        self._ahead: tuple[int, Future] | None = None

    def _build(self, step: int) -> list[Batch]:
        batches = self.make(step)
        if self.pin:
            batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
        return batches

    def get(self, step: int) -> list[Batch]:
        if self._pool is None:
            host = self._build(step)
        else:
            if self._ahead is not None and self._ahead[0] == step:
                host = self._ahead[1].result()
            else:  # first step, or a jump (resume): build this one now
                host = self._build(step)
            nxt = step + 1
            self._ahead = (
                (nxt, self._pool.submit(self._build, nxt)) if nxt < self.last_step else None
            )
        return to_device(host, self.device)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
