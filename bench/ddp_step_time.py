"""Benchmark 2: steady-state step time with 2 processes on gloo, ours against a raw torchrun script.

Ours is ``launch local --cpu --nproc 2``; the baseline is ``torchrun --standalone
--nproc-per-node 2 bench/raw_train.py``, with DDP and ``DistributedSampler``.
Both use one thread per process (torchrun's default for several processes,
and ours on this 2-core machine), the MLP workload (per-step overhead
dominates; the gradient all-reduce adds ~0.2 ms a step) and the same
measurement as benchmark 1: rank 0's fastest window of steps.

    python -m bench.ddp_step_time
    BENCH_DEVICE=cuda BENCH_GPUS=8 python -m bench.ddp_step_time   # launch local --gpus 8 against torchrun, NCCL
"""

from __future__ import annotations

import os

from bench.harness import DEVICE, rounds_from_env
from bench.step_time import compare_step_time

TARGET = 1.03


def main() -> None:
    nproc = int(os.environ.get("BENCH_GPUS", 2))
    backend = "NCCL" if DEVICE == "cuda" else "gloo"
    compare_step_time(f"2. step time, {nproc} processes on {backend}, mlp", "mlp", 200, 2200, 100, 0, nproc, TARGET,
                      rounds_from_env(4))


if __name__ == "__main__":
    main()
