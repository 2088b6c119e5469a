"""SLURM jobs end in the state that happened, and job ids are checked before they are acted on.

On the real cluster (``scripts/slurm_cluster.sh``), each job small: the test job on 2 nodes x 1 task.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.helpers import run_launch, wait_for, write_config
from tests.support.job import JOB_NAME

pytestmark = pytest.mark.timeout(600)
TWO_NODES = ["--cpu", "--nodes", "2", "--nproc-per-node", "1", "--cpus-per-task", "1"]


def config(tmp_path: Path, name: str, *, workers: int = 0, epochs: int = 3, **job) -> Path:
    return write_config(tmp_path, {
        "job": {"name": JOB_NAME, "model": "linear", "samples": 256, "val_samples": 0, "features": 4, **job},
        "data": {"batch_size": 8, "num_workers": workers},
        "train": {"epochs": epochs, "log_every": 2, "progress_bar": False},
        "run": {"name": name},
    }, name=f"{name}.yaml")


def submit(tmp_path: Path, *args: str) -> Path:
    result = run_launch("slurm", *args, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def job_id(run_dir: Path) -> str:
    return json.loads((run_dir / "slurm.json").read_text())["jobs"][-1]["job_id"]


def state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
    return next((part.split("=", 1)[1] for part in out.split() if part.startswith("JobState=")), "")


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "slurm_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_nan_with_loader_processes_on_two_nodes_ends_failed_within_30_s(slurm_cluster, tmp_path):
    path = config(tmp_path, "nan", workers=2, step_sleep_s=0.05, faults=[{"kind": "nan", "rank": 1, "at": 6}])
    submit(tmp_path, *TWO_NODES, str(path))
    run_dir = tmp_path / "runs" / "nan"
    job = job_id(run_dir)
    failed = wait_for(lambda: next((e for e in events(run_dir) if e["event"] == "failed"), None), 300,
                      what="the NaN to fail the run")
    wait_for(lambda: state(job) == "FAILED", 30, interval=0.5, what="SLURM to record FAILED within 30 s")
    assert "NaN or infinite" in failed["error"]
    status = run_launch("status", str(run_dir), cwd=tmp_path)
    assert "FAILED" in status.stdout and "first error" in status.stdout and "NaN or infinite" in status.stdout


def test_a_task_killed_on_one_node_ends_the_job_and_status_names_the_node(slurm_cluster, tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    path = config(tmp_path, "lost", step_sleep_s=0.2, epochs=20, record_dir=str(records))
    submit(tmp_path, *TWO_NODES, str(path))
    run_dir = tmp_path / "runs" / "lost"
    job = job_id(run_dir)
    rank_1 = wait_for(lambda: (records / "rank_1.jsonl").exists() and
                      json.loads((records / "rank_1.jsonl").read_text().splitlines()[0])["pid"], 300,
                      what="rank 1 to train")
    killed = time.monotonic()
    subprocess.run(["kill", "-9", str(rank_1)], check=True)
    wait_for(lambda: state(job) in ("FAILED", "NODE_FAIL", "CANCELLED", "COMPLETED"), 120, interval=0.5,
             what="the job to end")
    assert state(job) == "FAILED" and time.monotonic() - killed < 60
    status = run_launch("status", str(run_dir), cwd=tmp_path).stdout
    assert "FAILED" in status and "n2" in status.split("first error", 1)[-1], status


def test_a_warning_while_a_finished_job_exits_leaves_it_completed(slurm_cluster, tmp_path):
    path = config(tmp_path, "done", epochs=1)
    submit(tmp_path, *TWO_NODES, str(path))
    run_dir = tmp_path / "runs" / "done"
    job = job_id(run_dir)
    wait_for(lambda: any(e["event"] == "finished" for e in events(run_dir)), 300, interval=0.02,
             what="the run to finish")
    subprocess.run(["scancel", "--signal=USR2", job], capture_output=True, timeout=30)  # as a late warning
    wait_for(lambda: state(job) not in ("RUNNING", "COMPLETING", ""), 60, interval=0.5, what="the job to end")
    assert state(job) == "COMPLETED"


def test_a_job_id_that_now_belongs_to_another_job_is_neither_reported_nor_cancelled(slurm_cluster, tmp_path):
    other = subprocess.run(["sbatch", "--parsable", "--wrap", "sleep 120", "-o", "/dev/null"], capture_output=True,
                           text=True, timeout=60, check=True).stdout.strip().split(";")[0]
    try:
        run_dir = tmp_path / "runs" / "old"
        run_dir.mkdir(parents=True)
        (run_dir / "launch.json").write_text(json.dumps({"kind": "config", "mode": "slurm"}))
        # An old run's record of "its" job: the same id, long ago, with its logs in its own folder.
        (run_dir / "slurm.json").write_text(json.dumps({"jobs": [{
            "job_id": other, "submitted": time.time() - 30 * 86400, "folder": str(run_dir / "slurm"),
            "run_dir": str(run_dir), "max_requeues": 3}]}))
        status = run_launch("status", str(run_dir), cwd=tmp_path)
        assert status.returncode == 0 and "not this run's any more" in status.stdout
        assert "RUNNING" not in status.stdout and "PENDING" not in status.stdout
        cancel = run_launch("cancel", str(run_dir), cwd=tmp_path)
        assert f"not cancelling job {other}" in cancel.stdout and "nothing to cancel" in cancel.stdout
        assert state(other) in ("RUNNING", "PENDING")
    finally:
        subprocess.run(["scancel", other], capture_output=True, timeout=30)


def test_status_shows_the_first_error_of_a_two_task_failure(slurm_cluster, tmp_path):
    path = config(tmp_path, "raises", faults=[{"kind": "raise", "rank": 1, "at": 3}])
    submit(tmp_path, *TWO_NODES, str(path))
    run_dir = tmp_path / "runs" / "raises"
    job = job_id(run_dir)
    wait_for(lambda: state(job) == "FAILED", 300, interval=0.5, what="the job to fail")
    status = run_launch("status", str(run_dir), cwd=tmp_path).stdout
    error = status.split("first error", 1)[-1]
    assert "ValueError: rank 1 exploded at position 3" in error, status
