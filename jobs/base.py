"""The interface between a job (what is trained) and the library (how it is trained).

A job builds the model, the datasets and the loss; the library runs the loop:
devices, DDP, samplers, precision, accumulation, checkpoints, logging. A job
never touches the process group, ``set_epoch`` or the optimizer.

A complete job of your own::

    from dataclasses import dataclass
    import torch
    from jobs.base import Job

    class Regression(Job):
        @dataclass(frozen=True)
        class Config:                     # the keys allowed in the config's `job:` section
            features: int = 8

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
            error = (model(x) - y).pow(2).sum()
            return {"mse": (error, len(x))}

and in the YAML: ``job: {name: mypackage.regression:Regression, features: 8}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from ddp.env import DistEnv

# name -> (summed value, number of samples); the library all-reduces both and divides.
Metrics = Mapping[str, "tuple[torch.Tensor | float, torch.Tensor | int]"]


class Job:
    @dataclass(frozen=True)
    class Config:
        """Override with the job's own keys (a frozen dataclass)."""

    def __init__(self, config: Any, env: DistEnv):
        self.config = config  # an instance of type(self).Config
        self.env = env

    def build_model(self) -> nn.Module:
        """The bare model; the library moves it to the device and wraps it in DDP."""
        raise NotImplementedError

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        """(train, validation). Items are whatever ``training_step`` expects; tensors in them
        are moved to the device by the library. Random augmentations must draw from
        torch / numpy / random's global generators (the library seeds them per sample)."""
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar loss of one micro-batch (the library scales, backpropagates and steps)."""
        raise NotImplementedError

    def evaluation_step(self, model: nn.Module, batch: Any) -> Metrics:
        """Sums and counts for one validation batch, e.g. ``{"accuracy": (correct, n)}``."""
        return {}

    def prepare_datasets(self) -> None:
        """Called once on rank 0 before the other ranks build their datasets (downloads go here)."""
