"""Exact resume: stop anywhere, resume, end bitwise where an uninterrupted run ends.

The real training loop runs in this process (one worker, no launcher start-up:
about a second a run). The stop is a real SIGTERM, sent by the test job to its
own process while it trains on a chosen micro-batch, so it lands at an exact step.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from ddp.config import Config, build
from ddp.layout import Found, list_step_checkpoints, read_marker, step_path, verify
from ddp.trainer.state import ResumeError
from tests.support.helpers import assert_same_weights, final_weights, train_here
from tests.support.job import JOB_NAME

pytestmark = pytest.mark.timeout(120)

BASE = {
    "data": {"batch_size": 8, "num_workers": 0},
    "optim": {"lr": 0.05},
    # Votes on a stop every step: these tests stop at exact points of tiny, millisecond steps.
    "train": {"epochs": 2, "log_every": 5, "progress_bar": False, "stop_check_s": 0},
    "checkpoint": {"every_steps": 5, "keep_last": 3},
}


def merged(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for section, values in changes.items():
        out.setdefault(section, {}).update(values)
    return out


def make_config(tmp_path: Path, name: str, job: dict | None = None, **sections) -> Config:
    raw = merged(BASE, sections)
    raw["job"] = {"name": JOB_NAME, "marker_dir": str(tmp_path / f"markers-{name}"), **(job or {})}
    raw["run"] = {"name": name, "dir": str(tmp_path / "runs")}
    (tmp_path / f"markers-{name}").mkdir(parents=True, exist_ok=True)
    return build(Config, raw)


def run_dir_of(config: Config) -> Path:
    return Path(config.run.dir) / config.run.name


def stop_before(micro_batch: int) -> dict:
    """A SIGTERM to this very process while it trains on micro-batch ``micro_batch`` of the run (from 0)."""
    return {"faults": [{"kind": "signal", "rank": 0, "at": micro_batch, "target": "self", "signal": "SIGTERM"}]}


def saved_state(run_dir: Path, step: int) -> dict:
    return torch.load(step_path(run_dir / "checkpoints", step), weights_only=True)


def newest_valid(directory: Path) -> Found | None:
    """The newest step checkpoint whose completion marker vouches for its size and checksum."""
    valid = [found for found in list_step_checkpoints(directory) if verify(found.path) is None]
    return valid[-1] if valid else None


SHAPES = {  # name: (job keys, other sections); micro-batches per epoch, steps per epoch
    "plain": ({}, {}),  # 96 samples / 8: 12 micro-batches = 12 steps per epoch
    "accumulate, partial last batch": ({"samples": 100}, {"train": {"accumulate": 2}}),  # 13 micro, 7 steps
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each shape's run without a stop, once per module."""
    root = tmp_path_factory.mktemp("uninterrupted")
    runs = {}
    for name, (job, sections) in SHAPES.items():
        config = make_config(root, name.replace(" ", "_").replace(",", ""), job, **sections)
        outcome = train_here(config)
        assert outcome.status == "finished"
        runs[name] = run_dir_of(config)
    return runs


CASES = [
    # (shape, stop before micro-batch, step the stop lands on, what it exercises)
    ("plain", 6, 7, "mid-epoch"),
    ("plain", 11, 12, "on the last batch of an epoch: the epoch ends as usual, evaluated and saved"),
    ("plain", 12, 13, "on the first batch after an epoch boundary"),
    ("accumulate, partial last batch", 5, 3, "between the micro-batches of an accumulated step"),
    ("accumulate, partial last batch", 12, 7, "on the partial last micro-batch of an epoch"),
]


@pytest.mark.parametrize("shape,before,step,what", CASES, ids=[case[3].split(":")[0] for case in CASES])
def test_stop_then_resume_is_bitwise_identical(tmp_path, uninterrupted, shape, before, step, what):
    job, sections = SHAPES[shape]
    config = make_config(tmp_path, "stopped", {**job, **stop_before(before)}, **sections)
    run_dir = run_dir_of(config)

    first = train_here(config)
    assert (first.status, first.step) == ("stopped", step)
    assert verify(step_path(run_dir / "checkpoints", step)) is None
    second = train_here(config)
    assert second.status == "finished"
    assert_same_weights(final_weights(uninterrupted[shape]), final_weights(run_dir))


def test_a_stop_on_the_last_batch_of_an_epoch_saves_the_epoch_end_checkpoint(tmp_path):
    config = make_config(tmp_path, "edge", stop_before(11))
    run_dir = run_dir_of(config)
    assert train_here(config).status == "stopped"
    state = saved_state(run_dir, 12)
    # Not "epoch 0, all consumed": the epoch ended as usual.
    assert (state["loader"]["epoch"], state["train_state"]["step"], state["loader"]["consumed"]) == (1, 12, 0)
    assert read_marker(step_path(run_dir / "checkpoints", 12))["kind"] == "epoch"
    evaluated = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(record["step"] == 12 and "val/accuracy" in record for record in evaluated)


def test_resume_says_which_file_and_step(tmp_path, caplog):
    config = make_config(tmp_path, "said", stop_before(3))
    train_here(config)
    caplog.set_level("INFO")
    train_here(config)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming from")]
    assert lines == [f"resuming from {run_dir_of(config) / 'checkpoints' / 'step_00000004.pt'}: "
                     "step 4, epoch 0, 32 samples into the epoch"]


def test_async_checkpoints_give_the_same_run(tmp_path, uninterrupted):
    config = make_config(tmp_path, "async", stop_before(8), checkpoint={"async_save": True})
    run_dir = run_dir_of(config)
    assert train_here(config).status == "stopped"
    # run_training returned: the background write of the stop's checkpoint has finished.
    assert newest_valid(run_dir / "checkpoints").step == 9
    assert train_here(config).status == "finished"
    assert_same_weights(final_weights(uninterrupted["plain"]), final_weights(run_dir))


# -- a config that does not fit the checkpoint ------------------------------------------------

@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("short")
    config = make_config(root, "short", train={"max_steps": 2})
    assert train_here(config).status == "finished"
    return root


@pytest.mark.parametrize("change,expected", [
    ({"job": {"hidden": 32}}, ["model does not match", "0.weight: checkpoint (16, 8) vs model (32, 8)",
                                "job.hidden 16 -> 32", "launch resume RUN_DIR job.hidden=16"]),
    ({"job": {"samples": 80}}, ["trained on 96 samples but this config's training set has 80",
                                 "job.samples=96"]),
    ({"optim": {"name": "adamw"}}, ["optimizer state does not fit", "optim.name=\"sgd\""]),
], ids=["model shape", "dataset size", "optimizer"])
def test_a_config_that_breaks_the_resume_is_a_clear_error(short_run, change, expected):
    change = copy.deepcopy(change)
    job = change.pop("job", {})
    config = make_config(short_run, "short", job, train={"max_steps": 4}, **change)
    with pytest.raises(ResumeError) as raised:
        train_here(config)
    for text in expected:
        assert text in str(raised.value)
