"""Per-sample seeding through the loader, in this process and in loader processes: every item exactly as if every
generator had been seeded for it, whatever the number of loader processes."""

from __future__ import annotations

import pytest
import torch

from ddp.data import ResumableDistributedSampler
from ddp.loader import make_loader, shut_down
from tests.unit.test_per_sample_seeded_items import PLANS, Draws, reference

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("plan", list(PLANS))
def test_every_item_is_as_if_every_generator_was_seeded_for_it(plan, workers):
    dataset = Draws(PLANS[plan])
    sampler = ResumableDistributedSampler(len(dataset), 0, 1, seed=3)
    loader = make_loader(dataset, sampler, 4, seed=3, rank=0, num_workers=workers)
    try:
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            got = torch.cat(list(loader))
            assert sorted(got[:, 4].tolist()) == list(range(len(dataset)))
            expected = torch.stack([reference(dataset, 3, epoch, int(index)) for index in got[:, 4]])
            assert torch.equal(got, expected)
    finally:
        shut_down(loader)
