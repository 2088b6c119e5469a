"""Moving nested batches to a device."""

from __future__ import annotations

from typing import Any

import torch


def to_device(batch: Any, device: torch.device, memory_format=None) -> Any:
    """Every tensor in a (nested) batch on ``device``; non-blocking, which pays off with pinned memory."""
    if isinstance(batch, torch.Tensor):
        if memory_format is not None and batch.dim() == 4:
            return batch.to(device, non_blocking=True, memory_format=memory_format)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device, memory_format) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device, memory_format) for value in batch)
    return batch


def count_samples(batch: Any) -> int:
    """The number of samples in a batch: the length of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return count_samples(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return count_samples(batch[0])
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")
