"""A rank made slow on purpose is named once, with its host and how much slower, in the log and in metrics.jsonl."""

from __future__ import annotations

import socket

import pytest

from tests.support.helpers import metrics, run_launch, write_config
from tests.support.job import JOB_NAME

pytestmark = pytest.mark.timeout(180)


def straggler_config(tmp_path, name, slow_s):
    return write_config(tmp_path, {
        "job": {"name": JOB_NAME, "model": "linear", "samples": 96, "features": 4, "slow_rank": 2, "slow_s": slow_s},
        "run": {"name": name},
        "data": {"batch_size": 4, "num_workers": 0},  # 96 samples, 3 ranks: 8 steps per epoch
        "train": {"epochs": 3, "progress_bar": False, "log_every": 2},
        "watchdog": {"straggler_factor": 1.5, "straggler_windows": 3},
        "checkpoint": {"every_steps": None},
    }, name=f"{name}.yaml")


def test_a_slow_rank_is_named_once_with_its_host_and_slowdown(tmp_path):
    result = run_launch("local", "--cpu", "--nproc", "3", str(straggler_config(tmp_path, "slow", 0.05)),
                        cwd=tmp_path, timeout=150)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "runs" / "slow" / "logs" / "rank_0.log").read_text()
    warnings = [line for line in log.splitlines() if "straggler:" in line]
    assert len(warnings) == 1, log  # named once, not at every window
    assert f"rank 2 on {socket.gethostname()}" in warnings[0]
    named = [record for record in metrics(tmp_path / "runs" / "slow") if "straggler/rank" in record]
    assert [record["straggler/rank"] for record in named] == [2]
    assert named[0]["straggler/slowdown"] > 1.5


def test_ranks_at_the_same_speed_name_no_one(tmp_path):
    result = run_launch("local", "--cpu", "--nproc", "3", str(straggler_config(tmp_path, "even", 0.0)),
                        cwd=tmp_path, timeout=150)
    assert result.returncode == 0, result.stderr
    assert "straggler:" not in (tmp_path / "runs" / "even" / "logs" / "rank_0.log").read_text()
    assert not [record for record in metrics(tmp_path / "runs" / "even") if "straggler/rank" in record]
