"""Training options in one process (the same loop every worker runs): accumulation, mixed precision, clipping,
the run directory's records, continuing with more steps, a job named by its file."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ddp.config import load_config
from tests.support.helpers import REPO, final_weights, train_here

pytestmark = pytest.mark.timeout(300)


def config_for(tmp_path, name, *overrides):
    return load_config(REPO / "configs" / "demo.yaml", [
        f"run.dir={tmp_path}", f"run.name={name}", "job.model=small_mlp", "data.num_workers=0",
        "schedule.name=constant", "schedule.warmup_steps=0", "train.progress_bar=false",
        "checkpoint.every_steps=null", "train.max_steps=12", *overrides,
    ])


def train(tmp_path, name, *overrides):
    outcome = train_here(config_for(tmp_path, name, *overrides), tmp_path / name)
    return outcome, final_weights(tmp_path / name)


def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger(tmp_path):
    _, accumulated = train(tmp_path, "acc", "data.batch_size=16", "train.accumulate=2")
    _, large = train(tmp_path, "large", "data.batch_size=32", "train.accumulate=1")
    for key in large:
        torch.testing.assert_close(accumulated[key], large[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(tmp_path, precision):
    outcome, weights = train(tmp_path, precision, f"train.precision={precision}", "train.max_steps=null",
                             "train.epochs=2", "job.model=small_cnn", "train.clip_grad_norm=1.0")
    assert outcome.status == "finished"
    assert outcome.metrics["val/accuracy"] > 0.8
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    saved = torch.load(tmp_path / precision / "checkpoints" / "last.pt", weights_only=True)
    if precision == "fp16":  # the gradient scaler's state travels with the checkpoint
        assert saved["scaler"]["scale"] > 0


def test_gradient_clipping_bounds_the_update(tmp_path):
    # One SGD step without momentum moves the weights by lr * clipped gradient: its norm is at most lr * max.
    _, start = train(tmp_path, "zero", "optim.lr=1e-12", "train.max_steps=1", "optim.momentum=0")
    _, clipped = train(tmp_path, "clip", "optim.lr=1.0", "train.max_steps=1", "optim.momentum=0",
                       "train.clip_grad_norm=0.01", "optim.weight_decay=0")
    delta = torch.cat([(clipped[k] - start[k]).flatten() for k in start])
    assert delta.norm() <= 0.01 * 1.0001


def test_the_run_directory_records_environment_and_metrics(tmp_path):
    outcome, _ = train(tmp_path, "record")
    run_dir = tmp_path / "record"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in records) and any("val/accuracy" in r for r in records)
    environment = json.loads((run_dir / "env.jsonl").read_text())
    assert environment["world_size"] == 1 and environment["torch"] == torch.__version__
    assert outcome.step == 12


def test_max_steps_then_more_steps_continues_the_run(tmp_path):
    first, _ = train(tmp_path, "cont", "train.max_steps=5")
    assert first.step == 5
    second, _ = train(tmp_path, "cont", "train.max_steps=9")
    assert second.status == "finished" and second.step == 9
    again, _ = train(tmp_path, "cont", "train.max_steps=9")
    assert again.status == "already_finished"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_job_named_by_file_path(tmp_path, num_workers):
    """With loader processes (started from a fork server) too: they import the job's file to unpickle its dataset."""
    job_file = tmp_path / "my_job.py"  # its dataset class is defined in the file too
    job_file.write_text((REPO / "tests" / "support" / "job.py").read_text())
    config = config_for(tmp_path, "byfile", f"data.num_workers={num_workers}")
    config = dataclasses.replace(config, job={"name": f"{job_file}:TestJob", "model": "linear", "features": 4})
    outcome = train_here(config, tmp_path / "byfile", num_workers=None)
    assert outcome.status == "finished" and "val/mse" in outcome.metrics
