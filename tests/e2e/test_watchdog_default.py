"""With the default settings (watchdog.timeout_s: auto), a stalled rank is ended, named, with every stack."""

from __future__ import annotations

import time

import pytest

from ddp.codes import EXIT_STALLED
from tests.support.helpers import run_launch, write_config
from tests.support.job import JOB_NAME

pytestmark = pytest.mark.timeout(400)


def test_a_rank_stalled_mid_run_is_ended_by_the_default_watchdog(tmp_path):
    config = write_config(tmp_path, {
        "job": {"name": JOB_NAME, "samples": 101, "faults": [{"kind": "stall", "rank": 1, "at": 12}]},
        "data": {"batch_size": 8, "num_workers": 0},
        "train": {"epochs": 3, "progress_bar": False},
        "checkpoint": {"every_steps": 4},
        "run": {"name": "stall"},
    })
    start = time.monotonic()
    result = run_launch("local", "--cpu", "--nproc", "2", str(config), cwd=tmp_path, timeout=350)
    took = time.monotonic() - start
    assert result.returncode == EXIT_STALLED, result.stderr
    assert "watchdog: no training progress for" in result.stderr
    assert "rank 1 (on " in result.stderr and "stalled at step 13" in result.stderr
    assert took < 200  # the floor (60 s) after the first steps, not the 900 s of start-up
    for rank in (0, 1):
        log = (tmp_path / "runs" / "stall" / "logs" / f"rank_{rank}.log").read_text()
        assert "watchdog: stacks of every thread" in log
