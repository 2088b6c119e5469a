"""Asynchronous checkpoints: a snapshot of the moment of ``save()``, never taken as latest before it is complete."""

from __future__ import annotations

import threading

import pytest
import torch

import ddp.checkpoint as ckpt
from ddp.checkpoint import CheckpointError, CheckpointWriter, latest_valid


def storages(*tensors: torch.Tensor) -> frozenset[int]:
    return frozenset(t.untyped_storage().data_ptr() for t in tensors)


@pytest.fixture
def held_writes(monkeypatch):
    """Background writes wait at the start of write_atomic until the test releases them."""
    release, started = threading.Event(), threading.Event()
    real = ckpt.write_atomic

    def held(state, path):
        started.set()
        assert release.wait(30), "the test never released the write"
        real(state, path)

    monkeypatch.setattr(ckpt, "write_atomic", held)
    return release, started


@pytest.mark.timeout(60)
def test_a_write_under_way_is_not_the_latest_and_exit_waits_for_it(tmp_path, held_writes):
    release, started = held_writes
    writer = CheckpointWriter(tmp_path, keep_last=3, async_save=True)
    release.set()
    writer.save({"model": {"w": torch.zeros(3)}}, step=1)
    writer.wait()
    release.clear()

    writer.save({"model": {"w": torch.ones(3)}}, step=2)
    assert started.wait(10) and writer.writing
    assert latest_valid(tmp_path).step == 1  # step 2 is being written: not a candidate yet
    release.set()
    writer.wait()
    assert not writer.writing
    assert latest_valid(tmp_path).step == 2
    assert torch.equal(ckpt.load(tmp_path / "last.pt")["model"]["w"], torch.ones(3))


@pytest.mark.timeout(60)
def test_the_file_holds_the_state_of_the_moment_of_save(tmp_path, held_writes):
    release, _ = held_writes
    weight, statistic = torch.zeros(4), torch.zeros(4)  # a parameter, and a buffer the forward pass updates
    writer = CheckpointWriter(tmp_path, async_save=True)
    writer.save({"model": {"weight": weight, "running_mean": statistic}}, step=1, deferrable=storages(weight))
    statistic.add_(1)  # the next forward pass: the buffer was copied in save() already
    writer.before_update()  # what the trainer calls before the optimizer step
    weight.add_(1)  # the optimizer step
    release.set()
    writer.wait()
    saved = ckpt.load(tmp_path / "last.pt")["model"]
    assert torch.equal(saved["weight"], torch.zeros(4)) and torch.equal(saved["running_mean"], torch.zeros(4))


@pytest.mark.timeout(60)
def test_host_buffers_are_reused_from_one_save_to_the_next(tmp_path):
    writer = CheckpointWriter(tmp_path, async_save=True)
    weight = torch.zeros(1000)
    writer.save({"model": {"weight": weight}}, step=1, deferrable=storages(weight))
    writer.wait()
    first = writer._staged["model"]["weight"]
    weight.add_(1)
    writer.save({"model": {"weight": weight}}, step=2, deferrable=storages(weight))
    writer.wait()
    assert writer._staged["model"]["weight"] is first  # copied into, not allocated again
    assert torch.equal(ckpt.load(tmp_path / "last.pt")["model"]["weight"], torch.ones(1000))
    assert torch.equal(ckpt.load(ckpt.step_path(tmp_path, 1))["model"]["weight"], torch.zeros(1000))


@pytest.mark.timeout(60)
def test_a_failed_background_write_is_raised_in_the_training_thread(tmp_path, monkeypatch):
    def broken(state, path):
        raise CheckpointError(f"could not write checkpoint {path}: No space left on device")

    monkeypatch.setattr(ckpt, "write_atomic", broken)
    writer = CheckpointWriter(tmp_path, async_save=True)
    writer.save({"model": {"w": torch.zeros(2)}}, step=1)
    writer.before_update()  # the copy was done: training may go on
    with pytest.raises(CheckpointError, match="No space left"):
        writer.wait()
    assert latest_valid(tmp_path) is None
