"""The loss of fixed batches per split, the number every report and ASHA rung ranks by."""

from __future__ import annotations

import torch
import torch.distributed as dist

from raygpt.runtime import Runtime


@torch.no_grad()
def evaluate(model, batches_by_split, runtime: Runtime, world_size) -> dict[str, float]:
    """Mean loss over fixed batches per split, averaged across ranks.

    Losses stay on the device until one read at the end: one wait per evaluation,
    not one per batch."""
    model.eval()
    means = []
    for batches in batches_by_split.values():
        total = torch.zeros((), device=runtime.device)
        for x, y in batches:
            with runtime.autocast():
                _, loss = model(
                    x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
                )
            total += loss.float()
        means.append(total / len(batches))
    model.train()
    values = torch.stack(means).to(torch.float64)
    if world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= world_size
    return dict(zip(batches_by_split, values.tolist(), strict=True))
