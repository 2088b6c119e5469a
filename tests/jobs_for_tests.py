"""Small jobs for the resume and fault tests: a tiny model on generated data, seconds per run.

``FaultJob`` trains a little MLP (with BatchNorm and Dropout, so the model's
buffers and the training loop's random stream both matter) on generated data
whose "augmentation" draws noise per sample. It can also:

* record, per rank, the sample ids of every micro-batch it trains on
  (``record_dir/rank_R.jsonl``), to check that each sample is seen once;
* inject one fault, remembered by a marker file so a restarted or relaunched
  run does not repeat it: ``kill -9`` of its own worker, a stop signal to the
  ``launch`` process (which torch's elastic agent forwards to every worker),
  or a ``kill -9`` of rank 0 at an exact point inside a checkpoint write;
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
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from jobs.base import Job

JOB_FILE = Path(__file__).resolve()
JOB_NAME = f"{JOB_FILE}:FaultJob"


class NoisyPoints(Dataset):
    """Fixed points of ``classes`` clusters; each item adds fresh noise from the global generator."""

    def __init__(self, samples: int, features: int, classes: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(samples) % classes
        centres = torch.randn(classes, features, generator=generator) * 2
        self.points = centres[self.labels] + torch.randn(samples, features, generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        # Drawn from the global generator: exact only if the library seeds it per sample.
        noise = 0.1 * torch.randn(self.points.shape[1])
        return self.points[index] + noise, self.labels[index], torch.tensor(index)


class FaultJob(Job):
    @dataclass(frozen=True)
    class Config:
        samples: int = 96
        features: int = 8
        classes: int = 4
        hidden: int = 16
        dropout: float = 0.2
        ballast_mb: float = 0.0  # a frozen parameter of this size: big checkpoints, no extra compute
        record_dir: Optional[str] = None  # each rank appends the sample ids it trains on
        marker: Optional[str] = None  # the fault happens only while this file does not exist
        fault: Literal["none", "kill", "launcher_signal", "kill_in_save"] = "none"
        fault_rank: int = 0
        fault_call: int = 0  # kill / launcher_signal: before this process's micro-batch number (0-based)
        fault_signal: str = "SIGTERM"  # launcher_signal: SIGTERM or SIGUSR2
        fault_step: int = 0  # kill_in_save: the checkpoint of this step
        fault_phase: Literal["before_rename", "after_rename"] = "before_rename"
        save_delay_s: float = 0.0  # rank 0 sleeps this long inside every checkpoint write

    def __init__(self, config, env):
        super().__init__(config, env)
        self.calls = 0
        if env.rank == 0 and (config.fault == "kill_in_save" or config.save_delay_s > 0):
            _instrument_checkpoint_writes(config)

    def build_model(self) -> nn.Module:
        c = self.config
        model = nn.Sequential(nn.Linear(c.features, c.hidden), nn.BatchNorm1d(c.hidden), nn.ReLU(),
                              nn.Dropout(c.dropout), nn.Linear(c.hidden, c.classes))
        if c.ballast_mb > 0:
            numel = int(c.ballast_mb * 2**20 / 4)
            model.register_parameter("ballast", nn.Parameter(torch.zeros(numel), requires_grad=False))
        return model

    def build_datasets(self):
        c = self.config
        return NoisyPoints(c.samples, c.features, c.classes, seed=1), NoisyPoints(32, c.features, c.classes, seed=2)

    def training_step(self, model: nn.Module, batch) -> torch.Tensor:
        x, y, ids = batch
        self._maybe_fault()
        self.calls += 1
        if self.config.record_dir:
            path = Path(self.config.record_dir) / f"rank_{self.env.rank}.jsonl"
            with open(path, "a") as handle:
                handle.write(json.dumps({"ids": ids.tolist(), "world_size": self.env.world_size,
                                         "restart": self.env.restart_count, "pid": os.getpid()}) + "\n")
        return F.cross_entropy(model(x), y)

    def evaluation_step(self, model: nn.Module, batch):
        x, y, _ = batch
        logits = model(x)
        return {"accuracy": ((logits.argmax(1) == y).sum(), len(y))}

    def _maybe_fault(self) -> None:
        c = self.config
        if c.fault not in ("kill", "launcher_signal") or self.env.rank != c.fault_rank or self.calls != c.fault_call:
            return
        if not _claim(c.marker):
            return
        if c.fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            # The worker's parent is the `launch` process, which runs torch's elastic agent.
            os.kill(os.getppid(), getattr(signal, c.fault_signal))


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

    def __init__(self, real, config):
        self._real, self._config = real, config

    def __getattr__(self, name):
        return getattr(self._real, name)

    def replace(self, source, target):
        c, target_path = self._config, Path(target)
        if target_path.suffix == ".pt" and target_path.name.startswith("step_"):
            if c.save_delay_s > 0:
                time.sleep(c.save_delay_s)
            doomed = (c.fault == "kill_in_save" and target_path.name == f"step_{c.fault_step:08d}.pt")
            if doomed and _claim(c.marker):
                if c.fault_phase == "after_rename":
                    self._real.replace(source, target)
                self._real.kill(self._real.getpid(), signal.SIGKILL)
        return self._real.replace(source, target)


def _instrument_checkpoint_writes(config) -> None:
    import ddp.checkpoint

    if not isinstance(ddp.checkpoint.os, _OsWithFaults):
        ddp.checkpoint.os = _OsWithFaults(os, config)


def recorded_ids(record_dir: Path) -> list[dict]:
    """Every recorded micro-batch of every rank, as dicts with ``ids``, ``world_size``, ``restart``, ``pid``."""
    rows = []
    for path in sorted(Path(record_dir).glob("rank_*.jsonl")):
        rank = int(path.stem.split("_")[1])
        for line in path.read_text().splitlines():
            rows.append({"rank": rank, **json.loads(line)})
    return rows
