"""The watchdog ending one real process: stacks in the rank's log, the verdict where the agent reads it.

Its pure parts: tests/unit/test_watchdog.py; two workers through `launch local`: tests/e2e/test_watchdog_stall.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from ddp.codes import EXIT_STALLED
from ddp.layout import RunDir
from tests.support.helpers import REPO

STALL_SCRIPT = """
import os, sys, time, ctypes
from ddp.config import WatchdogConfig
from ddp.env import DistEnv
from ddp.layout import RunDir
from ddp.watchdog import Watchdog
run_dir = RunDir(sys.argv[1]); run_dir.logs.mkdir(parents=True, exist_ok=True)
dog = Watchdog(run_dir, DistEnv(), WatchdogConfig(timeout_s=1.0)).start()
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
    run_dir = RunDir(tmp_path)
    log = run_dir.rank_log(0).read_text()
    assert 'File "<string>"' in log and "most recent call first" in log  # the main thread's stack
    if how == "sleep":
        assert result.returncode == EXIT_STALLED and elapsed < 10, result.stderr
        message = json.loads(error_file.read_text())["message"]["message"]
        assert message.startswith("WatchdogTimeout: watchdog: no training progress for ")
        assert f"rank 0 (on {socket.gethostname()}) stalled at step 4, in the job's training_step" in message
        assert f"Python stacks of every thread in {tmp_path / 'logs'}" in message
        assert json.loads(run_dir.heartbeat(0).read_text())["verdict"]
    else:  # faulthandler's timer: exit code 1, within the timeout and its grace
        assert result.returncode == 1 and elapsed < 20, result.stderr
