"""A NaN loss: stop with the step, the rank and the last good checkpoint, or skip the step on every rank."""

from __future__ import annotations

import math

import pytest
import torch

from ddp.checkpoint import load
from ddp.layout import list_step_checkpoints, verify
from launcher.cli import main
from tests.support.helpers import metrics, run_launch, write_config
from tests.support.job import JOB_NAME

pytestmark = pytest.mark.timeout(180)


def nan_at(rank: int, step: int) -> list[dict]:
    """The loss of ``rank`` is NaN at ``step``: micro-batch ``step - 1`` of the run, without accumulation (the
    linear model counts its calls, the MLP its BatchNorm batches; both from 0)."""
    return [{"kind": "nan", "rank": rank, "at": step - 1}]


def nan_config(tmp_path, name, **sections):
    base = {
        "job": {"name": JOB_NAME, "model": "linear", "samples": 64, "features": 4, "faults": nan_at(1, 6)},
        "run": {"name": name},
        "data": {"batch_size": 8, "num_workers": 0},  # 64 samples, 2 ranks: 4 steps per epoch
        "train": {"epochs": 2, "progress_bar": False, "log_every": 4},
        "checkpoint": {"every_steps": 2},
    }
    for key, values in sections.items():
        base[key] = {**base.get(key, {}), **values}
    return write_config(tmp_path, base)


def test_error_names_the_step_the_rank_and_the_last_good_checkpoint(tmp_path):
    result = run_launch("local", "--cpu", "--nproc", "2", str(nan_config(tmp_path, "nan")), timeout=150)
    run_dir = tmp_path / "runs" / "nan"
    good = run_dir / "checkpoints" / "step_00000004.pt"
    assert result.returncode == 1, result.stderr
    assert (f"error: the loss became NaN or infinite at step 6 on rank 1; the last good checkpoint is {good}; "
            f"continue from it with `launch resume {run_dir}`") in result.stderr
    assert "Traceback" not in result.stderr
    # The checkpoint named is complete, loadable and finite; no later one was written.
    assert verify(good) is None
    state = load(good)
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert [found.step for found in list_step_checkpoints(run_dir / "checkpoints")][-1] == 4


def test_skip_drops_the_step_on_every_rank_together(tmp_path):
    config = nan_config(tmp_path, "skip", train={"on_nonfinite": "skip"},
                        checkpoint={"every_steps": 1, "keep_last": 20})
    result = run_launch("local", "--cpu", "--nproc", "2", str(config), timeout=150)
    run_dir = tmp_path / "runs" / "skip"
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):  # rank 0's loss was fine; it skipped the same step as rank 1
        log = (run_dir / "logs" / f"rank_{rank}.log").read_text()
        assert log.count("non-finite gradients, step skipped on every rank") == 1
        assert "step 6: non-finite gradients" in log

    def weights(step):
        return load(run_dir / "checkpoints" / f"step_{step:08d}.pt")["model"]

    assert all(torch.equal(weights(5)[k], weights(6)[k]) for k in weights(5))  # step 6 changed nothing
    assert not all(torch.equal(weights(6)[k], weights(7)[k]) for k in weights(6))  # step 7 did
    assert all(torch.isfinite(v).all() for v in weights(8).values())
    logged = [m for m in metrics(run_dir) if "train/loss" in m]
    assert logged[-1]["train/skipped_steps"] == 1
    assert all(math.isfinite(m["train/loss"]) for m in logged)  # the NaN is not averaged into the loss


def test_fp16_leaves_skipping_to_the_gradient_scaler_and_counts_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # A classifier (the MLP): its small gradients fit fp16 at the scaler's initial scale, so the only
    # step the scaler skips is the NaN's (a regression's large ones overflow for the first steps).
    config = nan_config(tmp_path, "fp16", job={"model": "mlp", "faults": nan_at(0, 3)},
                        train={"precision": "fp16", "epochs": 1, "log_every": 1})
    assert main(["debug", str(config)]) == 0  # fp16's NaN is the scaler's business, not an error
    logged = [m for m in metrics(tmp_path / "runs" / "fp16-debug") if "train/loss" in m]
    assert [m["train/skipped_steps"] for m in logged][:4] == [0, 0, 1, 1]
