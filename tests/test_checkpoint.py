"""Tier 1: checkpoint files: atomic writes, validity, keep-last-N, safe loading."""

import logging
import pickle

import pytest
import torch

from ddp.checkpoint import (CheckpointError, CheckpointWriter, latest_valid, list_step_checkpoints, load,
                            strip_module_prefix, verify, write_atomic)


def state(value=1.0):
    return {"model": {"weight": torch.full((4, 4), value)}, "train_state": {"step": 1}}


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


def test_latest_valid_falls_back_with_one_warning(tmp_path, caplog):
    for step in (10, 20, 30):
        write_atomic(state(step), tmp_path / f"step_{step:08d}.pt")
    newest = tmp_path / "step_00000030.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        found = latest_valid(tmp_path)
    assert found.step == 20
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step_00000030.pt" in warnings[0].getMessage()


def test_no_valid_checkpoint_lists_what_was_found(tmp_path):
    for step in (1, 2):
        (tmp_path / f"step_{step:08d}.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no valid checkpoint.*step_00000002.pt.*step_00000001.pt"):
        latest_valid(tmp_path)
    assert latest_valid(tmp_path / "absent") is None


def test_loading_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        torch.save({"model": Evil()}, handle, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load(path)
    assert not marker.exists()


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
