"""Running a function as N real ranks on the CPU (gloo) and collecting each rank's result.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` spawned processes with
torchrun's variables set, calls ``fn(rank, *args)`` in each, and returns the
results in rank order; a failing rank's traceback fails the test.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp

from launcher.ports import free_port


def _as_rank(rank: int, world_size: int, port: int, fn, args, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        result = ("ok", fn(rank, *args))
    except BaseException:
        result = ("error", traceback.format_exc())
    with open(Path(out) / f"rank_{rank}.pkl", "wb") as handle:
        pickle.dump(result, handle)


def run_ranks(fn, world_size: int, *args) -> list:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_as_rank, args=(world_size, free_port(), fn, args, out), nprocs=world_size,
                           start_method="spawn", join=True)
        results = []
        for rank in range(world_size):
            with open(Path(out) / f"rank_{rank}.pkl", "rb") as handle:
                status, value = pickle.load(handle)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
