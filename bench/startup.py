"""Benchmark 3: time from the command to the first optimizer step, on the demo (digits, small CNN).

* ``launch local --cpu --nproc 2 configs/demo.yaml`` against ``torchrun
  --standalone --nproc-per-node 2 bench/raw_train.py --workload digits``
  (target 1.15);
* ``launch debug configs/demo.yaml`` against ``python bench/raw_train.py
  --workload digits --num-workers 0`` (target 1.2).

The clock starts just before the process is created. Ours has taken its first
step when rank 0 logs step 1 (``train.log_every=1``; metrics.jsonl records the
time); the baseline writes ``time.time()`` to a file right after its first
``optimizer.step()``. Both then stop (``train.max_steps=1``, ``--steps 1``).

Ours does more before its first step, by design: validates the config, checks
that every rank builds the same model, writes the run directory and the
environment record. Both import torch twice (launcher and worker) and
scikit-learn once per worker.

    python -m bench.startup
    BENCH_DEVICE=cuda python -m bench.startup   # --gpus 2 against torchrun on NCCL, launch debug --device cuda
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.harness import (
    DEVICE,
    RAW_TRAIN,
    ROOT,
    Scratch,
    compare,
    first_metrics_time,
    launch_command,
    ours_launch_args,
    rounds_from_env,
    run_in_terminal,
    torchrun_command,
)

DEMO = ROOT / "configs" / "demo.yaml"


def ours(scratch: Scratch, command: str) -> float:
    name = scratch.fresh(f"demo-{command}")
    args = ours_launch_args(2) if command == "local" else ["debug", "--device", DEVICE]
    overrides = [f"run.dir={scratch.path / 'runs'}", f"run.name={name}", "train.max_steps=1", "train.log_every=1"]
    finished = run_in_terminal(launch_command(*args, str(DEMO), *overrides))
    run_dir = scratch.path / "runs" / (name if command == "local" else f"{name}-debug")
    return first_metrics_time(run_dir) - finished.started


def baseline(scratch: Scratch, command: str) -> float:
    marker = scratch.path / f"{scratch.fresh('first-step')}.txt"
    args = [str(RAW_TRAIN), "--device", DEVICE, "--workload", "digits", "--steps", "1", "--batch-size", "32",
            "--lr", "0.05",
            "--first-step-file", str(marker)]
    if command == "local":
        finished = run_in_terminal(torchrun_command("--standalone", "--nproc-per-node=2", *args,
                                                    "--num-workers", "1"))
    else:
        finished = run_in_terminal([sys.executable, *args, "--num-workers", "0"])
    return float(Path(marker).read_text()) - finished.started


def main() -> None:
    rounds = rounds_from_env(4)
    with Scratch("startup") as scratch:
        compare("3a. command to first step, launch local --cpu --nproc 2 vs torchrun",
                lambda: ours(scratch, "local"), lambda: baseline(scratch, "local"),
                rounds=rounds, unit="s", target=1.15)
        compare("3b. command to first step, launch debug vs python",
                lambda: ours(scratch, "debug"), lambda: baseline(scratch, "debug"),
                rounds=rounds, unit="s", target=1.2)


if __name__ == "__main__":
    main()
