"""Careless and hostile YAML is refused quickly, in bounded memory, with one message."""

from __future__ import annotations

import resource
import time

import pytest

from ddp import yaml_safe
from ddp.config import load_config
from ddp.settings import ConfigError


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        refs = ", ".join([f"*a{level - 1}"] * width)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return "slurm:\n  additional:\n" + "\n".join("    " + line for line in lines) + "\n"


@pytest.mark.parametrize("levels,width", [(9, 10), (6, 8)], ids=["classic, 90 aliases", "fewer aliases, 10^6 values"])
def test_a_billion_laughs_is_refused_in_under_a_second_in_bounded_memory(tmp_path, levels, width):
    path = tmp_path / "laughs.yaml"
    path.write_text(billion_laughs(levels, width))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases|expands to more than"):
        load_config(path)
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


@pytest.mark.parametrize("text", ["[" * 10_000 + "]" * 10_000, "{a: " * 10_000 + "1" + "}" * 10_000,
                                  "".join(" " * i + f"k{i}:\n" for i in range(1_000))],
                         ids=["10,000 deep lists", "10,000 deep mappings", "1,000 deep block mappings"])
def test_a_deep_nesting_is_refused_in_under_a_second(tmp_path, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
        load_config(path)
    assert time.perf_counter() - start < 1.0


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as handle:
        handle.truncate(yaml_safe.MAX_BYTES + 1)
    with pytest.raises(ConfigError, match="more than a config may be"):
        load_config(path)


def test_an_override_is_bounded_too():
    with pytest.raises(ConfigError, match="nested deeper"):
        load_config(None, ["job.x=" + "[" * 100 + "]" * 100])


def test_times_stay_text_and_a_few_anchors_are_fine(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {lr: 0.1}\nslurm: {time: 4:00:00, additional: {mail-type: END}}\n")
    assert yaml_safe.read_file(path)["slurm"]["time"] == "4:00:00"
