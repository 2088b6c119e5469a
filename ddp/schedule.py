"""The learning rate as a function of how far training has got, continuous across a change of world size.

``cosine`` follows the fraction of training done (samples seen over samples
planned, or steps over ``train.max_steps`` when that comes first), not a step
count fixed at the start: a run resumed on another number of workers (so with
another number of steps per epoch) continues the same curve from the same
point and ends at ``schedule.min_lr``. ``step`` and the warmup count optimizer
steps; ``plateau`` lowers the rate when a validation metric stops improving,
like ``torch.optim.lr_scheduler.ReduceLROnPlateau``, with its state in the
checkpoint. The state is plain values only.
"""

from __future__ import annotations

import logging
import math

import torch

from ddp.config import ScheduleConfig
from ddp.metric_watch import MetricWatch

log = logging.getLogger(__name__)


class Schedule:
    def __init__(self, optimizer: torch.optim.Optimizer, config: ScheduleConfig, base_lr: float):
        self.optimizer, self.config, self.base_lr = optimizer, config, base_lr
        self.plateau = MetricWatch(config.metric, config.mode, threshold=config.threshold)
        self.plateau_factor = 1.0

    def factor(self, step: int, progress: float) -> float:
        """The multiplier of the base rate after ``step`` optimizer steps, ``progress`` (0..1) of the run done."""
        c = self.config
        floor = c.min_lr / self.base_lr if self.base_lr else 0.0
        if c.name == "cosine":
            value = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
        elif c.name == "step":
            value = c.gamma ** (max(0, step - c.warmup_steps) // c.step_size)
        elif c.name == "plateau":
            value = max(self.plateau_factor, floor)
        else:
            value = 1.0
        if c.warmup_steps and step < c.warmup_steps:
            value *= (step + 1) / c.warmup_steps
        return value

    def update(self, step: int, progress: float) -> float:
        """Set the rate for the coming step; returns it."""
        lr = self.base_lr * self.factor(step, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def observe(self, metrics: dict, epoch: int) -> None:
        """After an evaluation: the plateau schedule's patience, and a reduction when it runs out."""
        c = self.config
        if c.name != "plateau" or self.plateau.observe(metrics, epoch) is not False:
            return
        if self.plateau.bad > c.patience:
            self.plateau_factor *= c.factor
            self.plateau.bad = 0
            log.warning("%s has not improved for %d evaluation(s): learning rate x %g -> %.4g", c.metric,
                        c.patience + 1, c.factor, max(self.base_lr * self.plateau_factor, c.min_lr))

    def state_dict(self) -> dict:
        return {"plateau_factor": self.plateau_factor, "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_factor = float(state.get("plateau_factor", 1.0))
        self.plateau.load_state_dict(state.get("plateau", {}))
