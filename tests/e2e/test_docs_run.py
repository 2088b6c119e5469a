"""The README and the "your own code" guide run as written, from a folder of their own.

Every ``sh`` block's commands run in order (``launch`` is the installed console script, as on a
user's PATH); ``python``/``yaml`` blocks whose first line names a file (``# mypackage/regression.py``)
are written there first; a ``python`` block that names no file is a script, run with ``launch local``.
Commands for SLURM run in the SLURM tier (tests/slurm/test_docs_slurm.py); ``make`` lines are what
CI itself runs (``make demo``'s script is run here).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helpers import REPO, launch_env

pytestmark = pytest.mark.timeout(600)

BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def blocks(document: Path) -> list[tuple[str, str]]:
    return [(kind, body) for kind, body in BLOCK.findall(document.read_text())]


def commands(body: str) -> list[str]:
    lines = []
    for line in body.splitlines():
        line = line.split("  #")[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def launch_command() -> list[str]:
    script = Path(sys.executable).parent / "launch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "launcher"]


def run(line: str, cwd: Path) -> subprocess.CompletedProcess:
    words = shlex.split(line)
    if words[0] == "launch":
        words = launch_command() + words[1:]
    result = subprocess.run(words, cwd=cwd, env=launch_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"$ {line}\n{result.stdout}\n{result.stderr}"
    return result


def workspace(tmp_path: Path) -> Path:
    """A user's folder: the shipped configs and examples, and nothing else of the repository."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copytree(REPO / "configs", home / "configs")
    shutil.copytree(REPO / "examples", home / "examples")
    return home


def runnable(line: str) -> bool:
    return line.startswith("launch ") and "launch slurm" not in line and "--gpus" not in line


def test_the_readme_quick_start_runs_as_written(tmp_path):
    home = workspace(tmp_path)
    quick = [body for kind, body in blocks(REPO / "README.md") if kind == "sh" and "launch local" in body]
    assert len(quick) == 1
    ran = [run(line, home) for line in commands(quick[0]) if runnable(line)]
    assert len(ran) >= 5
    assert "demo" in ran[-1].stdout and "finished" in ran[-1].stdout  # launch ls, after the runs


def test_make_demo_trains_the_demo_with_visible_results(tmp_path):
    home = workspace(tmp_path)
    shutil.copytree(REPO / "scripts", home / "scripts")
    result = subprocess.run([sys.executable, "scripts/demo.py"], cwd=home, env=launch_env(), capture_output=True,
                            text=True, timeout=400)
    assert result.returncode == 0, result.stderr
    assert "val/accuracy" in result.stderr and "Results: runs/demo-" in result.stdout


def test_your_own_code_guide_runs_as_written(tmp_path):
    home = workspace(tmp_path)
    scripts = 0
    for kind, body in blocks(REPO / "docs" / "your-code.md"):
        first = body.splitlines()[0]
        if kind in ("python", "yaml") and re.fullmatch(r"# [\w./-]+\.(py|yaml)", first):
            path = home / first[2:]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
        elif kind == "python":
            scripts += 1
            script = home / f"doc_script_{scripts}.py"
            script.write_text(body)
            run(f"launch local --cpu --nproc 2 {script.name}", home)
        elif kind == "sh":
            for line in commands(body):
                if runnable(line):
                    run(line, home)
    assert (home / "mypackage" / "regression.py").exists()
    assert (home / "runs" / "run" / "checkpoints" / "last.pt").exists()
    assert scripts == 1 and (home / "runs" / "library" / "last.pt").exists()
