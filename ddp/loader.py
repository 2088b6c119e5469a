"""Loaders and their processes: ``make_loader`` and ``ResumableLoader``, a loader that knows where it is.

Loader processes start from a fork server by default (``data.start_method``),
not by forking the training process: a fork while another thread of it (gloo's,
the checkpoint writer, the watchdog) holds an interpreter lock leaves the child
deadlocked for ever (seen as a rare silent hang before the first step).
A scheduler's stop signal reaches every process of a job step, so those
processes start with the stop signals blocked (``LoaderWithHelpers``), and they
end with the training process (``WorkerSeeder``). The fork server imports torch
and the dataset's module once (``preload_in_fork_server``), so its children
start with them imported instead of importing torch each (seconds of CPU).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import sys
import sysconfig
from contextlib import contextmanager
from multiprocessing import resource_tracker
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ddp.data import PerSampleSeeded, ResumableDistributedSampler, collate, seed_all
from ddp.process import die_with, die_with_parent
from ddp.transfer import count_samples


class WorkerSeeder:
    """``worker_init_fn``: a distinct, reproducible seed per (seed, rank, worker)."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank
        self.trainer_pid = os.getpid()  # made in the training process

    def __call__(self, worker_id: int) -> None:
        die_with_parent()  # a training process killed with -9 takes its loader processes along,
        if os.getppid() != self.trainer_pid:
            die_with(self.trainer_pid)  # also those a fork server started (the fork server's children)
        seed_all(self.seed + 1_000 * self.rank + worker_id)
        torch.set_num_threads(1)  # workers compete with the trainer for cores
        # A stop signal (a scheduler's, sent to every process of a job step; Ctrl-C, to the
        # terminal's process group) is for the training process, which saves and then ends its
        # loader processes; a loader process ended by it would fail the training process first.
        for signum in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)


START_METHODS = ("forkserver", "spawn", "fork")
HELD_SIGNALS = {signal.SIGTERM, signal.SIGUSR2, signal.SIGINT}


@contextmanager
def stop_signals_held():
    """Stop signals wait (they are not lost: they arrive on leaving) while loader processes start.

    SLURM sends SIGTERM (scancel, preemption) and SIGUSR2 (the time-limit warning) to every
    process of a job step. The processes a loader starts inherit the signal mask, through exec
    too: its workers, and multiprocessing's fork server and resource tracker, which ignore
    SIGINT (and the tracker SIGTERM) but nothing else. A fork server killed by the signal takes
    every worker it forked along, and the training process then fails with "DataLoader worker
    exited unexpectedly" instead of saving a checkpoint.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        resource_tracker.ensure_running()  # if it starts now, it unblocks SIGINT and SIGTERM behind it
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class LoaderWithHelpers(DataLoader):
    """A ``DataLoader`` whose processes start with the stop signals held (``stop_signals_held``)."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        with stop_signals_held():
            return super()._get_iterator()


# What every loader process needs: imported once in the fork server, not in each of its children.
FORK_SERVER_PRELOAD = ["__main__", "torch", "ddp.data", "ddp.loader"]


def preload_in_fork_server(dataset: Dataset) -> None:
    """Have the fork server (when this process starts it) import torch and ``dataset``'s module.

    Without this, the server imports only the main module (nothing, under ``python -m``),
    and each loader process imports torch and the dataset's module itself while unpickling
    its dataset: a few seconds of CPU per loader process, before the first batch. Only
    installed modules (ours, torchvision's...) are preloaded: a module of the user's
    folder is not on the server's path, and its import-time code runs where it always did.
    """
    module = sys.modules.get(type(dataset).__module__)
    if module is not None and _installed(module) and module.__name__ not in FORK_SERVER_PRELOAD:
        FORK_SERVER_PRELOAD.append(module.__name__)  # the training and validation sets' modules, say
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(FORK_SERVER_PRELOAD))


def _installed(module) -> bool:
    """From site-packages or one of our packages: importable by name in any process of this interpreter."""
    path = os.path.abspath(getattr(module, "__file__", None) or "/")
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
             *(os.path.join(ours, package) for package in ("ddp", "jobs", "launcher"))]
    return any(path.startswith(os.path.join(root, "")) for root in roots)


def make_loader(dataset: Dataset, sampler: Sampler, batch_size: int, *, seed: int, rank: int,
                num_workers: int = 0, prefetch_factor: int = 2, start_method: str = "forkserver",
                pin_memory: bool = False, drop_last: bool = False) -> DataLoader:
    extra: dict[str, Any] = {}
    if num_workers > 0:
        if start_method == "forkserver":
            preload_in_fork_server(dataset)
        extra = dict(persistent_workers=True, prefetch_factor=prefetch_factor,
                     worker_init_fn=WorkerSeeder(seed, rank),
                     multiprocessing_context=multiprocessing.get_context(start_method))
    # A loader of its own generator: creating an iterator must not draw from the global one,
    # or a resumed run (which creates it at another moment) would drift from an uninterrupted one.
    generator = torch.Generator()
    generator.manual_seed(seed)
    return LoaderWithHelpers(
        PerSampleSeeded(dataset, seed),
        generator=generator,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        **extra,
    )


def shut_down(loader: DataLoader) -> None:
    """End a loader's persistent worker processes now, not at interpreter exit (which a worker that ends
    with ``os._exit`` never reaches: they would linger, and their semaphores would be reported leaked)."""
    iterator = getattr(loader, "_iterator", None)  # where DataLoader keeps a persistent workers' iterator
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


class ResumableLoader:
    """This rank's batches of each epoch, exact and resumable: it knows its epoch and how far it got.

    ``for batch in loader`` yields the rest of the current epoch (all of it, unless
    restored part-way), then moves on to the next epoch: the next ``iter()`` starts
    it. ``set_epoch(e)`` picks an epoch explicitly (the position is kept when ``e``
    is the epoch it is already in). ``state_dict()`` is the position, global over
    the ranks, so a resume on another number of ranks still sees every remaining
    sample of the epoch once.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, num_workers: int = 0, prefetch_factor: int = 2,
                 start_method: str = "forkserver", pin_memory: bool = False):
        self.dataset_size = len(dataset)
        self.world_size = world_size
        self.batch_size = batch_size
        self.sampler = ResumableDistributedSampler(self.dataset_size, rank, world_size, seed, shuffle=shuffle,
                                                   drop_last=drop_last)
        self.loader = make_loader(dataset, self.sampler, batch_size, seed=seed, rank=rank,
                                  num_workers=num_workers, prefetch_factor=prefetch_factor,
                                  start_method=start_method, pin_memory=pin_memory, drop_last=drop_last)
        self.epoch = 0
        self.consumed = 0  # samples of this epoch handed out so far, over all ranks

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def batches_per_epoch(self) -> int:
        """This rank's batches in a whole epoch."""
        whole = ResumableDistributedSampler(self.dataset_size, 0, self.world_size, 0,
                                            drop_last=self.sampler.drop_last)
        share = len(whole)
        return share // self.batch_size if self.loader.drop_last else math.ceil(share / self.batch_size)

    def __len__(self) -> int:
        """This rank's batches left in the current epoch."""
        self.sampler.set_epoch(self.epoch, self.consumed)
        share = len(self.sampler)
        return share // self.batch_size if self.loader.drop_last else math.ceil(share / self.batch_size)

    def __iter__(self):
        self.sampler.set_epoch(self.epoch, self.consumed)
        for batch in self.loader:
            self.consumed = min(self.dataset_size, self.consumed + count_samples(batch) * self.world_size)
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0

    def close(self) -> None:
        shut_down(self.loader)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "dataset_size": self.dataset_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("dataset_size", self.dataset_size) != self.dataset_size:
            raise ValueError(f"the checkpoint's loader went over {state['dataset_size']} samples, this one over "
                             f"{self.dataset_size}: another dataset")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
