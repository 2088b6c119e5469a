"""Benchmark 5: resident memory of a training process, ours against the hand-written loop.

The MLP workload, one process (``launch local --cpu --nproc 1`` against
``python bench/raw_train.py``), 2,000 steps. Each side reads its own
``/proc/self/status`` at steps 200 and 2,000: the peak resident set (VmHWM)
by step 2,000 is compared (target 1.05), and the growth of the resident set
(VmRSS) from step 200 to step 2,000 is reported (none beyond noise expected).

    python -m bench.memory
"""

from __future__ import annotations

import sys

from bench.harness import (
    Scratch,
    compare,
    launch_command,
    raw_args,
    report,
    rounds_from_env,
    run_in_terminal,
    workload_config,
)
from bench.workload import read_probes

EARLY, LATE, BATCH = 200, 2000, 32


def run(scratch: Scratch, side: str) -> dict:
    name = scratch.fresh(f"memory-{side}")
    probe_file = scratch.path / f"{name}.probe.jsonl"
    common = dict(kind="mlp", size=(LATE + 10) * BATCH, steps=LATE + 1, batch_size=BATCH, num_workers=0,
                  probe_file=probe_file, probe_steps=[EARLY, LATE])
    if side == "ours":
        run_in_terminal(launch_command("local", "--cpu", "--nproc", "1", str(workload_config(scratch, run_name=name,
                                                                                              **common))))
    else:
        run_in_terminal([sys.executable, *raw_args(**common)])
    return read_probes(probe_file)


def main() -> None:
    rounds = rounds_from_env(3)
    growth: dict[str, list[float]] = {"ours": [], "baseline": []}
    with Scratch("memory") as scratch:
        def side(name):
            def measure() -> float:
                probes = run(scratch, name)
                growth[name].append((probes[LATE]["vmrss"] - probes[EARLY]["vmrss"]) / 1024)
                return probes[LATE]["vmhwm"] / 1024
            return measure

        compare("5a. peak resident memory of the training process", side("ours"), side("baseline"),
                rounds=rounds, unit="MB", target=1.05)
    report("5b. resident memory growth from step 200 to step 2,000",
           f"ours {', '.join(f'{g:+.1f}' for g in growth['ours'])} MB; "
           f"baseline {', '.join(f'{g:+.1f}' for g in growth['baseline'])} MB")


if __name__ == "__main__":
    main()
