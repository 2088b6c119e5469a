"""Four SLURM nodes (partition ``four`` of the test cluster): a run on ``--nodes 3:4`` gets all four and loses one
mid-epoch (its slurmd, its step daemon and its task killed, as when a machine dies). Once SLURM declares the node
down, it requeues the job, which continues the run on the three nodes left: every sample of each epoch once,
one learning-rate curve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.slurm.test_job_states import job_id, state, submit
from tests.support.helpers import REPO, metrics, wait_for, write_config
from tests.support.job import JOB_NAME
from tests.support.sampling import assert_every_sample_once, assert_one_lr_curve

pytestmark = pytest.mark.timeout(600)
SAMPLES = 480  # 4 ranks x batch 8: 15 steps an epoch; 3 ranks: 20
UP_TO_FOUR_NODES = ["--cpu", "--nodes", "3:4", "--nproc-per-node", "1", "--cpus-per-task", "1",
                    "--partition", "four"]


def environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def slurmd_of(rundir: Path, node: str) -> int:
    for line in (rundir / "pids").read_text().splitlines():
        pid, _, label = line.split()
        if label == f"slurmd-{node}":
            return int(pid)
    raise AssertionError(f"no slurmd of {node} in {rundir / 'pids'}")


def lose_node(rundir: Path, worker_pid: int) -> str:
    """Kill -9 the node of ``worker_pid``: its slurmd, the step daemon that runs the task, the task's processes."""
    node = environment_of(worker_pid)["SLURMD_NODENAME"]
    chain = [worker_pid]
    while Path(f"/proc/{chain[-1]}/comm").read_text().strip() != "slurmstepd":
        chain.append(parent_of(chain[-1]))
        assert chain[-1] > 1, "the worker does not run under a slurmstepd"
    for pid in (slurmd_of(rundir, node), *reversed(chain)):
        os.kill(pid, signal.SIGKILL)
    return node


def four_idle() -> bool:
    out = subprocess.run(["sinfo", "-h", "-N", "-p", "four", "-o", "%t"], capture_output=True, text=True,
                         timeout=30).stdout.split()
    return out == ["idle"] * 4


def test_a_job_on_four_nodes_that_loses_one_is_requeued_onto_the_three_left(slurm_cluster, tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    config = write_config(tmp_path, {
        "job": {"name": JOB_NAME, "samples": SAMPLES, "val_samples": 0, "step_sleep_s": 0.1,
                "record_dir": str(records)},
        "data": {"batch_size": 8, "num_workers": 0},
        "optim": {"lr": 0.05},
        "schedule": {"name": "cosine", "min_lr": 0.001},
        "train": {"epochs": 2, "log_every": 1, "progress_bar": False, "stop_check_s": 0},
        "checkpoint": {"every_steps": 4},
        "run": {"name": "four"},
    })
    command = [*UP_TO_FOUR_NODES, str(config)]
    wait_for(four_idle, 120, interval=0.5, what="the four nodes to be idle (earlier tests' jobs to end)")
    submit(tmp_path, *command)
    run_dir = tmp_path / "runs" / "four"
    first_job = job_id(run_dir)
    lost = None
    try:
        wait_for(lambda: any(r.get("train/loss") and r["step"] >= 6 for r in metrics(run_dir)), 300,
                 what="training on four nodes")
        assert json.loads((run_dir / "env.jsonl").read_text().splitlines()[-1])["world_size"] == 4
        last_rank = json.loads((records / "rank_3.jsonl").read_text().splitlines()[-1])["pid"]
        lost = lose_node(slurm_cluster.rundir, last_rank)
        # What SLURM does once the node has missed its heartbeats for SlurmdTimeout (5 minutes by
        # default; until then srun waits for the lost node's step): the node is down.
        subprocess.run(["scontrol", "update", f"NodeName={lost}", "State=DOWN", "Reason=lost in a test"],
                       check=True, timeout=30)
        # The job is requeued (it asked for --requeue), gets the three nodes left, and finishes the run.
        wait_for(lambda: state(first_job) in ("COMPLETED", "FAILED", "NODE_FAIL", "CANCELLED"), 400, interval=1,
                 what="the job to be requeued on three nodes and finish")
        assert state(first_job) == "COMPLETED", state(first_job)
        restarts = subprocess.run(["scontrol", "show", "job", "-o", first_job], capture_output=True, text=True,
                                  timeout=30).stdout
        assert "Restarts=1" in restarts, restarts
    finally:
        if lost:
            subprocess.run(["bash", str(REPO / "scripts" / "slurm_cluster.sh"), "node-up", lost,
                            str(slurm_cluster.rundir)], timeout=120, check=False)
    sizes = [json.loads(line)["world_size"] for line in (run_dir / "env.jsonl").read_text().splitlines()]
    assert sizes[0] == 4 and sizes[-1] == 3, sizes
    assert_every_sample_once(run_dir, records, SAMPLES, epochs=2)
    assert_one_lr_curve(run_dir, min_lr=0.001)
