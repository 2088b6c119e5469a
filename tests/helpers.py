"""Helpers shared by the test modules: configs in temp dirs, running `launch`, reading results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def write_config(directory: Path, sections: dict, name: str = "config.yaml") -> Path:
    """A YAML config in ``directory``; ``run.dir`` defaults to ``directory/runs``."""
    sections = {key: dict(value) if isinstance(value, dict) else value for key, value in sections.items()}
    sections.setdefault("run", {}).setdefault("dir", str(directory / "runs"))
    path = directory / name
    path.write_text(yaml.safe_dump(sections))
    return path


def run_launch(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None,
               check: bool = False) -> subprocess.CompletedProcess:
    """``python -m launcher ARGS`` in a subprocess, as a user would type ``launch ARGS``."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    result = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"launch {' '.join(args)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def add_ballast(model: torch.nn.Module, megabytes: float) -> None:
    """A frozen parameter of ``megabytes``: a checkpoint that big, at no extra compute."""
    if megabytes > 0:
        numel = int(megabytes * 2**20 / 4)
        model.register_parameter("ballast", torch.nn.Parameter(torch.zeros(numel), requires_grad=False))
