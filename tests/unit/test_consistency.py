"""Ranks that disagree on what they train are told apart, with the first difference named.

The same through `launch`, with real ranks: tests/e2e/test_rank_mismatch.py."""

from __future__ import annotations

from torch import nn

from ddp.config import Config, RunConfig
from ddp.consistency import compare, fingerprint


def prints(*models, configs=None, revisions=None, sizes=None):
    configs = configs or [Config()] * len(models)
    revisions = revisions or ["abc"] * len(models)
    sizes = sizes or [100] * len(models)
    return [fingerprint(c, m, train_size=n, revision=r) for c, m, r, n in zip(configs, models, revisions, sizes)]


def test_identical_ranks_agree():
    assert compare(prints(nn.Linear(4, 2), nn.Linear(4, 2), nn.Linear(4, 2))) is None


def test_a_shape_difference_names_the_rank_and_the_parameter():
    message = compare(prints(nn.Linear(4, 2), nn.Linear(4, 2), nn.Linear(4, 3)))
    assert "rank 2 differs from rank 0 in the model parameters" in message
    assert "parameter weight has shape (3, 4) there and (2, 4) on rank 0" in message


def test_an_extra_parameter_is_named():
    message = compare(prints(nn.Linear(4, 2, bias=False), nn.Linear(4, 2)))
    assert "the model has a parameter rank 0 lacks: bias" in message


def test_a_config_difference_names_the_first_key_and_both_values():
    other = Config(run=RunConfig(seed=7))
    message = compare(prints(nn.Linear(1, 1), nn.Linear(1, 1), nn.Linear(1, 1),
                             configs=[Config(), other, other]))
    assert "ranks 1, 2 differ from rank 0 in the config" in message
    assert "config key run.seed is 7 there and 0 on rank 0" in message


def test_the_code_revision_is_compared_before_the_model():
    message = compare(prints(nn.Linear(1, 1), nn.Linear(1, 2), revisions=["abc", "def"]))
    assert "in the code revision: on rank 1, code revision is 'def' there and 'abc' on rank 0" in message


def test_datasets_of_different_lengths_disagree():
    message = compare(prints(nn.Linear(1, 1), nn.Linear(1, 1), sizes=[100, 99]))
    assert "training set size is 99 there and 100 on rank 0" in message


def test_buffers_are_part_of_the_model_compared():
    with_stats = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    without = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, track_running_stats=False))
    message = compare(prints(with_stats, without))
    assert "rank 1 differs from rank 0 in the model parameters" in message
    assert "the model lacks rank 0's parameter 1.running_mean" in message
