"""A job for the SLURM tests whose steps take a set time, so a run outlasts SLURM's warning, and can fail.

Used through ``job: {name: /path/to/tests/slurm_jobs.py:SlowJob, step_sleep_s: 0.1}``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from jobs.base import Job


class SlowJob(Job):
    """Linear regression on fixed data; each training step also sleeps ``step_sleep_s``."""

    @dataclass(frozen=True)
    class Config:
        samples: int = 256
        features: int = 4
        step_sleep_s: float = 0.1
        fail_at_step: int = -1  # raise in this training step (counted from the start of each run)

    def build_model(self) -> nn.Module:
        return nn.Linear(self.config.features, 1)

    def build_datasets(self):
        x = torch.randn(self.config.samples, self.config.features, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), None

    def training_step(self, model: nn.Module, batch) -> torch.Tensor:
        self._steps = getattr(self, "_steps", 0) + 1
        if self._steps == self.config.fail_at_step:
            raise RuntimeError(f"injected failure at step {self._steps}")
        time.sleep(self.config.step_sleep_s)
        x, y = batch
        return F.mse_loss(model(x), y)
