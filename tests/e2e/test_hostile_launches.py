"""Hostile input through `launch`: a checkpoint that would run code, names and paths made to break a shell.

The same in this process (loaders, YAML, name checks): tests/unit/test_hostile_inputs.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from ddp.config import dump_yaml, load_config
from launcher.cli import main
from tests.support.helpers import run_launch, write_config
from tests.support.job import JOB_NAME

# A run name that breaks every careless shell: spaces, both quotes, $(...), backticks, ;, $HOME.
# (A newline is refused in a run name: tests/unit/test_hostile_inputs.py.)
HOSTILE_NAME = "a b'c\"$(touch MARK1)`touch MARK2`x;touch MARK3 $HOME"
HOSTILE_DIR = "config dir $(touch MARK4) `touch MARK5`; 'q'"


class RunsCode:
    """Unpickling this makes a directory: what a malicious checkpoint does (any call at all)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def markers_in(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("MARK"))


@pytest.mark.timeout(120)
def test_resuming_from_a_hostile_checkpoint_fails_cleanly_in_the_worker(tmp_path):
    run_dir = tmp_path / "runs" / "evil"
    (run_dir / "checkpoints").mkdir(parents=True)
    config = load_config(write_config(tmp_path, {"job": {"name": JOB_NAME}, "run": {"name": "evil"},
                                                 "data": {"num_workers": 0}, "train": {"progress_bar": False}}))
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    path = run_dir / "checkpoints" / "step_00000001.pt"
    torch.save({"format": 2, "model": {}, "extra": RunsCode(tmp_path / "MARK_pwned")}, path)
    data = path.read_bytes()  # a valid completion marker: only the content is hostile
    (run_dir / "checkpoints" / "step_00000001.pt.done").write_text(
        json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    result = run_launch("resume", str(run_dir), "--cpu", "--nproc", "1", timeout=100)
    assert result.returncode == 1, result.stderr
    assert f"error: no valid checkpoint in {run_dir / 'checkpoints'}" in result.stderr
    assert f"cannot load checkpoint {path}" in result.stderr and "weights_only=True" in result.stderr
    assert "Traceback" not in result.stderr
    assert markers_in(tmp_path) == []
    # Kept for a look, never to be resumed from.
    assert (run_dir / "checkpoints" / "step_00000001.pt.unusable").is_file() and not path.exists()


def hostile_config(tmp_path):
    directory = tmp_path / HOSTILE_DIR
    directory.mkdir()
    return write_config(directory, {
        "job": {"name": JOB_NAME},
        "run": {"name": HOSTILE_NAME, "dir": str(tmp_path / "runs with spaces")},
        "data": {"batch_size": 16, "num_workers": 0},
        "train": {"progress_bar": False, "max_steps": 2},
    })


@pytest.mark.timeout(60)
def test_the_printed_torchrun_command_is_safe_to_paste_into_a_shell(tmp_path, capsys):
    config = hostile_config(tmp_path)
    override = f"run.name={HOSTILE_NAME} 2"
    assert main(["local", "--cpu", "--nproc", "1", "--dry-run", str(config), override]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("torchrun ")]
    assert len(lines) == 1, out
    command = lines[0].split(None, 1)[1]  # after the label: VAR=VALUE ... torchrun ... -m launcher.worker ...
    # A stand-in torchrun that prints its arguments: the shell must pass every path through untouched.
    stand_in = f"torchrun() {{ {sys.executable} -c 'import sys, json; print(json.dumps(sys.argv[1:]))' \"$@\"; }}"
    shell = subprocess.run(["bash", "-c", f"{stand_in}\n{command}"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=30)
    assert shell.returncode == 0, shell.stderr
    args = json.loads(shell.stdout)
    assert args[-4:] == ["launcher.worker", "--config", str(config), override]
    assert markers_in(tmp_path) == [] and markers_in(tmp_path / HOSTILE_DIR) == []


@pytest.mark.timeout(120)
def test_a_run_named_to_break_a_shell_trains_and_executes_nothing(tmp_path):
    result = run_launch("local", "--cpu", "--nproc", "1", str(hostile_config(tmp_path)), cwd=tmp_path, timeout=100)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs with spaces" / HOSTILE_NAME
    assert (run_dir / "checkpoints" / "step_00000002.pt").is_file()
    assert load_config(run_dir / "config.yaml").run.name == HOSTILE_NAME
    assert markers_in(tmp_path) == [] and markers_in(run_dir.parent) == [] and markers_in(run_dir) == []
