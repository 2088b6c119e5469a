"""A full disk while a run writes its logs, metrics or checkpoints: one line, exit 1, and a bitwise resume."""

from __future__ import annotations

import os
import subprocess

import pytest

from ddp.layout import list_step_checkpoints
from tests.support.helpers import assert_same_weights, final_weights, run_launch, start_launch, wait_for, write_config
from tests.support.job import JOB_NAME

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs of our own (as root), so the test can fill it up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory) -> None:
    """Writes until the file system is full (creating the file may already fail on a full one)."""
    try:
        with open(directory / "filler", "ab", buffering=0) as handle:
            while True:
                handle.write(b"\0" * 65536)
    except OSError:
        pass


def sections(run_dir_parent, name: str) -> dict:
    return {"job": {"name": JOB_NAME, "samples": 1000, "step_sleep_s": 0.02},
            "data": {"batch_size": 8, "num_workers": 0},
            "train": {"epochs": 2, "progress_bar": False, "log_every": 5},
            "checkpoint": {"every_steps": 10},
            "run": {"name": name, "dir": str(run_dir_parent)}}


def test_a_full_disk_is_one_message_and_the_run_resumes_bitwise_once_space_is_freed(tmp_path, small_disk):
    reference = write_config(tmp_path, sections(tmp_path / "runs", "reference"), name="reference.yaml")
    assert run_launch("local", "--cpu", "--nproc", "2", str(reference), cwd=tmp_path).returncode == 0
    config = write_config(tmp_path, sections(small_disk, "full"), name="full.yaml")
    process = start_launch("local", "--cpu", "--nproc", "2", str(config), cwd=tmp_path, log=tmp_path / "out.log")
    run_dir = small_disk / "full"
    wait_for(lambda: len(list_step_checkpoints(run_dir / "checkpoints")) >= 2, 120, what="two checkpoints")
    fill(small_disk)
    code = process.wait(120)
    said = (tmp_path / "out.log").read_text()
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert code == 1, said[-3000:]
    assert len(errors) == 1 and "No space left on device; the disk is full: free some space" in errors[0], said
    assert "Traceback" not in said
    (small_disk / "filler").unlink()
    resumed = run_launch("resume", str(run_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(final_weights(tmp_path / "runs" / "reference"), final_weights(run_dir))
