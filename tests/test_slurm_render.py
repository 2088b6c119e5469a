"""Tier 1: `launch slurm` planning as pure functions: the sbatch script as golden text, sweeps, refusals.

No cluster needed: the script is rendered by submitit's own function from the plan, and
what a shell does with it is checked by running it with a stand-in ``srun``.
"""

import os
import subprocess
from pathlib import Path

import pytest

from ddp.config import ConfigError, load_config
from launcher import sweep
from launcher.cli import build_parser
from launcher.errors import LaunchError
from launcher.slurm import SlurmPlan, additional_options, plan_slurm, render_sbatch
from launcher.slurm_cli import with_command_line
from tests.helpers import REPO, run_launch

DEMO = REPO / "configs" / "demo.yaml"
PYTHON = "/opt/venv/bin/python"


def plan_for(overrides=(), *, nodes=2, gpus_per_node=None, cpu=True, nproc_per_node=1,
             run_dir="/scratch/runs/demo", python=PYTHON, env_threads=None) -> SlurmPlan:
    return plan_slurm(load_config(DEMO, list(overrides)), nodes=nodes, gpus_per_node=gpus_per_node, cpu=cpu,
                      nproc_per_node=nproc_per_node, run_dir=Path(run_dir), python=python, env_threads=env_threads)


CPU_SCRIPT = """\
#!/bin/bash

# Parameters
#SBATCH --error=/scratch/runs/demo/slurm/%j_0_log.err
#SBATCH --job-name=demo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/scratch/runs/demo/slurm/%j_0_log.out
#SBATCH --requeue
#SBATCH --signal=USR2@120

# setup
export OMP_NUM_THREADS=1
export CUDA_VISIBLE_DEVICES=

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /scratch/runs/demo/slurm/%j_%t_log.out --error /scratch/runs/demo/slurm/%j_%t_log.err \
/opt/venv/bin/python -u -m submitit.core._submit /scratch/runs/demo/slurm
"""


def test_cpu_job_script_is_golden():
    assert render_sbatch(plan_for()) == CPU_SCRIPT


GPU_SCRIPT = """\
#!/bin/bash

# Parameters
#SBATCH --account=proj
#SBATCH --constraint=volta32gb
#SBATCH --cpus-per-task=10
#SBATCH --error=/scratch/runs/demo/slurm/%j_0_log.err
#SBATCH --exclude='n[01-03],n7'
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name='resnet run'
#SBATCH --mail-type=END
#SBATCH --mem=64G
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --open-mode=append
#SBATCH --output=/scratch/runs/demo/slurm/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --requeue
#SBATCH --signal=USR2@90
#SBATCH --time=1-02:00:00

# setup
export OMP_NUM_THREADS=10

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /scratch/runs/demo/slurm/%j_%t_log.out --error /scratch/runs/demo/slurm/%j_%t_log.err \
/opt/venv/bin/python -u -m submitit.core._submit /scratch/runs/demo/slurm
"""


def test_gpu_job_with_every_scheduler_option_is_golden():
    plan = plan_for(["slurm.partition=gpu", "slurm.time=1-02:00:00", "slurm.account=proj", "slurm.qos=high",
                     "slurm.constraint=volta32gb", "slurm.exclude=n[01-03],n7", "slurm.cpus_per_task=10",
                     "slurm.mem=64G", "slurm.job_name=resnet run", "slurm.signal_delay_s=90",
                     "slurm.additional={mail-type: END, exclusive: true}"],
                    nodes=4, gpus_per_node=8, cpu=False, nproc_per_node=None)
    assert render_sbatch(plan) == GPU_SCRIPT
    assert plan.world_size == 32 and plan.device == "cuda"


AWKWARD_DIR = "/scratch/my runs/it's \"q\" $(touch pwned) `touch pwned2`/demo"
Q = "'/scratch/my runs/it'\"'\"'s \"q\" $(touch pwned) `touch pwned2`/demo/slurm'"  # the folder, shell-quoted
AWKWARD_SCRIPT = f"""\
#!/bin/bash

# Parameters
#SBATCH --error={Q[:-1]}/%j_0_log.err'
#SBATCH --job-name=demo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --open-mode=append
#SBATCH --output={Q[:-1]}/%j_0_log.out'
#SBATCH --requeue
#SBATCH --signal=USR2@120

# setup
export OMP_NUM_THREADS=1
export CUDA_VISIBLE_DEVICES=

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output {Q[:-1]}/%j_%t_log.out' --error {Q[:-1]}/%j_%t_log.err' \
'/opt/my venv/bin/python' -u -m submitit.core._submit {Q}
"""


def test_paths_with_spaces_quotes_and_substitutions_are_quoted():
    plan = plan_for(nodes=1, nproc_per_node=2, run_dir=AWKWARD_DIR, python="/opt/my venv/bin/python")
    assert render_sbatch(plan) == AWKWARD_SCRIPT


@pytest.mark.timeout(60)
def test_the_rendered_script_runs_nothing_but_srun_with_the_exact_paths(tmp_path):
    """bash runs the script with a stand-in srun: `$(...)` and backticks stay text, each path one argument."""
    run_dir = tmp_path / "my runs" / "it's \"q\" $(touch pwned) `touch pwned2` \\ ; & | * ~"
    plan = plan_for(nodes=1, nproc_per_node=2, run_dir=run_dir, python="/opt/my venv/bin/python")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$SRUN_ARGS"\n'
                                  'printf "%s\\0" "$OMP_NUM_THREADS" "${CUDA_VISIBLE_DEVICES-unset}" >> "$SRUN_ARGS"\n')
    (bin_dir / "srun").chmod(0o755)
    script = tmp_path / "job.sh"
    script.write_text(render_sbatch(plan))
    record = tmp_path / "srun-args"
    subprocess.run(["bash", str(script)], cwd=tmp_path, check=True, timeout=30,
                   env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SRUN_ARGS": str(record)})
    args = record.read_text().split("\0")[:-1]
    folder = str(run_dir / "slurm")
    assert args == ["--unbuffered", "--output", f"{folder}/%j_%t_log.out", "--error", f"{folder}/%j_%t_log.err",
                    "/opt/my venv/bin/python", "-u", "-m", "submitit.core._submit", folder, "1", ""]
    assert not list(tmp_path.rglob("pwned*"))


@pytest.mark.parametrize("run_dir, message", [
    ("/scratch/runs/line\nbreak", "newline"),
    ("/scratch/runs/tab\there", "control character"),
    ("/scratch/runs/100%", "'%'"),
])
def test_run_directories_an_sbatch_script_cannot_carry_are_refused(run_dir, message):
    with pytest.raises(LaunchError, match=message):
        plan_for(run_dir=run_dir)


def test_a_newline_in_a_scheduler_option_is_refused():
    with pytest.raises(LaunchError, match="--job-name .*newline"):
        plan_for(['slurm.job_name="a\\nb"'])  # YAML's double quotes: a real newline


@pytest.mark.parametrize("raw, message", [
    ({"partition": "gpu"}, "use --partition"),
    ({"cpus-per-task": 4}, "use --cpus-per-task"),
    ({"signal": "USR1@60"}, "the launcher sets this option itself"),
    ({"ntasks-per-node": 3}, "the launcher sets this option itself"),
    ({"output": "/tmp/x"}, "the launcher sets this option itself"),
    ({"bad name!": "x"}, "not an sbatch option name"),
    ({"comment": "two\nlines"}, "newline"),
])
def test_pass_through_options_that_would_break_the_job_are_refused(raw, message):
    with pytest.raises(LaunchError, match=message):
        additional_options(raw)


def test_pass_through_options_are_normalised():
    assert additional_options({"mail_type": "END", "--exclusive": True, "gres": "gpu:2"}) == {
        "mail-type": "END", "exclusive": True, "gres": "gpu:2"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(cpu=False, nproc_per_node=None), "--gpus-per-node G .* or --cpu --nproc-per-node P"),
    (dict(cpu=True, gpus_per_node=2), "exclude each other"),
    (dict(cpu=False, gpus_per_node=2, nproc_per_node=2), "--nproc-per-node is for --cpu"),
    (dict(nodes=0), "--nodes must be at least 1"),
    (dict(nproc_per_node=0), "--nproc-per-node must be at least 1"),
    (dict(env_threads="lots"), "OMP_NUM_THREADS='lots'"),
])
def test_impossible_requests_are_refused(kwargs, message):
    with pytest.raises(LaunchError, match=message):
        plan_for(**kwargs)


def test_cpu_job_with_a_cuda_config_is_refused():
    with pytest.raises(LaunchError, match="train.device=cuda"):
        plan_for(["train.device=cuda"])


def test_threads_per_task_follow_cpus_per_task_unless_the_shell_sets_them():
    assert plan_for().threads_per_task == 1
    assert plan_for(["slurm.cpus_per_task=6"]).threads_per_task == 6
    assert plan_for(["slurm.cpus_per_task=6"], env_threads="2").threads_per_task == 2


def test_the_command_line_wins_over_the_config_slurm_section():
    args = build_parser().parse_args(["slurm", "--cpu", "--partition", "cli", "--time", "1:00:00",
                                      "--sbatch", "mail-type=END", "--sbatch", "exclusive", str(DEMO)])
    config = load_config(DEMO, ["slurm.partition=config", "slurm.qos=from-config",
                                "slurm.additional={mail-type: BEGIN, comment: kept}"])
    slurm = with_command_line(config, args, suffix="").slurm
    assert (slurm.partition, slurm.qos, slurm.time) == ("cli", "from-config", "1:00:00")
    assert slurm.additional == {"mail-type": "END", "comment": "kept", "exclusive": True}


def test_a_sweep_suffix_names_each_run_directory():
    args = build_parser().parse_args(["slurm", "--cpu", str(DEMO)])
    config = with_command_line(load_config(DEMO), args, suffix="lr0.1")
    assert config.run.name == "demo_lr0.1"
    assert plan_for().options["job_name"] == "demo"


# -- sweeps -------------------------------------------------------------------------------------


def test_one_swept_key_gives_one_point_per_value():
    points = sweep.expand(["optim.lr=0.1,0.01,0.001", "train.epochs=2"])
    assert [p.overrides for p in points] == [("optim.lr=0.1", "train.epochs=2"), ("optim.lr=0.01", "train.epochs=2"),
                                             ("optim.lr=0.001", "train.epochs=2")]
    assert [p.suffix for p in points] == ["lr0.1", "lr0.01", "lr0.001"]


def test_two_swept_keys_give_every_combination():
    points = sweep.expand(["optim.lr=0.1,0.2", "optim.name=sgd,adamw"])
    assert [p.suffix for p in points] == ["lr0.1_namesgd", "lr0.1_nameadamw", "lr0.2_namesgd", "lr0.2_nameadamw"]


@pytest.mark.parametrize("override", ["optim.betas=[0.8,0.9]", "job.extra={a: 1, b: 2}", "run.name='a,b'",
                                      "slurm.exclude=n1,n2", "optim.lr=0.1"])
def test_commas_in_lists_quotes_and_slurm_options_do_not_sweep(override):
    assert sweep.expand([override]) == [sweep.SweepPoint((override,), "")]


def test_sweeping_the_run_name_names_the_runs():
    assert [p.suffix for p in sweep.expand(["run.name=a,b"])] == ["", ""]


def test_an_empty_sweep_value_is_refused():
    with pytest.raises(ConfigError, match="empty value"):
        sweep.expand(["optim.lr=0.1,"])


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_dry_run_prints_config_and_scripts_for_a_sweep_and_creates_nothing(tmp_path):
    result = run_launch("slurm", "--cpu", "--nproc-per-node", "1", "--nodes", "2", "--time", "10",
                        "--dry-run", str(DEMO), f"run.dir={tmp_path / 'runs'}", "optim.lr=0.1,0.01", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("# resolved config") == 2 and out.count("#!/bin/bash") == 2
    assert "# ===== job 2 of 2: " + str(tmp_path / "runs" / "demo_lr0.01") in out
    assert "lr: 0.01" in out and "#SBATCH --job-name=demo_lr0.01" in out and "#SBATCH --time=10" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("options, overrides, message", [
    ([], [], "--gpus-per-node G (one worker per GPU) or --cpu --nproc-per-node P"),
    (["--cpu", "--job-name", "two\nlines"], [], "newline"),
    (["--cpu"], ['run.name="two\\nlines"'], "newline"),
    (["--cpu", "--sbatch", "signal=USR1@5"], [], "sets this option itself"),
])
def test_bad_requests_exit_2_with_one_message(tmp_path, options, overrides, message):
    result = run_launch("slurm", *options, "--dry-run", str(DEMO), *overrides, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_time_in_a_config_file_stays_the_text_sbatch_reads(tmp_path):
    # YAML 1.1 reads 4:00:00 as the number 14400 (base 60), which sbatch would take as minutes.
    config = tmp_path / "c.yaml"
    config.write_text(f"{DEMO.read_text()}\nslurm:\n  time: 4:00:00\n")
    plan = plan_slurm(load_config(config), nodes=1, gpus_per_node=None, cpu=True, nproc_per_node=1,
                      run_dir=Path("/r"), python=PYTHON)
    assert "#SBATCH --time=4:00:00\n" in render_sbatch(plan)


@pytest.mark.timeout(120)
def test_resuming_a_slurm_run_without_local_flags_points_back_to_launch_slurm(tmp_path):
    from launcher import rundir

    config = load_config(DEMO, [f"run.dir={tmp_path}"])
    plan = plan_for(run_dir=tmp_path / "demo")
    rundir.prepare(config, plan.record())
    result = run_launch("resume", str(tmp_path / "demo"), cwd=tmp_path)
    assert result.returncode == 2 and "was launched with `launch slurm`; run that command again" in result.stderr
