"""Small jobs for the resume and fault tests: a tiny model on generated data, seconds per run.

``FaultJob`` trains a little MLP (with BatchNorm and Dropout, so the model's
buffers and the training loop's random stream both matter) on generated data
whose "augmentation" draws noise per sample. It can also:

* record, per rank, the sample ids of every micro-batch it trains on
  (``record_dir/rank_R.jsonl``), to check that each sample is seen once;
* inject faults at exact points of the run, each at most once (a marker file
  remembers it across restarts and relaunches): ``kill -9`` of its own worker,
  a stop signal to the ``launch`` process (which torch's elastic agent
  forwards to every worker), or a ``kill -9`` of rank 0 at a given point inside
  a checkpoint write;
* carry ballast (a large frozen parameter) so checkpoints are big, and slow
  down each checkpoint write, to make a write observable from outside.

Used through ``job: {name: /path/to/tests/jobs_for_tests.py:FaultJob, ...}``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from jobs.base import Job
from tests.helpers import add_ballast

JOB_FILE = Path(__file__).resolve()
JOB_NAME = f"{JOB_FILE}:FaultJob"


class NoisyPoints(Dataset):
    """Points around ``classes`` fixed centres; each item adds fresh noise from the global generator."""

    def __init__(self, points: torch.Tensor, labels: torch.Tensor):
        self.points, self.labels = points, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        # Drawn from the global generator: exact only if the library seeds it per sample.
        noise = 0.1 * torch.randn(self.points.shape[1])
        return self.points[index] + noise, self.labels[index], torch.tensor(index)


def make_points(samples: int, features: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(samples) % classes
    centres = torch.randn(classes, features, generator=generator) * 2
    return centres[labels] + torch.randn(samples, features, generator=generator), labels


class FaultJob(Job):
    """A tiny classifier that can record what it trains on and fail on purpose, once per fault."""

    @dataclass(frozen=True)
    class Config:
        samples: int = 96
        val_samples: int = 32
        features: int = 8
        classes: int = 4
        hidden: int = 16
        dropout: float = 0.2
        ballast_mb: float = 0.0  # a frozen parameter of this size: big checkpoints, no extra compute
        record_dir: Optional[str] = None  # each rank appends the sample ids it trains on
        marker_dir: Optional[str] = None  # fault i happens only while marker_dir/fault_i does not exist
        # Each fault a mapping, fired at most once:
        #   {kind: kill, rank: R, at: K}         rank R kills itself (SIGKILL) before global micro-batch K
        #   {kind: signal, rank: R, at: K, signal: SIGTERM|SIGUSR2, target: launcher|self}
        #                                        rank R signals the `launch` process (default) or itself
        #   {kind: kill_in_save, step: S, phase: before_rename|after_rename}   rank 0 dies writing step S
        #   {kind: signal_in_save, signal: SIGTERM}   once a signal fault has fired, rank 0 signals
        #                                        `launch` and itself again while writing the next checkpoint
        faults: tuple = ()
        save_delay_s: float = 0.0  # rank 0 sleeps this long inside every checkpoint write

    def __init__(self, config, env):
        super().__init__(config, env)
        if env.rank == 0 and (config.save_delay_s > 0 or any(f["kind"].endswith("_in_save") for f in config.faults)):
            _instrument_checkpoint_writes(self)

    def build_model(self) -> nn.Module:
        c = self.config
        model = nn.Sequential(nn.Linear(c.features, c.hidden), nn.BatchNorm1d(c.hidden), nn.ReLU(),
                              nn.Dropout(c.dropout), nn.Linear(c.hidden, c.classes))
        add_ballast(model, c.ballast_mb)
        return model

    def build_datasets(self):
        c = self.config
        points, labels = make_points(c.samples + c.val_samples, c.features, c.classes)
        return (NoisyPoints(points[: c.samples], labels[: c.samples]),
                NoisyPoints(points[c.samples:], labels[c.samples:]))

    def training_step(self, model: nn.Module, batch) -> torch.Tensor:
        x, y, ids = batch
        # BatchNorm counts the micro-batches trained on, and a checkpoint restores the count:
        # the position in the whole run, the same on every rank, across restarts and resumes.
        position = int(getattr(model, "module", model)[1].num_batches_tracked)
        self._maybe_fault(position)
        if self.config.record_dir:
            path = Path(self.config.record_dir) / f"rank_{self.env.rank}.jsonl"
            with open(path, "a") as handle:
                handle.write(json.dumps({"ids": ids.tolist(), "position": position, "world_size": self.env.world_size,
                                         "restart": self.env.restart_count, "pid": os.getpid()}) + "\n")
        return F.cross_entropy(model(x), y)

    def evaluation_step(self, model: nn.Module, batch):
        x, y, _ = batch
        logits = model(x)
        return {"accuracy": ((logits.argmax(1) == y).sum(), len(y))}

    def _claim(self, index: int) -> bool:
        marker_dir = self.config.marker_dir
        return _claim(None if marker_dir is None else str(Path(marker_dir) / f"fault_{index}"))

    def _maybe_fault(self, position: int) -> None:
        for index, fault in enumerate(self.config.faults):
            if fault["kind"] not in ("kill", "signal") or fault["rank"] != self.env.rank or fault["at"] != position:
                continue
            if not self._claim(index):
                continue
            if fault["kind"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            # The worker's parent is the `launch` process, which runs torch's elastic agent.
            target = os.getpid() if fault.get("target") == "self" else os.getppid()
            os.kill(target, getattr(signal, fault.get("signal", "SIGTERM")))

    def fired(self, kind: str) -> bool:
        """Whether a fault of this kind has already happened (in this or an earlier process)."""
        marker_dir = self.config.marker_dir
        return marker_dir is not None and any(
            fault["kind"] == kind and (Path(marker_dir) / f"fault_{index}").exists()
            for index, fault in enumerate(self.config.faults))


def _claim(marker: str | None) -> bool:
    """True once: the first caller creates the marker file."""
    if marker is None:
        return True
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


class _OsWithFaults:
    """``os`` as ``ddp.checkpoint`` sees it, with a crash (or a pause) at one ``os.replace``.

    ``write_atomic`` writes ``NAME.tmp``, renames it to ``NAME``, then writes
    ``NAME.done``. Dying just before the rename leaves a complete ``.tmp``;
    just after, a step file with no completion marker. Both are real states a
    crash can leave behind, produced here by the real writing code.
    """

    def __init__(self, real, job: "FaultJob"):
        self._real, self._job = real, job

    def __getattr__(self, name):
        return getattr(self._real, name)

    def replace(self, source, target):
        target_path, config = Path(target), self._job.config
        if target_path.suffix == ".pt" and target_path.name.startswith("step_"):
            if config.save_delay_s > 0:
                time.sleep(config.save_delay_s)
            for index, fault in enumerate(config.faults):
                if (fault["kind"] == "kill_in_save" and target_path.name == f"step_{fault['step']:08d}.pt"
                        and self._job._claim(index)):
                    if fault.get("phase", "before_rename") == "after_rename":
                        self._real.replace(source, target)
                    self._real.kill(self._real.getpid(), signal.SIGKILL)
                if fault["kind"] == "signal_in_save" and self._job.fired("signal") and self._job._claim(index):
                    second = getattr(signal, fault.get("signal", "SIGTERM"))
                    self._real.kill(self._real.getppid(), second)
                    self._real.kill(self._real.getpid(), second)
                    time.sleep(0.5)  # let the launcher take it while this write is still unfinished
        return self._real.replace(source, target)


def _instrument_checkpoint_writes(job: "FaultJob") -> None:
    import ddp.checkpoint

    ddp.checkpoint.os = _OsWithFaults(os, job)


def recorded_ids(record_dir: Path) -> list[dict]:
    """Every recorded micro-batch of every rank, as dicts with ``ids``, ``world_size``, ``restart``, ``pid``."""
    rows = []
    for path in sorted(Path(record_dir).glob("rank_*.jsonl")):
        rank = int(path.stem.split("_")[1])
        for line in path.read_text().splitlines():
            rows.append({"rank": rank, **json.loads(line)})
    return rows
