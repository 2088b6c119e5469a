"""A run directory has one owner and one identity: resume from anywhere, no two writers, no orphans.

Each run: the test job's MLP, 101 samples over 2 CPU workers, 8 per batch (7 steps per epoch), 3
epochs, a checkpoint every 4 steps. Faults fire at exact micro-batch positions (tests/support/job.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ddp.codes import EXIT_RESUMABLE, EXIT_USAGE
from ddp.layout import RunDir, list_step_checkpoints, marker_path, sha256_of, verify
from tests.support.helpers import (
    REPO,
    assert_same_weights,
    final_weights,
    run_launch,
    start_launch,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.timeout(300)

SECTIONS = {
    "data": {"batch_size": 8, "num_workers": 0},
    "optim": {"lr": 0.05},
    "train": {"epochs": 3, "log_every": 1, "progress_bar": False, "stop_check_s": 0},
    "checkpoint": {"every_steps": 4, "keep_last": 2},
}


def config_in(directory: Path, name: str, job_name: str | None = None, **job) -> Path:
    """A config in ``directory`` naming the test job by a path relative to the config file."""
    directory.mkdir(parents=True, exist_ok=True)
    if job_name is None:
        shutil.copy(REPO / "tests" / "support" / "job.py", directory / "myjob.py")
        job_name = "myjob.py:TestJob"
    markers = directory / f"markers-{name}"
    markers.mkdir(exist_ok=True)
    return write_config(directory, {**SECTIONS, "run": {"name": name},
                                    "job": {"name": job_name, "samples": 101, "marker_dir": str(markers), **job}},
                        name=f"{name}.yaml")


def launch(config: Path, *extra: str, cwd: Path | None = None, nproc: int = 2):
    """``launch local`` of the config; ``extra`` (options or overrides) after it, as a user may write them."""
    return run_launch("local", "--cpu", "--nproc", str(nproc), str(config), *extra, cwd=cwd)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("reference")
    result = launch(config_in(directory, "clean"), cwd=directory)
    assert result.returncode == 0, result.stderr
    return directory / "runs" / "clean"


@pytest.mark.parametrize("form", ["relative", "absolute"])
def test_resume_from_another_directory_continues_that_run_bitwise(tmp_path, reference, form):
    home, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir(parents=True)
    config = config_in(home, "moved", faults=[{"kind": "signal", "rank": 0, "at": 9, "signal": "SIGTERM"}])
    first = launch(config, cwd=home)
    assert first.returncode == EXIT_RESUMABLE, first.stderr
    run_dir = home / "runs" / "moved"
    target = os.path.relpath(run_dir, elsewhere) if form == "relative" else str(run_dir)
    second = run_launch("resume", target, cwd=elsewhere)
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stderr and not (elsewhere / "runs").exists()
    assert_same_weights(final_weights(reference), final_weights(run_dir))
    saved = (run_dir / "config.yaml").read_text()
    assert str(home / "myjob.py") in saved  # the relative job file, stored absolute


def test_a_second_launch_of_a_running_run_is_refused_naming_the_owner(tmp_path):
    config = config_in(tmp_path, "busy", step_sleep_s=0.3)
    first = start_launch("local", "--cpu", "--nproc", "2", str(config), cwd=tmp_path, log=tmp_path / "first.log")
    run_dir = RunDir(tmp_path / "runs" / "busy")
    wait_for(lambda: run_dir.lock.exists() and list(run_dir.logs.glob("rank_*.log")), 60, what="the first run")
    try:
        second = launch(config, cwd=tmp_path)
        assert second.returncode == EXIT_USAGE
        assert "is in use by `launch local" in second.stderr and f"pid {first.pid}" in second.stderr
        assert f"kill -TERM {first.pid}" in second.stderr
        assert second.stderr.count("error:") == 1
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(120) == EXIT_RESUMABLE
    assert not run_dir.lock.exists()


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


def test_kill_9_of_launch_leaves_no_process_and_the_relaunch_finishes_bitwise(tmp_path, reference):
    config = config_in(tmp_path, "orphans", step_sleep_s=0.05)
    first = start_launch("local", "--cpu", "--nproc", "2", str(config), "data.num_workers=2", cwd=tmp_path,
                         log=tmp_path / "first.log", new_session=True)
    run_dir = RunDir(tmp_path / "runs" / "orphans")
    wait_for(lambda: list_step_checkpoints(run_dir.checkpoints), 120, what="a first checkpoint")
    family = descendants(first.pid)
    assert len(family) >= 4  # 2 workers, their fork servers and loader processes
    first.kill()
    first.wait()
    wait_for(lambda: not alive(family), 10, interval=0.2, what="every process of the killed launch to end")
    again = launch(config, "data.num_workers=2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "took over the run directory's lock" in again.stderr
    assert_same_weights(final_weights(reference), final_weights(run_dir.path))


@pytest.mark.parametrize("fault", [
    {"kind": "signal", "rank": 1, "at": 9, "signal": "SIGTERM", "target": "self"},
    {"kind": "signal", "rank": 1, "at": 9, "signal": "SIGUSR2", "target": "self"},
    {"kind": "signal", "rank": 0, "at": 9, "signal": "SIGINT", "target": "launcher"},
], ids=["SIGTERM to rank 1 only", "SIGUSR2 to rank 1 only", "SIGINT to launch"])
def test_a_stop_signal_anywhere_is_one_line_exit_75_and_a_bitwise_resume(tmp_path, reference, fault):
    config = config_in(tmp_path, "stop", faults=[fault])
    first = launch(config, cwd=tmp_path)
    assert first.returncode == EXIT_RESUMABLE, first.stderr
    lines = [line for line in first.stderr.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and "Continue with `launch resume" in lines[0]
    assert "Traceback" not in first.stderr and "failed" not in first.stderr
    second = launch(config, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert_same_weights(final_weights(reference), final_weights(tmp_path / "runs" / "stop"))


def test_after_a_crash_and_restart_each_step_is_recorded_once(tmp_path, reference):
    config = config_in(tmp_path, "crash", faults=[{"kind": "kill", "rank": 1, "at": 10}])
    result = launch(config, "--max-restarts", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "crash"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in records if "train/loss" in record]
    assert len(steps) == len(set(steps)) == 21
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == sorted(set(steps))
    restart = json.loads((run_dir / "restarts.jsonl").read_text().splitlines()[0])
    assert restart["failures"][0]["rank"] == 1 and "no error report" in restart["cause"].split(";")[0]
    assert_same_weights(final_weights(reference), final_weights(run_dir))


def test_starting_over_moves_the_old_run_aside_and_keeps_the_stop_checkpoint(tmp_path, reference):
    config = config_in(tmp_path, "over", step_sleep_s=0.1)
    assert launch(config, cwd=tmp_path).returncode == 0
    run_dir = RunDir(tmp_path / "runs" / "over")
    for found in list_step_checkpoints(run_dir.checkpoints):  # every step file damaged
        found.path.write_bytes(found.path.read_bytes()[:100])
    refused = launch(config, cwd=tmp_path)
    assert refused.returncode == 1 and "checkpoint.resume=false" in refused.stderr
    again = start_launch("local", "--cpu", "--nproc", "2", str(config), "checkpoint.resume=false", cwd=tmp_path,
                         log=tmp_path / "again.log")
    wait_for(lambda: (run_dir.checkpoints / "step_00000004.pt.done").exists(), 120, what="a new checkpoint")
    again.send_signal(signal.SIGTERM)
    assert again.wait(120) == EXIT_RESUMABLE
    said = (tmp_path / "again.log").read_text()
    newest = list_step_checkpoints(run_dir.checkpoints)[-1]
    assert f"latest checkpoint {newest.path.name} (step {newest.step})" in said
    assert verify(newest.path) is None and newest.step >= 4
    abandoned = list(run_dir.path.glob("abandoned-*"))
    assert len(abandoned) == 1 and (abandoned[0] / "checkpoints" / "step_00000021.pt.unusable").exists()
    assert all(found.step <= newest.step for found in list_step_checkpoints(run_dir.checkpoints))
    resumed = run_launch("resume", str(run_dir.path), "checkpoint.resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {newest.path}" in resumed.stderr
    assert_same_weights(final_weights(reference), final_weights(run_dir.path))


def test_a_forged_unloadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference):
    config = config_in(tmp_path, "forged", faults=[{"kind": "signal", "rank": 0, "at": 9, "signal": "SIGTERM"}])
    assert launch(config, cwd=tmp_path).returncode == EXIT_RESUMABLE
    run_dir = RunDir(tmp_path / "runs" / "forged")
    newest = list_step_checkpoints(run_dir.checkpoints)[-1].path
    newest.write_bytes(b"PK\x03\x04" + b"\0" * 200)  # a zip header and nothing: fails to load
    marker_path(newest).write_text(json.dumps({"size": newest.stat().st_size, "sha256": sha256_of(newest)}))
    resumed = launch(config, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"set aside unusable checkpoint {newest.name}" in resumed.stderr
    assert (newest.parent / f"{newest.name}.unusable").exists() or not newest.exists()
    assert_same_weights(final_weights(reference), final_weights(run_dir.path))


@pytest.mark.timeout(600)  # eleven launches: ~5 minutes on a busy 2-core machine
def test_async_saves_loader_processes_and_repeated_stops_never_hang(tmp_path):
    """Ten launches, each stopped by SIGTERM at a moment of its own once it trains, with async checkpoints and
    loader processes (the fork hazard): every one ends within its time, and the run ends as an uninterrupted one."""
    config = config_in(tmp_path, "cycles", step_sleep_s=0.02, samples=4000)
    extra = ["data.num_workers=2", "checkpoint.async_save=true", "checkpoint.every_steps=3", "train.log_every=5"]
    clean = launch(config, *extra, "run.name=cycles-clean", cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    delays = [1.5, 0.3, 0.9, 2.0, 0.5, 1.2, 0.1, 1.8, 0.7, 1.4]
    codes = []
    for cycle, delay in enumerate(delays):
        log = tmp_path / f"cycle-{cycle}.log"
        process = start_launch("local", "--cpu", "--nproc", "2", str(config), *extra, cwd=tmp_path, log=log)
        wait_for(lambda log=log, process=process: "INFO epoch" in log.read_text() or process.poll() is not None,
                 120, what="training")
        time.sleep(delay)
        process.send_signal(signal.SIGTERM)
        try:
            codes.append(process.wait(timeout=90))
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail(f"launch hung after SIGTERM (cycle {cycle}): {log.read_text()[-3000:]}")
        assert codes[-1] == EXIT_RESUMABLE, log.read_text()[-3000:]
    finish = launch(config, *extra, cwd=tmp_path)
    assert finish.returncode == 0, finish.stderr
    assert_same_weights(final_weights(tmp_path / "runs" / "cycles-clean"), final_weights(tmp_path / "runs" / "cycles"))
