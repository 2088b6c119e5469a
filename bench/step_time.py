"""Benchmark 1: steady-state step time in one CPU process, ours against the hand-written loop.

Ours is ``launch local --cpu --nproc 1`` with logging every 10 steps,
metrics.jsonl, TensorBoard and the progress bar on (both sides run in a
pseudo-terminal, so the bar draws as it would for a user). The baseline is
``python bench/raw_train.py``, printing the loss every 10 steps. Both train
the same model on the same data with the same seed, batch size, loader
workers and threads. Each side probes the clock inside every step 100 (MLP)
or 10 (CNN) steps apart, well after start-up; a run's time per step is its
fastest such window, since other processes on the machine only ever add
time. The losses at the last probe must agree exactly on the CPU: the check
that both did the same work.

    python -m bench.step_time
    BENCH_DEVICE=cuda python -m bench.step_time     # launch local --gpus 1 against python on one GPU
"""

from __future__ import annotations

import statistics
import sys

from bench.harness import (
    DEVICE,
    BenchError,
    Scratch,
    compare,
    launch_command,
    ours_launch_args,
    raw_args,
    rounds_from_env,
    run_in_terminal,
    torchrun_command,
    workload_config,
)
from bench.workload import fastest_step_s, read_probes

# (workload, first probed step, last probed step, steps per window, loader workers). The MLP's
# steps take ~0.5 ms and its data is in memory, where a loader worker only adds inter-process
# copies (~1 ms a batch): it loads in the training process. The CNN's steps take ~20-100 ms;
# one worker loads for it.
CASES = (("mlp", 200, 3200, 100, 0), ("cnn", 10, 250, 10, 1))
BATCH = 32
TARGETS = {"mlp": 1.03, "cnn": 1.01}


def measure(scratch: Scratch, kind: str, first: int, last: int, window: int, workers: int, nproc: int,
            side: str) -> tuple[float, float, float]:
    """Seconds per step in the run's fastest window of ``window`` steps, the training thread's CPU
    seconds per step over all of them, and the loss at the last probe.

    Other processes on the machine only ever add time, so the fastest window
    is the closest to the loop's own speed; both sides are measured alike.
    """
    name = scratch.fresh(f"{kind}-{side}")
    probe_file = scratch.path / f"{name}.probe.jsonl"
    size = (last + 10) * BATCH * nproc  # one epoch holds every measured step
    common = dict(kind=kind, size=size, steps=last + 1, batch_size=BATCH, num_workers=workers,
                  probe_file=probe_file, probe_steps=list(range(first, last + 1, window)))
    run_in_terminal(workload_command(scratch, side, nproc, name, common))
    probes = read_probes(probe_file)
    cpu = (probes[last]["cpu"] - probes[first]["cpu"]) / (last - first)
    return fastest_step_s(probes, first, last, window), cpu, probes[last]["loss"]


def workload_command(scratch: Scratch, side: str, nproc: int, name: str, common: dict) -> list[str]:
    """The command that trains a workload: ``launch local`` (ours), else ``python`` or ``torchrun`` the raw loop."""
    if side == "ours":
        config = workload_config(scratch, run_name=name, **common)
        return launch_command(*ours_launch_args(nproc), str(config))
    if nproc == 1:
        return [sys.executable, *raw_args(**common)]
    return torchrun_command("--standalone", f"--nproc-per-node={nproc}", *raw_args(**common))


def compare_step_time(title: str, kind: str, first: int, last: int, window: int, workers: int, nproc: int,
                      target: float, rounds: int):
    losses: dict[str, set] = {"ours": set(), "baseline": set()}
    cpu: dict[str, list] = {"ours": [], "baseline": []}
    with Scratch(f"{kind}-{nproc}") as scratch:
        def side(name):
            def run() -> float:
                seconds, cpu_seconds, loss = measure(scratch, kind, first, last, window, workers, nproc, name)
                losses[name].add(round(loss, 5))
                cpu[name].append(cpu_seconds)
                return seconds * 1e3
            return run

        result = compare(title, side("ours"), side("baseline"), rounds=rounds, unit="ms/step", target=target)
    same = losses["ours"] == losses["baseline"] and len(losses["ours"]) == 1
    cpu_ratios = [o / b for o, b in zip(cpu["ours"], cpu["baseline"])]
    # CPU time of the training thread is not inflated by other processes taking the core: a steadier
    # view of the loop's own work (but blind to time spent waiting, for data or for other ranks).
    result.note = (f"same work: loss at step {last} {'identical' if same else 'DIFFERS'} "
                   f"(ours {sorted(losses['ours'])}, baseline {sorted(losses['baseline'])}); training thread's CPU "
                   f"time per step ours/baseline: median {statistics.median(cpu_ratios):.3f} "
                   f"(min {min(cpu_ratios):.3f}, max {max(cpu_ratios):.3f})")
    print("    " + result.note, flush=True)
    if not same and DEVICE == "cpu":  # GPU kernels (atomics in cuDNN's backward) are not bitwise repeatable
        raise BenchError(f"{title}: ours and the baseline did not train the same thing; the ratio means nothing")
    return result


def main() -> None:
    rounds = rounds_from_env(5)
    for kind, first, last, window, workers in CASES:
        compare_step_time(f"1. step time, 1 {DEVICE.upper()} process, {kind}", kind, first, last, window, workers,
                          1, TARGETS[kind], rounds)


if __name__ == "__main__":
    main()
