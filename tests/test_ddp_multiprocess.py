"""Tier 3: real 2-process gloo runs of the training code, each rank reporting back to the test."""

import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ddp.config import load_config
from ddp.env import read_env
from tests.helpers import REPO, final_weights

pytestmark = pytest.mark.timeout(300)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_rank(rank, world_size, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _train(rank, world_size, port, config, run_dir):
    _as_rank(rank, world_size, port)
    from ddp.trainer import run_training

    run_training(config, run_dir, read_env())


def _initial_weights(rank, world_size, port, config, run_dir, out):
    """Record the bare model each rank built, before DDP's broadcast could hide a difference."""
    _as_rank(rank, world_size, port)
    import ddp.trainer as trainer

    real_wrap = trainer.wrap

    def recording_wrap(model, *args, **kwargs):
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.pt")
        return real_wrap(model, *args, **kwargs)

    trainer.wrap = recording_wrap
    trainer.run_training(config, run_dir, read_env())


def _evaluate(rank, world_size, port, out):
    _as_rank(rank, world_size, port)
    from torch.utils.data import TensorDataset

    from ddp import distributed
    from ddp.config import DataConfig
    from ddp.data import ShardSampler, make_loader
    from ddp.evaluation import evaluate

    device = torch.device("cpu")
    env = read_env()
    distributed.init_process_group(env, device)
    try:
        data = TensorDataset(torch.arange(7.0))  # 7 samples over 2 ranks: 4 + 3, no padding
        loader = make_loader(data, ShardSampler(7, env.rank, env.world_size), DataConfig(num_workers=0), 2,
                             seed=0, rank=env.rank, device=device)
        metrics = evaluate(torch.nn.Identity(), loader, lambda model, batch: {"mean": (batch[0].sum(), len(batch[0]))},
                           device, torch.autocast("cpu", enabled=False))
        torch.save(metrics, f"{out}/metrics{rank}.pt")
    finally:
        distributed.destroy_process_group()


def spawn(fn, world_size, *args):
    mp.start_processes(fn, args=(world_size, free_port(), *args), nprocs=world_size, start_method="spawn")


def mlp_config(tmp_path, name, batch_size, **train):
    config = load_config(REPO / "configs" / "demo.yaml", [
        f"run.dir={tmp_path}", f"run.name={name}", "job.model=small_mlp", f"data.batch_size={batch_size}",
        "data.num_workers=0", "optim.lr=0.1", "schedule.name=constant", "schedule.warmup_steps=0",
        "train.max_steps=20", "train.progress_bar=false", "checkpoint.every_steps=null",
    ])
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **train))


def test_two_processes_of_batch_b_equal_one_process_of_batch_2b(tmp_path):
    two = mlp_config(tmp_path, "two", batch_size=16)
    one = mlp_config(tmp_path, "one", batch_size=32)
    spawn(_train, 2, two, tmp_path / "two")
    spawn(_train, 1, one, tmp_path / "one")
    a, b = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    initial = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    assert initial["train_state"]["step"] == 20
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    # ...and the run really moved the weights.
    assert any(not torch.equal(a[k], v) for k, v in _fresh_mlp_weights(one).items())


def _fresh_mlp_weights(config):
    from ddp import rng
    from ddp.env import DistEnv
    from jobs.registry import make_job

    rng.seed_everything(config.run.seed)
    return make_job(config.job, DistEnv()).build_model().state_dict()


def test_every_rank_starts_from_the_same_weights(tmp_path):
    config = mlp_config(tmp_path, "init", batch_size=8, max_steps=1)
    config = dataclasses.replace(config, job={**config.job, "model": "small_cnn"})
    spawn(_initial_weights, 2, config, tmp_path / "init", str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_evaluation_counts_every_sample_exactly_once(tmp_path):
    spawn(_evaluate, 2, str(tmp_path))
    for rank in (0, 1):
        metrics = torch.load(tmp_path / f"metrics{rank}.pt")
        assert metrics == {"mean": sum(range(7)) / 7}
