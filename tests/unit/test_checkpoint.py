"""Checkpoint files: atomic writes, validity, keep-last-N of the valid ones, safe loading, and restoring
the newest usable one (a single process: ``DistEnv()``)."""

import logging
import pickle

import pytest
import torch
from torch import nn

from ddp import rng
from ddp.checkpoint import CheckpointError, CheckpointWriter, load, strip_module_prefix, write_atomic
from ddp.checkpointer import Checkpointer
from ddp.env import DistEnv
from ddp.layout import list_step_checkpoints, verify


def state(value=1.0):
    """A checkpoint in format 2, as far as these tests need it."""
    return {"format": 2, "model": {"weight": torch.full((4, 4), value)},
            "loader": {"epoch": 0, "consumed": 0, "dataset_size": 16}, "train_state": {"step": 1}}


@pytest.fixture
def generators():
    """Restoring a checkpoint sets the global generators: put them back for the other tests."""
    saved = rng.capture()
    yield
    rng.restore(saved)


def test_atomic_write_leaves_a_verified_file_and_no_temporaries(tmp_path):
    path = tmp_path / "step_00000001.pt"
    write_atomic(state(), path)
    assert verify(path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt", "step_00000001.pt.done"]
    assert torch.equal(load(path)["model"]["weight"], torch.ones(4, 4))


def test_truncated_and_corrupted_files_are_detected(tmp_path):
    path = tmp_path / "step_00000001.pt"
    write_atomic(state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in verify(path)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert "checksum" in verify(path)
    (tmp_path / "step_00000001.pt.done").unlink()
    assert "no completion marker" in verify(path)


def test_restore_falls_back_to_the_previous_checkpoint_with_one_warning(tmp_path, caplog, generators):
    model = nn.Linear(4, 4)
    saver = Checkpointer(tmp_path, env=DistEnv(), keep_last=5)
    for step in (10, 20, 30):
        with torch.no_grad():
            model.weight.fill_(step)
        saver.save({"model": model, "step": step}, step)
    newest = tmp_path / "step_00000030.pt"
    newest.write_bytes(newest.read_bytes()[:100])

    fresh = nn.Linear(4, 4)
    state = {"model": fresh, "step": 0}
    with caplog.at_level(logging.WARNING):
        found = Checkpointer(tmp_path, env=DistEnv()).restore(state)
    assert found.step == 20
    assert state["step"] == 20 and torch.equal(fresh.weight, torch.full((4, 4), 20.0))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step_00000030.pt" in warnings[0].getMessage()
    # Set aside, kept for a look, and no longer taken for the newest.
    assert (tmp_path / "step_00000030.pt.unusable").is_file() and not newest.exists()
    assert [c.step for c in list_step_checkpoints(tmp_path)] == [10, 20]


def test_no_valid_checkpoint_lists_what_was_found(tmp_path, generators):
    for step in (1, 2):
        (tmp_path / f"step_{step:08d}.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no valid checkpoint.*step_00000002.pt.*step_00000001.pt"):
        Checkpointer(tmp_path, env=DistEnv()).restore({"model": nn.Linear(1, 1)})
    assert sorted(p.name for p in tmp_path.glob("*.unusable")) == ["step_00000001.pt.unusable",
                                                                     "step_00000002.pt.unusable"]
    assert Checkpointer(tmp_path / "absent", env=DistEnv()).restore({"model": nn.Linear(1, 1)}) is None


def test_loading_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        torch.save({"format": 2, "model": Evil()}, handle, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load(path)
    assert not marker.exists()


def test_a_file_without_the_format_entry_is_not_taken_for_a_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"weight": torch.ones(1)}}, path)
    with pytest.raises(CheckpointError, match="not a checkpoint written by this launcher"):
        load(path)


def test_ddp_and_compile_prefixes_are_stripped():
    assert strip_module_prefix({"module._orig_mod.fc.weight": 1, "fc.bias": 2}) == {"fc.weight": 1, "fc.bias": 2}


@pytest.mark.parametrize("async_save", [False, True])
def test_writer_keeps_last_n_and_links_last_and_best(tmp_path, async_save):
    writer = CheckpointWriter(tmp_path, keep_last=2, async_save=async_save)
    writer.save(state(1.0), step=1, is_best=True)
    writer.save(state(2.0), step=2)
    writer.save(state(3.0), step=3)
    writer.wait()
    assert [c.step for c in list_step_checkpoints(tmp_path)] == [2, 3]
    assert load(tmp_path / "last.pt")["model"]["weight"][0, 0] == 3.0
    assert load(tmp_path / "best.pt")["model"]["weight"][0, 0] == 1.0  # survives the pruning of step 1
    assert not list(tmp_path.glob("*.tmp"))


def test_pruning_counts_only_checkpoints_known_to_be_valid(tmp_path):
    # A newer step file of unknown validity (left by a crash) must not push a valid one out.
    (tmp_path / "step_00000009.pt").write_bytes(b"half written")
    writer = CheckpointWriter(tmp_path, keep_last=2)
    writer.save(state(1.0), step=1)
    writer.save(state(2.0), step=2)
    assert [c.step for c in list_step_checkpoints(tmp_path)] == [1, 2, 9]
    writer.save(state(3.0), step=3)
    assert [c.step for c in list_step_checkpoints(tmp_path)] == [2, 3, 9]
    assert verify(tmp_path / "step_00000002.pt") is None and verify(tmp_path / "step_00000003.pt") is None


def test_the_checkpoint_resumed_from_counts_as_valid_for_pruning(tmp_path):
    write_atomic(state(5.0), tmp_path / "step_00000005.pt")
    (tmp_path / "step_00000007.pt").write_bytes(b"garbage")  # newer, but not known valid
    writer = CheckpointWriter(tmp_path, keep_last=2)
    writer.note_valid(5)  # what a run resumed from
    writer.save(state(6.0), step=6)
    assert [c.step for c in list_step_checkpoints(tmp_path)] == [5, 6, 7]  # the two newest valid: 5 and 6
    writer.save(state(8.0), step=8)
    assert [c.step for c in list_step_checkpoints(tmp_path)] == [6, 7, 8]
    assert load(tmp_path / "last.pt")["model"]["weight"][0, 0] == 8.0


def test_async_writer_copies_before_returning(tmp_path):
    writer = CheckpointWriter(tmp_path, async_save=True)
    live = state(1.0)
    writer.save(live, step=1)
    live["model"]["weight"].fill_(99.0)  # training goes on changing the tensors
    writer.wait()
    assert load(tmp_path / "step_00000001.pt")["model"]["weight"][0, 0] == 1.0


def test_stale_temporaries_from_a_crash_are_removed(tmp_path):
    (tmp_path / "step_00000005.pt.tmp").write_bytes(b"half")
    CheckpointWriter(tmp_path)
    assert not (tmp_path / "step_00000005.pt.tmp").exists()
