"""Every key of configs/defaults.yaml, given a value out of its range, is refused where it is declared.

Each bad value is tried through the command line, in process (``launcher.cli.main``), as a user
would pass it: one message naming the key and the value, exit code 2, and no run directory.
"""

from __future__ import annotations

import math

import pytest
import yaml

from ddp.config import Config
from ddp.settings import ConfigError, build
from launcher import cli
from launcher.configs import load
from tests.support.helpers import REPO

DEFAULTS = yaml.safe_load((REPO / "configs" / "defaults.yaml").read_text())


def leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value and key not in ("additional",):
            out.extend(leaves(value, f"{prefix}{key}."))
        else:
            out.append(f"{prefix}{key}")
    return out


# key -> values out of its range (or of the wrong type, where the type is the whole range).
BAD = {
    "job.name": ["", "no.such.module:Job", "image_classification:X:Y"],
    "run.name": ["a/b", "..", '"with\\0nul"', '"new\\nline"'],
    "run.dir": ['"with\\0nul"'],
    "run.seed": [-1, 2**64, 1.5],
    "run.deterministic": ["maybe"],
    "data.batch_size": [0, -8, "abc"],
    "data.eval_batch_size": [0],
    "data.num_workers": [-1, 100000],
    "data.prefetch_factor": [0],
    "data.start_method": ["thread"],
    "data.pin_memory": [3],
    "data.drop_last": ["sometimes"],
    "optim.name": ["adam"],
    "optim.lr": [0, -0.1, ".nan", ".inf", 1e9],
    "optim.momentum": [-1, 1.5],
    "optim.weight_decay": [-1, ".nan"],
    "optim.betas": ["[2,3]", "[]", "[0.9]", "[0.9,.nan]"],
    "optim.no_decay_bias_and_norm": ["yes please"],
    "schedule.name": ["linear"],
    "schedule.warmup_steps": [-1],
    "schedule.step_size": [0],
    "schedule.gamma": [0, 2],
    "schedule.min_lr": [-1, 5.0],
    "schedule.metric": ["[1,2]"],
    "schedule.mode": ["up"],
    "schedule.factor": [0, 1],
    "schedule.patience": [-1],
    "schedule.threshold": [-0.1],
    "train.epochs": [-1],
    "train.max_steps": [0],
    "train.precision": ["fp8"],
    "train.accumulate": [0],
    "train.clip_grad_norm": [-1, 0],
    "train.sync_bn": ["[1]"],
    "train.channels_last": [2],
    "train.compile": ["fast"],
    "train.log_every": [0],
    "train.eval_every_epochs": [0],
    "train.progress_bar": ["no thanks"],
    "train.on_nonfinite": ["ignore"],
    "train.stop_check_s": [-0.5, ".inf"],
    "train.device": ["tpu"],
    "train.early_stop.metric": ["[1]"],
    "train.early_stop.mode": ["sideways"],
    "train.early_stop.patience": [0],
    "train.early_stop.min_delta": [-1],
    "checkpoint.every_steps": [0],
    "checkpoint.keep_last": [0],
    "checkpoint.best_metric": ["[1]"],
    "checkpoint.best_mode": ["best"],
    "checkpoint.async_save": ["later"],
    "checkpoint.resume": ["perhaps"],
    "ddp.backend": ["mpi"],
    "ddp.timeout_s": [1e-6, 0, ".nan"],
    "ddp.bucket_cap_mb": [-1, 0],
    "ddp.gradient_as_bucket_view": ["x"],
    "ddp.static_graph": ["x"],
    "ddp.find_unused_parameters": ["x"],
    "ddp.exact_resume": ["x"],
    "watchdog.timeout_s": [0, -5, "sometimes"],
    "watchdog.floor_s": [0],
    "watchdog.startup_s": [-1],
    "watchdog.straggler_factor": [1, 0.5],
    "watchdog.straggler_windows": [0],
    "slurm.partition": ['"a\\nb"'],
    "slurm.time": ["[1]"],
    "slurm.account": ["{a: 1}"],
    "slurm.qos": ["[q]"],
    "slurm.constraint": ["[c]"],
    "slurm.exclude": ["{n: 1}"],
    "slurm.cpus_per_task": [0],
    "slurm.mem": ["[1]"],
    "slurm.job_name": ['"a\\nb"'],
    "slurm.signal_delay_s": [-1],
    "slurm.max_requeues": [-1],
    "slurm.array_parallelism": [0],
    "slurm.additional": ["[1,2]"],
}
CASES = [(key, value) for key, values in BAD.items() for value in values]


def test_every_key_of_the_defaults_has_bad_values_tried():
    assert sorted(leaves(DEFAULTS)) == sorted(BAD), "a key without a bad value to try, or one that is gone"


def test_more_than_a_hundred_bad_inputs_are_tried():
    assert len(CASES) >= 100


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v!r}" for k, v in CASES])
def test_a_value_out_of_range_is_one_message_exit_2_and_nothing_written(tmp_path, capsys, monkeypatch, key, value):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{dir: {tmp_path / 'runs'}, name: probe}}\n")
    code = cli.main(["local", "--cpu", "--dry-run", str(config), f"{key}={value}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert key.rsplit(".", 1)[0].split(".")[0] in err  # names the key (or its section's job name)
    assert not (tmp_path / "runs").exists()


def test_all_bad_keys_are_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(None, ["data.batch_size=0", "optim.lr=-1", "train.accumulate=0"], cwd=tmp_path)
    assert len(info.value.problems) == 3
    assert all(key in str(info.value) for key in ("data.batch_size", "optim.lr", "train.accumulate"))


def test_non_finite_numbers_are_refused_everywhere_a_number_is_expected():
    for key in ("optim.lr", "optim.momentum", "schedule.gamma", "ddp.timeout_s", "watchdog.floor_s"):
        section, name = key.split(".")
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError, match="finite"):
                build(Config, {section: {name: bad}})


def test_the_shipped_defaults_are_the_declared_defaults(tmp_path):
    loaded = load(REPO / "configs" / "defaults.yaml", cwd=tmp_path)
    assert loaded.config.to_dict() == {**Config().to_dict(), "run": {**Config().to_dict()["run"],
                                                                      "dir": str(tmp_path / "runs")}}


def test_config_reference_and_defaults_are_generated_and_current():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "config_reference.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    reference = (REPO / "docs" / "configuration.md").read_text()
    for key in leaves(DEFAULTS):
        if not key.startswith("job."):
            assert f"`{key}`" in reference, f"{key} missing from docs/configuration.md"


def test_a_relative_job_file_and_data_dir_are_stored_absolute(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "my_job.py").write_text("from jobs.image_classification import ImageClassification as J\n")
    config = tmp_path / "cfg" / "c.yaml"
    config.write_text("job: {name: my_job.py:J, dataset: imagefolder, data_dir: data}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    loaded = load(config, ["run.dir=runs"], cwd=elsewhere)
    assert loaded.config.job["name"] == f"{tmp_path / 'cfg' / 'my_job.py'}:J"
    assert loaded.config.job["data_dir"] == str(tmp_path / "cfg" / "data")  # the file's value: its folder
    assert loaded.config.run.dir == str(elsewhere / "runs")  # the command line's: the working directory
    given = load(config, ["job.data_dir=mine"], cwd=elsewhere)
    assert given.config.job["data_dir"] == str(elsewhere / "mine")


def test_options_may_follow_the_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{dir: {tmp_path / 'runs'}}}\n")
    assert cli.main(["local", str(config), "--cpu", "optim.lr=0.2", "--nproc", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "world size     2" in out and "lr: 0.2" in out


def test_an_impossible_number_of_cpu_workers_is_warned_about(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{dir: {tmp_path / 'runs'}}}\n")
    assert cli.main(["local", "--cpu", "--nproc", "100000", "--dry-run", str(config)]) == 0
    assert "warning        100000 CPU workers on" in capsys.readouterr().out


def test_a_directory_or_a_device_is_not_a_config(tmp_path, capsys):
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    assert cli.main(["local", "--cpu", "--dry-run", str(tmp_path / "folder.yaml")]) == 2
    assert "is a directory, not a config file" in capsys.readouterr().err
    assert cli.main(["local", "--cpu", "--dry-run", str(tmp_path / "zero.yaml")]) == 2
    assert "is not a regular file" in capsys.readouterr().err
    assert cli.main(["local", "--cpu", "--dry-run", "/dev/zero"]) == 2
    assert "launch takes a config (.yaml or .yml)" in capsys.readouterr().err
