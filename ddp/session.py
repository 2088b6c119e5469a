"""The core as a library for your own training loop.

::

    import ddp

    with ddp.init(seed=0) as run:                        # process group, device, seeding, stop signals
        model = run.prepare(Net())                       # on the device; DDP with several ranks
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = run.loader(train_set, batch_size=32)    # resumable, exactly seeded per sample
        checkpointer = run.checkpointer("runs/mine")     # under `launch`: the run directory by default
        state = {"model": model, "optimizer": optimizer, "loader": loader, "step": 0}
        checkpointer.restore(state)                      # in place; nothing when there is no checkpoint
        while loader.epoch < 3:
            for x, y in loader:
                loss = F.cross_entropy(model(x.to(run.device)), y.to(run.device))
                optimizer.zero_grad(); loss.backward(); optimizer.step()
                state["step"] += 1
                if run.stop_requested():                 # SIGTERM, SIGUSR2, Ctrl-C: agreed by every rank
                    checkpointer.save(state, kind="stop")
                    raise SystemExit(ddp.EXIT_RESUMABLE)
            checkpointer.save(state)

The same code runs in one process (nothing distributed is set up), under
``torchrun``, ``launch local``, ``launch slurm`` or ``srun``. Killed anywhere
and restarted, it continues bitwise where the last checkpoint was.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ddp import distributed, rng
from ddp.checkpointer import Checkpointer
from ddp.config import DDPConfig
from ddp.env import DistEnv, read_env
from ddp.layout import RunDir
from ddp.loader import ResumableLoader
from ddp.model import wrap
from ddp.signals import StopRequest, StopVote

log = logging.getLogger(__name__)

RUN_DIR_VARIABLE = "LAUNCH_RUN_DIR"  # set by `launch` for the workers it starts


@dataclass
class Session:
    """Where this process is in the job, and the pieces of the core bound to it."""

    env: DistEnv
    device: torch.device
    backend: str
    seed: int
    stop: StopRequest
    vote: StopVote
    owns_stop: bool = True  # False when the caller installed ``stop`` and uninstalls it

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def prepare(self, model: nn.Module, *, sync_bn: bool = False, channels_last: bool = False,
                compile: bool = False, ddp: DDPConfig = DDPConfig()) -> nn.Module:
        """The model on this rank's device; DDP around it with several ranks (SyncBatchNorm on CUDA if
        asked). Then gives each rank its own random stream (dropout, augmentation in the loop)."""
        wrapped = wrap(model, self.device, self.env, sync_bn=sync_bn, channels_last=channels_last,
                       compile=compile, ddp=ddp)
        rng.seed_everything(self.seed + 1 + self.env.rank)
        return wrapped

    def loader(self, dataset: Dataset, batch_size: int, *, shuffle: bool = True, drop_last: bool = False,
               num_workers: int = 0, prefetch_factor: int = 2, start_method: str = "forkserver",
               seed: int | None = None, pin_memory: bool = True) -> ResumableLoader:
        """This rank's share of ``dataset`` in batches, every epoch in a new seeded order, resumable.

        ``pin_memory`` takes effect on CUDA only."""
        return ResumableLoader(dataset, batch_size, rank=self.env.rank, world_size=self.env.world_size,
                               seed=self.seed if seed is None else seed, shuffle=shuffle, drop_last=drop_last,
                               num_workers=num_workers, prefetch_factor=prefetch_factor,
                               start_method=start_method, pin_memory=pin_memory and self.device.type == "cuda")

    def checkpointer(self, directory: str | os.PathLike | None = None, *, keep_last: int = 2,
                     async_save: bool = False, resume: bool = True) -> Checkpointer:
        """Checkpoints in ``directory``; under ``launch``, the run directory's ``checkpoints/`` by default."""
        if directory is None:
            run_dir = os.environ.get(RUN_DIR_VARIABLE)
            if not run_dir:
                raise ValueError("give the checkpoint directory: run.checkpointer('runs/NAME') (under `launch` "
                                 "it defaults to the run directory)")
            directory = RunDir(run_dir).checkpoints
        return Checkpointer(Path(directory), env=self.env, device=self.device, keep_last=keep_last,
                            async_save=async_save, resume=resume)

    def stop_requested(self) -> bool:
        """Whether to stop now: True on every rank at the same call once any rank got a stop signal.

        Call it on every rank at the same points (once per step); it is cheap (a small
        all-reduce every ``stop_check_s`` seconds, not every call).
        """
        return self.vote.agreed()

    def close(self) -> None:
        self.vote.close()
        if self.owns_stop:
            self.stop.uninstall()
        distributed.destroy_process_group()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def init(*, seed: int = 0, device: str = "auto", backend: str | None = None, timeout_s: float = 1800.0,
         deterministic: bool = False, stop_check_s: float = 0.5, env: DistEnv | None = None,
         stop: StopRequest | None = None) -> Session:
    """Read this process's place in the job (torchrun's, SLURM's or a single process's variables), pick
    its device, join the process group, seed every generator alike (build the model next: identical
    weights everywhere) and turn SIGTERM, SIGUSR2 and Ctrl-C into an agreed stop.

    ``stop``: an already installed StopRequest (a caller that must catch signals from earlier on).
    """
    env = env or read_env()
    chosen = distributed.select_device(env, device)
    if deterministic:
        rng.use_deterministic_algorithms()
    distributed.init_process_group(env, chosen, backend, timeout_s)
    rng.seed_everything(seed)
    owns_stop = stop is None
    stop = stop or StopRequest().install()
    return Session(env=env, device=chosen, backend=distributed.backend_for(chosen, backend), seed=seed,
                   stop=stop, vote=StopVote(stop, every_s=stop_check_s), owns_stop=owns_stop)
