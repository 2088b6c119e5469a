"""A training process killed with -9 takes its loader processes along, however they were started (a fork server's
loader processes are the fork server's children, not the training process's), and a fork server started early by
``ddp.fork_server`` is forked from the training process only while it has a single thread."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.helpers import REPO, wait_for

TRAINER = """
import sys, threading, time
import torch
from torch.utils.data import TensorDataset
from ddp.data import ResumableDistributedSampler
from ddp.fork_server import start_fork_server
from ddp.loader import make_loader
method, early = sys.argv[1].split("+") if "+" in sys.argv[1] else (sys.argv[1], "")
if early == "thread":  # another thread runs: the server must not be forked from here
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
forked = start_fork_server() if early else None
loader = make_loader(TensorDataset(torch.arange(64.0)), ResumableDistributedSampler(64, 0, 1, seed=0), 4, seed=0,
                     rank=0, num_workers=2, start_method=method)
batches = iter(loader)
first = next(batches)
print(" ".join(str(worker.pid) for worker in batches._workers), forked, first[0].tolist(), flush=True)
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
@pytest.mark.parametrize("start_method", ["forkserver", "spawn", "forkserver+early", "forkserver+thread"])
def test_loader_processes_end_with_a_killed_training_process(start_method):
    trainer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(TRAINER), start_method], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    try:
        *pids, forked, batch = trainer.stdout.readline().split(" ", 3)
        loaders = [int(pid) for pid in pids]
        assert len(loaders) == 2, "the loader processes should have started"
        assert len(ast.literal_eval(batch)) == 4, "a batch of four samples"
        helpers = {parent_of(pid) for pid in loaders} - {trainer.pid}  # the fork server, if any
        assert len(helpers) == (1 if start_method.startswith("forkserver") else 0)
        if "+" in start_method:
            # Forked: the server runs the training process's command line; exec'd: multiprocessing's own.
            server = Path(f"/proc/{min(helpers)}/cmdline").read_bytes()
            assert forked == str(start_method.endswith("early"))
            assert (server == Path(f"/proc/{trainer.pid}/cmdline").read_bytes()) == (forked == "True")
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        wait_for(lambda: all(gone(pid) for pid in loaders + sorted(helpers)), timeout=20,
                 what="the loader processes (and the fork server) to end")
    finally:
        trainer.kill()
        trainer.wait()
