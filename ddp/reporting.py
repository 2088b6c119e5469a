"""What a run tells its user: per-rank logs, rank 0's console, metrics.jsonl, TensorBoard, a progress bar,
and state.json, where the run stands (for ``launch status`` and ``launch ls``).

Only rank 0 writes metrics, TensorBoard files, state.json and the console; every
rank writes its own ``logs/rank_N.log``. After a restart the steps since the last
checkpoint are trained again: their records are dropped from metrics.jsonl and
purged from TensorBoard (as SummaryWriter's ``purge_step`` does), so each step
is recorded once. A failed write (a full disk) is one ``StorageError``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ddp import storage
from ddp.env import DistEnv
from ddp.layout import RunDir

LOG_FORMAT = "%(asctime)s [rank %(rank)s] %(levelname)s %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


class _GuardedFileHandler(logging.FileHandler):
    """A log file whose failed write (a full disk) is kept for the training loop, not printed as a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            storage.record_failure(Path(self.baseFilename), error)
            self.setLevel(logging.CRITICAL + 1)  # silent from now on: the run is about to end
        else:
            super().handleError(record)


def setup_logging(run_dir: RunDir, env: DistEnv, console: bool = True) -> Path:
    """Every rank logs to its own file; rank 0 also to the console. Returns the file's path."""
    log_file = run_dir.rank_log(env.rank)
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = _GuardedFileHandler(log_file)
    except OSError as err:
        raise storage.storage_error(log_file, err) from None
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_launcher", False):
            root.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = [file_handler]
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


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a line cut short by a killed process is skipped."""
    records = []
    try:
        text = Path(path).read_text()
    except OSError:
        return records
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise storage.storage_error(path, err) from None


class MetricsSink:
    """Rank 0's scalars: one JSON line each in metrics.jsonl, and a TensorBoard event file.

    ``after_step``: the step the run resumes from; records of later steps (trained
    again now) are removed first. The event file is written by
    ``ddp.tensorboard_events`` (~50 us per log step, where tensorboard's
    SummaryWriter takes ~150 ms to import and ~100 us per scalar).
    """

    def __init__(self, run_dir: RunDir, enabled: bool, after_step: int = 0, tensorboard: bool = True):
        self.enabled = enabled
        self.path = run_dir.metrics
        self._jsonl = None
        self._writer = None
        if not enabled:
            return
        try:
            self._drop_records_after(after_step)
            self._jsonl = open(self.path, "a", buffering=1)
            if tensorboard:
                from ddp.tensorboard_events import ScalarEventWriter

                self._writer = ScalarEventWriter(run_dir.tensorboard, purge_from=after_step + 1)
        except OSError as err:
            raise storage.storage_error(getattr(err, "filename", None) or self.path, err) from None

    def _drop_records_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        records = read_jsonl(self.path)
        kept = [record for record in records if record.get("step", 0) <= step]
        if len(kept) != len(records) or self.path.read_text().count("\n") != len(records):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
            os.replace(tmp, self.path)

    def write(self, step: int, scalars: dict[str, float], epoch: int | None = None) -> None:
        if not self.enabled:
            return
        now = time.time()
        record: dict[str, Any] = {"step": step, "time": round(now, 3)}
        if epoch is not None:
            record["epoch"] = epoch
        record.update(scalars)
        try:
            self._jsonl.write(json.dumps(record) + "\n")
            if self._writer is not None:
                self._writer.write(step, scalars, wall_time=now)
        except OSError as err:
            raise storage.storage_error(self.path, err) from None

    def close(self) -> None:
        for handle in (self._jsonl, self._writer):
            if handle is not None:
                try:
                    handle.close()
                except OSError:
                    pass  # a full disk: the error was raised at the write


class Waited:
    """Iterates over ``iterable``, adding up how long each item took to arrive.

    Around a data loader this is the time the training loop sat blocked on its
    data; two clock reads per batch (~0.2 us).
    """

    def __init__(self, iterable):
        self._iterator = iter(iterable)
        self.seconds = 0.0

    def __iter__(self) -> Waited:
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

    def update(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def code_revision() -> str | None:
    """The git revision of the working directory's checkout (the user's code), if it is one."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def write_environment(run_dir: RunDir, env: DistEnv, device, backend: str, hostnames: list[str]) -> None:
    """Rank 0's record of where and with what the run ran (appended per launch: a resume may differ)."""
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
        # Who started the run: `launch slurm`'s tasks give the workers torchrun's variables, and say so.
        "launched_by": os.environ.get("LAUNCH_LAUNCHED_BY") or env.source,
        "restart_count": env.restart_count,
        "hostnames": hostnames,
        "git_revision": code_revision(),
    }
    append_jsonl(run_dir.env_log, record)


def append_jsonl(path: Path, record: dict) -> None:
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
    except OSError as err:
        raise storage.storage_error(path, err) from None


def write_run_state(run_dir: RunDir, status: str, **details: Any) -> None:
    """Rank 0's state.json: where the run stands, for ``launch status`` and ``launch ls`` (no torch needed)."""
    write_json_atomic(run_dir.state, {"status": status, "updated": round(time.time(), 3),
                                      "host": socket.gethostname(), "pid": os.getpid(), **details})
