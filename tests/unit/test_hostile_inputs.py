"""Hostile or broken input, in this process: checkpoints that would run code, YAML tags, names made to break a
shell or to climb out of run.dir. The same through `launch`: tests/e2e/test_hostile_launches.py."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import yaml

from ddp import checkpoint as ckpt
from ddp.config import ConfigError, load_config
from launcher.cli import main


class RunsCode:
    """Unpickling this makes a directory: what a malicious checkpoint does (any call at all)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


# -- checkpoints ---------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["torch.save", "plain pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path, fmt):
    marker = tmp_path / "MARK_pwned"
    path = tmp_path / "step_00000001.pt"
    evil = {"format": 2, "model": {"w": torch.zeros(2)}, "extra": RunsCode(marker)}
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


# -- YAML ----------------------------------------------------------------------------------------------


def test_a_python_yaml_tag_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "MARK_yaml"
    path = tmp_path / "evil.yaml"
    path.write_text(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["local", "--cpu", "--dry-run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: refused a YAML tag that is not plain data" in err and "Traceback" not in err
    assert not marker.exists()
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load(path.read_text())  # the loader is the safe one; unsafe_load would run it


def test_a_yaml_tag_in_an_override_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "MARK_override"
    with pytest.raises(ConfigError, match="override job.data_dir: refused a YAML tag that is not plain data"):
        load_config(None, ["job.name=image_classification",
                           f"job.data_dir=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


def test_yaml_bombs_are_refused_with_one_message(tmp_path):
    laughs = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for a, b in zip("abcdefgh", "bcdefghi"):  # each level nine of the one before: 9**9 leaves
        laughs.append(f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(laughs) + "\n")
    with pytest.raises(ConfigError, match="aliases|expands to more than"):
        load_config(path)
    deep = tmp_path / "deep.yaml"
    deep.write_text("run: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
        load_config(deep)


# -- names ----------------------------------------------------------------------------------------------


def test_overrides_with_shell_syntax_are_plain_values():
    config = load_config(None, ["job.name=image_classification",
                                "job.data_dir=$(touch MARK1) `touch MARK2`; touch MARK3"])
    assert config.job["data_dir"] == "$(touch MARK1) `touch MARK2`; touch MARK3"


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", "."])
def test_a_run_name_cannot_climb_out_of_run_dir(name):
    with pytest.raises(ConfigError, match="run.name must be a plain folder name"):
        load_config(None, [f"run.name={name}"])


def test_a_run_name_with_a_control_character_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('run:\n  name: "two\\nlines"\n')  # YAML's double quotes: a real newline
    with pytest.raises(ConfigError, match="run.name must not hold a newline"):
        load_config(path)
