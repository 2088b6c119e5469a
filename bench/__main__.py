"""``python -m bench [NAME ...]`` (``make bench``): run every benchmark, or the named ones, and print a summary.

Each benchmark module of this package that defines ``main()`` is one
benchmark; they run in the order below, then any others found. Figures are
printed, never judged: a missed target does not fail the command, a broken
benchmark does (exit status 1, after the others have run). ``BENCH_ROUNDS=N``
sets every benchmark's number of rounds.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback

import bench
from bench import harness

ORDER = ("step_time", "ddp_step_time", "startup", "input_pipeline", "memory", "gpu_scaling", "checkpoint_stall",
         "resume_latency", "exact_resume", "tuning", "peers", "scale")
NOT_BENCHMARKS = {"harness", "workload", "workload_job", "raw_train"}


def benchmark_names() -> list[str]:
    found = sorted(m.name for m in pkgutil.iter_modules(bench.__path__)
                   if m.name not in NOT_BENCHMARKS and not m.name.startswith("_"))
    return [name for name in ORDER if name in found] + [name for name in found if name not in ORDER]


def main(argv: list[str]) -> int:
    names = argv or benchmark_names()
    unknown = sorted(set(names) - set(benchmark_names()))
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(benchmark_names())}",
              file=sys.stderr)
        return 2
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} on {harness.machine()}", flush=True)
    failed = []
    start = time.perf_counter()
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        if not hasattr(module, "main"):
            continue
        print(f"\n## {name}", flush=True)
        began = time.perf_counter()
        try:
            module.main()
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"({name}: {time.perf_counter() - began:.0f} s)", flush=True)
    print(f"\n# summary ({time.perf_counter() - start:.0f} s)")
    for result in harness.RESULTS:
        print(result.summary())
    if failed:
        print(f"\nbenchmarks that failed to run: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
