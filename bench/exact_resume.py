"""Benchmark 9: the cost of ``ddp.exact_resume`` past two ranks (the comm hook of ``ddp.buckets``).

4 gloo ranks (one thread each) train the benchmark MLP with DDP as ``ddp.model.wrap``
builds it, with the hook (ours) and without it (DDP's built-in all-reduce). A
round's figure is rank 0's fastest window of 50 steps after 20 warm-up steps:
other processes only ever add time.

    python -m bench.exact_resume
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench.harness import compare, rounds_from_env

RANKS = 4
WARMUP, STEPS, WINDOW = 20, 320, 50
TARGET = 1.05


def rank_main(rank: int, port: int, exact: bool, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(RANKS), LOCAL_WORLD_SIZE=str(RANKS),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from bench.workload import make_model
    from ddp.config import DDPConfig
    from ddp.env import read_env
    from ddp.model import wrap

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = wrap(make_model("mlp"), torch.device("cpu"), read_env(), ddp=DDPConfig(exact_resume=exact))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(32, 64, generator=generator), torch.randint(0, 10, (32,), generator=generator))
               for _ in range(16)]
    clocks = []
    for step in range(WARMUP + STEPS):
        x, y = batches[step % len(batches)]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step >= WARMUP and (step - WARMUP) % WINDOW == 0:
            clocks.append(time.perf_counter())
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(str(min(b - a for a, b in zip(clocks, clocks[1:])) / WINDOW))


def step_seconds(exact: bool) -> float:
    import torch.multiprocessing as mp

    from launcher.ports import free_port

    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "seconds")
        mp.start_processes(rank_main, args=(free_port(), exact, out), nprocs=RANKS, start_method="spawn")
        return float(Path(out).read_text()) * 1000


def main() -> None:
    compare(f"9. step time, {RANKS} gloo ranks, mlp: exact_resume hook vs DDP's own all-reduce",
            lambda: step_seconds(True), lambda: step_seconds(False), rounds=rounds_from_env(4), unit="ms/step",
            target=TARGET)


if __name__ == "__main__":
    main()
