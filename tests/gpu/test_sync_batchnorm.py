"""SyncBatchNorm on CUDA under a process group (the CPU cases: tests/unit/test_model.py)."""

import pytest
import torch
from torch import nn

from ddp.env import DistEnv
from ddp.model import convert_sync_batchnorm
from launcher.ports import free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def bn_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))


def test_sync_bn_converts_on_cuda_under_a_process_group(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        env = DistEnv(world_size=2)  # conversion is decided by the job's size, not this group's
        model = bn_model()
        converted = convert_sync_batchnorm(model, torch.device("cuda", 0), env)
        layers = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(layers) == 2 and all(isinstance(m, nn.SyncBatchNorm) for m in layers)
    finally:
        dist.destroy_process_group()
