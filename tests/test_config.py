"""Tier 1: the config loader, as pure functions."""

import dataclasses

import pytest

from ddp.config import Config, ConfigError, load_config, parse_override
from tests.helpers import REPO


def test_demo_config_loads_with_its_values():
    config = load_config(REPO / "configs" / "demo.yaml")
    assert config.job["dataset"] == "digits"
    assert config.optim.lr == 0.05
    assert config.train.epochs == 8
    assert config.data.batch_size == 32


def test_shipped_defaults_file_matches_the_code_defaults():
    # configs/defaults.yaml documents every key; it must not drift from the dataclasses.
    assert load_config(REPO / "configs" / "defaults.yaml") == Config()


@pytest.mark.parametrize("name", ["demo.yaml", "imagenet_resnet50.yaml", "defaults.yaml"])
def test_every_shipped_config_validates(name):
    from launcher.preflight import check_job

    check_job(load_config(REPO / "configs" / name))


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


def test_python_tags_in_yaml_are_refused_not_executed(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="refused a YAML tag"):
        load_config(path)
    assert not marker.exists()


def test_missing_file_and_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(path)


def test_hash_follows_what_is_trained_not_where():
    base = Config()
    assert base.hash() == Config().hash()
    assert dataclasses.replace(base, optim=dataclasses.replace(base.optim, lr=0.2)).hash() != base.hash()
    assert dataclasses.replace(base, slurm=dataclasses.replace(base.slurm, partition="gpu")).hash() == base.hash()


def test_parse_override_keeps_text_with_colons():
    assert parse_override("job.name=mypkg.mod:MyJob") == ("job.name", "mypkg.mod:MyJob")
