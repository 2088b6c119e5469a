"""Benchmark: time from ``launch`` to the first training step, resumed against fresh.

Both sides are ``launch ... --cpu --nproc 2`` in a terminal, training the test
job (tests/support/job.py) with a 100 MB frozen parameter, so the checkpoint
is ~100 MB. The baseline is a fresh run's time from the command's start to its
first step (as metrics.jsonl records it, logging every step). Ours is the time
from ``launch resume RUN_DIR`` of that run to its first step after the resume:
finding the latest valid checkpoint (its SHA-256 checked), loading it on every
rank and restoring the model, optimizer, schedule, random state and position.

Target: at most 1.2 times the fresh start.

    python -m bench.resume_latency
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.harness import BenchError, Scratch, compare, launch_command, rounds_from_env, run_in_terminal

ROOT = Path(__file__).resolve().parents[1]
JOB = f"{ROOT / 'tests' / 'support' / 'job.py'}:TestJob"
BALLAST_MB = 100
TARGET = 1.2


def first_step_after(run_dir: Path, started: float) -> float:
    """time.time() of the first training record written after ``started``."""
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record and record["time"] >= started:
            return record["time"]
    raise BenchError(f"{run_dir}/metrics.jsonl has no training record after the launch")


def main() -> None:
    rounds = rounds_from_env(3)
    with Scratch("resume-latency") as scratch:
        runs: list[Path] = []

        def fresh() -> float:
            name = scratch.fresh("run")
            config = scratch.write_config(name, {
                "job": {"name": JOB, "ballast_mb": BALLAST_MB},
                "run": {"name": name, "dir": str(scratch.path / "runs")},
                "data": {"batch_size": 8, "num_workers": 0},
                "train": {"epochs": 1, "max_steps": 3, "log_every": 1},
                "checkpoint": {"keep_last": 1},
            })
            finished = run_in_terminal(launch_command("local", "--cpu", "--nproc", "2", str(config)))
            run_dir = scratch.path / "runs" / name
            runs.append(run_dir)
            return first_step_after(run_dir, finished.started) - finished.started

        def resumed() -> float:
            run_dir = runs[-1] if runs else None
            if run_dir is None:  # the first round runs ours first: it needs a run to resume
                fresh()
                run_dir = runs[-1]
            finished = run_in_terminal(launch_command("resume", str(run_dir), "train.max_steps=5"))
            if "resuming from" not in finished.output:
                raise BenchError(f"`launch resume {run_dir}` did not resume:\n{finished.output[-2000:]}")
            runs.remove(run_dir)
            return first_step_after(run_dir, finished.started) - finished.started

        compare(f"time to the first step, resumed ({BALLAST_MB} MB checkpoint) vs fresh, 2 CPU workers",
                resumed, fresh, rounds=rounds, unit="s", target=TARGET)


if __name__ == "__main__":
    main()
