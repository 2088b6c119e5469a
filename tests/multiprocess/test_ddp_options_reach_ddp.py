"""DDP's options (bucket_cap_mb, gradient_as_bucket_view, static_graph, find_unused_parameters) reach DDP and
train like the defaults: 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from ddp.config import load_config
from tests.support.helpers import REPO, final_weights
from tests.support.ranks import run_ranks

pytestmark = pytest.mark.timeout(300)


def mlp_config(tmp_path, name, *overrides):
    return load_config(REPO / "configs" / "demo.yaml", [
        f"run.dir={tmp_path}", f"run.name={name}", "job.model=small_mlp", "data.batch_size=16",
        "data.num_workers=0", "optim.lr=0.1", "schedule.name=constant", "schedule.warmup_steps=0",
        "train.max_steps=6", "train.progress_bar=false", "checkpoint.every_steps=null", *overrides,
    ])


def _train_rank(rank, config, run_dir):
    """Train as one of the ranks; returns what DDP was actually built with."""
    import ddp.session
    from ddp.env import read_env
    from ddp.trainer import run_training
    from jobs.registry import make_job

    built = {}
    real_wrap = ddp.session.wrap

    def recording_wrap(*args, **kwargs):
        model = real_wrap(*args, **kwargs)
        built.update(bucket_bytes_cap=model.bucket_bytes_cap, gradient_as_bucket_view=model.gradient_as_bucket_view,
                     static_graph=model.static_graph, find_unused_parameters=model.find_unused_parameters)
        return model

    ddp.session.wrap = recording_wrap
    env = read_env()
    run_training(config, run_dir, env, make_job(config.job, env))
    return built


def train_two_processes(config, run_dir):
    options = run_ranks(_train_rank, 2, config, run_dir)
    assert options[0] == options[1]
    return options[0], final_weights(run_dir)


def assert_close_weights(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol)


@pytest.fixture(scope="module")
def ddp_defaults(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp-defaults")
    return train_two_processes(mlp_config(tmp_path, "defaults"), tmp_path / "defaults")


@pytest.mark.parametrize("option, value, expected", [
    ("bucket_cap_mb", 0.001, ("bucket_bytes_cap", 1048)),  # a bucket per parameter
    ("gradient_as_bucket_view", False, ("gradient_as_bucket_view", False)),
    ("static_graph", True, ("static_graph", True)),
    ("find_unused_parameters", True, ("find_unused_parameters", True)),
])
def test_each_ddp_option_reaches_ddp_and_trains_like_the_defaults(tmp_path, ddp_defaults, option, value, expected):
    default_options, default_weights = ddp_defaults
    assert default_options[expected[0]] != expected[1]  # the option changes something
    config = mlp_config(tmp_path, option, f"ddp.{option}={value}")
    assert getattr(config.ddp, option) == value
    options, weights = train_two_processes(config, tmp_path / option)
    assert options[expected[0]] == expected[1]
    assert_close_weights(weights, default_weights, atol=1e-6)
