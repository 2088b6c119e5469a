"""The work both sides of a benchmark do: datasets, models and step probes in plain torch.

``raw_train.py`` (the hand-written baseline) and ``workload_job.py`` (the same
work as a job of ours) both build their data and models here, so the two
train exactly the same thing: same tensors, same architecture, same initial
weights for the same seed. Nothing here imports the library.

Workloads:

* ``mlp``: 64 features -> 64 -> 10. A step is a few hundred microseconds, so
  any per-step overhead of the loop shows.
* ``cnn``: the job's ``small_cnn`` on 3x32x32 images; a step is tens of
  milliseconds of convolutions, so compute dominates.
* ``digits``: the demo: scikit-learn's 8x8 digits with a one-pixel random
  shift, ``small_cnn`` for 8x8 inputs.
"""

from __future__ import annotations

import json
import resource
import time

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

WORKLOADS = ("mlp", "cnn", "digits")
FEATURES, CLASSES = 64, 10


def make_model(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(inplace=True), nn.Linear(64, CLASSES))
    in_channels, stride = (3, 2) if kind == "cnn" else (1, 1)
    return nn.Sequential(  # jobs.models.small_cnn, written out
        nn.Conv2d(in_channels, 32, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, CLASSES),
    )


def make_dataset(kind: str, size: int) -> Dataset:
    """``size`` samples of the workload (digits: its 1,438 training images, ``size`` is ignored)."""
    if kind == "digits":
        return digits_train()
    generator = torch.Generator().manual_seed(1234)  # the same data in every process and run
    shape = (size, FEATURES) if kind == "mlp" else (size, 3, 32, 32)
    inputs = torch.randn(shape, generator=generator)
    teacher = torch.randn(inputs[0].numel(), CLASSES, generator=generator)
    labels = (inputs.flatten(1) @ teacher).argmax(1)  # learnable labels: the loss goes down
    return TensorDataset(inputs, labels)


class ShiftedDigits(Dataset):
    """As ``jobs.datasets.TensorImages`` with ``shift=1``: a random translation of up to a pixel."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        padded = torch.nn.functional.pad(image, (1, 1, 1, 1))
        dy, dx = torch.randint(0, 3, (2,)).tolist()
        return padded[:, dy : dy + 8, dx : dx + 8], int(self.labels[index])


def digits_train() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train = order[round(len(labels) * 0.2):]  # the demo's split: 20% held out with seed 0
    return ShiftedDigits(images[train], labels[train])


def memory_kb() -> dict[str, int]:
    """This process's resident memory now (VmRSS) and at its peak (VmHWM), in kB (Linux)."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount, _ = line.split()
                values[key[:-1].lower()] = int(amount)
    return values


class Probe:
    """Appends one JSON line per chosen step: the clock, this thread's CPU time, the loss, resident memory,
    and the process's minor page faults and context switches so far.

    Called right after the forward pass of each micro-step, by both sides, so
    the time between two probes covers whole steps of each loop. Only the
    chosen steps read the loss (a host sync) or touch the file.
    """

    def __init__(self, path: str, steps):
        self.path, self.steps, self.count = path, set(steps), 0

    def __call__(self, loss: torch.Tensor) -> None:
        self.count += 1
        if self.count in self.steps:
            usage = resource.getrusage(resource.RUSAGE_SELF)  # this process: page faults, context switches
            record = {"step": self.count, "clock": time.perf_counter(), "cpu": time.thread_time(), "time": time.time(),
                      "loss": loss.item(), "minflt": usage.ru_minflt, "switches": usage.ru_nvcsw + usage.ru_nivcsw,
                      **memory_kb()}
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def read_probes(path) -> dict[int, dict]:
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return {record["step"]: record for record in records}


def fastest_step_s(probes: dict[int, dict], first: int, last: int, window: int) -> float:
    """Seconds per step in the run's fastest window of ``window`` steps between the probed steps
    ``first`` and ``last``: other processes on the machine only ever add time."""
    clocks = [probes[step]["clock"] for step in range(first, last + 1, window)]
    return min(b - a for a, b in zip(clocks, clocks[1:])) / window
