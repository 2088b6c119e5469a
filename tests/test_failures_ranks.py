"""Ranks that disagree on what they train are stopped before the first step, with the difference named."""

from __future__ import annotations

import pytest
from torch import nn

from ddp.config import Config, RunConfig
from ddp.consistency import compare, fingerprint
from tests.helpers import run_launch, write_config
from tests.jobs_for_failures import JOB_NAME


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


@pytest.mark.timeout(120)
def test_a_model_that_depends_on_the_rank_is_refused(tmp_path):
    config = write_config(tmp_path, {
        "job": {"name": JOB_NAME, "rank_dependent_model": True},
        "run": {"name": "mismatch"},
        "data": {"batch_size": 8, "num_workers": 0},
        "train": {"progress_bar": False},
    })
    result = run_launch("local", "--cpu", "--nproc", "2", str(config), timeout=100)
    assert result.returncode == 1
    first = result.stderr.split("error: ", 1)[1].splitlines()[0]
    assert first.startswith("ranks disagree before the first step: rank 1 differs from rank 0 in the model "
                            "parameters: on rank 1, the model's parameter 2.weight has shape (4, 8) there and "
                            "(3, 8) on rank 0")
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "runs" / "mismatch").glob("checkpoints/*.pt"))  # no step was taken
