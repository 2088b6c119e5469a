"""Putting a run together: the job's model and data, bound to this process's session, ready for the loop.

Everything is built from the public pieces of the core (``Session.prepare``,
``Session.loader``, ``ddp.schedule``): the built-in trainer is one user of
them, as a script of your own is.
"""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ddp import distributed, rng
from ddp.config import Config
from ddp.consistency import check_ranks_agree
from ddp.data import ShardSampler
from ddp.job import Job, JobError
from ddp.layout import RunDir
from ddp.loader import ResumableLoader, make_loader, shut_down
from ddp.model import ddp_module, unwrap
from ddp.optim import build_optimizer
from ddp.precision import grad_scaler
from ddp.reporting import write_environment
from ddp.schedule import Schedule
from ddp.session import Session
from ddp.settings import build


@dataclass
class Parts:
    job: Job
    model: torch.nn.Module  # wrapped: DDP (and compiled) where asked
    ddp: torch.nn.parallel.DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    train_loader: ResumableLoader
    val_loader: DataLoader | None
    train_size: int
    hostnames: list[str]

    def close(self) -> None:
        """End the loaders' worker processes."""
        self.train_loader.close()
        if self.val_loader is not None:
            shut_down(self.val_loader)

    def steps_per_epoch(self, accumulate: int) -> int:
        return max(1, -(-self.train_loader.batches_per_epoch() // accumulate))


def assemble(config: Config, job: Job, session: Session, run_dir: RunDir, num_workers: int | None = None) -> Parts:
    env = session.env
    hostnames = distributed.all_gather_object(socket.gethostname())
    if env.is_main:
        write_environment(run_dir, env, session.device, session.backend, hostnames)
        job.prepare_datasets()  # downloads happen once, before the other ranks look
    distributed.barrier()

    # The same seed on every rank before building the model: identical initial weights.
    rng.seed_everything(config.run.seed)
    bare = job.build_model()
    train_set, val_set = job.build_datasets()
    if len(train_set) == 0:
        raise JobError(f"the training set is empty: {type(job).__name__}.build_datasets() returned no samples; "
                       "check the job's data paths and settings")
    # Before DDP's constructor, which fails obscurely (or hangs) on models that differ.
    check_ranks_agree(config, bare, job, len(train_set))

    train = config.train
    model = session.prepare(bare, sync_bn=train.sync_bn, channels_last=train.channels_last,
                            compile=train.compile, ddp=config.ddp)  # then per-rank random streams
    optimizer = build_optimizer(unwrap(model), config.optim)
    data = config.data
    workers = data.num_workers if num_workers is None else num_workers
    loader_options = dict(num_workers=workers, prefetch_factor=data.prefetch_factor,
                          start_method=data.start_method)
    train_loader = session.loader(train_set, data.batch_size, drop_last=data.drop_last, seed=config.run.seed,
                                  pin_memory=data.pin_memory, **loader_options)
    val_loader = None
    if val_set is not None and len(val_set) > 0:
        val_loader = make_loader(val_set, ShardSampler(len(val_set), env.rank, env.world_size),
                                 data.eval_batch_size or data.batch_size, seed=config.run.seed, rank=env.rank,
                                 pin_memory=data.pin_memory and session.device.type == "cuda", **loader_options)
    return Parts(job=job, model=model, ddp=ddp_module(model), optimizer=optimizer,
                 schedule=Schedule(optimizer, config.schedule, config.optim.lr),
                 scaler=grad_scaler(train.precision, session.device), train_loader=train_loader,
                 val_loader=val_loader, train_size=len(train_set), hostnames=hostnames)


def full_job_section(job: Job):
    """``section -> {"name": ..., every key of the job's config}``: the job's defaults filled in."""

    def expand(section: dict) -> dict:
        rest = {key: value for key, value in section.items() if key != "name"}
        return {"name": section.get("name"), **dataclasses.asdict(build(type(job).Config, rest, prefix="job."))}

    return expand
