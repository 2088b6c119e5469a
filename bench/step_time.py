"""Benchmark 1: steady-state step time in one CPU process, ours against the hand-written loop.

Ours is ``launch local --cpu --nproc 1`` with logging every 10 steps,
metrics.jsonl, TensorBoard and the progress bar on (both sides run in a
pseudo-terminal, so the bar draws as it would for a user). The baseline is
``python bench/raw_train.py``, printing the loss every 10 steps. Both train
the same model on the same data with the same seed, batch size, loader
workers and threads; the time per step is measured between two probes taken
inside the step, well after start-up. The losses at the probes must agree:
the check that both did the same work.

    python -m bench.step_time
"""

from __future__ import annotations

import sys

from bench.harness import (BenchError, Scratch, compare, launch_command, raw_args, rounds_from_env,
                           run_in_terminal, torchrun_command, workload_config)
from bench.workload import read_probes

# (workload, first probed step, last probed step): the MLP's steps are ~0.2 ms, the CNN's ~20 ms.
CASES = (("mlp", 200, 3200), ("cnn", 20, 140))
BATCH, WORKERS = 32, 1
TARGETS = {"mlp": 1.03, "cnn": 1.01}


def measure(scratch: Scratch, kind: str, first: int, last: int, nproc: int, side: str) -> tuple[float, float]:
    """Seconds per step between the probes, and the loss at the last probe, of one run."""
    name = scratch.fresh(f"{kind}-{side}")
    probe_file = scratch.path / f"{name}.probe.jsonl"
    size = (last + 10) * BATCH * nproc  # one epoch holds every measured step
    common = dict(kind=kind, size=size, steps=last + 1, batch_size=BATCH, num_workers=WORKERS,
                  probe_file=probe_file, probe_steps=[first, last])
    if side == "ours":
        config = workload_config(scratch, run_name=name, **common)
        run_in_terminal(launch_command("local", "--cpu", "--nproc", str(nproc), str(config)))
    elif nproc == 1:
        run_in_terminal([sys.executable, *raw_args(**common)])
    else:
        run_in_terminal(torchrun_command("--standalone", f"--nproc-per-node={nproc}", *raw_args(**common)))
    probes = read_probes(probe_file)
    return (probes[last]["clock"] - probes[first]["clock"]) / (last - first), probes[last]["loss"]


def compare_step_time(title: str, kind: str, first: int, last: int, nproc: int, target: float, rounds: int):
    losses: dict[str, set] = {"ours": set(), "baseline": set()}
    with Scratch(f"{kind}-{nproc}") as scratch:
        def side(name):
            def run() -> float:
                seconds, loss = measure(scratch, kind, first, last, nproc, name)
                losses[name].add(round(loss, 5))
                return seconds * 1e3
            return run

        result = compare(title, side("ours"), side("baseline"), rounds=rounds, unit="ms/step", target=target)
    same = losses["ours"] == losses["baseline"] and len(losses["ours"]) == 1
    result.note = (f"same work: loss at step {last} {'identical' if same else 'DIFFERS'} "
                   f"(ours {sorted(losses['ours'])}, baseline {sorted(losses['baseline'])})")
    print("    " + result.note, flush=True)
    if not same:
        raise BenchError(f"{title}: ours and the baseline did not train the same thing; the ratio means nothing")
    return result


def main() -> None:
    rounds = rounds_from_env(5)
    for kind, first, last in CASES:
        compare_step_time(f"1. step time, 1 CPU process, {kind}", kind, first, last, 1, TARGETS[kind], rounds)


if __name__ == "__main__":
    main()
