"""`launch slurm` without a cluster: the rendered script under a real shell (a stand-in srun), dry runs, refusals,
and `launch resume` of a SLURM run. The plan and the script as pure functions: tests/unit/test_slurm_plan.py."""

import os
import subprocess
from pathlib import Path

import pytest

from ddp.layout import RunDir
from launcher import configs
from launcher.commands.common import launch_record
from launcher.errors import LaunchError
from launcher.local.plan import Entry
from launcher.runs import claim
from launcher.slurm.plan import Element, Request, plan_slurm
from launcher.slurm.render import render_sbatch
from tests.support.helpers import REPO, run_launch

DEMO = REPO / "configs" / "demo.yaml"


def demo_plan(run_dir: Path, *, nodes="1", nproc_per_node=2, python="/opt/my venv/bin/python", overrides=()):
    """The demo's plan into ``run_dir`` (the plan takes any path; a config's run.name is checked apart)."""
    run = configs.load(DEMO, list(overrides), cwd=REPO)
    plan = plan_slurm(Request(nodes=nodes, cpu=True, nproc_per_node=nproc_per_node), run.slurm,
                      elements=[Element(run_dir, Entry("config", str(run_dir)))], folder=run_dir / "slurm",
                      python=python, num_workers=run.config.data.num_workers)
    return run, plan


@pytest.mark.timeout(60)
def test_the_rendered_script_runs_nothing_but_srun_with_the_exact_paths(tmp_path):
    """bash runs the script with a stand-in srun: `$(...)` and backticks stay text, each path one argument."""
    run_dir = tmp_path / "my runs" / "it's \"q\" $(touch pwned) `touch pwned2` ; & | * ~"
    _, plan = demo_plan(run_dir)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$SRUN_ARGS"\n'
                                  'printf "%s\\0" "$OMP_NUM_THREADS" "${CUDA_VISIBLE_DEVICES-unset}" '
                                  '"$SRUN_CPUS_PER_TASK" "$SUBMITIT_EXECUTOR" >> "$SRUN_ARGS"\n')
    (bin_dir / "srun").chmod(0o755)
    script = tmp_path / "job.sh"
    script.write_text(render_sbatch(plan))
    record = tmp_path / "srun-args"
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}
    subprocess.run(["bash", str(script)], cwd=tmp_path, check=True, timeout=30,
                   env={**env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_ARGS": str(record)})
    args = record.read_text().split("\0")[:-1]
    folder = str(run_dir / "slurm")
    assert args == ["--unbuffered", "--kill-on-bad-exit=1", "--output", f"{folder}/%j_%t_log.out",
                    "--error", f"{folder}/%j_%t_log.err",
                    "/opt/my venv/bin/python", "-u", "-P", "-m", "launcher.slurm.task", folder,
                    "2", "", "2", "slurm"]  # OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES (empty), SRUN_CPUS_PER_TASK
    assert not list(tmp_path.rglob("pwned*"))


def test_a_backslash_in_the_run_directory_is_refused(tmp_path):
    """sbatch reads a backslash in #SBATCH paths as an escape: the logs would go elsewhere."""
    with pytest.raises(LaunchError, match="holds a backslash"):
        demo_plan(tmp_path / "a \\ b")


@pytest.mark.timeout(120)
def test_dry_run_of_a_sweep_prints_each_config_and_one_array_script_and_creates_nothing(tmp_path):
    result = run_launch("slurm", "--cpu", "--nproc-per-node", "1", "--nodes", "2", "--time", "10",
                        "--dry-run", str(DEMO), f"run.dir={tmp_path / 'runs'}", "optim.lr=0.1,0.01", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("# resolved config") == 2 and out.count("#!/bin/bash") == 1
    assert "# ===== run 2 of 2: " + str(tmp_path / "runs" / "demo_lr0.01") in out
    assert "lr: 0.01" in out and "submission     one array job of 2 runs" in out
    sweep = tmp_path / "runs" / "demo_sweep" / "slurm"
    for line in ("#SBATCH --job-name=demo_sweep", "#SBATCH --array=0-1", "#SBATCH --time=10", "#SBATCH --nodes=2",
                 f"#SBATCH --output={sweep}/%A_%a_0_log.out"):
        assert f"\n{line}\n" in out, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(120)
def test_dry_run_of_a_sweep_without_an_array_prints_each_jobs_own_script(tmp_path):
    result = run_launch("slurm", "--cpu", "--no-array", "--dry-run", str(DEMO), f"run.dir={tmp_path / 'runs'}",
                        "optim.lr=0.1,0.01", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("#!/bin/bash") == 2 and out.count("submission     one job\n") == 2
    first, second = out.split("# ===== job 2 of 2: " + str(tmp_path / "runs" / "demo_lr0.01"))
    assert "\n#SBATCH --job-name=demo_lr0.1\n" in first and "demo_lr0.01" not in first
    assert "\n#SBATCH --job-name=demo_lr0.01\n" in second
    assert f"\n#SBATCH --output={tmp_path / 'runs' / 'demo_lr0.01' / 'slurm'}/%j_0_log.out\n" in second
    assert "#SBATCH --array" not in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("options, overrides, message", [
    ([], [], "--gpus-per-node G (one worker per GPU) or --cpu --nproc-per-node P"),
    (["--cpu", "--job-name", "two\nlines"], [], "--job-name 'two\\nlines' holds a newline"),
    (["--cpu", "--partition", "gpu\n#SBATCH --wrap=x"], [], "holds a newline"),
    (["--cpu"], ['run.name="two\\nlines"'], "run.name must not hold a newline"),
    (["--cpu", "--sbatch", "signal=USR1@5"], [], "sets this option itself"),
])
def test_bad_requests_exit_2_with_one_message(tmp_path, options, overrides, message):
    result = run_launch("slurm", *options, "--dry-run", str(DEMO), *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("error: ") == 1 and "#!/bin/bash" not in result.stdout


@pytest.mark.timeout(120)
def test_resuming_a_slurm_run_resubmits_the_same_job(tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    run, plan = demo_plan(run_dir, nodes="2", nproc_per_node=1, python="/opt/venv/bin/python",
                          overrides=[f"run.dir={run_dir.parent}", f"run.name={run_dir.name}"])
    record = launch_record("config", "slurm", {"config": str(DEMO)}, plan.record())
    claim(RunDir(run_dir), kind="slurm", record=record, config=run.config).release()
    result = run_launch("resume", str(run_dir), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "# resolved config" in out and f"dir: {run_dir.parent}" in out
    assert render_sbatch(plan) in out  # the recorded job, as it was submitted
