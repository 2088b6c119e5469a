"""The benchmark workloads as a job of ours: ``job: {name: bench.workload_job:Workload, kind: mlp}``.

The job builds exactly what ``raw_train.py`` builds (both use ``bench.workload``)
and probes the same point of each step, so ours and the baseline are measured alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from bench import workload
from jobs.base import Job


class Workload(Job):
    @dataclass(frozen=True)
    class Config:
        kind: str = "mlp"  # mlp, cnn or digits (see bench.workload)
        size: int = 4096
        probe_file: str | None = None
        probe_steps: tuple = ()

    def __init__(self, config, env):
        super().__init__(config, env)
        self.probe = (workload.Probe(config.probe_file, config.probe_steps)
                      if config.probe_file and env.is_main else None)

    def build_model(self):
        return workload.make_model(self.config.kind)

    def build_datasets(self):
        return workload.make_dataset(self.config.kind, self.config.size), None

    def training_step(self, model, batch):
        images, labels = batch
        loss = F.cross_entropy(model(images), labels)
        if self.probe:
            self.probe(loss)
        return loss
