"""Mixed precision without branches in the loop: an autocast context and a scaler that may be off."""

from __future__ import annotations

from contextlib import nullcontext

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Enabled only for fp16, where small gradients underflow; bf16 has fp32's range."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
