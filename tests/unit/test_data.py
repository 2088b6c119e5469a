"""Sample order, resumption and seeding, without processes."""

import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from ddp.data import PerSampleSeeded, ResumableDistributedSampler, ShardSampler, epoch_order
from ddp.loader import ResumableLoader


def shards(length, world, epoch=0, consumed=0, seed=0, drop_last=False):
    out = []
    for rank in range(world):
        sampler = ResumableDistributedSampler(length, rank, world, seed, drop_last=drop_last)
        sampler.set_epoch(epoch, consumed)
        out.append([index for _, index in sampler])
    return out


def test_shards_are_disjoint_and_cover_the_epoch():
    parts = shards(40, 4)
    assert sorted(i for part in parts for i in part) == list(range(40))
    assert all(len(part) == 10 for part in parts)


def test_each_epoch_has_its_own_order_the_same_on_every_run():
    assert shards(50, 2, epoch=1) == shards(50, 2, epoch=1)
    assert shards(50, 2, epoch=1) != shards(50, 2, epoch=2)


def test_matches_torch_distributed_sampler():
    from torch.utils.data import DistributedSampler

    reference = DistributedSampler(range(23), num_replicas=3, rank=1, shuffle=True, seed=5)
    reference.set_epoch(4)
    ours = ResumableDistributedSampler(23, 1, 3, seed=5)
    ours.set_epoch(4)
    assert [i for _, i in ours] == list(reference)


def test_resuming_with_the_same_world_size_continues_the_same_sequence():
    full = shards(37, 2, epoch=3)
    consumed = 10  # 5 samples per rank already trained
    rest = shards(37, 2, epoch=3, consumed=consumed)
    assert rest == [part[consumed // 2:] for part in full]


@pytest.mark.parametrize("new_world", [1, 3])
def test_resuming_with_another_world_size_sees_every_remaining_sample_once(new_world):
    length, consumed = 48, 18  # 30 left: no padding needed for 1 or 3 ranks
    order = epoch_order(length, 0, 2)
    rest = shards(length, new_world, epoch=2, consumed=consumed)
    seen = Counter(i for part in rest for i in part)
    assert set(seen) == set(order[consumed:]) and set(seen.values()) == {1}


def test_padding_repeats_the_first_samples_when_the_world_does_not_divide():
    parts = shards(10, 3)
    flat = [i for part in parts for i in part]
    assert len(flat) == 12 and set(flat) == set(range(10))


def test_drop_last_keeps_shards_even_without_repeats():
    parts = shards(10, 3, drop_last=True)
    assert all(len(part) == 3 for part in parts)
    flat = [i for part in parts for i in part]
    assert len(set(flat)) == 9


def test_shard_sampler_has_no_padding():
    parts = [[i for _, i in ShardSampler(10, rank, 3)] for rank in range(3)]
    assert sorted(i for part in parts for i in part) == list(range(10))


class RandomItems(Dataset):
    def __len__(self):
        return 100

    def __getitem__(self, index):
        return index, torch.rand(()).item(), random.random(), float(np.random.rand())


def test_per_sample_seeding_depends_only_on_seed_epoch_and_index():
    data = PerSampleSeeded(RandomItems(), seed=7)
    assert data[(0, 5)] == data[(0, 5)]
    assert data[(0, 5)] != data[(1, 5)]
    assert data[(0, 5)] != data[(0, 6)]
    assert PerSampleSeeded(RandomItems(), seed=8)[(0, 5)] != data[(0, 5)]


def test_per_sample_seeding_leaves_the_training_generators_alone():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    PerSampleSeeded(RandomItems(), seed=1)[(0, 3)]
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_a_loader_restored_part_way_yields_the_rest_of_the_epoch_then_the_next():
    data = RandomItems()
    uninterrupted = ResumableLoader(data, batch_size=8, seed=3)
    uninterrupted.set_epoch(1)
    full = [batch for batch in uninterrupted]
    assert uninterrupted.state_dict() == {"epoch": 2, "consumed": 0, "dataset_size": 100}

    first = ResumableLoader(data, batch_size=8, seed=3)
    first.set_epoch(1)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == 5:
            break
    saved = first.state_dict()
    assert saved == {"epoch": 1, "consumed": 40, "dataset_size": 100}

    resumed = ResumableLoader(data, batch_size=8, seed=3)
    resumed.load_state_dict(saved)
    assert len(resumed) == len(full) - 5
    tail = [batch for batch in resumed]
    assert len(head) + len(tail) == len(full)
    for got, want in zip(head + tail, full):  # the same samples, with the same per-sample random draws
        assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(got, want))
    assert resumed.state_dict()["epoch"] == 2


def test_a_loader_refuses_the_position_of_another_dataset():
    loader = ResumableLoader(RandomItems(), batch_size=8)
    with pytest.raises(ValueError, match="over 50 samples, this one over 100: another dataset"):
        loader.load_state_dict({"epoch": 0, "consumed": 8, "dataset_size": 50})
