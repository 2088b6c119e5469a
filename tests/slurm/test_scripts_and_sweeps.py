"""Scripts on SLURM (unchanged torchrun scripts, and the library API preempted) and sweeps as one array job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.helpers import REPO, launch_env, run_launch, wait_for, write_config
from tests.support.job import JOB_NAME

pytestmark = pytest.mark.timeout(600)
TWO_NODES = ["--cpu", "--nodes", "2", "--nproc-per-node", "1", "--cpus-per-task", "1"]


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
    fields = dict(part.split("=", 1) for part in out.split() if "=" in part)
    return fields.get("JobState", "")


def restarts(job: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
    fields = dict(part.split("=", 1) for part in out.split() if "=" in part)
    return int(fields.get("Restarts", "0"))


def test_an_unchanged_torchrun_script_runs_on_two_nodes_with_awkward_arguments(slurm_cluster, tmp_path):
    reference = tmp_path / "reference.pt"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(REPO / "examples" / "torchrun_script.py"), "--epochs", "2", "--out", str(reference)],
                   cwd=tmp_path, env=launch_env(), check=True, capture_output=True, timeout=300)
    out = tmp_path / "it's a \"weights\" file $(touch pwned).pt"
    result = run_launch("slurm", *TWO_NODES, str(REPO / "examples" / "torchrun_script.py"), "--epochs", "2",
                        "--out", str(out), cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "torchrun_script"
    job = json.loads((run_dir / "slurm.json").read_text())["jobs"][-1]["job_id"]
    wait_for(lambda: state(job) in ("COMPLETED", "FAILED"), 300, interval=0.5, what="the script's job")
    assert state(job) == "COMPLETED", run_launch("status", str(run_dir), cwd=tmp_path).stdout
    assert same(weights(reference), weights(out))
    assert not list(tmp_path.glob("pwned*"))
    assert "epoch 1 loss" in (run_dir / "logs" / "rank_0.log").read_text()


def test_a_library_script_preempted_on_slurm_is_requeued_and_ends_bitwise_equal(slurm_cluster, tmp_path):
    script = tmp_path / "library.py"
    script.write_text((REPO / "examples" / "library_script.py").read_text().replace(
        "            state[\"step\"] += 1\n",
        "            state[\"step\"] += 1\n            __import__('time').sleep(0.05)\n"))
    reference = tmp_path / "reference.pt"
    local = run_launch("local", "--cpu", "--nproc", "2", "--run-dir", "runs/reference", str(script), "--epochs", "3",
                       "--out", str(reference), cwd=tmp_path, timeout=300)
    assert local.returncode == 0, local.stderr
    out = tmp_path / "preempted.pt"
    result = run_launch("slurm", *TWO_NODES, "--run-dir", "runs/preempted", str(script), "--epochs", "3",
                        "--out", str(out), cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "preempted"
    job = json.loads((run_dir / "slurm.json").read_text())["jobs"][-1]["job_id"]
    wait_for(lambda: (run_dir / "checkpoints" / "last.pt").exists(), 300, what="a first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)  # SLURM's time-limit warning
    wait_for(lambda: any(e["event"] == "requeued" for e in records(run_dir / "slurm_events.jsonl")), 120,
             what="the script to save and the job to requeue itself")
    wait_for(lambda: state(job) in ("COMPLETED", "FAILED"), 300, interval=0.5, what="the requeued job")
    assert state(job) == "COMPLETED" and restarts(job) == 1
    assert same(weights(reference), weights(out))


def test_a_sweep_is_one_array_job_and_a_preempted_element_is_requeued_alone(slurm_cluster, tmp_path):
    config = write_config(tmp_path, {
        "job": {"name": JOB_NAME, "model": "linear", "samples": 256, "val_samples": 0, "features": 4,
                "step_sleep_s": 0.1},
        "data": {"batch_size": 8, "num_workers": 0},
        "train": {"epochs": 2, "log_every": 2, "progress_bar": False},
        "run": {"name": "sweep"},
    })
    result = run_launch("slurm", "--cpu", "--cpus-per-task", "1", "--array-parallelism", "3", str(config),
                        "optim.lr=0.1,0.05,0.01", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    runs = [tmp_path / "runs" / f"sweep_lr{value}" for value in ("0.1", "0.05", "0.01")]
    jobs = [json.loads((run / "slurm.json").read_text())["jobs"][-1]["job_id"] for run in runs]
    array = jobs[0].split("_")[0]
    assert jobs == [f"{array}_{index}" for index in range(3)]  # one array job, one element per run
    script = (tmp_path / "runs" / "sweep_sweep" / "slurm" / f"{array}_submission.sh").read_text()
    assert "#SBATCH --array=0-2%3" in script
    sweep = json.loads((tmp_path / "runs" / "sweep_sweep" / "sweep.json").read_text())
    assert sweep["runs"] == [str(run) for run in runs]
    wait_for(lambda: any(e["event"] == "started" for e in records(runs[1] / "slurm_events.jsonl")), 300,
             what="the second element to start")
    wait_for(lambda: (runs[1] / "checkpoints" / "last.pt").exists(), 300, what="its first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", jobs[1]], check=True, timeout=30)
    wait_for(lambda: all(state(job) == "COMPLETED" for job in jobs), 400, interval=1, what="the three runs")
    assert [restarts(job) for job in jobs] == [0, 1, 0]
    status = run_launch("status", str(tmp_path / "runs" / "sweep_sweep"), cwd=tmp_path)
    assert status.returncode == 0 and status.stdout.count("COMPLETED") == 3
