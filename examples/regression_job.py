"""The same training as a Job: the core runs the loop (and everything around it) for you.

    launch local --cpu --nproc 2 examples/regression.yaml
    launch debug examples/regression.yaml --steps 20

Moving a script to a Job: keep the model, the data and the loss (build_model, build_datasets,
training_step), drop the loop. What that adds over library_script.py: the config file and its
checks (every key, type and range before any process starts), mixed precision, gradient
accumulation, clipping, LR schedules (continuous across a change of world size), evaluation that
counts every sample once, best.pt, early stopping, metrics.jsonl and TensorBoard, the watchdog,
straggler warnings, and sweeps of any key on SLURM.
"""

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from ddp import Job, setting


class Regression(Job):
    @dataclass(frozen=True)
    class Config:  # the keys allowed in the config's job: section, each checked when the config is read
        features: int = setting(8, "input features", at_least=1)
        hidden: int = setting(16, "hidden units", at_least=1)
        samples: int = setting(512, "training samples", at_least=1)

    def build_model(self):  # the bare model: the core moves it, wraps it in DDP, seeds it alike on every rank
        c = self.config
        return torch.nn.Sequential(torch.nn.Linear(c.features, c.hidden), torch.nn.ReLU(), torch.nn.Linear(c.hidden, 1))

    def build_datasets(self):  # (train, validation or None)
        x = torch.randn(self.config.samples, self.config.features, generator=torch.Generator().manual_seed(1))
        data = TensorDataset(x, x.sum(1, keepdim=True))
        return data, data

    def training_step(self, model, batch):  # the loss of one micro-batch
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    def evaluation_step(self, model, batch):  # sums and counts: the core adds them up over every rank
        x, y = batch
        return {"mse": ((model(x) - y).pow(2).sum(), len(x))}
