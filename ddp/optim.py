"""Optimizer with decay / no-decay parameter groups, and warmup + cosine or step schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from ddp.config import OptimConfig, ScheduleConfig

# Parameters of these layers (and every bias) are not weight-decayed: decaying a
# norm's scale or a bias toward zero only fights the normalisation.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def parameter_groups(model: nn.Module, weight_decay: float, exclude_bias_and_norm: bool) -> list[dict]:
    if not exclude_bias_and_norm or weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, NORM_LAYERS) or name.endswith("bias") or param.ndim <= 1:
                no_decay.append(param)
            else:
                decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay, config.no_decay_bias_and_norm)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))


def lr_factor(step: int, config: ScheduleConfig, total_steps: int, base_lr: float) -> float:
    """The multiplier of the base learning rate after ``step`` optimizer steps."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.name == "constant":
        return 1.0
    if config.name == "step":
        return config.gamma ** ((step - config.warmup_steps) // max(1, config.step_size))
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr / base_lr if base_lr else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_schedule(optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int,
                   base_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    # A plain lambda: LambdaLR's state_dict then holds only plain values (last_epoch, base_lrs).
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config, total_steps, base_lr))
