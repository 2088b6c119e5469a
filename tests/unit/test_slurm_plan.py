"""`launch slurm` planning as pure functions: the sbatch script as golden text, refusals, options, sweeps.

No cluster needed: the script is rendered by our own template (launcher.slurm.render) from the plan. What a
shell does with it, and `launch slurm --dry-run`: tests/e2e/test_slurm_dry_run.py.
"""

import json
from pathlib import Path

import pytest

from ddp.config import ConfigError
from launcher import configs, sweep
from launcher.cli import parse
from launcher.commands.slurm import with_command_line
from launcher.errors import LaunchError
from launcher.local.plan import Entry
from launcher.slurm.options import OptionError, SlurmConfig, additional_options
from launcher.slurm.plan import Element, Request, SlurmPlan, plan_slurm
from launcher.slurm.render import render_sbatch
from tests.support.helpers import REPO

DEMO = REPO / "configs" / "demo.yaml"  # data.num_workers: 1, so 2 CPUs per task by default
PYTHON = "/opt/venv/bin/python"


def plan_for(overrides=(), *, nodes="2", gpus_per_node=None, cpu=True, nproc_per_node=1,
             run_dir="/scratch/runs/demo", python=PYTHON, env_threads=None, config=DEMO) -> SlurmPlan:
    run = configs.load(config, list(overrides), cwd=REPO)
    run_dir = Path(run_dir)
    request = Request(nodes=str(nodes), gpus_per_node=gpus_per_node, cpu=cpu, nproc_per_node=nproc_per_node)
    return plan_slurm(request, run.slurm, elements=[Element(run_dir, Entry("config", str(run_dir)))],
                      folder=run_dir / "slurm", python=python, config_device=run.config.train.device,
                      num_workers=run.config.data.num_workers, env_threads=env_threads)


CPU_SCRIPT = """\
#!/bin/bash
# Submitted by `launch slurm`: 1 task(s) per node, one per worker.

#SBATCH --job-name=demo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=/scratch/runs/demo/slurm/%j_0_log.out
#SBATCH --error=/scratch/runs/demo/slurm/%j_0_log.err

export SUBMITIT_EXECUTOR=slurm
export SRUN_CPUS_PER_TASK=2
export OMP_NUM_THREADS=2
export CUDA_VISIBLE_DEVICES=  # --cpu means CPU, even on a node with GPUs

srun --unbuffered --kill-on-bad-exit=1 --output /scratch/runs/demo/slurm/%j_%t_log.out \
--error /scratch/runs/demo/slurm/%j_%t_log.err /opt/venv/bin/python -u -P -m launcher.slurm.task \
/scratch/runs/demo/slurm
"""


def test_cpu_job_script_is_golden():
    assert render_sbatch(plan_for()) == CPU_SCRIPT


GPU_SCRIPT = """\
#!/bin/bash
# Submitted by `launch slurm`: 8 task(s) per node, one per worker.

#SBATCH --job-name='resnet run'
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --gpus-per-node=8
#SBATCH --partition=gpu
#SBATCH --time=1-02:00:00
#SBATCH --account=proj
#SBATCH --qos=high
#SBATCH --constraint=volta32gb
#SBATCH --exclude='n[01-03],n7'
#SBATCH --mem=64G
#SBATCH --signal=USR2@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=/scratch/runs/demo/slurm/%j_0_log.out
#SBATCH --error=/scratch/runs/demo/slurm/%j_0_log.err
#SBATCH --mail-type=END
#SBATCH --exclusive

export SUBMITIT_EXECUTOR=slurm
export SRUN_CPUS_PER_TASK=10
export OMP_NUM_THREADS=10

srun --unbuffered --kill-on-bad-exit=1 --output /scratch/runs/demo/slurm/%j_%t_log.out \
--error /scratch/runs/demo/slurm/%j_%t_log.err /opt/venv/bin/python -u -P -m launcher.slurm.task \
/scratch/runs/demo/slurm
"""


def test_gpu_job_with_every_scheduler_option_is_golden():
    plan = plan_for(["slurm.partition=gpu", "slurm.time=1-02:00:00", "slurm.account=proj", "slurm.qos=high",
                     "slurm.constraint=volta32gb", "slurm.exclude=n[01-03],n7", "slurm.cpus_per_task=10",
                     "slurm.mem=64G", "slurm.job_name=resnet run", "slurm.signal_delay_s=90",
                     "slurm.additional={mail-type: END, exclusive: true}"],
                    nodes=4, gpus_per_node=8, cpu=False, nproc_per_node=None)
    assert render_sbatch(plan) == GPU_SCRIPT  # no CUDA_VISIBLE_DEVICES: SLURM binds the GPUs
    assert plan.max_world_size == 32 and plan.device == "cuda"


AWKWARD_DIR = "/scratch/my runs/it's \"q\" $(touch pwned) `touch pwned2`/demo"
Q = "'/scratch/my runs/it'\"'\"'s \"q\" $(touch pwned) `touch pwned2`/demo/slurm'"  # the folder, shell-quoted
AWKWARD_SCRIPT = f"""\
#!/bin/bash
# Submitted by `launch slurm`: 2 task(s) per node, one per worker.

#SBATCH --job-name=demo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=2
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={Q[:-1]}/%j_0_log.out'
#SBATCH --error={Q[:-1]}/%j_0_log.err'

export SUBMITIT_EXECUTOR=slurm
export SRUN_CPUS_PER_TASK=2
export OMP_NUM_THREADS=2
export CUDA_VISIBLE_DEVICES=  # --cpu means CPU, even on a node with GPUs

srun --unbuffered --kill-on-bad-exit=1 --output {Q[:-1]}/%j_%t_log.out' --error {Q[:-1]}/%j_%t_log.err' \
'/opt/my venv/bin/python' -u -P -m launcher.slurm.task {Q}
"""


def test_paths_with_spaces_quotes_and_substitutions_are_quoted():
    plan = plan_for(nodes=1, nproc_per_node=2, run_dir=AWKWARD_DIR, python="/opt/my venv/bin/python")
    assert render_sbatch(plan) == AWKWARD_SCRIPT


def test_an_elastic_node_range_and_a_sweep_array_are_asked_for():
    assert "\n#SBATCH --nodes=1-3\n" in render_sbatch(plan_for(nodes="1:3"))
    elements = [Element(Path(f"/r/demo_lr{lr}"), Entry("config", f"/r/demo_lr{lr}")) for lr in (0.1, 0.01, 0.001)]
    plan = plan_slurm(Request(cpu=True), SlurmConfig(array_parallelism=2), elements=elements,
                      folder=Path("/r/demo_sweep/slurm"), python=PYTHON)
    script = render_sbatch(plan)
    assert "\n#SBATCH --array=0-2%2\n" in script and "\n#SBATCH --job-name=demo_sweep\n" in script
    assert "\n#SBATCH --output=/r/demo_sweep/slurm/%A_%a_0_log.out\n" in script
    assert "--output /r/demo_sweep/slurm/%A_%a_%t_log.out" in script
    # Submitted one job per run instead, each job is named after its own run.
    assert [plan.for_element(e).job_name for e in elements] == ["demo_lr0.1", "demo_lr0.01", "demo_lr0.001"]


def test_a_node_range_asks_for_whole_nodes_and_srun_starts_the_tasks_on_every_node_given():
    """With --ntasks-per-node, sbatch would derive the task count from MIN and allocate MIN nodes."""
    script = render_sbatch(plan_for(["data.num_workers=2"], nodes="3:4", nproc_per_node=2))
    assert "--ntasks-per-node" not in "".join(line for line in script.splitlines() if line.startswith("#SBATCH"))
    assert "\n#SBATCH --cpus-per-task=6\n" in script  # 2 tasks x (2 loader processes + 1)
    assert "\nexport SRUN_CPUS_PER_TASK=3\n" in script
    srun = '\nsrun --unbuffered --kill-on-bad-exit=1 --ntasks="$((SLURM_JOB_NUM_NODES * 2))" --ntasks-per-node=2 '
    assert srun in script


@pytest.mark.parametrize("run_dir, message", [
    ("/scratch/runs/line\nbreak", "newline"),
    ("/scratch/runs/tab\there", "control character"),
    ("/scratch/runs/100%", "'%'"),
])
def test_run_directories_an_sbatch_script_cannot_carry_are_refused(run_dir, message):
    with pytest.raises(LaunchError, match=message):
        plan_for(run_dir=run_dir)


def test_a_newline_in_a_scheduler_option_is_refused():
    with pytest.raises(ConfigError, match="slurm.job_name must not hold a newline"):
        plan_for(['slurm.job_name="a\\nb"'])  # YAML's double quotes: a real newline


@pytest.mark.parametrize("raw, message", [
    ({"partition": "gpu"}, "use --partition"),
    ({"cpus-per-task": 4}, "use --cpus-per-task"),
    ({"signal": "USR1@60"}, "the launcher sets this option itself"),
    ({"ntasks-per-node": 3}, "the launcher sets this option itself"),
    ({"output": "/tmp/x"}, "the launcher sets this option itself"),
    ({"gres": "gpu:2"}, "the launcher sets this option itself"),
    ({"bad name!": "x"}, "not an sbatch option name"),
    ({"comment": "two\nlines"}, "newline"),
])
def test_pass_through_options_that_would_break_the_job_are_refused(raw, message):
    with pytest.raises(OptionError, match=message):
        additional_options(raw)
    with pytest.raises(LaunchError, match=message):  # as the plan reports it
        plan_for([f"slurm.additional={json.dumps(raw)}"])  # JSON is YAML: "\n" is a real newline


def test_pass_through_options_are_normalised():
    assert additional_options({"mail_type": "END", "--exclusive": True, "comment": "gpu:2"}) == {
        "mail-type": "END", "exclusive": True, "comment": "gpu:2"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(cpu=False, nproc_per_node=None), "--gpus-per-node G .* or --cpu --nproc-per-node P"),
    (dict(cpu=True, gpus_per_node=2), "exclude each other"),
    (dict(cpu=False, gpus_per_node=2, nproc_per_node=2), "--nproc-per-node is for --cpu"),
    (dict(nodes=0), "--nodes must be at least 1"),
    (dict(nodes="3:2"), "--nodes must be at least 1"),
    (dict(nproc_per_node=0), "--nproc-per-node must be at least 1, got 0"),
    (dict(cpu=False, gpus_per_node=0, nproc_per_node=None), "--gpus-per-node must be at least 1, got 0"),
    (dict(env_threads="lots"), "OMP_NUM_THREADS='lots'"),
])
def test_impossible_requests_are_refused(kwargs, message):
    with pytest.raises(LaunchError, match=message):
        plan_for(**kwargs)


def test_cpu_job_with_a_cuda_config_is_refused():
    with pytest.raises(LaunchError, match="train.device=cuda"):
        plan_for(["train.device=cuda"])


def test_cpus_per_task_default_to_the_loader_processes_plus_one_and_threads_follow():
    assert (plan_for().cpus_per_task, plan_for().threads_per_task) == (2, 2)  # demo: one loader process
    assert plan_for(["data.num_workers=5"]).cpus_per_task == 6
    assert plan_for(["slurm.cpus_per_task=6"]).threads_per_task == 6
    assert plan_for(["slurm.cpus_per_task=6"], env_threads="2").threads_per_task == 2  # the shell's setting wins
    assert "\nexport SRUN_CPUS_PER_TASK=6\nexport OMP_NUM_THREADS=2\n" in render_sbatch(
        plan_for(["slurm.cpus_per_task=6"], env_threads="2"))


def test_the_command_line_wins_over_the_config_slurm_section():
    parsed = parse(["slurm", "--cpu", "--partition", "cli", "--time", "1:00:00", "--sbatch", "mail-type=END",
                    "--sbatch", "exclusive", str(DEMO)])
    run = configs.load(DEMO, ["slurm.partition=config", "slurm.qos=from-config",
                              "slurm.additional={mail-type: BEGIN, comment: kept}"], cwd=REPO)
    slurm = with_command_line(run.slurm, parsed.options)
    assert (slurm.partition, slurm.qos, slurm.time) == ("cli", "from-config", "1:00:00")
    assert slurm.additional == {"mail-type": "END", "comment": "kept", "exclusive": True}


def test_the_job_is_named_after_the_run_unless_named():
    assert plan_for().job_name == "demo"
    assert plan_for(["slurm.job_name=mine"]).job_name == "mine"


def test_a_time_in_a_config_file_stays_the_text_sbatch_reads(tmp_path):
    # YAML 1.1 reads 4:00:00 as the number 14400 (base 60), which sbatch would take as minutes.
    config = tmp_path / "c.yaml"
    config.write_text(f"{DEMO.read_text()}\nslurm:\n  time: 4:00:00\n")
    assert "\n#SBATCH --time=4:00:00\n" in render_sbatch(plan_for(config=config, run_dir="/r"))


def test_an_unreadable_time_is_refused_and_a_warning_too_early_is_warned_about():
    with pytest.raises(LaunchError, match="--time 'soon' is not a time sbatch reads"):
        plan_for(["slurm.time=soon"])
    plan = plan_for(["slurm.time=2", "slurm.signal_delay_s=300"])  # 2 minutes
    assert plan.warnings and "comes 300 s before a limit of 120 s" in plan.warnings[0]
    assert not plan_for(["slurm.time=10"]).warnings


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
    with pytest.raises(LaunchError, match="empty value"):
        sweep.expand(["optim.lr=0.1,"])
