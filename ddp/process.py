"""A process that must not outlive its parent: a worker whose ``launch`` was killed, a loader of a dead worker.

Linux's ``PR_SET_PDEATHSIG`` has the kernel send SIGKILL when the parent
exits, however it exits (``kill -9`` included). Elsewhere a daemon thread polls
the parent's pid instead. Torch-free.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int | None = None) -> None:
    """End this process with SIGKILL as soon as its parent is gone.

    ``expected_parent``: the pid the parent had when this process was started (for the race
    where the parent dies before this call: the process is then already orphaned).
    """
    parent = os.getppid() if expected_parent is None else expected_parent
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:  # died before the prctl took effect
                    os.kill(os.getpid(), signal.SIGKILL)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def die_with(pid: int) -> None:
    """End this process with SIGKILL as soon as process ``pid`` (not its parent) is gone.

    A loader process started by a fork server is the fork server's child, not the training
    process's, and the fork server lives as long as any process it forked: ``die_with_parent``
    alone would leave both behind a training process killed with -9. This watches ``pid``
    itself (a pidfd on Linux, else its pid every second).
    """
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        os.kill(os.getpid(), signal.SIGKILL)  # gone already
        return
    except (AttributeError, OSError):  # not Linux 5.3+
        handle = None

    def exists() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def watch() -> None:
        if handle is not None:
            select.select([handle], [], [])  # readable once the process has exited
        else:
            while exists():
                time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="process-watch", daemon=True).start()


def cpu_share(allowed: list[int], local_rank: int, local_world_size: int) -> list[int]:
    """This worker's part of the cores: contiguous, disjoint shares (workers beyond the cores share them)."""
    if local_world_size <= 1 or not allowed:
        return list(allowed)
    if len(allowed) < local_world_size:
        return [allowed[local_rank % len(allowed)]]
    size = len(allowed) // local_world_size
    return allowed[local_rank * size:(local_rank + 1) * size]


def gpu_numa_cpus(gpu_index: int) -> list[int] | None:
    """The CPUs of the NUMA node a GPU hangs off (from sysfs), or None when it cannot be told."""
    try:
        import torch

        props = torch.cuda.get_device_properties(gpu_index)
        address = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        with open(f"/sys/bus/pci/devices/{address}/numa_node") as handle:
            node = int(handle.read())
        if node < 0:
            return None
        with open(f"/sys/devices/system/node/node{node}/cpulist") as handle:
            return parse_cpu_list(handle.read())
    except (ImportError, AttributeError, OSError, ValueError, RuntimeError):
        return None


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,8,10-11"`` -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus = []
    for part in text.strip().split(","):
        if part:
            low, _, high = part.partition("-")
            cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def pin_to_share(local_rank: int, local_world_size: int, gpu: bool = False) -> list[int] | None:
    """Pin this worker (and the loader processes it will start) to its share of the cores.

    On a GPU node, the share comes from the cores of the GPU's NUMA node, split among the
    workers whose GPUs hang off that node; elsewhere from all the cores this process may use.
    Returns the share, or None where affinity cannot be set (macOS).
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if gpu:
        numa = gpu_numa_cpus(local_rank)
        if numa:
            near = [cpu for cpu in allowed if cpu in set(numa)]
            siblings = [rank for rank in range(local_world_size) if gpu_numa_cpus(rank) == numa]
            if near and local_rank in siblings:
                share = cpu_share(near, siblings.index(local_rank), len(siblings))
                os.sched_setaffinity(0, share)
                return share
    share = cpu_share(allowed, local_rank, local_world_size)
    if share:
        os.sched_setaffinity(0, share)
    return share
