"""Process group set-up and the few collectives the library needs.

With one process nothing is initialised and every helper degrades to the
identity, so the same training code runs alone or in many processes without
``if distributed:`` branches (as in detectron2's ``comm``).
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from ddp.env import DistEnv


class DeviceError(RuntimeError):
    """The requested device is not there."""


def select_device(env: DistEnv, requested: str = "auto") -> torch.device:
    """CUDA device ``local_rank`` when there is one (or when asked), else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("train.device=cuda but this machine has no CUDA GPU; use train.device=cpu "
                          "(or launch with --cpu)")
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise DeviceError(f"local rank {env.local_rank} needs GPU {env.local_rank} but only {count} "
                          "are visible; launch at most that many workers per node")
    device = torch.device("cuda", env.local_rank)
    torch.cuda.set_device(device)
    return device


def backend_for(device: torch.device, requested: str | None = None) -> str:
    return requested or ("nccl" if device.type == "cuda" else "gloo")


def init_process_group(env: DistEnv, device: torch.device, backend: str | None = None,
                       timeout_s: float = 1800.0) -> None:
    """Join the job's process group; a no-op for one process."""
    if not env.distributed or dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_id"] = device  # lets NCCL bind eagerly and catch a wrong GPU early
    dist.init_process_group(
        backend=backend_for(device, backend),
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; the identity for one process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's object, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. "a signal arrived")."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([1 if flag else 0], device=device)
    return bool(all_reduce_max(tensor).item())


@contextmanager
def process_group(env: DistEnv, device: torch.device, backend: str | None = None, timeout_s: float = 1800.0):
    init_process_group(env, device, backend, timeout_s)
    try:
        yield
    finally:
        destroy_process_group()
