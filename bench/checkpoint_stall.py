"""Benchmark: how long training stalls for a checkpoint, synchronous and asynchronous.

The state is what a checkpoint of a ~100 MB model holds: the model's weights,
SGD's momentum buffers (as much again), the loop's position and the random
generators. Each round measures, in this one process and on the same disk:

* the baseline: a plain ``torch.save(state, path)``, no fsync (what a training
  script without our guarantees would pay);
* ours, synchronous: ``CheckpointWriter.save`` with ``async_save=False``
  (temporary file, fsync, SHA-256, rename, completion marker, last.pt, pruning);
* ours, asynchronous: the time ``CheckpointWriter.save`` with ``async_save=True``
  blocks the caller (the copy to host memory); the background write is timed
  separately and reported, as is how much a busy training thread slows down
  while that write runs (the write shares the CPU and the GIL with it).

Target: the asynchronous stall at most 0.25 of the plain ``torch.save``.

    python -m bench.checkpoint_stall
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from torch import nn

from bench.harness import Scratch, compare, report, rounds_from_env
from ddp import rng
from ddp.checkpoint import CheckpointWriter

MODEL_MB = 100
TARGET_ASYNC = 0.25


def checkpoint_state(megabytes: int = MODEL_MB) -> dict:
    """A real model of ``megabytes`` of fp32 weights after one SGD step, as the trainer would save it."""
    width = 2048
    layers = max(1, round(megabytes * 2**20 / 4 / (width * width)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, width)).square().mean().backward()
    optimizer.step()
    return {
        "format": 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "train_state": {"epoch": 0, "step": 1, "consumed": 4, "best": None},
        "rng": [rng.capture()],
    }


def state_megabytes(state: dict) -> float:
    tensors = list(state["model"].values()) + [t for s in state["optimizer"]["state"].values() for t in s.values()
                                                if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def busy_work_seconds(steps: int = 30) -> float:
    """A stand-in for training steps: matrix products on the training thread."""
    a = torch.randn(512, 512)
    start = time.perf_counter()
    for _ in range(steps):
        a = torch.tanh(a @ a) * 0.5
    return time.perf_counter() - start


def main() -> None:
    rounds = rounds_from_env(3)
    state = checkpoint_state()
    print(f"checkpoint state: {state_megabytes(state):.0f} MB of tensors (model {MODEL_MB} MB + momentum)",
          flush=True)
    background: list[float] = []
    slowdown: list[float] = []
    with Scratch("checkpoint-stall") as scratch:
        plain_dir = scratch.path / "plain"
        plain_dir.mkdir()
        sync_writer = CheckpointWriter(scratch.path / "sync", keep_last=1, async_save=False)
        async_writer = CheckpointWriter(scratch.path / "async", keep_last=1, async_save=True)
        step = iter(range(1, 10**6))

        def plain() -> float:
            path = plain_dir / "state.pt"
            start = time.perf_counter()
            torch.save(state, path)
            seconds = time.perf_counter() - start
            path.unlink()
            return seconds

        def synchronous() -> float:
            start = time.perf_counter()
            sync_writer.save(state, next(step))
            return time.perf_counter() - start

        def asynchronous() -> float:
            alone = busy_work_seconds()
            start = time.perf_counter()
            async_writer.save(state, next(step))
            stall = time.perf_counter() - start
            during = busy_work_seconds()  # training goes on while the thread writes
            async_writer.wait()
            background.append(time.perf_counter() - start)
            slowdown.append(during / alone)
            return stall

        plain()  # warm the page cache and the allocator once, for every side alike
        compare(f"checkpoint stall, synchronous, {MODEL_MB} MB model", synchronous, plain, rounds=rounds,
                unit="s", target=float("inf"))
        compare(f"checkpoint stall, asynchronous, {MODEL_MB} MB model", asynchronous, plain, rounds=rounds,
                unit="s", target=TARGET_ASYNC)
        report("asynchronous checkpoint, background write",
               f"{statistics.median(background):.3g} s from save() to a complete file (median of {len(background)}); "
               f"compute on the training thread ran {statistics.median(slowdown):.2f}x as long while it wrote "
               f"({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
