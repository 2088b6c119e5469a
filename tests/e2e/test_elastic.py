"""Elastic nodes: two agents on one host (``--nnodes 1:2``); one is killed with -9 mid-epoch and later
comes back. The survivor goes on alone, then with it again; every sample of each epoch is trained on
exactly once (counted from what the workers recorded), and the learning rate follows one curve."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from launcher.ports import free_port
from tests.support.helpers import metrics, start_launch, wait_for, write_config
from tests.support.job import JOB_NAME, recorded_ids

pytestmark = pytest.mark.timeout(600)

SAMPLES = 480


def effective_batches(record_dir: Path) -> dict[int, list[dict]]:
    """For each micro-batch position, the records of the last attempt that trained it (replays replace).

    An attempt is a set of worker processes; a later attempt's processes started later."""
    rows = recorded_ids(record_dir)
    started = {}
    for row in rows:
        started[row["pid"]] = min(started.get(row["pid"], row["time"]), row["time"])
    by_position: dict[int, list[dict]] = {}
    for row in rows:
        by_position.setdefault(row["position"], []).append(row)
    out = {}
    for position, found in by_position.items():
        latest = max(started[row["pid"]] for row in found)
        # The workers of one attempt start within seconds of each other; an attempt is seconds after another.
        out[position] = [row for row in found if started[row["pid"]] >= latest - 5]
    return out


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

    # Every sample of each epoch once (and at most a world size's padding, as DistributedSampler pads).
    records = metrics(run_dir)
    epoch_ends = sorted(r["step"] for r in records if "train/epoch_time_s" in r)
    assert len(epoch_ends) == 4
    ids_by_epoch: dict[int, Counter] = {}
    for position, rows in effective_batches(record).items():
        epoch = sum(1 for end in epoch_ends if end <= position)  # position p trains step p + 1
        for row in rows:
            ids_by_epoch.setdefault(epoch, Counter()).update(row["ids"])
    for epoch, counts in sorted(ids_by_epoch.items()):
        assert set(counts) == set(range(SAMPLES)), f"epoch {epoch} missed samples"
        assert sum(counts.values()) - SAMPLES <= 1, f"epoch {epoch} repeated more than the padding"

    # One learning-rate curve: each step logged once, no jump at a change, ending at min_lr.
    lrs = {r["step"]: r["train/lr"] for r in records if "train/lr" in r}
    steps = sorted(lrs)
    assert steps == list(range(1, steps[-1] + 1))
    jumps = [abs(lrs[s + 1] - lrs[s]) for s in steps[:-1]]
    typical = sorted(jumps)[len(jumps) // 2]
    assert max(jumps) <= 4 * typical + 1e-9, max(jumps)
    assert lrs[steps[-1]] == pytest.approx(0.001)
