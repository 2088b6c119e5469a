"""A resized resume through ``launch``: two workers stopped mid-epoch, then one, sees every sample once."""

from __future__ import annotations

import pytest

from ddp.codes import EXIT_RESUMABLE
from ddp.layout import Found, list_step_checkpoints, verify
from tests.support.helpers import run_launch, write_config
from tests.support.job import JOB_NAME, recorded_ids


def newest_valid(directory) -> Found | None:
    valid = [found for found in list_step_checkpoints(directory) if verify(found.path) is None]
    return valid[-1] if valid else None


@pytest.mark.timeout(240)
def test_two_workers_stopped_mid_epoch_then_one_sees_every_sample_once(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    config = write_config(tmp_path, {
        "data": {"batch_size": 8, "num_workers": 0},
        "optim": {"lr": 0.05},
        # Votes on a stop every step: the stop lands at an exact point of tiny, millisecond steps.
        "train": {"epochs": 1, "log_every": 5, "progress_bar": False, "stop_check_s": 0},
        "checkpoint": {"every_steps": 5, "keep_last": 3},
        # Rank 1 sends SIGUSR2 to `launch`, which passes the stop on to both workers.
        "job": {"name": JOB_NAME, "samples": 192, "record_dir": str(records), "marker_dir": str(tmp_path),
                "faults": [{"kind": "signal", "rank": 1, "at": 2, "signal": "SIGUSR2"}]},
        "run": {"name": "resize"},
    })
    run_dir = tmp_path / "runs" / "resize"
    first = run_launch("local", "--cpu", "--nproc", "2", str(config))
    assert first.returncode == EXIT_RESUMABLE, first.stderr
    assert "stopped by SIGUSR2" in first.stderr
    stopped_at = newest_valid(run_dir / "checkpoints")
    assert 0 < stopped_at.step < 12, "the stop should land mid-epoch (12 steps of 16 samples)"

    second = run_launch("resume", "--cpu", "--nproc", "1", str(run_dir))
    assert second.returncode == 0, second.stderr
    assert "resuming a 2-process checkpoint with 1 processes" in second.stderr

    rows = recorded_ids(records)
    before = [i for row in rows if row["world_size"] == 2 for i in row["ids"]]
    after = [i for row in rows if row["world_size"] == 1 for i in row["ids"]]
    assert len(before) == 16 * stopped_at.step  # exactly what the checkpoint says was consumed
    assert sorted(before + after) == list(range(192))
