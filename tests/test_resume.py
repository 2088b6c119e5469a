"""Exact resume: stop anywhere, resume, end bitwise where an uninterrupted run ends.

Most tests here run the real training loop in this process (one worker, no
launcher start-up: about a second each). The stop is a real SIGTERM, sent by
the test job to its own process before a chosen micro-batch, so it lands at an
exact step. A resized resume (2 workers -> 1) goes through ``launch``.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from ddp import checkpoint as ckpt
from ddp.config import Config, build
from ddp.data import ResumableDistributedSampler, epoch_order
from ddp.env import DistEnv
from ddp.resume import ResumeError, describe_cause, previous_attempt_failures
from ddp.signals import EXIT_RESUMABLE, StopRequest, StopVote
from ddp.trainer import run_training
from tests.helpers import assert_same_weights, final_weights, run_launch, write_config
from tests.jobs_for_tests import JOB_NAME, recorded_ids

BASE = {
    "data": {"batch_size": 8, "num_workers": 0},
    "optim": {"lr": 0.05},
    # Votes on a stop every step: these tests stop at exact points of tiny, millisecond steps.
    "train": {"epochs": 2, "log_every": 5, "progress_bar": False, "stop_check_s": 0},
    "checkpoint": {"every_steps": 5, "keep_last": 3},
}


def merged(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for section, values in changes.items():
        out.setdefault(section, {}).update(values)
    return out


def make_config(tmp_path: Path, name: str, job: dict | None = None, **sections) -> Config:
    raw = merged(BASE, sections)
    raw["job"] = {"name": JOB_NAME, "marker_dir": str(tmp_path / f"markers-{name}"), **(job or {})}
    raw["run"] = {"name": name, "dir": str(tmp_path / "runs")}
    (tmp_path / f"markers-{name}").mkdir(parents=True, exist_ok=True)
    return build(Config, raw, prefix="")


def train(config: Config):
    return run_training(config, Path(config.run.dir) / config.run.name, DistEnv(), num_workers=0)


def stop_before(micro_batch: int) -> dict:
    """A SIGTERM to this very process while it trains on global micro-batch ``micro_batch``."""
    return {"faults": [{"kind": "signal", "rank": 0, "at": micro_batch, "target": "self", "signal": "SIGTERM"}]}


def saved_state(run_dir: Path, step: int) -> dict:
    return torch.load(ckpt.step_path(run_dir / "checkpoints", step), weights_only=True)


# -- single process, in this process -------------------------------------------------------

SHAPES = {  # name: (job keys, other sections); micro-batches per epoch, steps per epoch
    "plain": ({}, {}),  # 96 samples / 8: 12 micro-batches = 12 steps per epoch
    "accumulate, partial last batch": ({"samples": 100}, {"train": {"accumulate": 2}}),  # 13 micro, 7 steps
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each shape's run without a stop, once per module."""
    root = tmp_path_factory.mktemp("uninterrupted")
    runs = {}
    for name, (job, sections) in SHAPES.items():
        config = make_config(root, name.replace(" ", "_").replace(",", ""), job, **sections)
        outcome = train(config)
        assert outcome.status == "finished"
        runs[name] = Path(config.run.dir) / config.run.name
    return runs


CASES = [
    # (shape, stop before micro-batch, step the stop lands on, what it exercises)
    ("plain", 6, 7, "mid-epoch"),
    ("plain", 11, 12, "on the last batch of an epoch: the epoch ends as usual, evaluated and saved"),
    ("plain", 12, 13, "on the first batch after an epoch boundary"),
    ("accumulate, partial last batch", 5, 3, "between the micro-batches of an accumulated step"),
    ("accumulate, partial last batch", 12, 7, "on the partial last micro-batch of an epoch"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape,before,step,what", CASES, ids=[case[3].split(":")[0] for case in CASES])
def test_stop_then_resume_is_bitwise_identical(tmp_path, uninterrupted, shape, before, step, what):
    job, sections = SHAPES[shape]
    config = make_config(tmp_path, "stopped", {**job, **stop_before(before)}, **sections)
    run_dir = Path(config.run.dir) / config.run.name

    first = train(config)
    assert (first.status, first.step) == ("stopped", step)
    assert ckpt.verify(ckpt.step_path(run_dir / "checkpoints", step)) is None
    second = train(config)
    assert second.status == "finished"
    assert_same_weights(final_weights(uninterrupted[shape]), final_weights(run_dir))


def test_a_stop_on_the_last_batch_of_an_epoch_saves_the_epoch_end_checkpoint(tmp_path):
    config = make_config(tmp_path, "edge", stop_before(11))
    run_dir = Path(config.run.dir) / config.run.name
    assert train(config).status == "stopped"
    state = saved_state(run_dir, 12)["train_state"]
    assert (state["epoch"], state["step"], state["consumed"]) == (1, 12, 0)  # not "epoch 0, all consumed"
    evaluated = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(record["step"] == 12 and "val/accuracy" in record for record in evaluated)


def test_resume_says_which_file_and_step(tmp_path, caplog):
    config = make_config(tmp_path, "said", stop_before(3))
    train(config)
    caplog.set_level("INFO")
    train(config)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming from")]
    assert lines == [f"resuming from {Path(config.run.dir) / 'said' / 'checkpoints' / 'step_00000004.pt'}: "
                     "step 4, epoch 0, 32 samples into the epoch"]


def test_async_checkpoints_give_the_same_run(tmp_path, uninterrupted):
    config = make_config(tmp_path, "async", stop_before(8), checkpoint={"async_save": True})
    run_dir = Path(config.run.dir) / config.run.name
    assert train(config).status == "stopped"
    # run_training returned: the background write of the stop's checkpoint has finished.
    assert ckpt.latest_valid(run_dir / "checkpoints").step == 9
    assert train(config).status == "finished"
    assert_same_weights(final_weights(uninterrupted["plain"]), final_weights(run_dir))


# -- a config that does not fit the checkpoint ------------------------------------------------

@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("short")
    config = make_config(root, "short", train={"max_steps": 2})
    train(config)
    return root


@pytest.mark.parametrize("change,expected", [
    ({"job": {"hidden": 32}}, ["model does not match", "0.weight: checkpoint (16, 8) vs model (32, 8)",
                                "job.hidden 16 -> 32", "launch resume RUN_DIR job.hidden=16"]),
    ({"job": {"samples": 80}}, ["trained on 96 samples but this config's training set has 80",
                                 "job.samples=96"]),
    ({"optim": {"name": "adamw"}}, ["optimizer state does not fit", "optim.name=\"sgd\""]),
], ids=["model shape", "dataset size", "optimizer"])
def test_a_config_that_breaks_the_resume_is_a_clear_error(short_run, change, expected):
    job = change.pop("job", {})
    config = make_config(short_run, "short", job, train={"max_steps": 4}, **change)
    with pytest.raises(ResumeError) as raised:
        train(config)
    for text in expected:
        assert text in str(raised.value)


# -- a different world size: every sample of the epoch exactly once ----------------------------

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


@pytest.mark.timeout(240)
def test_two_workers_stopped_mid_epoch_then_one_sees_every_sample_once(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    config = write_config(tmp_path, {
        **merged(BASE, {"train": {"epochs": 1}}),
        "job": {"name": JOB_NAME, "samples": 192, "record_dir": str(records), "marker_dir": str(tmp_path),
                "faults": [{"kind": "signal", "rank": 1, "at": 2, "signal": "SIGUSR2"}]},
        "run": {"name": "resize"},
    })
    run_dir = tmp_path / "runs" / "resize"
    first = run_launch("local", "--cpu", "--nproc", "2", str(config))
    assert first.returncode == EXIT_RESUMABLE, first.stderr
    assert "stopped by SIGUSR2" in first.stderr
    stopped_at = ckpt.latest_valid(run_dir / "checkpoints")
    assert 0 < stopped_at.step < 12, "the stop should land mid-epoch (12 steps of 16 samples)"

    second = run_launch("resume", "--cpu", "--nproc", "1", str(run_dir))
    assert second.returncode == 0, second.stderr
    assert "resuming 2-process checkpoint with 1 processes" in second.stderr

    rows = recorded_ids(records)
    before = [i for row in rows if row["world_size"] == 2 for i in row["ids"]]
    after = [i for row in rows if row["world_size"] == 1 for i in row["ids"]]
    assert len(before) == 16 * stopped_at.step  # exactly what the checkpoint says was consumed
    assert sorted(before + after) == list(range(192))


# -- stop signals: agreement, forwarding, reporting --------------------------------------------

def _vote_worker(rank: int, store_path: str, signal_at: dict, results, every_s: float = 0.0,
                 step_s: float = 0.0, steps: int = 30) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
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
    results.put((rank, agreed_at))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signal_at", [{1: 3}, {0: 5, 1: 9}, {}], ids=["one rank", "both, apart", "none"])
def test_every_rank_agrees_on_the_same_stop_step(tmp_path, signal_at):
    context = multiprocessing.get_context("fork")  # no second torch import: a second, not ten
    results = context.Queue()
    store = tempfile.mktemp(dir=tmp_path)
    workers = [context.Process(target=_vote_worker, args=(rank, store, signal_at, results)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    agreed = dict(results.get(timeout=50) for _ in workers)
    for worker in workers:
        worker.join(10)
    first = min(signal_at.values(), default=None)
    expected = None if first is None else first + 1  # the vote started at a step is read at the next
    assert agreed == {0: expected, 1: expected}


@pytest.mark.timeout(60)
def test_spaced_votes_still_agree_on_one_step_within_about_two_intervals(tmp_path):
    # Steps of 10-20 ms and votes about 0.1 s apart: votes every ~5 steps, read ~5 steps later.
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    store = tempfile.mktemp(dir=tmp_path)
    signal_at = {0: 12}
    workers = [context.Process(target=_vote_worker, args=(rank, store, signal_at, results, 0.1, 0.01, 80))
               for rank in (0, 1)]
    for worker in workers:
        worker.start()
    agreed = dict(results.get(timeout=50) for _ in workers)
    for worker in workers:
        worker.join(10)
    assert agreed[0] == agreed[1] is not None
    assert 12 < agreed[0] <= 12 + 2 * 10 + 1  # the interval never exceeds 0.1 s / 10 ms steps


def test_a_stop_request_keeps_the_first_signal(monkeypatch):
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal, e.g. during the save: changes nothing
        assert stop.signal_name == "SIGUSR2"
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_launch_forwards_the_first_stop_signal_and_ignores_repeats(capsys):
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from launcher.local import AGENT_SIGNALS, stop_signals_forwarded

    assert "SIGTERM" not in AGENT_SIGNALS and "SIGUSR2" not in AGENT_SIGNALS  # or the agent's handler replaces ours
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SignalException) as raised:
        with stop_signals_forwarded():
            try:
                os.kill(os.getpid(), signal.SIGUSR2)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # while the agent waits for the workers: ignored
    assert raised.value.sigval == signal.SIGUSR2
    assert "already stopping on SIGUSR2" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before


def test_the_stop_report_names_the_latest_complete_checkpoint(tmp_path, capsys):
    from launcher.local import report_stop

    directory = tmp_path / "checkpoints"
    directory.mkdir()
    ckpt.write_atomic({"model": {}}, ckpt.step_path(directory, 40))
    ckpt.step_path(directory, 50).write_bytes(b"half a checkpoint")  # no .done: not counted
    assert report_stop(signal.SIGTERM, tmp_path) == EXIT_RESUMABLE
    err = capsys.readouterr().err
    assert "stopped by SIGTERM: latest checkpoint step_00000040.pt (step 40)" in err
    assert f"launch resume {tmp_path}" in err


# -- restarts: counted, with their causes -----------------------------------------------------

def test_the_previous_attempts_errors_are_found_next_to_this_ones(tmp_path):
    attempt = lambda n: tmp_path / "launch-x_abc" / f"attempt_{n}"  # noqa: E731
    for rank in (0, 1):
        (attempt(0) / str(rank)).mkdir(parents=True)
        (attempt(1) / str(rank)).mkdir(parents=True)
    (attempt(0) / "0" / "error.json").write_text(json.dumps(
        {"message": {"message": "RuntimeError: Connection closed by peer\nmore", "extraInfo": {}}}))
    failures = previous_attempt_failures(str(attempt(1) / "1" / "error.json"), restart_count=1)
    assert failures == [{"local_rank": 0, "error": "RuntimeError: Connection closed by peer\nmore"},
                        {"local_rank": 1, "error": None}]
    cause = describe_cause(DistEnv(source="torchrun"), failures)
    assert cause.startswith("local rank 1: no error report: killed by a signal")  # the likely root cause first
    assert cause.endswith("local rank 0: RuntimeError: Connection closed by peer")
    assert previous_attempt_failures(None, 1) == []
