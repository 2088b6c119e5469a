"""The core's contract with what it trains: a job builds the model, the data and the loss; the core runs the loop.

The core is handed a job object and never looks one up by name (``jobs.registry``
does that, for the launcher). A complete job::

    from dataclasses import dataclass
    import torch
    from ddp import Job, setting

    class Regression(Job):
        @dataclass(frozen=True)
        class Config:                     # the keys allowed in the config's `job:` section
            features: int = setting(8, "input features", at_least=1)

        def build_model(self):
            return torch.nn.Linear(self.config.features, 1)

        def build_datasets(self):
            x = torch.randn(512, self.config.features, generator=torch.Generator().manual_seed(0))
            data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
            return data, data             # train, validation (or None)

        def training_step(self, model, batch):
            x, y = batch
            return torch.nn.functional.mse_loss(model(x), y)

        def evaluation_step(self, model, batch):
            x, y = batch
            return {"mse": ((model(x) - y).pow(2).sum(), len(x))}

A job never touches process groups, samplers, ``set_epoch`` or the optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from ddp.env import DistEnv

class JobError(RuntimeError):
    """The job could not be found, constructed or used (an empty training set)."""


# name -> (summed value, number of samples); the core all-reduces both and divides.
Metrics = Mapping[str, "tuple[torch.Tensor | float, torch.Tensor | int]"]


class Job:
    @dataclass(frozen=True)
    class Config:
        """Override with the job's own keys: a frozen dataclass, its fields declared with ``ddp.setting``."""

    def __init__(self, config: Any, env: DistEnv):
        self.config = config  # an instance of type(self).Config
        self.env = env

    @classmethod
    def preflight(cls, config: Any) -> None:
        """Cheap checks in the launching process, before any worker starts (e.g. that data folders exist).

        Raise ``ddp.ConfigError`` with what to do. Runs on the machine that launches:
        for SLURM, the data may be visible only to the compute nodes, so it is not called there.
        """

    def build_model(self) -> nn.Module:
        """The bare model; the core moves it to the device and wraps it in DDP."""
        raise NotImplementedError

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        """(train, validation). Items are whatever ``training_step`` expects; tensors in them
        are moved to the device by the core. Random augmentations must draw from
        torch / numpy / random's global generators (the core seeds them per sample)."""
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss of one micro-batch (the core scales, backpropagates and steps)."""
        raise NotImplementedError

    def evaluation_step(self, model: nn.Module, batch: Any) -> Metrics:
        """Sums and counts for one validation batch, e.g. ``{"accuracy": (correct, n)}``."""
        return {}

    def prepare_datasets(self) -> None:
        """Called once on rank 0 before the other ranks build their datasets (downloads go here)."""
