"""The watchdog's pure parts: who stalled, how positions advance, the limits it applies.

The watchdog ending a real process: tests/multiprocess/test_watchdog_process.py; two workers through
`launch local`: tests/e2e/test_watchdog_stall.py.
"""

from __future__ import annotations

from types import SimpleNamespace

from ddp.config import WatchdogConfig
from ddp.env import DistEnv
from ddp.watchdog import Watchdog, collective_timeout, describe_position, verdict


def record(step, seq, phase, sub=0, in_collective=False):
    return {"step": step, "phase": phase, "sub": sub, "position": [step, seq, sub], "in_collective": in_collective}


def test_the_rank_behind_the_others_is_the_one_that_stalled():
    records = {0: record(4, 3, "backward"), 1: record(4, 2, "forward"), 2: record(4, 3, "backward")}
    message = verdict(records, world_size=3, waited_s=30)
    assert "rank 1 stalled at step 5, in the job's training_step" in message
    assert "ranks 0, 2 waited for it at step 5, in backward" in message
    assert "no training progress for 30 s" in message


def test_a_rank_inside_a_collective_is_waiting_even_at_the_same_position():
    # Rank 0 writes the checkpoint (stuck in its file system); rank 1 waits for it in broadcast.
    records = {0: record(9, 1, "checkpoint-agree"), 1: record(9, 1, "checkpoint-agree", in_collective=True)}
    message = verdict(records, world_size=2, waited_s=60)
    assert "rank 0 stalled after step 9" in message and "rank 1 waited for it" in message


def test_a_rank_without_heartbeat_is_named_as_well():
    message = verdict({0: record(2, 3, "backward"), 1: None}, world_size=2, waited_s=10)
    assert "rank 1 sent no heartbeat" in message


def test_a_silent_rank_is_named_with_its_host_when_known():
    message = verdict({0: record(2, 3, "backward"), 1: None}, world_size=2, waited_s=10, hosts=["n1", "n2"])
    assert "rank 1 (on n2) sent no heartbeat" in message


def test_every_rank_at_the_same_point_is_reported_as_such():
    records = {0: record(7, 3, "backward"), 1: record(7, 3, "backward")}
    assert "every rank stopped at the same point, at step 8" in verdict(records, world_size=2, waited_s=5)


def test_positions_follow_the_loop_and_never_go_back_within_an_epoch(tmp_path):
    dog = Watchdog(tmp_path, DistEnv(), WatchdogConfig(timeout_s=None))
    assert not dog.enabled
    seen = []
    for step in range(3):
        for phase in ("data", "forward", "backward", "data", "forward", "backward", "optimizer"):
            dog.beat(step, phase)
            seen.append((dog._beat.step, dog._beat.seq, dog._beat.sub))
        dog.beat(step + 1, "log")
        seen.append((dog._beat.step, dog._beat.seq, dog._beat.sub))
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_evaluation_and_step_phases_read_naturally():
    assert describe_position(record(4, 0, "evaluate", sub=7)) == "after step 4, in evaluation, batch 7"
    assert describe_position(record(4, 0, "data")) == "at step 5, waiting for its data loader"


def test_collectives_outlast_the_watchdog():
    assert collective_timeout(1800, WatchdogConfig(timeout_s=None)) == 1800
    assert collective_timeout(1800, WatchdogConfig(timeout_s=300)) == 1800
    assert collective_timeout(60, WatchdogConfig(timeout_s=300)) > 300  # the watchdog reports first
    auto = WatchdogConfig()  # auto: the longest it may wait is startup_s
    assert collective_timeout(60, auto) > auto.startup_s


def test_auto_limits_follow_the_longest_time_each_phase_took(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("ddp.watchdog.time", SimpleNamespace(time=lambda: now[0]))
    config = WatchdogConfig(timeout_s="auto", floor_s=60, startup_s=900)
    dog = Watchdog(tmp_path, DistEnv(), config)
    assert dog.limit_s("forward") == 900  # not timed yet: the start-up limit
    for step, forward_s in enumerate([2.0, 9.0, 3.0]):
        dog.beat(step, "forward")
        now[0] += forward_s
        dog.beat(step, "backward")
        now[0] += 0.5
    assert dog.limit_s("forward") == 90  # ten times its longest (9 s)
    assert dog.limit_s("backward") == 60  # ten times 0.5 s, but never under the floor
    assert dog.limit_s("checkpoint") == 900  # never seen: still the start-up limit
    assert Watchdog(tmp_path, DistEnv(), WatchdogConfig(timeout_s=7.0)).limit_s("forward") == 7.0
