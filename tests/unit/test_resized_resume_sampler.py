"""A resized resume: the new ranks cover the rest of the epoch, every sample once."""

from __future__ import annotations

from collections import Counter

import pytest

from ddp.data import ResumableDistributedSampler, epoch_order


@pytest.mark.parametrize("length", [96, 101])
@pytest.mark.parametrize("old_world,new_world", [(2, 1), (2, 3), (3, 2), (1, 2)])
def test_resized_resume_covers_the_rest_of_the_epoch_once(length, old_world, new_world):
    batch = 8
    order = epoch_order(length, seed=0, epoch=3)
    for consumed in range(0, length, batch * old_world):
        before = order[:consumed]
        after = []
        for rank in range(new_world):
            sampler = ResumableDistributedSampler(length, rank, new_world, seed=0)
            sampler.set_epoch(3, consumed)
            after += [index for _, index in sampler]
        # Every sample once; only the padding (the order's first samples, as DistributedSampler pads) twice.
        seen = Counter(before + after)
        assert set(seen) == set(range(length))
        extra = Counter({index: count - 1 for index, count in seen.items() if count > 1})
        assert sum(extra.values()) == (-(length - consumed)) % new_world
        assert set(extra) <= set(order[: sum(extra.values())])
