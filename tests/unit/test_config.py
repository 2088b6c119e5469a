"""The config loader, as pure functions: files, overrides, checks, the hash."""

import dataclasses

import pytest

from ddp.config import Config, ConfigError, load_config, parse_override
from launcher import configs
from launcher.slurm.options import SlurmConfig
from tests.support.helpers import REPO


def test_demo_config_loads_with_its_values():
    config = load_config(REPO / "configs" / "demo.yaml")
    assert config.job["dataset"] == "digits"
    assert config.optim.lr == 0.05
    assert config.train.epochs == 8
    assert config.data.batch_size == 32


def test_shipped_defaults_file_matches_the_code_defaults():
    # configs/defaults.yaml documents every key (the launcher's slurm: section too); it must not drift.
    run = configs.load(REPO / "configs" / "defaults.yaml", cwd=REPO)
    assert run.config.run.dir == str(REPO / "runs")  # resolved against the working directory
    assert dataclasses.replace(run.config, run=dataclasses.replace(run.config.run, dir="runs")) == Config()
    assert run.slurm == SlurmConfig()


@pytest.mark.parametrize("name", ["demo.yaml", "imagenet_resnet50.yaml", "defaults.yaml"])
def test_every_shipped_config_validates(name):
    # The whole check a launch makes: every section, the slurm: section and the job's own keys.
    run = configs.load(REPO / "configs" / name, cwd=REPO)
    assert isinstance(run.job_settings, run.job_class.Config)


def test_overrides_are_read_as_yaml_values():
    config = load_config(REPO / "configs" / "demo.yaml",
                         ["optim.lr=1e-3", "train.sync_bn=true", "optim.betas=[0.8,0.9]", "job.model=resnet18"])
    assert config.optim.lr == pytest.approx(1e-3)
    assert config.train.sync_bn is True
    assert config.optim.betas == (0.8, 0.9)
    assert config.job["model"] == "resnet18"


def test_unknown_key_names_it_and_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["optim.learning_rate=0.1"])
    message = str(info.value)
    assert "optim.learning_rate" in message and "lr" in message and "momentum" in message


def test_unknown_section_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown key trainer; valid keys in the config: job, run"):
        load_config(path)


def test_the_slurm_section_is_the_launchers_not_the_trainers():
    assert "slurm" not in Config().to_dict()
    with pytest.raises(ConfigError, match="unknown key slurm; valid keys in the config: job, run"):
        load_config(None, ["slurm.partition=gpu"])
    run = configs.load(REPO / "configs" / "demo.yaml", ["slurm.partition=gpu"], cwd=REPO)
    assert run.slurm.partition == "gpu"


@pytest.mark.parametrize("override, fragment", [
    ("data.batch_size=abc", "data.batch_size must be an integer, got 'abc'"),
    ("data.batch_size=1.5", "data.batch_size must be an integer"),
    ("train.precision=fp8", "train.precision must be one of fp32, fp16, bf16"),
    ("train.sync_bn=maybe", "train.sync_bn must be true or false"),
    ("optim=3", "optim must be a mapping"),
    ("nokey", "not of the form section.key=value"),
    ("optim..lr=1", "not of the form section.key=value"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.batch_size=0", "optim.lr=-1", "bogus.x=1"])
    problems = info.value.problems
    assert len(problems) == 3
    assert "data.batch_size must be >= 1, got 0" in problems
    assert "optim.lr must be > 0 and <= 1000, got -1.0" in problems
    assert any(p.startswith("unknown key bogus") for p in problems)
    assert str(info.value).startswith("3 problems in the config:\n")


def test_python_tags_in_yaml_are_refused_not_executed(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="refused a YAML tag"):
        load_config(path)
    assert not marker.exists()


def test_missing_file_and_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match=f"config file not found: {tmp_path / 'absent.yaml'}"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=f"{tmp_path} is a directory, not a config file"):
        load_config(tmp_path)
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(path)


def test_hash_follows_what_is_trained_not_where():
    base = Config()
    assert base.hash() == Config().hash()
    assert dataclasses.replace(base, optim=dataclasses.replace(base.optim, lr=0.2)).hash() != base.hash()
    assert dataclasses.replace(base, run=dataclasses.replace(base.run, dir="/elsewhere")).hash() == base.hash()
    assert dataclasses.replace(base, checkpoint=dataclasses.replace(base.checkpoint, keep_last=9)).hash() == base.hash()


def test_parse_override_keeps_text_with_colons():
    assert parse_override("job.name=mypkg.mod:MyJob") == ("job.name", "mypkg.mod:MyJob")
