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
"""

from __future__ import annotations

import ctypes
import itertools
import math
import pickle
import random
import signal
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, get_worker_info

from ddp.config import DataConfig


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


class _GlobalGenerator:
    """One of the global generators dataset code draws from: how to seed it, a cheap fingerprint
    of its state (which every draw changes) and, when the fingerprint is the whole state, how to
    set it back."""

    def __init__(self, name: str, seed: Callable[[int], object], fingerprint: Callable[[], object],
                 restore: Callable[[object], object] | None):
        self.name, self.seed, self.fingerprint, self.restore = name, seed, fingerprint, restore


def _numpy_fingerprint() -> bytes:
    bitgen = np.random.get_bit_generator()
    if type(bitgen).__name__ == "MT19937":
        # Its raw state (624 words and a position) through numpy's public ctypes view: 0.5 us,
        # where np.random.get_state() copies it into a new tuple in ~30 us.
        return ctypes.string_at(bitgen.ctypes.state_address, 624 * 4 + 4)
    return pickle.dumps(bitgen.state)  # set_bit_generator() put another kind there: rare, slower


def _same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


GENERATORS = (
    # The CPU generator only: torch.manual_seed would also queue a reseed of every CUDA device
    # with a captured stack trace (~170 us), and in the main process it would reseed the
    # training loop's own dropout stream on the GPU.
    _GlobalGenerator("torch", torch.default_generator.manual_seed, torch.default_generator.get_state,
                     torch.default_generator.set_state),
    # numpy's fingerprint misses the legacy gaussian cache, which lives outside the bit generator.
    _GlobalGenerator("numpy", lambda seed: np.random.seed(seed % 2**32), _numpy_fingerprint, None),
    _GlobalGenerator("random", random.seed, random.getstate, random.setstate),
)


class PerSampleSeeded(Dataset):
    """Wraps a dataset so each ``(epoch, index)`` item is produced under its own seed.

    Every item comes out exactly as if ``random``, numpy's and torch's global
    generators had all been seeded from ``sample_seed(seed, epoch, index)``
    just before it. Seeding all three costs ~8 us per item, as much as fetching
    an in-memory sample, so only the generators the dataset has been seen to
    draw from are seeded: the others are fingerprinted before and after each
    batch, and when one of them has moved, the batch is produced again with it
    seeded too, as is every later batch. A dataset without randomness (tensors
    in memory) then costs well under 1 us per item, one drawing from torch only
    (torchvision's transforms) ~2 us, and the items never depend on it.

    The DataLoader fetches whole batches through ``__getitems__``, so saving and
    restoring the training loop's generators in the main process is paid once
    per batch too (~35 us, most of it Python's ``random.getstate``). Tensors in
    memory (torch's ``TensorDataset`` itself, not a subclass, which could
    augment) hold no randomness at all and are passed through untouched.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._drawn_from: tuple[str, ...] = ()  # learnt per process: it changes the cost, never the items
        self._numpy_known: tuple[bytes, tuple] | None = None  # see _loop_numpy_state
        self._without_randomness = type(dataset) is TensorDataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        if self._without_randomness:
            return [self.dataset[index] for _, index in keys]
        if get_worker_info() is not None:
            # A worker's generators belong to it alone: seeding them is enough.
            return self._produce(keys, {gen.name: gen.fingerprint() for gen in GENERATORS
                                        if gen.name not in self._drawn_from})
        # In the main process, the training loop's generators must come out untouched.
        numpy_state = self._loop_numpy_state()
        if numpy_state[3]:
            # The loop holds a cached numpy gaussian, which a draw would take without moving the
            # bit generator (so unseen by the fingerprint): hide it for the batch.
            np.random.set_state(numpy_state[:3] + (0, 0.0))
        before = {gen.name: gen.fingerprint() for gen in GENERATORS}
        try:
            return self._produce(keys, {name: state for name, state in before.items() if name not in self._drawn_from})
        finally:
            for gen in GENERATORS:
                if gen.restore is not None:
                    gen.restore(before[gen.name])
                elif numpy_state[3] or gen.name in self._drawn_from or not _same(gen.fingerprint(), before[gen.name]):
                    np.random.set_state(numpy_state)

    def _loop_numpy_state(self) -> tuple:
        """np.random.get_state() (~35 us), or its copy from the last batch if nothing drew since.

        A draw moves the bit generator, except one that takes a cached gaussian; a
        state without one that has not moved is therefore still the same state.
        """
        fingerprint = _numpy_fingerprint()
        if self._numpy_known is not None and self._numpy_known[0] == fingerprint:
            return self._numpy_known[1]
        state = np.random.get_state()
        self._numpy_known = None if state[3] else (fingerprint, state)
        return state

    def _produce(self, keys: list[tuple[int, int]], watched: dict[str, object]) -> list:
        items = self._seeded_items(keys)
        moved = tuple(gen.name for gen in GENERATORS
                      if gen.name in watched and not _same(gen.fingerprint(), watched[gen.name]))
        if moved:  # an item drew from a generator that was not seeded for it: produce them all again
            self._drawn_from += moved
            items = self._seeded_items(keys)
        return items

    def _seeded_items(self, keys: list[tuple[int, int]]) -> list:
        dataset, seed = self.dataset, self.seed
        seeders = [gen.seed for gen in GENERATORS if gen.name in self._drawn_from]
        items = []
        for epoch, index in keys:
            if seeders:
                item_seed = sample_seed(seed, epoch, index)
                for seeder in seeders:
                    seeder(item_seed)
            items.append(dataset[index])
        return items


def _seed_all(seed: int) -> None:
    for gen in GENERATORS:
        gen.seed(seed)


class WorkerSeeder:
    """``worker_init_fn``: a distinct, reproducible seed per (seed, rank, worker)."""

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank

    def __call__(self, worker_id: int) -> None:
        _seed_all(self.seed + 1_000 * self.rank + worker_id)
        torch.set_num_threads(1)  # workers compete with the trainer for cores
        # A scheduler's stop warning (sent to every process of a job step) is for the training
        # process, which saves and then ends its loader workers; a loader worker killed by it
        # would instead fail the training process before it could save.
        for signum in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(signum, signal.SIG_IGN)


def make_loader(dataset: Dataset, sampler: Sampler, data: DataConfig, batch_size: int, *, seed: int,
                rank: int, device: torch.device, num_workers: int | None = None,
                drop_last: bool = False) -> DataLoader:
    workers = data.num_workers if num_workers is None else num_workers
    extra = {}
    if workers > 0:
        extra = dict(persistent_workers=True, prefetch_factor=data.prefetch_factor,
                     worker_init_fn=WorkerSeeder(seed, rank))
    # A loader of its own generator: creating an iterator must not draw from the global one,
    # or a resumed run (which creates it at another moment) would drift from an uninterrupted one.
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        PerSampleSeeded(dataset, seed),
        generator=generator,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=data.pin_memory and device.type == "cuda",
        drop_last=drop_last,
        **extra,
    )
