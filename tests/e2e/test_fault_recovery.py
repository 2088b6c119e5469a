"""Faults injected into ``launch local``: real processes on the CPU with gloo, 2 workers.

Workers are killed with SIGKILL at chosen points (before the first checkpoint,
mid-epoch, just after an epoch boundary, inside a checkpoint write), ``launch``
gets SIGTERM (and a second one during the save), checkpoints are truncated or
replaced by garbage. Each run must end with weights bitwise equal to an
uninterrupted run's, or fail with one clear message.

The test job (tests/support/job.py) injects each fault itself, at an exact
micro-batch of the run (BatchNorm's batch counter, which checkpoints restore),
and only once: a marker file remembers it across restarts and relaunches.

Run: 101 samples over 2 workers (51 each: the sampler pads one), 8 per batch:
7 steps per epoch, the last one short; 3 epochs, 21 steps. Checkpoints every
4 steps and at each epoch's end: 4, 7, 8, 12, 14, 16, 20, 21. Step N trains
micro-batch N - 1.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from ddp.codes import EXIT_RESUMABLE
from ddp.layout import Found, list_step_checkpoints, step_path, verify
from launcher.restarts import NO_REPORT
from tests.support.helpers import assert_same_weights, final_weights, run_launch, write_config
from tests.support.job import JOB_NAME

pytestmark = pytest.mark.timeout(300)

JOB_MODULE = "tests.support.job:TestJob"

SECTIONS = {
    "data": {"batch_size": 8, "num_workers": 0},
    "optim": {"lr": 0.05},
    # Votes on a stop every step: the signals land at exact points of tiny, millisecond steps.
    "train": {"epochs": 3, "log_every": 5, "progress_bar": False, "stop_check_s": 0},
    "checkpoint": {"every_steps": 4, "keep_last": 2},
}


def config_file(directory: Path, name: str, *, num_workers: int = 0, async_save: bool = False,
                faults: list[dict] = ()) -> Path:
    markers = directory / f"markers-{name}"
    markers.mkdir(parents=True, exist_ok=True)
    return write_config(directory, {
        **SECTIONS,
        "data": {**SECTIONS["data"], "num_workers": num_workers},
        "checkpoint": {**SECTIONS["checkpoint"], "async_save": async_save},
        # Named by module with loader processes: they cannot import a job named by file path (a product bug,
        # see tests/multiprocess/test_training_options.py::test_a_job_named_by_file_path).
        "job": {"name": JOB_MODULE if num_workers else JOB_NAME, "samples": 101, "marker_dir": str(markers),
                "faults": list(faults)},
        "run": {"name": name},
    }, name=f"{name}.yaml")


def launch(config: Path, *extra: str):
    return run_launch("local", "--cpu", "--nproc", "2", *extra, str(config))


def newest_valid(directory: Path) -> Found | None:
    """The newest step checkpoint whose completion marker vouches for its size and checksum."""
    valid = [found for found in list_step_checkpoints(directory) if verify(found.path) is None]
    return valid[-1] if valid else None


def copy_run(source: Path, directory: Path, name: str) -> Path:
    """A copy of a finished run under another name, as if it had been launched there."""
    target = directory / "runs" / name
    shutil.copytree(source, target)
    config = yaml.safe_load((target / "config.yaml").read_text())
    config["run"].update(name=name, dir=str(directory / "runs"))
    (target / "config.yaml").write_text(yaml.safe_dump(config))
    return target


def restarts(run_dir: Path) -> list[dict]:
    path = run_dir / "restarts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_one_clear_message(result) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("uninterrupted")
    result = launch(config_file(directory, "clean"))
    assert result.returncode == 0, result.stderr
    return directory / "runs" / "clean"


KILLS = {
    "num_workers=0": dict(
        num_workers=0,
        faults=[{"kind": "kill", "rank": 1, "at": 1},  # early: no checkpoint yet, start over
                {"kind": "kill", "rank": 0, "at": 9},  # mid-epoch 1, after its mid-epoch checkpoint of step 8
                # inside the write of step 12: the step file is in place but has no completion marker
                {"kind": "kill_in_save", "step": 12, "phase": "after_rename"}],
        resumed_from=[None, 8, 8],
    ),
    "num_workers=2, async checkpoints": dict(
        num_workers=2, async_save=True,
        faults=[{"kind": "kill", "rank": 0, "at": 14},  # the first batch after epoch 1's end (checkpoint 14)
                # inside the background write of step 16, before the rename: a .tmp is left
                {"kind": "kill_in_save", "step": 16, "phase": "before_rename"}],
        resumed_from=None,  # 14, or 12 when the kill beat the background write of 14: both are right
    ),
}


@pytest.mark.parametrize("case", list(KILLS))
def test_killed_workers_are_restarted_and_finish_bitwise_equal(tmp_path, uninterrupted, case):
    spec = KILLS[case]
    config = config_file(tmp_path, "killed", num_workers=spec["num_workers"], async_save=spec.get("async_save", False),
                         faults=spec["faults"])
    run_dir = tmp_path / "runs" / "killed"

    result = launch(config, "--max-restarts", "3")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "markers-killed").iterdir()) == [
        f"fault_{i}" for i in range(len(spec["faults"]))], "every fault should have happened"
    assert_same_weights(final_weights(uninterrupted), final_weights(run_dir))

    records = restarts(run_dir)
    assert [r["restart"] for r in records] == list(range(1, len(spec["faults"]) + 1))
    if spec["resumed_from"] is not None:
        assert [r["step"] if r["resumed_from"] else None for r in records] == spec["resumed_from"]
    for record in records:
        assert (record["why"], record["old_world_size"], record["new_world_size"]) == ("failure", 2, 2)
        if record["resumed_from"]:
            assert record["resumed_from"] == str(step_path(run_dir / "checkpoints", record["step"]))
    for record, fault in zip(records, spec["faults"]):
        killed = fault.get("rank", 0)
        assert f"rank {killed}: {NO_REPORT}" in record["cause"]
        assert {"rank": killed, "exit_code": -9, "error": None} in record["failures"]
    assert not list((run_dir / "checkpoints").glob("*.tmp")), "a crash's leftovers should be cleaned up"


def test_sigterm_saves_exits_75_and_a_new_launch_finishes_bitwise_equal(tmp_path, uninterrupted):
    config = config_file(tmp_path, "stopped", num_workers=2, faults=[
        {"kind": "signal", "rank": 1, "at": 9, "signal": "SIGTERM"},  # to `launch`, which passes it on
        {"kind": "signal_in_save", "signal": "SIGTERM"},  # again, to `launch` and rank 0, during the save
    ])
    run_dir = tmp_path / "runs" / "stopped"

    first = launch(config)
    assert first.returncode == EXIT_RESUMABLE, first.stderr
    assert "Traceback" not in first.stderr
    assert "already stopping on SIGTERM" in first.stderr  # the second signal reached `launch`...
    saved = newest_valid(run_dir / "checkpoints")  # ...and did not spoil the checkpoint
    assert saved.step >= 10
    assert f"stopped by SIGTERM: latest checkpoint {saved.path.name}" in first.stderr
    assert not restarts(run_dir)  # a stop is neither a failure nor a restart

    second = launch(config)
    assert second.returncode == 0, second.stderr
    assert f"resuming from {saved.path}: step {saved.step}," in second.stderr
    assert_same_weights(final_weights(uninterrupted), final_weights(run_dir))


def test_a_truncated_latest_checkpoint_is_set_aside_with_one_warning(tmp_path, uninterrupted):
    run_dir = copy_run(uninterrupted, tmp_path, "truncated")
    latest = step_path(run_dir / "checkpoints", 21)
    os.truncate(latest, latest.stat().st_size // 2)

    result = run_launch("resume", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("unusable checkpoint") == 1
    assert ("set aside unusable checkpoint step_00000021.pt as step_00000021.pt.unusable: size "
            in result.stderr)
    assert f"resuming from {run_dir / 'checkpoints' / 'step_00000020.pt'}: step 20," in result.stderr
    assert (run_dir / "checkpoints" / "step_00000021.pt.unusable").is_file()  # kept for a look
    assert_same_weights(final_weights(uninterrupted), final_weights(run_dir))  # step 21 done again


def test_garbage_in_every_checkpoint_is_a_clear_error(tmp_path, uninterrupted):
    run_dir = copy_run(uninterrupted, tmp_path, "garbage")
    for found in list_step_checkpoints(run_dir / "checkpoints"):
        found.path.write_bytes(os.urandom(found.path.stat().st_size))  # same size: only the checksum tells

    result = run_launch("resume", str(run_dir))
    assert_one_clear_message(result)
    assert f"error: no valid checkpoint in {run_dir / 'checkpoints'}; found " in result.stderr
    assert "step_00000021.pt: checksum mismatch" in result.stderr
    assert "step_00000020.pt: checksum mismatch" in result.stderr


def test_a_changed_model_shape_is_a_clear_error_through_launch(tmp_path, uninterrupted):
    run_dir = copy_run(uninterrupted, tmp_path, "reshaped")
    result = run_launch("resume", str(run_dir), "job.hidden=32")
    assert_one_clear_message(result)
    assert "error: the checkpoint's model does not match this config's model" in result.stderr
    assert "launch resume RUN_DIR job.hidden=16" in result.stderr


def test_four_ranks_resume_bitwise_after_a_kill(tmp_path):
    """Past two ranks an all-reduce's sum depends on DDP's bucket layout, which DDP regroups after its
    first step; ``ddp.exact_resume`` makes the first step sum as the regrouped steps do.

    101 samples over 4 workers, 8 per batch: 4 steps per epoch, 12 in all; checkpoints at 4, 8, 12.
    """
    def four_ranks(name: str, faults: list[dict] = ()) -> Path:
        result = run_launch("local", "--cpu", "--nproc", "4", "--max-restarts", "1",
                            str(config_file(tmp_path, name, faults=faults)))
        assert result.returncode == 0, result.stderr
        return tmp_path / "runs" / name

    clean = four_ranks("clean")
    killed = four_ranks("killed", faults=[{"kind": "kill", "rank": 3, "at": 6}])
    assert [(r["step"], r["new_world_size"]) for r in restarts(killed)] == [(4, 4)]
    assert_same_weights(final_weights(clean), final_weights(killed))
