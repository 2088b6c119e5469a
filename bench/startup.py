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

* ``3c``: the whole command, from its start to its exit, of a short training
  run on 2 processes (the benchmark CNN, 130 steps, one loader process each,
  and the MLP, 1,400 steps), ``launch local`` against ``torchrun`` with the raw
  loop (target 1.05): start-up, steps, the end of the run (ours writes its last
  checkpoint) and the shutdown together. Both train the same thing (the losses
  at the last step are compared).

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
    BenchError,
    Scratch,
    compare,
    first_metrics_time,
    launch_command,
    ours_launch_args,
    rounds_from_env,
    run_in_terminal,
    torchrun_command,
)
from bench.step_time import BATCH, workload_command
from bench.workload import read_probes

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


# (workload, steps, loader processes) of the whole-command comparison, on 2 processes.
WHOLE_RUNS = (("cnn", 130, 1), ("mlp", 1400, 0))


def whole_command(scratch: Scratch, side: str, kind: str, steps: int, workers: int, losses: dict) -> float:
    """Seconds from the command to its exit; the loss at the last step goes to ``losses[side]``."""
    name = scratch.fresh(f"whole-{kind}-{side}")
    probe_file = scratch.path / f"{name}.probe.jsonl"
    common = dict(kind=kind, size=(steps + 10) * BATCH * 2, steps=steps, batch_size=BATCH, num_workers=workers,
                  probe_file=probe_file, probe_steps=[steps - 1])
    finished = run_in_terminal(workload_command(scratch, side, 2, name, common))
    losses[side].add(round(read_probes(probe_file)[steps - 1]["loss"], 5))
    return finished.seconds


def compare_whole_commands(scratch: Scratch, kind: str, steps: int, workers: int, rounds: int) -> None:
    losses: dict[str, set] = {"ours": set(), "baseline": set()}
    compare(f"3c. whole command, {kind} {steps} steps, launch local --cpu --nproc 2 vs torchrun",
            lambda: whole_command(scratch, "ours", kind, steps, workers, losses),
            lambda: whole_command(scratch, "baseline", kind, steps, workers, losses),
            rounds=rounds, unit="s", target=1.05)
    if losses["ours"] != losses["baseline"] or len(losses["ours"]) != 1:
        raise BenchError(f"3c ({kind}): ours and the baseline did not train the same thing: {losses}")


def main() -> None:
    rounds = rounds_from_env(4)
    with Scratch("startup") as scratch:
        compare("3a. command to first step, launch local --cpu --nproc 2 vs torchrun",
                lambda: ours(scratch, "local"), lambda: baseline(scratch, "local"),
                rounds=rounds, unit="s", target=1.15)
        compare("3b. command to first step, launch debug vs python",
                lambda: ours(scratch, "debug"), lambda: baseline(scratch, "debug"),
                rounds=rounds, unit="s", target=1.2)
        for kind, steps, workers in WHOLE_RUNS:
            compare_whole_commands(scratch, kind, steps, workers, rounds)


if __name__ == "__main__":
    main()
