"""A checkpoint that cannot be written (a file-size limit, in a process of its own): a clear error, the previous
checkpoint intact, nothing partial; synchronous and asynchronous writes alike."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from ddp.layout import list_step_checkpoints, verify
from tests.support.helpers import REPO

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
    assert [found.step for found in list_step_checkpoints(directory) if verify(found.path) is None] == [1]
    assert torch.equal(torch.load(directory / "last.pt", weights_only=True)["model"]["w"], torch.zeros(300_000))
