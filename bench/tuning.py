"""Benchmark 12: what the launcher's process tuning buys, each part alone and together, against none.

``launch local`` gives each CPU worker glibc allocator settings that keep
freed blocks for reuse instead of returning them to the kernel
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) and its own share of
the cores (affinity, with ``OMP_NUM_THREADS`` matched). ``--no-tuning`` leaves
both at their defaults, as a hand-written loop does; the variants "allocator"
and "affinity" are ``--no-tuning`` with that one part set by hand (a variable
the user sets reaches the workers). Same workload and method as benchmark 1
(fastest window of the probed steps); the variants take turns in an order
rotated every round. Beside each time: minor page faults and context
switches of the training process per step, and its training thread's CPU time.

    python -m bench.tuning
"""

from __future__ import annotations

import statistics

from bench.harness import (
    Scratch,
    launch_command,
    ours_launch_args,
    report,
    rounds_from_env,
    run_in_terminal,
    workload_config,
)
from bench.step_time import BATCH
from bench.workload import fastest_step_s, read_probes

# (workload, first probed step, last probed step, steps per window, loader workers)
CASES = (("cnn", 10, 130, 10, 1), ("mlp", 200, 1400, 100, 0))
PROCESSES = (1, 2)


ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "16777216", "MALLOC_TRIM_THRESHOLD_": "268435456"}
# variant: (launch options, environment)
VARIANTS = {"none": (["--no-tuning"], {}), "allocator": (["--no-tuning"], ALLOCATOR),
            "affinity": (["--no-tuning"], {"LAUNCH_CPU_AFFINITY": "1"}), "shipped": ([], {})}


def measure(scratch: Scratch, kind: str, first: int, last: int, window: int, workers: int, nproc: int,
            variant: str) -> dict:
    name = scratch.fresh(f"{kind}-{variant}")
    probe_file = scratch.path / f"{name}.probe.jsonl"
    config = workload_config(scratch, run_name=name, kind=kind, size=(last + 10) * BATCH * nproc, steps=last + 1,
                             batch_size=BATCH, num_workers=workers, probe_file=probe_file,
                             probe_steps=list(range(first, last + 1, window)))
    options, env = VARIANTS[variant]
    run_in_terminal(launch_command(*ours_launch_args(nproc), *options, str(config)), env=env)
    probes = read_probes(probe_file)
    steps = last - first
    figures = {key: (probes[last][key] - probes[first][key]) / steps for key in ("minflt", "switches", "cpu")}
    return {"ms": fastest_step_s(probes, first, last, window) * 1000, **figures}


def compare_variants(kind: str, first: int, last: int, window: int, workers: int, nproc: int, rounds: int) -> str:
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    names = list(VARIANTS)
    with Scratch(f"tuning-{kind}-{nproc}") as scratch:
        for round_ in range(rounds):
            for variant in names[round_ % len(names):] + names[:round_ % len(names)]:
                runs[variant].append(measure(scratch, kind, first, last, window, workers, nproc, variant))
            print(f"  {kind}, {nproc} process(es), round {round_ + 1}/{rounds}: "
                  + ", ".join(f"{v} {runs[v][-1]['ms']:.3f}" for v in names) + " ms/step", flush=True)
    median = {v: {key: statistics.median(run[key] for run in runs[v]) for key in runs[v][0]} for v in names}
    return "\n".join(
        f"| {kind} | {nproc} | {variant} | {m['ms']:.3f} | {median['none']['ms'] / m['ms']:.2f} | "
        f"{m['minflt']:.0f} | {m['switches']:.1f} | {m['cpu'] * 1000:.2f} |" for variant, m in median.items())


def main() -> None:
    rounds = rounds_from_env(3)
    header = ("| workload | processes | tuning | ms/step | speed vs none | page faults/step | context switches/step "
              "| CPU ms/step |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for nproc in PROCESSES:
        for case in CASES:
            lines.append(compare_variants(*case, nproc, rounds))
    report(f"12. process tuning, each part alone (median of {rounds} rounds)", "\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
