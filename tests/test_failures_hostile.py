"""Hostile or broken input: checkpoints that would run code, YAML tags, names made to break a shell."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import yaml

from ddp import checkpoint as ckpt
from ddp.config import ConfigError, dump_yaml, load_config
from launcher.cli import main
from tests.helpers import run_launch, write_config
from tests.jobs_for_failures import JOB_NAME

# A run name that breaks every careless shell: spaces, both quotes, $(...), backticks, ;, a newline.
HOSTILE_NAME = "a b'c\"$(touch MARK1)`touch MARK2`\nx;touch MARK3 $HOME"


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def markers_in(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("MARK"))


# -- checkpoints ---------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["torch.save", "plain pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path, fmt):
    marker = tmp_path / "MARK_pwned"
    path = tmp_path / "step_00000001.pt"
    evil = {"model": {"w": torch.zeros(2)}, "extra": RunsCode(marker)}
    if fmt == "torch.save":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil))
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.load(path)
    message = str(caught.value)
    assert f"cannot load checkpoint {path}" in message and "weights_only=True" in message
    assert "\n" not in message  # one line, not torch's page of advice
    assert not marker.exists()
    # The same file through an unsafe loader does run the code: the test would catch a regression.
    try:
        torch.load(path, weights_only=False)
    except RuntimeError:  # a plain pickle is not a torch file, but it was unpickled first
        pass
    assert marker.exists()


@pytest.mark.timeout(120)
def test_resuming_from_a_hostile_checkpoint_fails_cleanly_in_the_worker(tmp_path):
    run_dir = tmp_path / "runs" / "evil"
    (run_dir / "checkpoints").mkdir(parents=True)
    config = load_config(write_config(tmp_path, {"job": {"name": JOB_NAME}, "run": {"name": "evil"},
                                                 "data": {"num_workers": 0}, "train": {"progress_bar": False}}))
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    path = run_dir / "checkpoints" / "step_00000001.pt"
    torch.save({"model": {}, "extra": RunsCode(tmp_path / "MARK_pwned")}, path)
    data = path.read_bytes()  # a valid completion marker: only the content is hostile
    (run_dir / "checkpoints" / "step_00000001.pt.done").write_text(
        json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    result = run_launch("resume", str(run_dir), "--cpu", "--nproc", "1", timeout=100)
    assert result.returncode == 1
    assert f"error: cannot load checkpoint {path}" in result.stderr
    assert "Traceback" not in result.stderr
    assert markers_in(tmp_path) == []


# -- YAML ----------------------------------------------------------------------------------------------


def test_a_python_yaml_tag_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "MARK_yaml"
    path = tmp_path / "evil.yaml"
    path.write_text(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["local", "--cpu", "--dry-run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "refused a YAML tag that is not plain data" in err and "Traceback" not in err
    assert not marker.exists()
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load(path.read_text())  # the loader is the safe one; unsafe_load would run it


def test_a_yaml_tag_in_an_override_stays_text(tmp_path):
    marker = tmp_path / "MARK_override"
    config = load_config(None, [f"job.data_dir=!!python/object/apply:os.system ['touch {marker}']"])
    assert config.job["data_dir"].startswith("!!python/object/apply:os.system") and not marker.exists()


# -- shells ---------------------------------------------------------------------------------------------


def hostile_config(tmp_path):
    return write_config(tmp_path, {
        "job": {"name": JOB_NAME},
        "run": {"name": HOSTILE_NAME, "dir": str(tmp_path / "runs with spaces")},
        "data": {"batch_size": 16, "num_workers": 0},
        "train": {"progress_bar": False, "max_steps": 2},
    })


def test_the_printed_torchrun_command_is_safe_to_paste_into_a_shell(tmp_path, capsys):
    assert main(["local", "--cpu", "--nproc", "1", "--dry-run", str(hostile_config(tmp_path))]) == 0
    out = capsys.readouterr().out
    command = out[out.index("torchrun ", out.index("\ntorchrun")):].strip()
    # A stand-in torchrun that prints its arguments: the shell must pass the path through untouched.
    stand_in = f"torchrun() {{ {sys.executable} -c 'import sys, json; print(json.dumps(sys.argv[1:]))' \"$@\"; }}"
    shell = subprocess.run(["bash", "-c", f"{stand_in}\n{command}"], cwd=tmp_path, capture_output=True, text=True)
    assert shell.returncode == 0, shell.stderr
    args = json.loads(shell.stdout)
    assert args[-1] == str(tmp_path / "runs with spaces" / HOSTILE_NAME)
    assert markers_in(tmp_path) == []


@pytest.mark.timeout(120)
def test_a_run_named_to_break_a_shell_trains_and_executes_nothing(tmp_path):
    result = run_launch("local", "--cpu", "--nproc", "1", str(hostile_config(tmp_path)), cwd=tmp_path, timeout=100)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs with spaces" / HOSTILE_NAME
    assert (run_dir / "checkpoints" / "step_00000002.pt").is_file()
    assert load_config(run_dir / "config.yaml").run.name == HOSTILE_NAME
    assert markers_in(tmp_path) == [] and markers_in(run_dir.parent) == []


def test_overrides_with_shell_syntax_are_plain_values():
    config = load_config(None, ["job.data_dir=$(touch MARK1) `touch MARK2`; touch MARK3"])
    assert config.job["data_dir"] == "$(touch MARK1) `touch MARK2`; touch MARK3"


def test_a_run_name_cannot_climb_out_of_run_dir():
    from launcher.preflight import check_job

    with pytest.raises(ConfigError, match="run.name must be a plain folder name"):
        check_job(load_config(None, ["run.name=../../etc"]))
