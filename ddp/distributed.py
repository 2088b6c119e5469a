"""Process group set-up and the few collectives the core needs.

With one process nothing is initialised and every helper degrades to the
identity, so the same training code runs alone or in many processes without
``if distributed:`` branches (as in detectron2's ``comm``).

The process group's store listens on the master address only (loopback for a
single-node run), not on every interface as torch's own store does: it has no
authentication, so it should be reachable only where the job's ranks are.
Under ``launch`` the agent (or the SLURM task of rank 0) hosts it and the
workers connect (``TORCHELASTIC_USE_AGENT_STORE``); otherwise rank 0 hosts
it here, and torch reuses it (``multi_tenant``).
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import logging
import os
import socket
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from ddp.env import DistEnv

log = logging.getLogger(__name__)

_hosted: list = []  # the store rank 0 hosts, kept alive for the life of the process


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


def bind_address(host: str) -> str | None:
    """The local address to listen on for ``host`` (the master address), or None if it is not this machine's."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return None
    for *_, address in infos:
        ip = address[0]
        if ipaddress.ip_address(ip).is_loopback:
            return "127.0.0.1"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((ip, 0))
            return ip
        except OSError:
            continue
    return None


def host_store(env: DistEnv, timeout_s: float, *, for_workers: bool = False) -> bool:
    """On rank 0: host the job's TCPStore on ``master_addr:master_port``, listening on that address only.

    Returns whether it did; when it cannot (the port is taken, e.g. by torchrun's own
    shared store, or the address is not this machine's), torch's default applies.
    ``for_workers``: hosted by a launcher process for the workers it starts (a SLURM task).
    """
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and not for_workers
    if not env.distributed or env.rank != 0 or _hosted or agent_hosts:
        return bool(_hosted)  # hosted already, here or by the launcher (which outlives the workers)
    address = bind_address(env.master_addr)
    if address is None:
        return False
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, env.master_port))
        listener.listen(4096)
    except OSError as err:
        listener.close()
        if err.errno != errno.EADDRINUSE:
            log.debug("cannot listen on %s:%d: %s", address, env.master_port, err)
        return False
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, True,
                          datetime.timedelta(seconds=timeout_s), wait_for_workers=False, multi_tenant=True,
                          master_listen_fd=listener.fileno())
    _hosted.append((store, listener))
    return True


def init_process_group(env: DistEnv, device: torch.device, backend: str | None = None,
                       timeout_s: float = 1800.0) -> None:
    """Join the job's process group; a no-op for one process."""
    if not env.distributed or dist.is_initialized():
        return
    host_store(env, timeout_s)
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_id"] = device  # lets NCCL bind eagerly and catch a wrong GPU early
    dist.init_process_group(
        backend=backend_for(device, backend),
        init_method=f"tcp://{_url_host(env.master_addr)}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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


def gather_rows(row: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's row of numbers, on every rank, in one all-reduce (no pickling)."""
    ranks = world_size()
    table = torch.zeros(ranks, len(row), dtype=torch.float64)
    table[rank()] = torch.tensor(row, dtype=torch.float64)
    return all_reduce_sum(table.to(device)).tolist()


def on_main_then_agree(action, is_main: bool, wrap_error):
    """``action()`` on rank 0 only; its result, or its error, on every rank at once.

    With a plain barrier, a failure on rank 0 (a full disk) would leave the
    others waiting in the barrier until the collective timeout; here every rank
    raises at once: rank 0 its own error, the others ``wrap_error(error_type_name, message)``.
    """
    error, result = None, None
    if is_main:
        try:
            result = action()
        except Exception as err:
            error = err
    failure = None if error is None else (type(error).__name__, str(error))
    failure, result = broadcast_object((failure, result))
    if error is not None:
        raise error
    if failure is not None:
        raise wrap_error(*failure)
    return result


@contextmanager
def process_group(env: DistEnv, device: torch.device, backend: str | None = None, timeout_s: float = 1800.0):
    init_process_group(env, device, backend, timeout_s)
    try:
        yield
    finally:
        destroy_process_group()
