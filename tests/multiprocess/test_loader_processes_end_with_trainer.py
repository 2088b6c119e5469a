"""A training process killed with -9 takes its loader processes along, however they were started (a fork server's
loader processes are the fork server's children, not the training process's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.helpers import REPO, wait_for

TRAINER = """
import sys, time
import torch
from torch.utils.data import TensorDataset
from ddp.data import ResumableDistributedSampler
from ddp.loader import make_loader
loader = make_loader(TensorDataset(torch.arange(64.0)), ResumableDistributedSampler(64, 0, 1, seed=0), 4, seed=0,
                     rank=0, num_workers=2, start_method=sys.argv[1])
batches = iter(loader)
next(batches)
print(" ".join(str(worker.pid) for worker in batches._workers), flush=True)
time.sleep(600)
"""


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # a zombie has ended; only its parent's wait is missing


@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_loader_processes_end_with_a_killed_training_process(start_method):
    trainer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(TRAINER), start_method], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        loaders = [int(pid) for pid in trainer.stdout.readline().split()]
        assert len(loaders) == 2, "the loader processes should have started"
        helpers = {parent_of(pid) for pid in loaders} - {trainer.pid}  # the fork server, if any
        assert len(helpers) == (1 if start_method == "forkserver" else 0)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        wait_for(lambda: all(gone(pid) for pid in loaders + sorted(helpers)), timeout=20,
                 what="the loader processes (and the fork server) to end")
    finally:
        trainer.kill()
        trainer.wait()
