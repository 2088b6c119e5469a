"""What the command imports: the demo's path needs neither torchvision, tensorboard nor submitit, and building the
command line needs no torch at all."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.helpers import REPO


@pytest.mark.timeout(300)
def test_the_demo_path_imports_neither_torchvision_tensorboard_nor_submitit(tmp_path):
    script = (
        "import sys\n"
        "from launcher.cli import main\n"
        f"code = main(['debug', {str(REPO / 'configs' / 'demo.yaml')!r}, 'train.max_steps=2', "
        f"'run.dir={tmp_path}'])\n"
        "print('IMPORTED', sorted(m for m in ('torchvision', 'tensorboard', 'submitit') if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "IMPORTED []" in result.stdout, result.stdout


@pytest.mark.timeout(120)
def test_building_the_command_line_imports_no_torch():
    script = ("import sys\nfrom launcher.cli import build_parsers, parse\nbuild_parsers()\n"
              "parse(['local', '--cpu', '--nproc', '2', 'configs/demo.yaml', 'optim.lr=0.1'])\n"
              "print(sorted(m for m in ('torch', 'submitit', 'tensorboard', 'torchvision') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
