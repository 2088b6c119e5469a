"""Parameter groups and the learning-rate schedule (``ddp.schedule``: cosine follows progress, warmup multiplies)."""

import io
import math

import pytest
import torch
from torch import nn

from ddp.config import OptimConfig, ScheduleConfig
from ddp.optim import build_optimizer, parameter_groups
from ddp.schedule import Schedule


def schedule(base_lr=0.1, **config):
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=base_lr)
    return Schedule(optimizer, ScheduleConfig(**config), base_lr)


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
    s = schedule(base_lr=0.1, name="cosine", warmup_steps=10, min_lr=0.01)  # the floor is 0.1 of the base
    assert s.factor(0, 0.0) == pytest.approx(0.1)  # the first of 10 warmup steps
    assert s.factor(9, 0.0) == pytest.approx(1.0)
    assert s.factor(10, 0.0) == pytest.approx(1.0)
    assert s.factor(60, 0.5) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the planned samples
    assert s.factor(4, 0.5) == pytest.approx(0.5 * (0.1 + 0.9 * 0.5))  # warmup multiplies the curve
    assert s.factor(110, 1.0) == pytest.approx(0.1)
    assert s.factor(500, 1.7) == pytest.approx(0.1)  # past the plan: stays at the floor


def test_cosine_follows_progress_not_the_step_count():
    # A run resumed on another world size has other step numbers for the same progress.
    s = schedule(name="cosine")
    assert s.factor(30, 0.25) == s.factor(3000, 0.25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_step_schedule():
    s = schedule(base_lr=1.0, name="step", step_size=5, gamma=0.5)
    assert [s.factor(step, step / 100) for step in (0, 4, 5, 10)] == [1.0, 1.0, 0.5, 0.25]


def test_plateau_lowers_the_rate_after_its_patience_and_not_below_the_floor():
    s = schedule(base_lr=1.0, name="plateau", patience=1, factor=0.5, min_lr=0.2)
    for epoch, loss in enumerate([1.0, 0.5, 0.6, 0.6]):  # improves, improves, then two bad evaluations
        s.observe({"val/loss": loss}, epoch)
    assert s.factor(0, 0.5) == pytest.approx(0.5)
    for epoch in range(4, 10):
        s.observe({"val/loss": 0.9}, epoch)
    assert s.factor(0, 0.5) == pytest.approx(0.2)  # 0.5 x 0.5 x 0.5 ... but never under min_lr
    restored = schedule(base_lr=1.0, name="plateau", patience=1, factor=0.5, min_lr=0.2)
    restored.load_state_dict(s.state_dict())
    assert restored.factor(0, 0.5) == s.factor(0, 0.5) and restored.plateau.best == 0.5


def test_schedule_drives_the_optimizer_and_its_state_is_plain():
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=0.5, weight_decay=0.01))
    assert len(optimizer.param_groups) == 2  # decayed and not decayed
    s = Schedule(optimizer, ScheduleConfig(name="cosine"), base_lr=0.5)
    lrs = []
    for step in range(4):
        s.update(step, progress=(step + 1) / 4)
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        assert all(group["lr"] == lr for group in optimizer.param_groups)
        lrs.append(lr)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs[1] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 2)))
    buffer = io.BytesIO()
    torch.save(s.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == s.state_dict()  # plain values only
