"""The watchdog: a rank that stops making progress is named, every rank's stacks are logged, the job ends."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from ddp.env import DistEnv
from ddp.watchdog import EXIT_STALLED, Watchdog, collective_timeout, describe_position, heartbeat_path, verdict
from tests.helpers import REPO, run_launch, write_config
from tests.jobs_for_failures import JOB_NAME


def record(step, seq, phase, sub=0, in_collective=False):
    return {"step": step, "phase": phase, "sub": sub, "position": [step, seq, sub], "in_collective": in_collective}


# -- pure parts -------------------------------------------------------------------------------------


def test_the_rank_behind_the_others_is_the_one_that_stalled():
    records = {0: record(4, 3, "backward"), 1: record(4, 2, "forward"), 2: record(4, 3, "backward")}
    message = verdict(records, world_size=3, timeout_s=30)
    assert "rank 1 stalled at step 5, in the job's training_step" in message
    assert "ranks 0, 2 waited for it at step 5, in backward" in message
    assert "no training progress for 30 s" in message


def test_a_rank_inside_a_collective_is_waiting_even_at_the_same_position():
    # Rank 0 writes the checkpoint (stuck in its file system); rank 1 waits for it in broadcast.
    records = {0: record(9, 1, "checkpoint-agree"), 1: record(9, 1, "checkpoint-agree", in_collective=True)}
    message = verdict(records, world_size=2, timeout_s=60)
    assert "rank 0 stalled after step 9" in message and "rank 1 waited for it" in message


def test_a_rank_without_heartbeat_is_named_as_well():
    message = verdict({0: record(2, 3, "backward"), 1: None}, world_size=2, timeout_s=10)
    assert "rank 1 sent no heartbeat" in message


def test_every_rank_at_the_same_point_is_reported_as_such():
    records = {0: record(7, 3, "backward"), 1: record(7, 3, "backward")}
    assert "every rank stopped at the same point, at step 8" in verdict(records, world_size=2, timeout_s=5)


def test_positions_follow_the_loop_and_never_go_back_within_an_epoch():
    dog = Watchdog(REPO, DistEnv(), timeout_s=None)
    seen = []
    for step in range(3):
        for phase in ("data", "forward", "backward", "data", "forward", "backward", "optimizer"):
            dog.beat(step, phase)
            seen.append((dog._beat.step, dog._beat.seq, dog._beat.sub))
        dog.beat(step + 1, "log")
        seen.append((dog._beat.step, dog._beat.seq, dog._beat.sub))
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_evaluation_and_step_phases_read_naturally():
    assert describe_position(record(4, 0, "evaluate", sub=7)) == "after step 4, in evaluation, batch 7"
    assert describe_position(record(4, 0, "data")) == "at step 5, waiting for its data loader"


def test_collectives_outlast_the_watchdog():
    assert collective_timeout(1800, None) == 1800
    assert collective_timeout(1800, 300) == 1800
    assert collective_timeout(60, 300) > 300  # the watchdog reports first, with the better message


# -- one process, for real ---------------------------------------------------------------------------

STALL_SCRIPT = """
import os, sys, time, ctypes
from pathlib import Path
from ddp.env import DistEnv
from ddp.watchdog import Watchdog
run_dir = Path(sys.argv[1]); (run_dir / "logs").mkdir(parents=True, exist_ok=True)
dog = Watchdog(run_dir, DistEnv(), timeout_s=1.0).start()
dog.beat(3, "forward")
if sys.argv[2] == "sleep":
    time.sleep(60)
else:  # a C call that never releases the GIL: the watchdog thread cannot run
    ctypes.PyDLL(None).sleep(60)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["sleep", "gil"])
def test_a_stalled_process_dumps_its_stacks_and_exits(tmp_path, how):
    error_file = tmp_path / "error.json"
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(STALL_SCRIPT), str(tmp_path), how],
                            capture_output=True, text=True, timeout=50, cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "TORCHELASTIC_ERROR_FILE": str(error_file)})
    elapsed = time.monotonic() - start
    log = (tmp_path / "logs" / "rank_0.log").read_text()
    assert 'File "<string>"' in log and "most recent call first" in log  # the main thread's stack
    if how == "sleep":
        assert result.returncode == EXIT_STALLED and elapsed < 10
        message = json.loads(error_file.read_text())["message"]["message"]
        assert "rank 0 stalled at step 4, in the job's training_step" in message
        assert json.loads(heartbeat_path(tmp_path, 0).read_text())["verdict"]
    else:  # faulthandler's timer: exit code 1, within the timeout and its grace
        assert result.returncode == 1 and elapsed < 20


# -- two workers through `launch local` ---------------------------------------------------------------


@pytest.mark.timeout(180)
def test_rank_1_sleeping_at_step_3_is_named_and_every_rank_is_ended(tmp_path):
    timeout_s = 6
    config = write_config(tmp_path, {
        "job": {"name": JOB_NAME, "stall_rank": 1, "stall_call": 3},
        "run": {"name": "stall"},
        "data": {"batch_size": 8, "num_workers": 0},
        "train": {"epochs": 3, "progress_bar": False, "log_every": 1},
        "watchdog": {"timeout_s": timeout_s},
    })
    result = run_launch("local", "--cpu", "--nproc", "2", str(config), timeout=150)
    ended = time.time()
    run_dir = tmp_path / "runs" / "stall"
    assert result.returncode == EXIT_STALLED, result.stderr
    assert "rank 1 stalled at step 3, in the job's training_step" in result.stderr
    assert "rank 0 waited for it at step 3" in result.stderr
    assert "Traceback" not in result.stderr
    # Within the timeout plus a small margin of the last progress rank 1 made.
    last_progress = json.loads(heartbeat_path(run_dir, 1).read_text())["beat_time"]
    assert ended - last_progress < timeout_s + 15
    logs = {rank: (run_dir / "logs" / f"rank_{rank}.log").read_text() for rank in (0, 1)}
    for rank, text in logs.items():
        assert f"stacks of every thread of rank {rank}" in text
    stacks = {rank: text.split("--- watchdog: stacks of every thread")[1] for rank, text in logs.items()}
    assert "jobs_for_failures.py" in stacks[1] and "jobs_for_failures.py" not in stacks[0]  # where rank 1 hangs
    assert "in backward" in stacks[0]  # where rank 0 waits
