"""Per-sample seeding in the training process: every item as if every generator had been seeded for it, the
training loop's own generators left exactly as they were, and tensors in memory gathered a batch at a time."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from ddp.data import PerSampleSeeded, collate, sample_seed


class Draws(Dataset):
    """Items drawing from the generators named for them (some items none), like augmentations do."""

    def __init__(self, plan):
        self.plan = plan  # index -> generators it draws from

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, index):
        sources = self.plan[index]
        return torch.tensor([
            torch.rand(()).item() if "torch" in sources else -1.0,
            float(np.random.rand()) if "numpy" in sources else -1.0,
            float(np.random.randn()) if "gauss" in sources else -1.0,
            random.random() if "random" in sources else -1.0,
            float(index),
        ], dtype=torch.float64)


def reference(dataset, seed, epoch, index):
    """The item under every generator freshly seeded from (seed, epoch, index): the promise."""
    item_seed = sample_seed(seed, epoch, index)
    random.seed(item_seed)
    np.random.seed(item_seed % 2**32)
    torch.manual_seed(item_seed)
    return dataset[index]


PLANS = {
    "none": [()] * 24,
    "torch only": [("torch",)] * 24,
    "everything": [("torch", "numpy", "random", "gauss")] * 24,
    # The first draws come late, and from one item only: a batch must be produced again.
    "late and rare": [()] * 13 + [("random", "gauss")] + [()] * 4 + [("numpy",)] + [("torch",)] * 5,
}


def test_loading_in_the_training_process_leaves_its_generators_alone():
    for cached_gaussian in (False, True):
        dataset = PerSampleSeeded(Draws(PLANS["late and rare"]), seed=1)
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        if cached_gaussian:
            np.random.randn()  # numpy now holds the second gaussian of a pair
        before = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        items = dataset.__getitems__([(0, i) for i in range(24)])
        after = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        assert torch.equal(before[0], after[0]) and before[1] == after[1]
        assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(before[2], after[2]))
        assert all(torch.equal(item, reference(Draws(PLANS["late and rare"]), 1, 0, i)) for i, item in enumerate(items))


def test_tensors_in_memory_pass_through_unchanged_and_are_gathered_as_a_whole_batch():
    data = TensorDataset(torch.randn(10, 3), torch.arange(10))
    wrapped = PerSampleSeeded(data, seed=0)
    state = torch.get_rng_state()
    keys = [(0, 3), (1, 7), (1, 0)]
    batch = collate(wrapped.__getitems__(keys))
    expected = default_collate([data[index] for _, index in keys])  # what the loader made of the rows
    assert len(batch) == 2 and all(torch.equal(got, want) and got.dtype == want.dtype and got.is_contiguous()
                                   for got, want in zip(batch, expected))
    assert [tuple(map(float, wrapped[key][0])) for key in keys] == [tuple(map(float, data[i][0])) for _, i in keys]
    assert torch.equal(torch.get_rng_state(), state)
