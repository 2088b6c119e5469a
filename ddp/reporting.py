"""What a run tells its user: per-rank log files, rank 0's console, metrics.jsonl, TensorBoard, a progress bar.

Only rank 0 writes metrics, TensorBoard files and the console; every rank
writes its own ``logs/rank_N.log``. TensorBoard and tqdm are imported lazily,
so a run that does not use them does not pay for them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ddp.env import DistEnv

LOG_FORMAT = "%(asctime)s [rank %(rank)s] %(levelname)s %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(run_dir: Path, env: DistEnv, console: bool = True) -> Path:
    """Every rank logs to its own file; rank 0 also to the console. Returns the file's path."""
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"rank_{env.rank}.log"
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_launcher", False):
            root.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = [logging.FileHandler(log_file)]
    if console and env.is_main:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler._launcher = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter(env.rank))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return log_file


class MetricsSink:
    """Rank 0's scalars: one JSON line each in metrics.jsonl, and a TensorBoard event file.

    The event file is written by ``ddp.tensorboard_events``: one event per log
    step, ~50 us in all, where tensorboard's SummaryWriter takes ~150 ms to
    import and ~100 us per scalar. Writing here, in the training thread, is
    cheaper than handing the records to a writer thread: on a busy CPU the two
    threads' contention for the GIL cost more than the writing itself.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._writer = None
        if not enabled:
            return
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from ddp.tensorboard_events import ScalarEventWriter

            self._writer = ScalarEventWriter(run_dir / "tensorboard")

    def write(self, step: int, scalars: dict[str, float], epoch: int | None = None) -> None:
        if not self.enabled:
            return
        now = time.time()
        record: dict[str, Any] = {"step": step, "time": round(now, 3)}
        if epoch is not None:
            record["epoch"] = epoch
        record.update(scalars)
        self._jsonl.write(json.dumps(record) + "\n")
        if self._writer is not None:
            self._writer.write(step, scalars, wall_time=now)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._writer is not None:
            self._writer.close()


class Waited:
    """Iterates over ``iterable``, adding up how long each item took to arrive.

    Around a data loader this is the time the training loop sat blocked on its
    data; two clock reads per batch (~0.2 us).
    """

    def __init__(self, iterable):
        self._iterator = iter(iterable)
        self.seconds = 0.0

    def __iter__(self) -> "Waited":
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self._iterator)
        finally:
            self.seconds += time.perf_counter() - start

    def take(self) -> float:
        """The seconds waited since the last ``take``."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class Progress:
    """A tqdm bar on rank 0 when stderr is a terminal; otherwise nothing at all."""

    def __init__(self, enabled: bool, total: int, initial: int = 0, desc: str = ""):
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False,
                             mininterval=0.5)

    def update(self, steps: int = 1, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def code_revision() -> str | None:
    """The git revision of the working directory's checkout (the user's code), if it is one."""
    import subprocess

    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def write_environment(run_dir: Path, env: DistEnv, device, backend: str, hostnames: list[str]) -> None:
    """Rank 0's record of where and with what the run ran (appended per launch: a resume may differ)."""
    import platform

    import torch

    record = {
        "time": round(time.time(), 3),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device": str(device),
        "backend": backend if env.distributed else None,
        "world_size": env.world_size,
        "nnodes": env.nnodes,
        "launched_by": env.source,
        "restart_count": env.restart_count,
        "hostnames": hostnames,
        "git_revision": code_revision(),
    }
    with open(run_dir / "env.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
