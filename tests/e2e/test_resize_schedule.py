"""A resume on another number of workers continues the learning rate's curve: no jump, and it ends at min_lr."""

from __future__ import annotations

import json

import pytest

from ddp.codes import EXIT_RESUMABLE
from tests.support.helpers import run_launch, write_config
from tests.support.job import JOB_NAME

pytestmark = pytest.mark.timeout(300)


def lr_by_step(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["train/lr"] for record in records if "train/lr" in record}


@pytest.mark.parametrize("after", [1, 3])
def test_the_learning_rate_is_continuous_across_a_resize_and_ends_at_min_lr(tmp_path, after):
    markers = tmp_path / "markers"
    markers.mkdir()
    config = write_config(tmp_path, {
        "job": {"name": JOB_NAME, "samples": 480, "marker_dir": str(markers),
                "faults": [{"kind": "signal", "rank": 0, "at": 40, "signal": "SIGTERM"}]},
        "data": {"batch_size": 8, "num_workers": 0},
        "optim": {"lr": 0.1},
        "schedule": {"name": "cosine", "warmup_steps": 5, "min_lr": 0.001},
        "train": {"epochs": 2, "log_every": 1, "progress_bar": False, "stop_check_s": 0},
        "checkpoint": {"every_steps": 10},
        "run": {"name": "resize"},
    })
    first = run_launch("local", "--cpu", "--nproc", "2", str(config), cwd=tmp_path)
    assert first.returncode == EXIT_RESUMABLE, first.stderr
    run_dir = tmp_path / "runs" / "resize"
    before = lr_by_step(run_dir)
    stop_step = max(before)
    second = run_launch("resume", "--cpu", "--nproc", str(after), str(run_dir), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    lrs = lr_by_step(run_dir)
    steps = sorted(lrs)
    assert steps == list(range(1, len(steps) + 1))  # every step once, none twice
    changes = [abs(lrs[s + 1] - lrs[s]) for s in steps[:-1]]
    largest_before = max(abs(before[s + 1] - before[s]) for s in range(6, stop_step))  # after the warmup
    at_resume = abs(lrs[stop_step + 1] - lrs[stop_step])
    # A step of `after` workers covers after/2 times the samples of a step of 2: so much may the rate move.
    allowed = 1.2 * largest_before * max(1.0, after / 2)
    assert at_resume <= allowed, (stop_step, lrs[stop_step], lrs[stop_step + 1], allowed)
    assert max(changes[6:]) <= allowed
    assert lrs[steps[-1]] == pytest.approx(0.001)
    assert lrs[stop_step] == pytest.approx(before[stop_step])
