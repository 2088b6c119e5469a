"""Rank 0 cannot write a checkpoint (a file-size limit): every rank ends at once with one clear error, the previous
checkpoint intact, nothing partial; with synchronous and asynchronous writes."""

from __future__ import annotations

import time

import pytest

from ddp.checkpoint import load
from ddp.layout import verify
from tests.support.helpers import run_launch, write_config
from tests.support.job import JOB_NAME


@pytest.mark.timeout(180)
@pytest.mark.parametrize("async_save", [False, True])
def test_rank_0_failing_to_write_ends_every_rank_quickly(tmp_path, async_save):
    """Rank 0 writes alone; the others must not wait for it in a barrier until the collective timeout."""
    checkpoints = tmp_path / "runs" / "full" / "checkpoints"
    config = write_config(tmp_path, {
        # 2 MB checkpoints; a 1 MB limit from step 3 on, once the checkpoint of step 2 is complete (async: written
        # in the background). 64 samples over 2 ranks in batches of 8: 4 steps per epoch, a checkpoint every 2.
        "job": {"name": JOB_NAME, "model": "linear", "samples": 64, "features": 4, "ballast_mb": 2,
                "faults": [{"kind": "fsize_limit", "at": 2, "bytes": 1 << 20,
                            "after": str(checkpoints / "step_00000002.pt.done")}]},
        "run": {"name": "full"},
        "data": {"batch_size": 8, "num_workers": 0},
        "train": {"epochs": 3, "progress_bar": False},
        "checkpoint": {"every_steps": 2, "async_save": async_save},
        "ddp": {"timeout_s": 600},
    })
    start = time.monotonic()
    result = run_launch("local", "--cpu", "--nproc", "2", str(config), timeout=150)
    elapsed = time.monotonic() - start
    run_dir = tmp_path / "runs" / "full"
    assert result.returncode == 1, result.stderr
    assert f"error: could not write checkpoint {checkpoints / 'step_00000004.pt'}: File too large" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 120  # far below ddp.timeout_s
    assert "CheckpointError: could not write checkpoint" in (run_dir / "logs" / "rank_1.log").read_text()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt", "step_00000002.pt", "step_00000002.pt.done"]
    state = load(checkpoints / "last.pt")
    assert verify(checkpoints / "step_00000002.pt") is None and state["model"]["ballast"].numel() == 2**19
