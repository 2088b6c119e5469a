"""GPU only: samples/s and scaling efficiency from 1 to N GPUs, ours and the hand-written loop.

For N = 1, 2, 4, ... up to the GPUs present (or ``BENCH_GPUS``): the CNN
workload with 256 samples per GPU per step, ``launch local --gpus N`` and
``torchrun --nproc-per-node N bench/raw_train.py --device cuda``. Scaling
efficiency is samples/s at N GPUs over N times samples/s at one. Skipped on a
machine without CUDA.

    python -m bench.gpu_scaling
"""

from __future__ import annotations

import os
import sys

from bench.harness import Scratch, launch_command, raw_args, report, run_in_terminal, torchrun_command, workload_config
from bench.workload import fastest_step_s, read_probes

BATCH, FIRST, LAST, WINDOW = 256, 20, 220, 20


def samples_per_s(scratch: Scratch, gpus: int, side: str) -> float:
    name = scratch.fresh(f"scaling-{side}-{gpus}")
    probe_file = scratch.path / f"{name}.probe.jsonl"
    common = dict(kind="cnn", size=(LAST + 10) * BATCH * gpus, steps=LAST + 1, batch_size=BATCH, num_workers=2,
                  probe_file=probe_file, probe_steps=list(range(FIRST, LAST + 1, WINDOW)))
    if side == "ours":
        config = workload_config(scratch, run_name=name, **common)
        run_in_terminal(launch_command("local", "--gpus", str(gpus), str(config)))
    else:
        args = [*raw_args(**common)]
        args[args.index("--device") + 1] = "cuda"
        run_in_terminal(torchrun_command("--standalone", f"--nproc-per-node={gpus}", *args))
    probes = read_probes(probe_file)
    return BATCH * gpus / fastest_step_s(probes, FIRST, LAST, WINDOW)


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: skipped (run on a GPU machine)")
        return
    most = int(os.environ.get("BENCH_GPUS", torch.cuda.device_count()))
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= most]
    with Scratch("scaling") as scratch:
        for side in ("ours", "baseline"):
            rates = {n: samples_per_s(scratch, n, side) for n in counts}
            report(f"GPU scaling, {side}", ", ".join(
                f"{n} GPU(s) {rates[n]:.0f} samples/s (efficiency {rates[n] / (n * rates[1]):.0%})" for n in counts))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
