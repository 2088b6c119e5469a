"""The ``launch`` command end to end, as a user runs it: a dry run, a failing worker, a GPU request on a CPU
machine, ``launch debug`` stopping at a breakpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.support.helpers import REPO, run_launch, write_config
from tests.support.job import JOB_FILE

pytestmark = pytest.mark.timeout(600)

REGRESSION = {"name": "tests.support.job:TestJob", "model": "linear"}


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path):
    config = write_config(tmp_path, {"job": REGRESSION, "run": {"name": "dry"}})
    result = run_launch("local", "--cpu", "--nproc", "3", "--max-restarts", "2", "--dry-run", str(config),
                        "optim.lr=0.01")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "lr: 0.01" in out
    assert "world size     3 (1 node(s) x 3 worker(s))" in out
    assert "backend gloo" in out and "max restarts   2" in out
    assert "torchrun --nnodes=1 --nproc-per-node=3 --standalone" in out
    assert not (tmp_path / "runs").exists()


def test_a_failing_worker_is_reported_as_the_root_cause(tmp_path):
    config = write_config(tmp_path, {"job": {**REGRESSION, "faults": [{"kind": "raise", "rank": 1, "at": 2}]},
                                     "run": {"name": "fails"}, "data": {"num_workers": 0, "batch_size": 8}})
    result = run_launch("local", "--cpu", "--nproc", "2", str(config))
    assert result.returncode == 1
    err = result.stderr
    assert "error: worker rank 1 failed (exit code 1" in err
    assert "ValueError: rank 1 exploded at position 2" in err
    assert "worker traceback (root cause):" in err and f'File "{JOB_FILE}"' in err
    assert f"worker log: {tmp_path / 'runs' / 'fails' / 'logs' / 'rank_1.log'}" in err


def test_gpus_on_a_machine_without_any_names_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = write_config(tmp_path, {"job": REGRESSION})
    result = run_launch("local", "--gpus", "2", str(config))
    assert result.returncode == 2
    assert "this machine has none; use --cpu --nproc N" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_runs_in_process_and_stops_at_a_breakpoint(tmp_path):
    pid_file = tmp_path / "pid"
    config = write_config(tmp_path, {"job": {**REGRESSION, "faults": [{"kind": "breakpoint", "at": 0,
                                                                        "file": str(pid_file)}]},
                                     "run": {"name": "dbg"}, "train": {"epochs": 1}, "data": {"batch_size": 16}})
    process = subprocess.Popen([sys.executable, "-m", "launcher", "debug", str(config), "--steps", "5"],
                               cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    # The breakpoint is in the job's fault code; one frame up is its training_step, with the model.
    out, err = process.communicate("up\np 'stopped-in-' + type(model[0]).__name__\ncontinue\n", timeout=300)
    assert process.returncode == 0, err
    assert "(Pdb)" in out and "stopped-in-Linear" in out
    assert int(pid_file.read_text()) == process.pid  # the job ran in the launching process itself
    assert "debug run finished at step 5" in err
