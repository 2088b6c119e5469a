"""Real 2-rank gloo runs of the training code: data parallelism is the same training, every rank starts alike,
and distributed evaluation counts every sample once."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ddp.config import load_config
from tests.support.helpers import REPO, final_weights
from tests.support.ranks import run_ranks

pytestmark = pytest.mark.timeout(300)


def _train(rank, config, run_dir):
    from ddp.env import read_env
    from ddp.trainer import run_training
    from jobs.registry import make_job

    env = read_env()
    run_training(config, run_dir, env, make_job(config.job, env))


def _initial_weights(rank, config, run_dir):
    """The bare model each rank built, before DDP's broadcast could hide a difference."""
    import ddp.session

    built = {}
    real_wrap = ddp.session.wrap

    def recording_wrap(model, *args, **kwargs):
        built.update({k: v.clone() for k, v in model.state_dict().items()})
        return real_wrap(model, *args, **kwargs)

    ddp.session.wrap = recording_wrap
    _train(rank, config, run_dir)
    return built


def _evaluate(rank):
    from torch.utils.data import TensorDataset

    from ddp.data import ShardSampler
    from ddp.evaluation import evaluate
    from ddp.loader import make_loader
    from ddp.session import init

    with init(seed=0, device="cpu") as session:
        data = TensorDataset(torch.arange(7.0))  # 7 samples over 2 ranks: 4 + 3, no padding
        loader = make_loader(data, ShardSampler(7, session.rank, session.world_size), 2, seed=0, rank=session.rank)
        return evaluate(torch.nn.Identity(), loader, lambda model, batch: {"mean": (batch[0].sum(), len(batch[0]))},
                        session.device, torch.autocast("cpu", enabled=False))


def mlp_config(tmp_path, name, batch_size, **train):
    config = load_config(REPO / "configs" / "demo.yaml", [
        f"run.dir={tmp_path}", f"run.name={name}", "job.model=small_mlp", f"data.batch_size={batch_size}",
        "data.num_workers=0", "optim.lr=0.1", "schedule.name=constant", "schedule.warmup_steps=0",
        "train.max_steps=20", "train.progress_bar=false", "checkpoint.every_steps=null",
    ])
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **train))


def _fresh_mlp_weights(config):
    from ddp import rng
    from ddp.env import DistEnv
    from jobs.registry import make_job

    rng.seed_everything(config.run.seed)
    return make_job(config.job, DistEnv()).build_model().state_dict()


def test_two_processes_of_batch_b_equal_one_process_of_batch_2b(tmp_path):
    two = mlp_config(tmp_path, "two", batch_size=16)
    one = mlp_config(tmp_path, "one", batch_size=32)
    run_ranks(_train, 2, two, tmp_path / "two")
    run_ranks(_train, 1, one, tmp_path / "one")
    a, b = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    last = torch.load(tmp_path / "two" / "checkpoints" / "last.pt", weights_only=True)
    assert last["train_state"]["step"] == 20
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    # ...and the run really moved the weights.
    assert any(not torch.equal(a[k], v) for k, v in _fresh_mlp_weights(one).items())


def test_every_rank_starts_from_the_same_weights(tmp_path):
    config = mlp_config(tmp_path, "init", batch_size=8, max_steps=1)
    config = dataclasses.replace(config, job={**config.job, "model": "small_cnn"})
    rank0, rank1 = run_ranks(_initial_weights, 2, config, tmp_path / "init")
    assert rank0 and rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_evaluation_counts_every_sample_exactly_once():
    assert run_ranks(_evaluate, 2) == [{"mean": sum(range(7)) / 7}] * 2
