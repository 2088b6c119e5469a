"""Putting a job's bare model on its device: SyncBatchNorm, memory format, DDP, compile.

``wrap`` returns the model unchanged for one process and ``unwrap`` undoes
whatever ``wrap`` added, so checkpoints always hold the bare model's keys.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddp.buckets import keep_one_summation_order
from ddp.config import DDPConfig
from ddp.env import DistEnv


def convert_sync_batchnorm(model: nn.Module, device: torch.device, env: DistEnv) -> nn.Module:
    """BatchNorm -> SyncBatchNorm where torch supports it: CUDA with a process group.

    Torch's SyncBatchNorm refuses CPU modules under DDP ("SyncBatchNorm layers
    only work with GPU modules") and needs a process group, so elsewhere the
    same config runs with plain BatchNorm after one warning.
    """
    if device.type != "cuda" or not env.distributed:
        where = "on CPU" if device.type != "cuda" else "in a single process"
        warnings.warn(f"train.sync_bn=true has no effect {where}: SyncBatchNorm needs CUDA and more "
                      "than one process; training with ordinary BatchNorm", stacklevel=2)
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap(model: nn.Module, device: torch.device, env: DistEnv, *, sync_bn: bool = False,
         channels_last: bool = False, compile: bool = False, ddp: DDPConfig = DDPConfig()) -> nn.Module:
    """The bare model on ``device`` (channels-last if asked), in DDP with several ranks, compiled if asked."""
    if sync_bn:
        model = convert_sync_batchnorm(model, device, env)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    model = model.to(device=device, memory_format=memory_format)
    if env.distributed:
        model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=ddp.bucket_cap_mb,
            gradient_as_bucket_view=ddp.gradient_as_bucket_view,
            static_graph=ddp.static_graph,
            find_unused_parameters=ddp.find_unused_parameters,
        )
        if needs_one_summation_order(ddp, env):
            keep_one_summation_order(model)
    if compile:
        model = torch.compile(model)
    return model


def needs_one_summation_order(ddp: DDPConfig, env: DistEnv) -> bool:
    """Whether the first step must sum gradients as the later ones do (see ``ddp.buckets``).

    Only with more than 2 ranks (two ranks sum a + b either way) and only when DDP
    regroups its buckets: ``find_unused_parameters`` keeps the first layout for good.
    """
    if not ddp.exact_resume or env.world_size <= 2 or ddp.find_unused_parameters:
        return False
    if ddp.static_graph:
        warnings.warn("ddp.static_graph=true regroups DDP's gradient buckets on its own schedule, so with more "
                      "than 2 ranks a resumed run ends close to, not bitwise equal to, an uninterrupted one",
                      stacklevel=3)
        return False
    return True


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def ddp_module(model: nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper inside ``model`` (possibly under ``torch.compile``), if any."""
    while True:
        if isinstance(model, DistributedDataParallel):
            return model
        if not hasattr(model, "_orig_mod"):
            return None
        model = model._orig_mod


def parameter_signature(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the bare model's parameters and buffers, to compare across ranks."""
    bare = unwrap(model)
    return [(name, tuple(tensor.shape)) for name, tensor in bare.state_dict().items()]
