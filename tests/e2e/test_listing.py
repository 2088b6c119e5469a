"""``launch ls`` and ``launch status`` of local runs, from their directories alone; the curves as a PNG."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from ddp.codes import EXIT_RESUMABLE
from tests.support.helpers import launch_env, run_launch, start_launch, wait_for, write_config
from tests.support.job import JOB_NAME

pytestmark = pytest.mark.timeout(300)


def make(tmp_path, name: str, **job):
    markers = tmp_path / f"markers-{name}"
    markers.mkdir()
    return write_config(tmp_path, {"job": {"name": JOB_NAME, "samples": 64, "marker_dir": str(markers), **job},
                                   "data": {"batch_size": 8, "num_workers": 0},
                                   "train": {"epochs": 2, "progress_bar": False, "stop_check_s": 0},
                                   "checkpoint": {"every_steps": 2},
                                   "run": {"name": name}}, name=f"{name}.yaml")


def test_ls_lists_finished_running_stopped_and_failed_runs_in_under_half_a_second(tmp_path):
    assert run_launch("local", "--cpu", "--nproc", "2", str(make(tmp_path, "done")), cwd=tmp_path).returncode == 0
    stopped = run_launch("local", "--cpu", "--nproc", "2", str(make(tmp_path, "halted", faults=[
        {"kind": "signal", "rank": 0, "at": 5, "signal": "SIGTERM"}])), cwd=tmp_path)
    assert stopped.returncode == EXIT_RESUMABLE
    failed = run_launch("local", "--cpu", "--nproc", "2", str(make(tmp_path, "broken", faults=[
        {"kind": "raise", "rank": 1, "at": 3}])), cwd=tmp_path)
    assert failed.returncode == 1
    running = start_launch("local", "--cpu", "--nproc", "2", str(make(tmp_path, "busy", step_sleep_s=0.5)),
                           cwd=tmp_path, log=tmp_path / "busy.log")
    try:
        wait_for(lambda: (tmp_path / "runs" / "busy" / "state.json").exists(), 120, what="the running run")
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "launcher", "ls", "runs"], cwd=tmp_path, env=launch_env(),
                                capture_output=True, text=True, timeout=30)
        took = time.perf_counter() - start
    finally:
        running.send_signal(signal.SIGTERM)
        running.wait(120)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert " finished " in rows["done"] and "step_00000008.pt" in rows["done"]
    assert " stopped (by SIGTERM) " in rows["halted"]
    assert " failed " in rows["broken"]
    assert " running " in rows["busy"] and f"pid {running.pid} on" in rows["busy"]
    assert took < 0.5 * 4, took  # the command as a whole, Python's start included, on a busy machine
    from launcher import cli

    start = time.perf_counter()
    assert cli.main(["ls", str(tmp_path / "runs")]) == 0
    assert time.perf_counter() - start < 0.5


def test_status_of_a_local_run_says_where_it_stands_and_plots_its_curves(tmp_path):
    assert run_launch("local", "--cpu", "--nproc", "2", str(make(tmp_path, "curves")), cwd=tmp_path).returncode == 0
    result = run_launch("status", "runs/curves", "--plot", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "state          finished" in result.stdout and "progress       step 8, epoch 2" in result.stdout
    png = tmp_path / "runs" / "curves" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as image:
        assert image.size[0] > image.size[1] > 100  # two panels side by side: training and validation
