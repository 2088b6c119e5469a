"""What every benchmark shares: alternating runs, ratios with their spread, and running commands in a terminal.

A comparison runs ours and the baseline in turn, ``rounds`` times, swapping
which goes first each round so that a drift of the machine's load (other
jobs, thermal throttling) falls on both alike. Each round gives one ratio
ours/baseline; the median is the figure, min and max its spread. Benchmarks
print; they never fail on a slow or busy machine.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class BenchError(RuntimeError):
    """A benchmark's command failed; the message holds the end of its output."""


@dataclass
class Comparison:
    """Measurements of ours and the baseline, one pair per round."""

    name: str
    unit: str
    target: float  # for the ratio ours/baseline
    higher_is_better: bool = False  # True for throughput: the target is then a minimum
    ours: list[float] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def ratios(self) -> list[float]:
        return [o / b for o, b in zip(self.ours, self.baseline)]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def met(self) -> bool:
        return self.median >= self.target if self.higher_is_better else self.median <= self.target

    @property
    def best_ratio(self) -> float:
        """Ours' best run over the baseline's best: other processes only ever slow a run down,
        so on a busy machine this is the steadier estimate of the two programs' own ratio."""
        best = max if self.higher_is_better else min
        return best(self.ours) / best(self.baseline)

    def summary(self) -> str:
        ratios = self.ratios
        sign = ">=" if self.higher_is_better else "<="
        verdict = "met" if self.met else f"MISSED by {abs(self.median - self.target):.3f}"
        return (f"{self.name}: ours/baseline {self.median:.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}, "
                f"{len(ratios)} rounds; best run over best run {self.best_ratio:.3f}); target {sign} "
                f"{self.target}: {verdict}\n"
                f"    ours {_spread(self.ours)} {self.unit}, baseline {_spread(self.baseline)} {self.unit}"
                + (f"\n    {self.note}" if self.note else ""))


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.4g} [{min(values):.4g} .. {max(values):.4g}]"


RESULTS: list = []  # every Comparison and Report of this process, for the closing table


@dataclass
class Report:
    """A figure that is reported, not compared (e.g. the share of time spent waiting for data)."""

    name: str
    text: str

    def summary(self) -> str:
        return f"{self.name}: {self.text}"


def compare(name: str, ours: Callable[[], float], baseline: Callable[[], float], *, rounds: int, unit: str,
            target: float, higher_is_better: bool = False) -> Comparison:
    """Alternate ``ours()`` and ``baseline()`` (each returns one measurement) and print the ratio."""
    result = Comparison(name, unit, target, higher_is_better)
    for round_ in range(rounds):
        first_ours = round_ % 2 == 0
        pair = {}
        for side in (("ours", "baseline") if first_ours else ("baseline", "ours")):
            pair[side] = (ours if side == "ours" else baseline)()
        result.ours.append(pair["ours"])
        result.baseline.append(pair["baseline"])
        print(f"  round {round_ + 1}/{rounds}: ours {pair['ours']:.4g} {unit}, baseline {pair['baseline']:.4g} "
              f"{unit}, ratio {pair['ours'] / pair['baseline']:.3f}", flush=True)
    RESULTS.append(result)
    print(result.summary(), flush=True)
    return result


def report(name: str, text: str) -> Report:
    entry = Report(name, text)
    RESULTS.append(entry)
    print(entry.summary(), flush=True)
    return entry


def rounds_from_env(default: int) -> int:
    """``BENCH_ROUNDS`` overrides every benchmark's number of rounds (e.g. 1 for a smoke run)."""
    return int(os.environ.get("BENCH_ROUNDS", default))


# -- running commands ---------------------------------------------------------------------------


@dataclass
class Finished:
    returncode: int
    output: str  # the end of what the command wrote to its terminal
    started: float  # time.time() just before the process was created
    seconds: float


def run_in_terminal(command: list[str], *, env: dict | None = None, timeout: float = 600,
                    cwd: Path = ROOT) -> Finished:
    """Run ``command`` with a pseudo-terminal as stdout and stderr, as a user at a terminal would.

    Progress bars draw only on a terminal; under a pipe they would be off and
    their cost would not be measured. The output is drained as it comes (a full
    terminal buffer would block the command) and its last 20 kB kept.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, columns
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not data:
                return
            chunks.append(data)
            if len(chunks) > 64:
                del chunks[:-32]

    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                "OMP_NUM_THREADS": THREADS, **(env or {})}
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    started = time.time()
    start_clock = time.perf_counter()
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=full_env,
                                   cwd=cwd, start_new_session=True)
    finally:
        os.close(slave)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
        code = -9
    seconds = time.perf_counter() - start_clock
    reader.join(timeout=5)
    os.close(master)
    output = b"".join(chunks)[-20000:].decode(errors="replace")
    finished = Finished(code, output, started, seconds)
    if code != 0:
        raise BenchError(f"{' '.join(map(str, command))} exited with {code}; its output ended with:\n"
                         f"{output[-4000:]}")
    return finished


def launch_command(*args: str) -> list[str]:
    """``launch ARGS`` through the installed console script, as a user types it."""
    script = BIN / "launch"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "launcher", *args]


def torchrun_command(*args: str) -> list[str]:
    script = BIN / "torchrun"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "torch.distributed.run", *args]


RAW_TRAIN = ROOT / "bench" / "raw_train.py"
# Both sides run with the same threads per process: OMP_NUM_THREADS if set, else 1. One is what
# torchrun and ours give each of 2 processes on 2 cores, and on a machine shared with other jobs
# a 2-thread process is 2-5x slower whenever another process takes a core (its threads wait
# for each other), which would drown every ratio in noise.
THREADS = os.environ.get("OMP_NUM_THREADS", "1")
# BENCH_DEVICE=cuda runs benchmarks 1-3 on GPUs: ``launch local --gpus N`` against torchrun on NCCL.
DEVICE = os.environ.get("BENCH_DEVICE", "cpu")


def ours_launch_args(nproc: int) -> list[str]:
    return ["local", "--gpus", str(nproc)] if DEVICE == "cuda" else ["local", "--cpu", "--nproc", str(nproc)]


class Scratch:
    """A temporary directory for one benchmark's configs, runs and probe files."""

    def __init__(self, name: str):
        self.path = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self._count = 0

    def fresh(self, stem: str) -> str:
        self._count += 1
        return f"{stem}-{self._count}"

    def write_config(self, name: str, sections: dict) -> Path:
        path = self.path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(sections, sort_keys=False))
        return path

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def workload_config(scratch: Scratch, *, kind: str, size: int, steps: int, batch_size: int, num_workers: int,
                    probe_file: Path, probe_steps: list[int], run_name: str, lr: float = 0.05,
                    log_every: int = 10) -> Path:
    """Our config for a bench workload: what raw_train.py does, as a user would write it."""
    return scratch.write_config(run_name, {
        "job": {"name": "bench.workload_job:Workload", "kind": kind, "size": size,
                "probe_file": str(probe_file), "probe_steps": probe_steps},
        "run": {"name": run_name, "dir": str(scratch.path / "runs"), "seed": 0},
        "data": {"batch_size": batch_size, "num_workers": num_workers, "prefetch_factor": 2},
        "optim": {"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "train": {"epochs": 1, "max_steps": steps, "log_every": log_every, "progress_bar": True},
        "checkpoint": {"resume": False},
    })


def raw_args(*, kind: str, size: int, steps: int, batch_size: int, num_workers: int, probe_file: Path,
             probe_steps: list[int], lr: float = 0.05, log_every: int = 10) -> list[str]:
    return [str(RAW_TRAIN), "--device", DEVICE, "--workload", kind, "--size", str(size), "--steps", str(steps),
            "--batch-size", str(batch_size), "--num-workers", str(num_workers), "--lr", str(lr),
            "--log-every", str(log_every), "--probe-file", str(probe_file),
            "--probe-steps", ",".join(map(str, probe_steps))]


def first_metrics_time(run_dir: Path) -> float:
    """time.time() of the first training record in a run's metrics.jsonl (logged at the first step)."""
    with open(run_dir / "metrics.jsonl") as handle:
        for line in handle:
            record = json.loads(line)
            if "train/loss" in record:
                return record["time"]
    raise BenchError(f"{run_dir}/metrics.jsonl has no training record")


def machine() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, OMP_NUM_THREADS={THREADS}, load average {os.getloadavg()[0]:.1f}"
            + (f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if DEVICE == "cuda" else ""))
