"""Tier 1: parameter groups and learning-rate schedules."""

import math

import pytest
import torch
from torch import nn

from ddp.config import OptimConfig, ScheduleConfig
from ddp.optim import build_optimizer, build_schedule, lr_factor, parameter_groups


def test_biases_and_norm_layers_are_not_decayed():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(2), nn.LayerNorm(2))
    model(torch.zeros(1, 3, 5, 5))
    decay, no_decay = parameter_groups(model, 0.1, exclude_bias_and_norm=True)
    decayed = {id(p) for p in decay["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_one_group_when_asked():
    model = nn.Linear(2, 2)
    groups = parameter_groups(model, 0.1, exclude_bias_and_norm=False)
    assert len(groups) == 1 and len(groups[0]["params"]) == 2


def test_warmup_then_cosine_reaches_the_floor():
    config = ScheduleConfig(name="cosine", warmup_steps=10, min_lr=0.01)
    assert lr_factor(0, config, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, config, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, config, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(60, config, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, config, 110, 0.1) == pytest.approx(0.1)


def test_step_schedule():
    config = ScheduleConfig(name="step", step_size=5, gamma=0.5)
    assert [lr_factor(s, config, 100, 1.0) for s in (0, 4, 5, 10)] == [1.0, 1.0, 0.5, 0.25]


def test_scheduler_drives_the_optimizer_and_its_state_is_plain():
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=0.5, weight_decay=0.01))
    scheduler = build_schedule(optimizer, ScheduleConfig(name="cosine"), total_steps=4, base_lr=0.5)
    lrs = []
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs[1] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 2)))
    state = scheduler.state_dict()
    torch.save(state, "/dev/null")  # plain values only
    assert all(fn is None for fn in state["lr_lambdas"])
