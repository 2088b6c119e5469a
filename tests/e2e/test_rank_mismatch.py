"""Ranks that disagree on what they train are stopped before the first step, with the difference named.

The comparison itself, as pure functions: tests/unit/test_consistency.py.
"""

from __future__ import annotations

import pytest

from tests.support.helpers import run_launch, write_config
from tests.support.job import JOB_NAME


@pytest.mark.timeout(120)
def test_a_model_that_depends_on_the_rank_is_refused(tmp_path):
    config = write_config(tmp_path, {
        "job": {"name": JOB_NAME, "rank_dependent_model": True},
        "run": {"name": "mismatch"},
        "data": {"batch_size": 8, "num_workers": 0},
        "train": {"progress_bar": False},
    })
    result = run_launch("local", "--cpu", "--nproc", "2", str(config), timeout=100)
    assert result.returncode == 1, result.stderr
    first = result.stderr.split("error: ", 1)[1].splitlines()[0]
    # TestJob's MLP: rank 1's output layer (4) has one class more than rank 0's.
    assert first.startswith("ranks disagree before the first step: rank 1 differs from rank 0 in the model "
                            "parameters: on rank 1, the model's parameter 4.weight has shape (5, 16) there and "
                            "(4, 16) on rank 0"), first
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "runs" / "mismatch").glob("checkpoints/*.pt"))  # no step was taken
