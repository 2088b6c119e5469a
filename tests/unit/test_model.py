"""Preparing a model: SyncBatchNorm conversion, wrapping, unwrapping (CPU; the CUDA case: tests/gpu)."""

import warnings

import pytest
import torch
from torch import nn

from ddp.config import DDPConfig
from ddp.env import DistEnv
from ddp.model import convert_sync_batchnorm, parameter_signature, unwrap, wrap


def bn_model():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(4, 1, 6, 6))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_()
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_()
            module.bias.data.uniform_()
            module.num_batches_tracked.fill_(7)
    return model


def test_sync_batchnorm_conversion_replaces_every_layer_and_keeps_its_state():
    model = bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # what convert_sync_batchnorm uses on CUDA
    layers = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(layers) == 2 and all(isinstance(m, nn.SyncBatchNorm) for m in layers)
    after = converted.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_sync_bn_on_cpu_is_skipped_with_one_warning_and_the_model_still_trains():
    model = bn_model()
    with pytest.warns(UserWarning, match="sync_bn=true has no effect on CPU") as record:
        same = convert_sync_batchnorm(model, torch.device("cpu"), DistEnv(world_size=2))
    assert len(record) == 1 and same is model
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in same.modules())
    same(torch.randn(4, 1, 6, 6)).sum().backward()


def test_wrap_is_the_identity_for_one_process_and_unwrap_undoes_compile_wrappers():
    model = nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped = wrap(model, torch.device("cpu"), DistEnv(), ddp=DDPConfig())
    assert wrapped is model and unwrap(wrapped) is model

    class Compiled(nn.Module):  # what torch.compile returns keeps the original as _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert unwrap(Compiled(model)) is model


def test_channels_last_is_applied():
    model = nn.Conv2d(3, 4, 3)
    wrapped = wrap(model, torch.device("cpu"), DistEnv(), channels_last=True)
    assert wrapped.weight.is_contiguous(memory_format=torch.channels_last)


def test_wrap_with_sync_bn_on_cpu_warns_once_and_keeps_the_model():
    model = bn_model()
    with pytest.warns(UserWarning, match="sync_bn=true has no effect on CPU") as record:
        wrapped = wrap(model, torch.device("cpu"), DistEnv(), sync_bn=True)
    assert len(record) == 1 and wrapped is model


def test_parameter_signature_lists_names_and_shapes():
    assert parameter_signature(nn.Linear(3, 2)) == [("weight", (2, 3)), ("bias", (2,))]
    # Buffers count too: ranks that disagree on BatchNorm's statistics shapes disagree on the model.
    assert ("1.running_mean", (4,)) in parameter_signature(bn_model())
