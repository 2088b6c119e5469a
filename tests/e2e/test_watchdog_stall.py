"""Two workers through `launch local`, one hanging in its own code: it is named, every rank's stacks are logged,
every rank is ended with the watchdog's exit code.

The watchdog's pure parts: tests/unit/test_watchdog.py; one process: tests/multiprocess/test_watchdog_process.py.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from ddp.codes import EXIT_STALLED
from ddp.layout import RunDir
from tests.support.helpers import run_launch, write_config
from tests.support.job import JOB_FILE, JOB_NAME


def main_thread_stack(stacks: str) -> str:
    """The main thread's part of a faulthandler dump (the watchdog's own thread is the current one)."""
    return [part for part in stacks.split("\n\n") if part.startswith("Thread ")][-1]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_rank_1_sleeping_at_step_3_is_named_and_every_rank_is_ended(tmp_path, model):
    """linear: rank 0 goes on to backward and waits in the gradient all-reduce. mlp (BatchNorm): DDP
    broadcasts the buffers at the start of each forward, so rank 0 waits inside its forward."""
    timeout_s = 6
    config = write_config(tmp_path, {
        # Rank 1 hangs in its third micro-batch (position 2): at step 3, after two completed steps.
        "job": {"name": JOB_NAME, "model": model, "faults": [{"kind": "stall", "rank": 1, "at": 2}]},
        "run": {"name": "stall"},
        "data": {"batch_size": 8, "num_workers": 0},
        "train": {"epochs": 3, "progress_bar": False, "log_every": 1},
        "watchdog": {"timeout_s": timeout_s},
    })
    result = run_launch("local", "--cpu", "--nproc", "2", str(config), timeout=150)
    ended = time.time()
    run_dir = RunDir(tmp_path / "runs" / "stall")
    host = socket.gethostname()
    assert result.returncode == EXIT_STALLED, result.stderr
    assert f"rank 1 (on {host}) stalled at step 3, in the job's training_step" in result.stderr
    waits = "in backward" if model == "linear" else "in the job's training_step (forward)"
    assert f"rank 0 waited for it at step 3, {waits}" in result.stderr
    assert f"continue with `launch resume {run_dir.path}`" in result.stderr
    assert "Traceback" not in result.stderr
    # Within the timeout plus a small margin of the last progress rank 1 made.
    last_progress = json.loads(run_dir.heartbeat(1).read_text())["beat_time"]
    assert ended - last_progress < timeout_s + 15
    logs = {rank: run_dir.rank_log(rank).read_text() for rank in (0, 1)}
    for rank, text in logs.items():
        assert f"stacks of every thread of rank {rank}" in text
    stacks = {rank: main_thread_stack(text.split("--- watchdog: stacks of every thread")[1])
              for rank, text in logs.items()}
    # Where rank 1 hangs: in the job's own code, its innermost frame.
    assert stacks[1].splitlines()[1].strip().startswith(f'File "{JOB_FILE}"'), stacks[1]
    if model == "linear":  # where rank 0 waits
        assert str(JOB_FILE) not in stacks[0] and "in backward" in stacks[0], stacks[0]
    else:
        assert "in _sync_buffers" in stacks[0], stacks[0]
