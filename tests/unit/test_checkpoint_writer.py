"""Rank 0's checkpoint writer: asynchronous writes snapshot the moment of ``save()`` and are never taken as the
latest before they are complete; a failed write is raised once, in the training thread, and leaves nothing partial."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

import ddp.checkpoint as ckpt
from ddp.checkpoint import CheckpointError, CheckpointWriter
from ddp.layout import Found, list_step_checkpoints, step_path, verify


def newest_valid(directory) -> Found | None:
    """The newest step checkpoint whose completion marker vouches for its size and checksum."""
    valid = [found for found in list_step_checkpoints(directory) if verify(found.path) is None]
    return valid[-1] if valid else None


def storages(*tensors: torch.Tensor) -> frozenset[int]:
    return frozenset(t.untyped_storage().data_ptr() for t in tensors)


@pytest.fixture
def held_writes(monkeypatch):
    """Background writes wait at the start of write_atomic until the test releases them."""
    release, started = threading.Event(), threading.Event()
    real = ckpt.write_atomic

    def held(state, path, kind="step"):
        started.set()
        assert release.wait(30), "the test never released the write"
        real(state, path, kind)

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
    assert newest_valid(tmp_path).step == 1  # step 2 is being written: not a candidate yet
    release.set()
    writer.wait()
    assert not writer.writing
    assert newest_valid(tmp_path).step == 2
    assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["model"]["w"], torch.ones(3))


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
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
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
    assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["model"]["weight"], torch.ones(1000))
    assert torch.equal(torch.load(step_path(tmp_path, 1), weights_only=True)["model"]["weight"], torch.zeros(1000))


@pytest.mark.timeout(60)
def test_a_failed_background_write_is_raised_in_the_training_thread(tmp_path, monkeypatch):
    def broken(state, path, kind="step"):
        raise CheckpointError(f"could not write checkpoint {path}: No space left on device")

    monkeypatch.setattr(ckpt, "write_atomic", broken)
    writer = CheckpointWriter(tmp_path, async_save=True)
    writer.save({"model": {"w": torch.zeros(2)}}, step=1)
    writer.before_update()  # the copy was done: training may go on
    with pytest.raises(CheckpointError, match="No space left"):
        writer.wait()
    assert newest_valid(tmp_path) is None


@pytest.mark.timeout(60)
def test_an_async_write_error_surfaces_at_the_next_save(tmp_path):
    directory = tmp_path / "checkpoints"
    writer = CheckpointWriter(directory, async_save=True)
    shutil.rmtree(directory)  # the folder disappears under the writer (an unmounted file system)
    writer.save({"model": {"w": torch.full((300_000,), 1.0)}}, 1)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*step_00000001.pt: No such file"):
        writer.save({"model": {"w": torch.full((300_000,), 2.0)}}, 2)
    writer.wait()  # reported once, not again


def test_a_failed_write_removes_its_partial_files(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise TypeError("cannot pickle this")

    path = tmp_path / "step_00000003.pt"
    with pytest.raises(TypeError):
        ckpt.write_atomic({"model": {}, "bad": Unpicklable()}, path)
    assert list(tmp_path.iterdir()) == []
