"""Scripts: an unchanged torchrun script under every launcher, and a script on the library API, resumed exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp.codes import EXIT_RESUMABLE
from tests.support.helpers import REPO, launch_env, run_launch

pytestmark = pytest.mark.timeout(300)


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def torchrun_weights(tmp_path_factory) -> Path:
    """The plain script under plain torchrun: the reference."""
    directory = tmp_path_factory.mktemp("torchrun")
    out = directory / "weights.pt"
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    subprocess.run([*command, "--standalone", "--nproc-per-node", "2", str(REPO / "examples" / "torchrun_script.py"),
                    "--epochs", "2", "--out", str(out)], cwd=directory, env=launch_env(), check=True,
                   capture_output=True, timeout=200)
    return out


def test_an_unchanged_torchrun_script_gives_the_same_weights_under_launch_local(tmp_path, torchrun_weights):
    out = tmp_path / "weights with spaces.pt"
    result = run_launch("local", "--cpu", "--nproc", "2", str(REPO / "examples" / "torchrun_script.py"),
                        "--epochs", "2", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert same(weights(torchrun_weights), weights(out))
    run_dir = tmp_path / "runs" / "torchrun_script"
    assert "epoch 1 loss" in (run_dir / "logs" / "rank_0.log").read_text()
    record = json.loads((run_dir / "launch.json").read_text())
    assert record["kind"] == "script" and record["target"]["args"] == ["--epochs", "2", "--out", str(out)]


def test_launch_debug_runs_the_script_in_process_as_one_rank(tmp_path):
    out = tmp_path / "debug.pt"
    result = run_launch("debug", str(REPO / "examples" / "torchrun_script.py"), "--epochs", "1", "--out", str(out),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "in this process" in result.stderr and out.exists()


def test_a_module_runs_as_python_m_would(tmp_path):
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    result = run_launch("local", "--cpu", "--nproc", "2", "-m", "examples.torchrun_script", "--epochs", "1",
                        "--out", "m.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.pt").exists()


def test_a_failing_rank_of_a_script_is_named_as_the_root_cause_with_its_traceback(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(
        "import os, time\nimport torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "def train_step():\n"
        "    if dist.get_rank() == 1:\n"
        "        raise ValueError('rank one exploded')\n"
        "    time.sleep(30)\n"
        "train_step()\n")
    result = run_launch("local", "--cpu", "--nproc", "2", str(script), cwd=tmp_path)
    assert result.returncode == 1
    assert "worker rank 1 failed" in result.stderr and "ValueError: rank one exploded" in result.stderr
    assert "worker traceback (root cause):" in result.stderr and "train_step" in result.stderr
    assert "rank one exploded" in (tmp_path / "runs" / "fails" / "logs" / "rank_1.log").read_text()


def test_the_dry_runs_torchrun_line_runs_the_script_when_pasted(tmp_path):
    result = run_launch("local", "--cpu", "--nproc", "2", "--dry-run", str(REPO / "examples" / "torchrun_script.py"),
                        "--epochs", "1", "--out", "pasted.pt", cwd=tmp_path)
    line = next(line for line in result.stdout.splitlines() if line.startswith("torchrun"))
    pasted = subprocess.run(["bash", "-c", line.split(None, 1)[1].replace("torchrun ", f"{sys.executable} -m "
                                                                          "torch.distributed.run ", 1)],
                            cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=200)
    assert pasted.returncode == 0, pasted.stderr
    assert (tmp_path / "pasted.pt").exists()


LIBRARY = REPO / "examples" / "library_script.py"


@pytest.fixture(scope="module")
def library_uninterrupted(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("library")
    out = directory / "final.pt"
    result = run_launch("local", "--cpu", "--nproc", "2", "--run-dir", "runs/clean", str(LIBRARY), "--epochs", "3",
                        "--out", str(out), cwd=directory)
    assert result.returncode == 0, result.stderr
    return out


def test_a_library_script_killed_with_9_and_restarted_ends_bitwise_equal(tmp_path, library_uninterrupted):
    """The script kills its own rank 1 (SIGKILL) once, mid-epoch, after a checkpoint; the agent restarts."""
    script = tmp_path / "killed_once.py"
    marker = tmp_path / "killed"
    script.write_text(LIBRARY.read_text().replace(
        "            state[\"step\"] += 1\n",
        "            state[\"step\"] += 1\n"
        f"            if state['step'] == 37 and run.rank == 1 and not __import__('os').path.exists({str(marker)!r}):\n"
        f"                open({str(marker)!r}, 'w').close(); __import__('os').kill(__import__('os').getpid(), 9)\n"))
    out = tmp_path / "final.pt"
    result = run_launch("local", "--cpu", "--nproc", "2", "--max-restarts", "2", str(script), "--epochs", "3",
                        "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert marker.exists() and "restart 1 of the workers" in result.stdout + result.stderr
    restarted = (tmp_path / "runs" / "killed_once" / "logs" / "rank_0.log").read_text()
    assert "resumed at step 32, epoch 2" in restarted  # the checkpoint at the end of epoch 2, before step 37
    assert same(weights(library_uninterrupted), weights(out))


def test_a_library_script_stopped_by_a_signal_exits_75_and_resumes_bitwise(tmp_path, library_uninterrupted):
    script = tmp_path / "stopped.py"
    script.write_text(LIBRARY.read_text().replace(
        "            state[\"step\"] += 1\n",
        "            state[\"step\"] += 1\n"
        "            __import__('time').sleep(0.05)  # slow enough that the stop comes before the end\n"
        "            if state['step'] == 10 and run.rank == 0 and state.get('stopped') is None:\n"
        "                state['stopped'] = True; __import__('os').kill(__import__('os').getppid(), 15)\n"))
    out = tmp_path / "final.pt"
    first = run_launch("local", "--cpu", "--nproc", "2", str(script), "--epochs", "3", "--out", str(out),
                       cwd=tmp_path)
    assert first.returncode == EXIT_RESUMABLE, first.stderr
    assert "stopped by SIGTERM" in first.stderr
    second = run_launch("resume", str(tmp_path / "runs" / "stopped"), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert same(weights(library_uninterrupted), weights(out))
