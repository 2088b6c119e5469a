"""Past two ranks: 8 and 32 CPU ranks on this machine, as 4 "nodes" of the elastic launcher (1 thread each).

The 32-rank run loses a worker to ``kill -9`` mid-run; every agent restarts its workers, which resume
from the last checkpoint, and the run ends bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import json
import time

import pytest

from launcher.ports import free_port
from tests.support.helpers import assert_same_weights, final_weights, start_launch, write_config
from tests.support.job import JOB_NAME

pytestmark = pytest.mark.timeout(900)
NODES = 4


def run_nodes(tmp_path, name: str, world: int, *extra_options: str, **job) -> list[int]:
    """``NODES`` agents of ``world / NODES`` workers each, on one rendezvous; returns their exit codes."""
    markers = tmp_path / f"markers-{name}"
    markers.mkdir(exist_ok=True)
    config = write_config(tmp_path, {
        "job": {"name": JOB_NAME, "samples": 16 * world, "val_samples": 2 * world, "marker_dir": str(markers),
                **job},
        "data": {"batch_size": 4, "num_workers": 0},
        "train": {"epochs": 2, "log_every": 2, "progress_bar": False},
        "checkpoint": {"every_steps": 2},
        "run": {"name": name},
    }, name=f"{name}.yaml")
    endpoint = f"127.0.0.1:{free_port()}"
    agents = []
    for node in range(NODES):
        agents.append(start_launch("local", "--cpu", "--nproc", str(world // NODES), "--nnodes", str(NODES),
                                   "--node-rank", str(node), "--rdzv-endpoint", endpoint, *extra_options,
                                   str(config), cwd=tmp_path, log=tmp_path / f"{name}-node{node}.log",
                                   env={"OMP_NUM_THREADS": "1"}))
        time.sleep(0.5)
    codes = [agent.wait(800) for agent in agents]
    return codes


def test_eight_ranks_train_to_the_end(tmp_path):
    codes = run_nodes(tmp_path, "eight", 8)
    assert codes == [0] * NODES, (tmp_path / "eight-node0.log").read_text()[-3000:]
    environment = json.loads((tmp_path / "runs" / "eight" / "env.jsonl").read_text().splitlines()[-1])
    assert environment["world_size"] == 8 and environment["nnodes"] == NODES


def test_thirty_two_ranks_finish_and_resume_bitwise_after_a_kill(tmp_path):
    assert run_nodes(tmp_path, "clean", 32) == [0] * NODES, (tmp_path / "clean-node0.log").read_text()[-3000:]
    codes = run_nodes(tmp_path, "killed", 32, "--max-restarts", "1",
                      faults=[{"kind": "kill", "rank": 17, "at": 5}])
    assert codes == [0] * NODES, (tmp_path / "killed-node0.log").read_text()[-3000:]
    restarts = [json.loads(line) for line in (tmp_path / "runs" / "killed" / "restarts.jsonl").read_text().splitlines()]
    assert len(restarts) == 1 and restarts[0]["new_world_size"] == 32 and restarts[0]["step"] == 4
    assert_same_weights(final_weights(tmp_path / "runs" / "clean"), final_weights(tmp_path / "runs" / "killed"))
