"""A checkpoint that cannot be written: a clear error on every rank, the previous one intact, nothing partial."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ddp import checkpoint as ckpt
from tests.helpers import REPO, run_launch, write_config
from tests.jobs_for_failures import JOB_NAME


def small_state(step: int = 0) -> dict:
    return {"model": {"w": torch.full((300_000,), float(step))}}


LIMITED_WRITE = """
import resource, sys
from pathlib import Path
import torch
from ddp import checkpoint as ckpt
directory = Path(sys.argv[1])
writer = ckpt.CheckpointWriter(directory, keep_last=1, async_save=sys.argv[2] == "async")
writer.save({"model": {"w": torch.zeros(300_000)}}, 1)
writer.wait()
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    writer.save({"model": {"w": torch.ones(300_000)}}, 2)  # async: starts the write, returns
    writer.wait()  # async: the background write's error surfaces here (or at the next save)
except ckpt.CheckpointError as err:
    print(err)
    sys.exit(3)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_file_size_limit_is_a_clear_error_and_leaves_the_previous_checkpoint(tmp_path, mode):
    directory = tmp_path / "run" / "checkpoints"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(LIMITED_WRITE), str(directory), mode],
                            capture_output=True, text=True, timeout=50, env={"PYTHONPATH": str(REPO)})
    assert result.returncode == 3, result.stderr
    assert f"could not write checkpoint {directory / 'step_00000002.pt'}: File too large" in result.stdout
    assert "file-size limit" in result.stdout and "Traceback" not in result.stderr
    assert sorted(p.name for p in directory.iterdir()) == ["last.pt", "step_00000001.pt", "step_00000001.pt.done"]
    assert ckpt.latest_valid(directory).step == 1
    assert torch.equal(ckpt.load(directory / "last.pt")["model"]["w"], torch.zeros(300_000))


def test_an_async_write_error_surfaces_at_the_next_save(tmp_path):
    directory = tmp_path / "checkpoints"
    writer = ckpt.CheckpointWriter(directory, async_save=True)
    shutil.rmtree(directory)  # the folder disappears under the writer (an unmounted file system)
    writer.save(small_state(1), 1)
    with pytest.raises(ckpt.CheckpointError, match="could not write checkpoint .*step_00000001.pt: No such file"):
        writer.save(small_state(2), 2)
    writer.wait()  # reported once, not again


def test_a_failed_write_removes_its_partial_files(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise TypeError("cannot pickle this")

    path = tmp_path / "step_00000003.pt"
    with pytest.raises(TypeError):
        ckpt.write_atomic({"model": {}, "bad": Unpicklable()}, path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("async_save", [False, True])
def test_rank_0_failing_to_write_ends_every_rank_quickly(tmp_path, async_save):
    """Rank 0 writes alone; the others must not wait for it in a barrier until the collective timeout."""
    config = write_config(tmp_path, {
        # 2 MB checkpoints; a 1 MB limit once the checkpoint of step 2 is complete (async: in the background)
        "job": {"name": JOB_NAME, "ballast_mb": 2, "fsize_limit_call": 3,
                "fsize_limit_after": str(tmp_path / "runs" / "full" / "checkpoints" / "step_00000002.pt.done")},
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
    checkpoints = run_dir / "checkpoints"
    assert result.returncode == 1
    assert f"error: could not write checkpoint {checkpoints / 'step_00000004.pt'}: File too large" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 120  # far below ddp.timeout_s
    assert "CheckpointError: could not write checkpoint" in (run_dir / "logs" / "rank_1.log").read_text()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt", "step_00000002.pt", "step_00000002.pt.done"]
    state = ckpt.load(checkpoints / "last.pt")
    assert ckpt.verify(checkpoints / "step_00000002.pt") is None and state["model"]["ballast"].numel() == 2**19
