"""Benchmark: how long training stalls for a checkpoint, synchronous and asynchronous.

A real ~100 MB model (an MLP of 2048-wide layers) trains with SGD and momentum
in this process; its checkpoint holds what the trainer's does: weights,
momentum buffers (as much again), the loop's position, the random generators.
Each round measures, on the same disk:

* the baseline: a plain ``torch.save(state, path)`` of that state, no fsync;
* ours, synchronous: ``CheckpointWriter.save`` with ``async_save=False``
  (temporary file, fsync, SHA-256, rename, completion marker, last.pt, pruning),
  which the training loop waits for entirely;
* ours, asynchronous: the time the training loop is blocked: in ``save()``
  (the copy of what the next forward pass changes, BatchNorm-like buffers)
  plus in ``before_update()`` before the next optimizer step, until the
  background thread has copied the weights and momentum (it does so while
  that step's forward and backward run, see ``CheckpointWriter.save``).

Reported besides: the training loop's whole extra time while the background
write runs (over as many steps without a checkpoint), which adds the steps'
slowdown from sharing the CPU with the write (copy, serialisation, SHA-256).

Target: the asynchronous stall at most 0.25 of the plain ``torch.save``.

    python -m bench.checkpoint_stall
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from bench.harness import Scratch, compare, report, rounds_from_env
from ddp import rng
from ddp.checkpoint import CheckpointWriter

MODEL_MB = 100
WIDTH = 2048
BATCH = 32
TARGET_ASYNC = 0.25


class Training:
    """A model of ``MODEL_MB`` MB of fp32 weights, its optimizer, and one training step."""

    def __init__(self):
        layers = max(1, round(MODEL_MB * 2**20 / 4 / (WIDTH * WIDTH)))
        torch.manual_seed(0)
        self.model = nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH))
                                     for _ in range(layers)])
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.inputs = torch.randn(BATCH, WIDTH)
        self.step_count = 0

    def step(self, writer: CheckpointWriter | None = None) -> float:
        """One step; returns the seconds it waited for an asynchronous checkpoint's copy."""
        loss = self.model(self.inputs).square().mean()
        loss.backward()
        waited = time.perf_counter()
        if writer is not None:
            writer.before_update()  # as the trainer does before every optimizer step
        waited = time.perf_counter() - waited
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return waited

    def state(self) -> dict:
        return {
            "format": 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "train_state": {"epoch": 0, "step": self.step_count, "consumed": 0, "best": None},
            "rng": [rng.capture()],
        }

    def deferrable(self) -> frozenset[int]:
        tensors = list(self.model.parameters()) + [v for s in self.optimizer.state.values() for v in s.values()
                                                   if isinstance(v, torch.Tensor)]
        return frozenset(t.untyped_storage().data_ptr() for t in tensors)

    def megabytes(self) -> float:
        state = self.state()
        tensors = list(state["model"].values()) + [v for s in state["optimizer"]["state"].values()
                                                   for v in s.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def step_seconds(training: Training, steps: int = 3) -> float:
    """A step's time without checkpoints: the fastest of a few (load only ever adds)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        training.step()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    rounds = rounds_from_env(3)
    training = Training()
    training.step()  # creates the momentum buffers
    print(f"checkpoint: {training.megabytes():.0f} MB of tensors (a {MODEL_MB} MB model and its momentum); "
          f"a training step takes {step_seconds(training):.3f} s here", flush=True)
    details: list[str] = []
    overall: list[float] = []
    with Scratch("checkpoint-stall") as scratch:
        (scratch.path / "plain").mkdir()
        sync_writer = CheckpointWriter(scratch.path / "sync", keep_last=1, async_save=False)
        async_writer = CheckpointWriter(scratch.path / "async", keep_last=1, async_save=True)

        def plain() -> float:
            path = scratch.path / "plain" / "state.pt"
            start = time.perf_counter()
            torch.save(training.state(), path)
            seconds = time.perf_counter() - start
            path.unlink()
            return seconds

        def synchronous() -> float:
            start = time.perf_counter()
            sync_writer.save(training.state(), training.step_count)
            return time.perf_counter() - start

        def asynchronous() -> float:
            step = step_seconds(training)
            start = time.perf_counter()
            async_writer.save(training.state(), training.step_count, deferrable=training.deferrable())
            returned = time.perf_counter() - start
            steps, waited = 0, 0.0
            while async_writer.writing or steps == 0:
                waited += training.step(async_writer)
                steps += 1
            async_writer.wait()
            total = time.perf_counter() - start
            overall.append(max(total - steps * step, 0.0))
            details.append(f"save() {returned * 1e3:.1f} ms + before_update() {waited * 1e3:.1f} ms; the write "
                           f"took {total:.2f} s over {steps} steps of {step:.3f} s")
            return returned + waited

        plain()  # warm the page cache and the allocator once, for every side alike
        compare(f"checkpoint stall, synchronous, {MODEL_MB} MB model", synchronous, plain, rounds=rounds,
                unit="s", target=float("inf"))
        compare(f"checkpoint stall, asynchronous, {MODEL_MB} MB model", asynchronous, plain, rounds=rounds,
                unit="s", target=TARGET_ASYNC)
        report("asynchronous checkpoint, per round", "; ".join(details))
        report("asynchronous checkpoint, whole extra training time while it writes",
               f"median {statistics.median(overall):.3f} s ({len(overall)} rounds): the blocked time above plus "
               "the steps' slowdown from sharing the CPU with the write")
    print("  (synchronous has no target: it is what durability costs, fsync and checksum included)")


if __name__ == "__main__":
    main()
