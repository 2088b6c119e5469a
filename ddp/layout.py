"""The run directory: every file a run keeps, named once, and the rules for its checkpoints.

Torch-free: the launcher, ``launch status`` and ``launch ls`` read a run
directory without importing torch. Every other module takes its paths from
here; none spells a file name of its own.

::

    RUN_DIR/
      config.yaml          the resolved config the workers run (paths in it are absolute)
      launch.json          how the run was launched, so `launch resume` can do it again
      lock.json            the live owner of the run (see ddp.lock)
      state.json           where the run stands: running, finished, stopped, failed, ...
      env.jsonl            one line per launch: versions, devices, hosts
      metrics.jsonl        one line per logged step (each step once, also after restarts)
      restarts.jsonl       one line per restart or membership change of the workers
      resumes.jsonl        one line per `launch resume RUN_DIR KEY=VALUE` change
      tensorboard/         the scalars of metrics.jsonl, for TensorBoard
      abandoned-STAMP/     an earlier run's files, moved aside when it was started over
      checkpoints/         step_NNNNNNNN.pt (+ .done), last.pt, best.pt
      logs/                rank_N.log of every rank; heartbeat_rank_N.json of the watchdog
      slurm/ slurm.json slurm_events.jsonl    a SLURM run's scripts, task logs, jobs, events

A sweep submitted as one array job has a directory of its own (``SweepDir``):
``sweep.json`` (its runs and job), and ``slurm/`` with the array's task logs.

A step checkpoint is valid only with its ``.done`` marker, written after the
file was fsynced and renamed into place, holding the file's size and SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

STEP_FILE = re.compile(r"step_(\d{8})\.pt$")
MARKER_SUFFIX = ".done"
LAST, BEST = "last.pt", "best.pt"


class RunDir:
    """The paths of one run directory. Holds no state beyond its path."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # Files of the run as a whole.
    config = property(lambda self: self.path / "config.yaml")
    launch_record = property(lambda self: self.path / "launch.json")
    lock = property(lambda self: self.path / "lock.json")
    state = property(lambda self: self.path / "state.json")
    env_log = property(lambda self: self.path / "env.jsonl")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    restarts = property(lambda self: self.path / "restarts.jsonl")
    resumes = property(lambda self: self.path / "resumes.jsonl")
    tensorboard = property(lambda self: self.path / "tensorboard")
    checkpoints = property(lambda self: self.path / "checkpoints")
    logs = property(lambda self: self.path / "logs")
    # A SLURM run's: submitit's folder (scripts, pickles, task logs), its job ids, what each job did.
    slurm_folder = property(lambda self: self.path / "slurm")
    slurm_record = property(lambda self: self.path / "slurm.json")
    slurm_events = property(lambda self: self.path / "slurm_events.jsonl")

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank_{rank}.log"

    def heartbeat(self, rank: int) -> Path:
        return self.logs / f"heartbeat_rank_{rank}.json"

    def slurm_rendezvous(self, job_id: str, restart: int) -> Path:
        """Where rank 0 of a SLURM job publishes the port it chose for the process group."""
        return self.slurm_folder / f"rendezvous_{job_id}_{restart}.json"

    def abandoned(self, stamp: str) -> Path:
        """Where the checkpoints, metrics and state of a run started over (``checkpoint.resume=false``) go."""
        return self.path / f"abandoned-{stamp}"

    def abandon(self, stamp: str) -> Path | None:
        """Move an earlier run's checkpoints, metrics, TensorBoard files and state aside; None if there were none."""
        if not list_step_checkpoints(self.checkpoints) and not self.metrics.exists():
            return None
        target = self.abandoned(stamp)
        target.mkdir(parents=True, exist_ok=True)
        for path in (self.checkpoints, self.metrics, self.tensorboard, self.state):
            if path.exists():
                path.rename(target / path.name)
        self.checkpoints.mkdir()  # the new run's, empty
        return target

    def exists(self) -> bool:
        return self.config.is_file()

    def command(self, verb: str, *args: str) -> str:
        """A ``launch VERB RUN_DIR ARGS`` command to suggest in a message, shell-quoted for pasting."""
        return shlex.join(["launch", verb, str(self.path), *args])


class SweepDir:
    """The directory of a sweep submitted as one array job: the runs it holds, and the array's logs."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    record = property(lambda self: self.path / "sweep.json")
    slurm_folder = property(lambda self: self.path / "slurm")

    def exists(self) -> bool:
        return self.record.is_file()


# -- checkpoint files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    path: Path
    step: int


def step_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def marker_path(path: Path) -> Path:
    return path.with_name(path.name + MARKER_SUFFIX)


def list_step_checkpoints(directory: Path) -> list[Found]:
    """Every ``step_N.pt`` in ``directory``, oldest first, complete or not."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = STEP_FILE.match(entry.name)
        if match:
            found.append(Found(entry, int(match.group(1))))
    return sorted(found, key=lambda item: item.step)


def read_marker(path: Path) -> dict | None:
    """The ``.done`` record of a step file (size, sha256, kind), or None when it has none."""
    try:
        record = json.loads(marker_path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, checksum: bool = True) -> str | None:
    """None if ``path`` is a complete checkpoint, else why not. ``checksum=False``: size only (fast)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if not marker_path(path).exists():
        return "no completion marker (written while the run stopped?)"
    record = read_marker(path)
    try:
        if record is None:
            raise ValueError("not a JSON record")
        size = path.stat().st_size
        if size != record["size"]:
            return f"size {size} bytes, expected {record['size']} (truncated?)"
        if checksum and sha256_of(path) != record["sha256"]:
            return "checksum mismatch (corrupted)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable completion marker ({err})"
    return None


def latest_complete(directory: Path) -> Found | None:
    """The newest step file whose marker vouches for its size: cheap enough for a scheduler's grace time."""
    for found in reversed(list_step_checkpoints(directory)):
        if verify(found.path, checksum=False) is None:
            return found
    return None
