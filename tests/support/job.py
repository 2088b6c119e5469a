"""The one test job: a tiny model on generated data, seconds per run, that can fail on purpose.

``job: {name: tests.support.job:TestJob, ...}`` (or by file path, ``JOB_NAME``).

The model is a little MLP (with BatchNorm and Dropout, so the model's buffers
and the training loop's random stream both matter) or a linear regression;
the data are points around fixed centres whose "augmentation" draws noise per
sample (or a regression target). It can also:

* record, per rank, the sample ids of every micro-batch it trains on
  (``record_dir/rank_R.jsonl``), to check that each sample is seen once;
* sleep in every step (``step_sleep_s``; a run that outlasts a signal), or on
  one rank only (``slow_rank``, ``slow_s``: a straggler);
* inject faults at exact points, each at most once (a marker file in
  ``marker_dir`` remembers it across restarts and relaunches). ``at`` is the
  micro-batch's position in the run, from 0: BatchNorm's batch counter for the
  MLP (checkpoints restore it, so it is exact across restarts), the calls in
  this process for the linear model. Each fault is a mapping:

  ==============================================  ==============================================
  ``{kind: kill, rank: R, at: K}``                rank R kills itself (SIGKILL)
  ``{kind: signal, rank, at, signal, target}``    a signal to ``launch`` (target: launcher, the
                                                  default), to itself (self), or to its node's
                                                  agent and workers (group)
  ``{kind: raise, rank, at}``                     an exception in training_step
  ``{kind: stall, rank, at}``                     sleeps for ever (a hang in user code)
  ``{kind: nan, rank, at}``                       the loss is NaN
  ``{kind: breakpoint, at, file}``                writes its pid to ``file``, then breakpoint()
  ``{kind: fsize_limit, at, bytes, after}``       rank 0 limits the size of files it writes
                                                  (once ``after`` exists, if given)
  ``{kind: kill_in_save, step, phase}``           rank 0 dies writing step's checkpoint,
                                                  phase before_rename or after_rename
  ``{kind: signal_in_save, signal}``              once a signal fault has fired, rank 0 signals
                                                  ``launch`` and itself again during a write
  ==============================================  ==============================================
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ddp.job import Job

JOB_FILE = Path(__file__).resolve()
JOB_NAME = f"{JOB_FILE}:TestJob"


class NoisyPoints(Dataset):
    """Points around fixed centres; each item adds fresh noise from the global generator, and its id."""

    def __init__(self, points: torch.Tensor, labels: torch.Tensor, regression: bool = False):
        self.points, self.labels, self.regression = points, labels, regression

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        # Drawn from the global generator: exact only if the library seeds it per sample.
        noise = 0.1 * torch.randn(self.points.shape[1])
        x = self.points[index] + noise
        target = x.sum(0, keepdim=True) if self.regression else self.labels[index]
        return x, target, torch.tensor(index)


def make_points(samples: int, features: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(samples) % classes
    centres = torch.randn(classes, features, generator=generator) * 2
    return centres[labels] + torch.randn(samples, features, generator=generator), labels


def add_ballast(model: nn.Module, megabytes: float) -> None:
    """A frozen parameter of ``megabytes``: a checkpoint that big, at no extra compute."""
    if megabytes > 0:
        numel = int(megabytes * 2**20 / 4)
        model.register_parameter("ballast", nn.Parameter(torch.zeros(numel), requires_grad=False))


class TestJob(Job):
    __test__ = False  # not a pytest test class

    @dataclass(frozen=True)
    class Config:
        model: str = "mlp"  # mlp (Linear, BatchNorm, ReLU, Dropout, Linear) or linear (a regression)
        samples: int = 96
        val_samples: int = 32
        features: int = 8
        classes: int = 4
        hidden: int = 16
        dropout: float = 0.2
        ballast_mb: float = 0.0
        rank_dependent_model: bool = False  # rank r's model has r extra outputs
        fail_in_constructor: bool = False
        record_dir: str | None = None
        marker_dir: str | None = None
        faults: tuple = ()
        save_delay_s: float = 0.0  # rank 0 sleeps this long inside every checkpoint write
        step_sleep_s: float = 0.0  # every training step sleeps this long
        slow_rank: int | None = None  # this rank sleeps slow_s more in every step
        slow_s: float = 0.0

    def __init__(self, config, env):
        super().__init__(config, env)
        if config.fail_in_constructor:
            raise ValueError("the job's own constructor failed on purpose")
        self.calls = 0
        if env.rank == 0 and (config.save_delay_s > 0 or any(f["kind"].endswith("_in_save") for f in config.faults)):
            _instrument_checkpoint_writes(self)

    def build_model(self) -> nn.Module:
        c = self.config
        outputs = (1 if c.model == "linear" else c.classes) + (self.env.rank if c.rank_dependent_model else 0)
        if c.model == "linear":
            model = nn.Sequential(nn.Linear(c.features, outputs))
        else:
            model = nn.Sequential(nn.Linear(c.features, c.hidden), nn.BatchNorm1d(c.hidden), nn.ReLU(),
                                  nn.Dropout(c.dropout), nn.Linear(c.hidden, outputs))
        add_ballast(model, c.ballast_mb)
        return model

    def build_datasets(self):
        c = self.config
        points, labels = make_points(c.samples + c.val_samples, c.features, c.classes)
        regression = c.model == "linear"
        train = NoisyPoints(points[: c.samples], labels[: c.samples], regression)
        val = NoisyPoints(points[c.samples:], labels[c.samples:], regression) if c.val_samples else None
        return train, val

    def position(self, model: nn.Module) -> int:
        """The micro-batch's place in the run, from 0 (see the module docstring)."""
        bare = getattr(getattr(model, "module", model), "_orig_mod", getattr(model, "module", model))
        if self.config.model == "mlp":
            return int(bare[1].num_batches_tracked)
        return self.calls - 1

    def training_step(self, model: nn.Module, batch) -> torch.Tensor:
        c = self.config
        self.calls += 1
        x, y, ids = batch
        position = self.position(model)
        scale = self._maybe_fault(position)
        if c.record_dir:
            path = Path(c.record_dir) / f"rank_{self.env.rank}.jsonl"
            with open(path, "a") as handle:
                handle.write(json.dumps({"ids": ids.tolist(), "position": position, "world_size": self.env.world_size,
                                         "restart": self.env.restart_count, "pid": os.getpid(),
                                         "time": time.time()}) + "\n")
        if c.step_sleep_s:
            time.sleep(c.step_sleep_s)
        if c.slow_rank == self.env.rank and c.slow_s:
            time.sleep(c.slow_s)
        out = model(x)
        loss = F.mse_loss(out, y) if c.model == "linear" else F.cross_entropy(out, y)
        return loss * scale

    def evaluation_step(self, model: nn.Module, batch):
        x, y, _ = batch
        out = model(x)
        if self.config.model == "linear":
            return {"mse": ((out - y).pow(2).sum(), len(x))}
        return {"accuracy": ((out.argmax(1) == y).sum(), len(y)),
                "loss": (F.cross_entropy(out, y, reduction="sum"), len(y))}

    # -- faults --------------------------------------------------------------------------------------

    def _claim(self, index: int) -> bool:
        marker_dir = self.config.marker_dir
        return _claim(None if marker_dir is None else str(Path(marker_dir) / f"fault_{index}"))

    def _maybe_fault(self, position: int) -> float:
        """Fire the faults due at ``position`` on this rank; returns the loss's factor (NaN for a nan fault)."""
        scale = 1.0
        for index, fault in enumerate(self.config.faults):
            kind = fault["kind"]
            if kind.endswith("_in_save") or fault.get("at") != position:
                continue
            if kind not in ("fsize_limit", "breakpoint") and fault.get("rank", 0) != self.env.rank:
                continue
            if kind in ("fsize_limit", "breakpoint") and self.env.rank != 0:
                continue
            if not self._claim(index):
                continue
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "signal":
                target = fault.get("target", "launcher")
                signum = getattr(signal, fault.get("signal", "SIGTERM"))
                if target == "self":
                    os.kill(os.getpid(), signum)
                elif target == "group":
                    os.killpg(os.getpgid(os.getppid()), signum)
                else:  # the worker's parent is the `launch` process, which runs torch's elastic agent
                    os.kill(os.getppid(), signum)
            elif kind == "raise":
                raise ValueError(f"rank {self.env.rank} exploded at position {position}")
            elif kind == "stall":
                while True:  # a hang in user code: a deadlock, a dead file system, ...
                    time.sleep(3600)
            elif kind == "nan":
                scale = float("nan")
            elif kind == "breakpoint":
                Path(fault["file"]).write_text(str(os.getpid()))
                breakpoint()
            elif kind == "fsize_limit":
                deadline = time.monotonic() + 60
                while fault.get("after") and not Path(fault["after"]).exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                # The soft limit only: a file write past it fails with EFBIG (Python ignores SIGXFSZ).
                _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fault.get("bytes", 1 << 20), hard))
        return scale

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

    def __init__(self, real, job: TestJob):
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


def _instrument_checkpoint_writes(job: TestJob) -> None:
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
