"""Configs in temp dirs, running ``launch`` as a user would, and reading what a run left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]


def write_config(directory: Path, sections: dict, name: str = "config.yaml") -> Path:
    """A YAML config in ``directory``; ``run.dir`` defaults to ``directory/runs``."""
    sections = {key: dict(value) if isinstance(value, dict) else value for key, value in sections.items()}
    sections.setdefault("run", {}).setdefault("dir", str(directory / "runs"))
    path = directory / name
    path.write_text(yaml.safe_dump(sections))
    return path


def launch_env(extra: dict | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), **(extra or {})}


def run_launch(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None,
               check: bool = False) -> subprocess.CompletedProcess:
    """``python -m launcher ARGS`` in a subprocess, as a user would type ``launch ARGS``."""
    result = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, env=launch_env(env),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"launch {' '.join(args)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def start_launch(*args: str, cwd: Path | None = None, env: dict | None = None, log: Path | None = None,
                 new_session: bool = False) -> subprocess.Popen:
    """``launch ARGS`` in the background; its output to ``log`` (or a pipe)."""
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=cwd, env=launch_env(env), stdout=out,
                            stderr=subprocess.STDOUT, text=True, start_new_session=new_session)


def wait_for(condition, timeout: float = 60, interval: float = 0.05, what: str = "a condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def final_weights(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def processes_of(pattern: str) -> list[int]:
    """Pids of processes whose command line contains ``pattern``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if pattern in command and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def train_here(config, run_dir: Path | None = None, num_workers: int | None = 0):
    """The training loop every worker runs, in this process as a world of one, on the config's job.

    ``run_dir`` defaults to ``run.dir/run.name``; ``num_workers=0`` loads data in this process
    (``None``: the config's ``data.num_workers``). Returns the ``Outcome``.
    """
    from ddp.env import DistEnv
    from ddp.trainer import run_training
    from jobs.registry import make_job

    env = DistEnv()
    run_dir = Path(config.run.dir) / config.run.name if run_dir is None else run_dir
    return run_training(config, run_dir, env, make_job(config.job, env), num_workers=num_workers)
