"""A tiny job that fails on purpose, for the failure tests: hangs, rank-dependent models, NaNs, full disks.

Used as ``job: {name: /path/to/tests/jobs_for_failures.py:FailingJob, ...}``. Every
fault is chosen in the job's config and happens at one call of ``training_step``
(counted per process, from 1): with ``train.accumulate=1`` call k is step k.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from jobs.base import Job
from tests.helpers import add_ballast

JOB_FILE = Path(__file__).resolve()
JOB_NAME = f"{JOB_FILE}:FailingJob"


class FailingJob(Job):
    @dataclass(frozen=True)
    class Config:
        samples: int = 64
        features: int = 4
        classes: int = 3
        ballast_mb: float = 0.0  # a frozen parameter of this size: checkpoints this big
        stall_rank: Optional[int] = None  # this rank sleeps forever at call stall_call
        stall_call: int = 0
        nan_rank: Optional[int] = None  # this rank's loss is NaN at call nan_call
        nan_call: int = 0
        rank_dependent_model: bool = False  # rank r's model has r extra outputs
        fsize_limit_call: int = 0  # rank 0 limits the size of files it writes from this call on
        fsize_limit_bytes: int = 1 << 20
        fsize_limit_after: Optional[str] = None  # ... once this file exists (an async write has finished)
        fail_in_constructor: bool = False

    def __init__(self, config, env):
        super().__init__(config, env)
        if config.fail_in_constructor:
            raise ValueError("the job's own constructor failed on purpose")
        self.calls = 0

    def build_model(self) -> nn.Module:
        c = self.config
        outputs = c.classes + (self.env.rank if c.rank_dependent_model else 0)
        model = nn.Sequential(nn.Linear(c.features, 8), nn.ReLU(), nn.Linear(8, outputs))
        add_ballast(model, c.ballast_mb)
        return model

    def build_datasets(self):
        c = self.config
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(c.samples, c.features, generator=generator)
        y = torch.arange(c.samples) % c.classes
        return TensorDataset(x, y), TensorDataset(x[:16], y[:16])

    def training_step(self, model: nn.Module, batch) -> torch.Tensor:
        c, rank = self.config, self.env.rank
        self.calls += 1
        if rank == c.stall_rank and self.calls == c.stall_call:
            while True:  # a hang in user code: a deadlock, a dead file system, ...
                time.sleep(3600)
        if rank == 0 and c.fsize_limit_call and self.calls == c.fsize_limit_call:
            deadline = time.monotonic() + 60
            while c.fsize_limit_after and not Path(c.fsize_limit_after).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            # The soft limit only: a file write past it fails with EFBIG (Python ignores SIGXFSZ).
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (c.fsize_limit_bytes, hard))
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        if rank == c.nan_rank and self.calls == c.nan_call:
            loss = loss * float("nan")
        return loss

    def evaluation_step(self, model: nn.Module, batch):
        x, y = batch
        return {"accuracy": ((model(x).argmax(1) == y).sum(), len(y))}
