"""Every rank agrees on a stop signal at the same step (``StopVote``), 2 real gloo ranks."""

from __future__ import annotations

import time

import pytest

from tests.support.ranks import run_ranks


def _agreed_stop_step(rank: int, signal_at: dict, every_s: float = 0.0, step_s: float = 0.0, steps: int = 30):
    """Steps of ``step_s`` (rank 1 twice as slow); the step at which this rank learns of the agreed stop."""
    import torch.distributed as dist

    from ddp.signals import StopRequest, StopVote

    dist.init_process_group("gloo", rank=rank, world_size=2)
    stop = StopRequest()
    vote = StopVote(stop, every_s=every_s)
    agreed_at = None
    for step in range(1, steps):
        time.sleep(step_s * (1 + rank))  # rank 1 is the slow one
        if step == signal_at.get(rank):
            stop.signal_name = "SIGTERM"  # as the handler would
        if vote.agreed():
            agreed_at = step
            break
    vote.close()
    dist.destroy_process_group()
    return agreed_at


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signal_at", [{1: 3}, {0: 5, 1: 9}, {}], ids=["one rank", "both, apart", "none"])
def test_every_rank_agrees_on_the_same_stop_step(signal_at):
    agreed = run_ranks(_agreed_stop_step, 2, signal_at)
    first = min(signal_at.values(), default=None)
    expected = None if first is None else first + 1  # the vote started at a step is read at the next
    assert agreed == [expected, expected]


@pytest.mark.timeout(120)
def test_spaced_votes_still_agree_on_one_step_within_about_two_intervals():
    # Steps of 10-20 ms and votes about 0.1 s apart: votes every ~5 steps, read ~5 steps later.
    agreed = run_ranks(_agreed_stop_step, 2, {0: 12}, 0.1, 0.01, 80)
    assert agreed[0] == agreed[1] is not None
    assert 12 < agreed[0] <= 12 + 2 * 10 + 1  # the interval never exceeds 0.1 s / 10 ms steps
