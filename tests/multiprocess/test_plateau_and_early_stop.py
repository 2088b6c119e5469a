"""The plateau schedule and early stopping: at the right evaluation, the same on every rank, exact across a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddp.config import Config
from ddp.settings import build
from tests.support.helpers import assert_same_weights, final_weights, run_launch, train_here, write_config
from tests.support.job import JOB_NAME

pytestmark = pytest.mark.timeout(300)


def config(tmp_path: Path, name: str, **sections) -> Config:
    raw = {"job": {"name": JOB_NAME, "samples": 64, "val_samples": 32, "dropout": 0.0},
           "data": {"batch_size": 16, "num_workers": 0},
           "optim": {"lr": 0.05},
           "train": {"epochs": 12, "log_every": 1, "progress_bar": False, "stop_check_s": 0},
           "run": {"name": name, "dir": str(tmp_path / "runs")}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return build(Config, raw)


def evaluations(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if "val/loss" in record]


def lrs(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["train/lr"] for record in records if "train/lr" in record}


def test_plateau_lowers_the_rate_after_patience_evaluations_without_improvement(tmp_path):
    # A metric that never improves after the first evaluation: val/accuracy with mode min once it is 1.0.
    cfg = config(tmp_path, "plateau", schedule={"name": "plateau", "metric": "val/loss", "mode": "max",
                                                "patience": 1, "factor": 0.5})
    assert train_here(cfg).status == "finished"
    run_dir = tmp_path / "runs" / "plateau"
    losses = [record["val/loss"] for record in evaluations(run_dir)]
    rates = lrs(run_dir)
    # Replay the rule on the logged metric: "max" mode, so an improvement is a higher loss.
    best, bad, factor, expected = None, 0, 1.0, []
    for loss in losses:
        if best is None or loss > best * (1 + 1e-4):
            best, bad = loss, 0
        else:
            bad += 1
            if bad > 1:
                factor, bad = factor * 0.5, 0
        expected.append(0.05 * factor)
    steps_per_epoch = 4
    for epoch, rate in enumerate(expected, start=1):
        if epoch * steps_per_epoch + 1 in rates:
            assert rates[epoch * steps_per_epoch + 1] == pytest.approx(rate), (epoch, losses)
    assert min(rates.values()) < 0.05  # it did lower the rate


def test_plateau_resumes_bitwise_from_a_kill_between_two_evaluations(tmp_path):
    sections = dict(schedule={"name": "plateau", "metric": "val/loss", "mode": "max", "patience": 1,
                              "factor": 0.5},
                    checkpoint={"every_steps": 3})
    clean = config(tmp_path, "clean", **sections)
    train_here(clean)
    markers = tmp_path / "markers"
    markers.mkdir()
    stopped = config(tmp_path, "stopped", **sections, job={"name": JOB_NAME, "samples": 64, "val_samples": 32,
                                                           "dropout": 0.0, "marker_dir": str(markers),
                                                           "faults": [{"kind": "signal", "rank": 0, "at": 22,
                                                                       "target": "self", "signal": "SIGTERM"}]})
    assert train_here(stopped).status == "stopped"
    assert train_here(stopped).status == "finished"
    assert_same_weights(final_weights(tmp_path / "runs" / "clean"), final_weights(tmp_path / "runs" / "stopped"))
    assert lrs(tmp_path / "runs" / "clean") == lrs(tmp_path / "runs" / "stopped")


EARLY = {"job": {"name": JOB_NAME, "samples": 64, "val_samples": 32, "dropout": 0.0},
         "data": {"batch_size": 8, "num_workers": 0},
         "optim": {"lr": 0.05},
         "train": {"epochs": 30, "log_every": 2, "progress_bar": False, "stop_check_s": 0,
                   "early_stop": {"metric": "val/loss", "mode": "max", "patience": 2}},
         "checkpoint": {"every_steps": 2}}


def test_early_stopping_ends_both_ranks_at_the_same_step_and_says_so(tmp_path):
    path = write_config(tmp_path, {**EARLY, "run": {"name": "early"}})
    result = run_launch("local", "--cpu", "--nproc", "2", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "early"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "early-stopped"
    ended = state["early_stop"]
    assert "finished (early stop at epoch" in result.stderr and f"at epoch {ended['best_epoch']}" in result.stderr
    assert ended["epoch"] - ended["best_epoch"] == 2 and ended["epoch"] < 30
    for rank in (0, 1):  # both ranks trained to the same last step
        log = (run_dir / "logs" / f"rank_{rank}.log").read_text()
        assert f"early stop at epoch {ended['epoch']}" in log or rank == 1
    again = run_launch("local", "--cpu", "--nproc", "2", str(path), cwd=tmp_path)
    assert again.returncode == 0 and "already finished (finished (early stop at epoch" in again.stderr


def test_a_kill_during_the_patience_window_resumes_and_stops_at_the_same_step(tmp_path):
    clean = write_config(tmp_path, {**EARLY, "run": {"name": "clean"}}, name="clean.yaml")
    assert run_launch("local", "--cpu", "--nproc", "2", str(clean), cwd=tmp_path).returncode == 0
    ended = json.loads((tmp_path / "runs" / "clean" / "state.json").read_text())["early_stop"]
    kill_at = (ended["best_epoch"] + 1) * 4 + 1  # inside the patience window: after the best, before the stop
    markers = tmp_path / "markers"
    markers.mkdir()
    killed = write_config(tmp_path, {**EARLY, "run": {"name": "killed"},
                                     "job": {**EARLY["job"], "marker_dir": str(markers),
                                             "faults": [{"kind": "kill", "rank": 1, "at": kill_at}]}},
                          name="killed.yaml")
    result = run_launch("local", "--cpu", "--nproc", "2", "--max-restarts", "1", str(killed), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (markers / "fault_0").exists()
    state = json.loads((tmp_path / "runs" / "killed" / "state.json").read_text())
    assert state["status"] == "early-stopped" and state["step"] == json.loads(
        (tmp_path / "runs" / "clean" / "state.json").read_text())["step"]
    assert state["early_stop"] == ended
    assert_same_weights(final_weights(tmp_path / "runs" / "clean"), final_weights(tmp_path / "runs" / "killed"))
