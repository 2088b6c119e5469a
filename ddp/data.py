"""Samplers and loaders that make data order, augmentation and resume exact.

* ``ResumableDistributedSampler`` is ``DistributedSampler`` that can start an
  epoch part-way: it skips the samples already consumed (counted globally)
  without loading them, and re-shards the rest over the current world size,
  so a resumed run sees every remaining sample of the epoch once.
* ``PerSampleSeeded`` seeds the random generators from (seed, epoch, index)
  before each sample's transform. Augmentation is then a function of the
  sample, not of how many samples a worker has produced before, which is what
  makes a mid-epoch resume (or a different ``num_workers``) bitwise exact.
* ``ShardSampler`` gives each rank a disjoint part of the evaluation set with
  no padding, so summed metrics count every sample exactly once.
* ``ResumableLoader`` puts them together: a loader that knows which epoch it is
  in and how far, saves that in a checkpoint and continues from it.

Loader processes start from a fork server by default (``data.start_method``),
not by forking the training process: a fork while another thread of it (gloo's,
the checkpoint writer, the watchdog) holds an interpreter lock leaves the child
deadlocked for ever (seen as a rare silent hang before the first step).
A scheduler's stop signal reaches every process of a job step, so those
processes start with the stop signals blocked (``LoaderWithHelpers``).
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import random
import signal
from contextlib import contextmanager
from multiprocessing import resource_tracker
from multiprocessing.reduction import ForkingPickler
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, get_worker_info

from ddp import file_modules
from ddp.process import die_with, die_with_parent
from ddp.transfer import count_samples


def epoch_order(length: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    if not shuffle:
        return list(range(length))
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)  # as DistributedSampler does
    return torch.randperm(length, generator=generator).tolist()


class ResumableDistributedSampler(Sampler):
    """Yields ``(epoch, index)`` pairs of this rank's share of the epoch's remaining samples.

    The epoch's order is a permutation seeded by (seed, epoch). ``consumed``
    samples of it (globally, over all ranks) are skipped; the rest is padded
    with the order's first samples to a multiple of the world size, as
    ``DistributedSampler`` does, and dealt out round-robin. With the same
    world size this is exactly the uninterrupted sequence; with another, it
    still covers every remaining sample once (plus padding).
    """

    def __init__(self, length: int, rank: int, world_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = False):
        if length <= 0:
            raise ValueError("the training dataset is empty")
        self.length, self.rank, self.world_size = length, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.consumed = 0, 0

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        self.epoch, self.consumed = epoch, min(consumed, self.length)

    def _remaining(self) -> list[int]:
        order = epoch_order(self.length, self.seed, self.epoch, self.shuffle)
        remaining = order[self.consumed:]
        if self.drop_last:
            return remaining[: len(remaining) - len(remaining) % self.world_size]
        padding = (-len(remaining)) % self.world_size
        return remaining + (order * math.ceil(padding / len(order)))[:padding]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # zip and repeat make the pairs in C: a generator would cost ~0.2 us per sample.
        return zip(itertools.repeat(self.epoch), self._remaining()[self.rank :: self.world_size])

    def __len__(self) -> int:
        remaining = self.length - self.consumed
        if self.drop_last:
            return remaining // self.world_size
        return math.ceil(remaining / self.world_size)


class ShardSampler(Sampler):
    """Rank r evaluates samples r, r+W, r+2W, ...: disjoint, complete, no padding."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((0, index) for index in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    # A fixed mixing of three integers (no Python hash(): it is salted per process).
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**63 - 1)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # The CPU generator only: torch.manual_seed would also queue a reseed of every CUDA device
    # with a captured stack trace (~170 us), and in the main process it would reseed the
    # training loop's own dropout stream on the GPU.
    torch.default_generator.manual_seed(seed)


class PerSampleSeeded(Dataset):
    """Wraps a dataset so each ``(epoch, index)`` item is produced under its own seed.

    Every item comes out as if ``random``, numpy's and torch's global generators
    had all been seeded from ``sample_seed(seed, epoch, index)`` just before it
    (~8 us an item). The DataLoader fetches whole batches through ``__getitems__``,
    so in the main process (``num_workers=0``) the training loop's generators are
    saved and restored once per batch. Tensors in memory (torch's ``TensorDataset``
    itself, not a subclass, which could augment) hold no randomness at all and are
    passed through untouched.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._without_randomness = type(dataset) is TensorDataset

    def __reduce__(self):
        # Sent to a loader process: the modules loaded from a file (a job's own dataset class) must be
        # importable there before the dataset is unpickled (ddp.file_modules); tensors still go by
        # shared memory (multiprocessing's pickler, with torch's reducers).
        return _rebuild_seeded, (bytes(ForkingPickler.dumps(self.dataset)), self.seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        if self._without_randomness:
            return [self.dataset[index] for _, index in keys]
        if get_worker_info() is not None:
            return self._seeded_items(keys)  # a loader worker's generators belong to it alone
        # In the main process, the training loop's generators must come out untouched.
        saved = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
        try:
            return self._seeded_items(keys)
        finally:
            torch.default_generator.set_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])  # with numpy's cached gaussian, if it held one

    def _seeded_items(self, keys: list[tuple[int, int]]) -> list:
        items = []
        for epoch, index in keys:
            _seed_all(sample_seed(self.seed, epoch, index))
            items.append(self.dataset[index])
        return items


def _rebuild_seeded(dataset: bytes, seed: int) -> PerSampleSeeded:
    file_modules.install()
    return PerSampleSeeded(ForkingPickler.loads(dataset), seed)


class WorkerSeeder:
    """``worker_init_fn``: a distinct, reproducible seed per (seed, rank, worker)."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank
        self.trainer_pid = os.getpid()  # made in the training process

    def __call__(self, worker_id: int) -> None:
        die_with_parent()  # a training process killed with -9 takes its loader processes along,
        if os.getppid() != self.trainer_pid:
            die_with(self.trainer_pid)  # also those a fork server started (the fork server's children)
        _seed_all(self.seed + 1_000 * self.rank + worker_id)
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


def make_loader(dataset: Dataset, sampler: Sampler, batch_size: int, *, seed: int, rank: int,
                num_workers: int = 0, prefetch_factor: int = 2, start_method: str = "forkserver",
                pin_memory: bool = False, drop_last: bool = False) -> DataLoader:
    extra: dict[str, Any] = {}
    if num_workers > 0:
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
