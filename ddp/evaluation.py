"""Exact distributed evaluation: sums and counts are all-reduced over a padding-free sharding."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddp import distributed
from ddp.transfer import to_device


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, step_fn: Callable, device: torch.device, autocast) -> dict[str, float]:
    """Run ``step_fn(model, batch) -> {name: (sum, count)}`` over this rank's shard; return global means."""
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    try:
        for batch in loader:
            batch = to_device(batch, device)
            with autocast:
                metrics = step_fn(model, batch)
            for name, (total, count) in metrics.items():
                total = torch.as_tensor(total, dtype=torch.float64, device=device).detach()
                count = torch.as_tensor(count, dtype=torch.float64, device=device)
                sums[name] = sums.get(name, 0) + total
                counts[name] = counts.get(name, 0) + count
    finally:
        model.train(was_training)
    # A rank whose shard is empty has seen no names; agree on them before reducing.
    names = sorted(set().union(*distributed.all_gather_object(sorted(sums))))
    if not names:
        return {}
    stacked = torch.zeros(2, len(names), dtype=torch.float64, device=device)
    for column, name in enumerate(names):
        if name in sums:
            stacked[0, column] = sums[name]
            stacked[1, column] = counts[name]
    distributed.all_reduce_sum(stacked)
    values = stacked.cpu().tolist()
    return {name: values[0][i] / values[1][i] if values[1][i] else float("nan") for i, name in enumerate(names)}

