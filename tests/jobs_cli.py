"""Small jobs used by the end-to-end tests of the `launch` command."""

import os
from dataclasses import dataclass

import torch

from jobs.base import Job


class Regression(Job):
    """The README's bring-your-own-job example, verbatim in spirit."""

    @dataclass(frozen=True)
    class Config:
        features: int = 8
        fail_on_rank: int = -1  # raise in training_step on this rank at fail_at_step
        fail_at_step: int = 3
        breakpoint_file: str = ""  # write the pid here and stop in the debugger once

    def build_model(self):
        return torch.nn.Linear(self.config.features, 1)

    def build_datasets(self):
        x = torch.randn(256, self.config.features, generator=torch.Generator().manual_seed(0))
        data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
        return data, data

    def training_step(self, model, batch):
        self._steps = getattr(self, "_steps", 0) + 1
        if self.env.rank == self.config.fail_on_rank and self._steps == self.config.fail_at_step:
            raise ValueError(f"rank {self.env.rank} exploded at step {self._steps}")
        if self.config.breakpoint_file and self._steps == 1:
            with open(self.config.breakpoint_file, "w") as handle:
                handle.write(str(os.getpid()))
            breakpoint()
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    def evaluation_step(self, model, batch):
        x, y = batch
        return {"mse": ((model(x) - y).pow(2).sum(), len(x))}
