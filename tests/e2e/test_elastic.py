"""Elastic nodes: two agents on one host (``--nnodes 1:2``); one is killed with -9 mid-epoch and later
comes back. The survivor goes on alone, then with it again; every sample of each epoch is trained on
exactly once (counted from what the workers recorded), and the learning rate follows one curve."""

from __future__ import annotations

import json
import signal
import time

import pytest

from launcher.ports import free_port
from tests.support.helpers import metrics, start_launch, wait_for, write_config
from tests.support.job import JOB_NAME
from tests.support.sampling import assert_every_sample_once, assert_one_lr_curve

pytestmark = pytest.mark.timeout(600)

SAMPLES = 480


def test_a_lost_node_is_a_scale_down_and_its_return_a_scale_up_with_every_sample_once(tmp_path):
    record = tmp_path / "records"
    record.mkdir()
    config = write_config(tmp_path, {
        "job": {"name": JOB_NAME, "samples": SAMPLES, "step_sleep_s": 0.15, "record_dir": str(record)},
        "data": {"batch_size": 8, "num_workers": 0},
        "optim": {"lr": 0.05},
        "schedule": {"name": "cosine", "min_lr": 0.001},
        "train": {"epochs": 4, "log_every": 1, "progress_bar": False, "stop_check_s": 0},
        "checkpoint": {"every_steps": 5},
        "run": {"name": "elastic"},
    })
    endpoint = f"127.0.0.1:{free_port()}"
    options = ["local", "--cpu", "--nproc", "1", "--nnodes", "1:2", "--rdzv-endpoint", endpoint, str(config)]
    host = start_launch(*options, cwd=tmp_path, log=tmp_path / "host.log")
    time.sleep(1)
    other = start_launch(*options, cwd=tmp_path, log=tmp_path / "other.log")
    run_dir = tmp_path / "runs" / "elastic"
    restarts = run_dir / "restarts.jsonl"
    try:
        wait_for(lambda: any(r.get("train/loss") and r["step"] >= 12 for r in metrics(run_dir)), 240,
                 what="training on two nodes")
        other.send_signal(signal.SIGKILL)
        other.wait()
        wait_for(lambda: restarts.exists() and "scale-down" in restarts.read_text(), 120, what="the scale-down")
        resumed_at = json.loads(restarts.read_text().splitlines()[0])["step"]
        wait_for(lambda: any(r.get("train/loss") and r["step"] >= resumed_at + 8 for r in metrics(run_dir)), 120,
                 what="training on one node")
        back = start_launch(*options, cwd=tmp_path, log=tmp_path / "back.log")
        assert host.wait(400) == 0, (tmp_path / "host.log").read_text()[-4000:]
        assert back.wait(120) == 0, (tmp_path / "back.log").read_text()[-4000:]
    finally:
        for process in (host, other):
            if process.poll() is None:
                process.kill()
    changes = [json.loads(line) for line in restarts.read_text().splitlines()]
    assert [c["why"] for c in changes] == ["scale-down: a node left", "scale-up: a node joined"], changes
    assert [(c["old_world_size"], c["new_world_size"]) for c in changes] == [(2, 1), (1, 2)]

    assert_every_sample_once(run_dir, record, SAMPLES, epochs=4)
    assert_one_lr_curve(run_dir, min_lr=0.001)
