"""The sbatch script of a ``SlurmPlan``: our own template, one pure function, tested as golden text.

It asks for one task per worker, SLURM's time-limit warning as USR2, the right
to requeue, and each task's stdout/stderr in submitit's folder (submitit's
names, so its job objects find them). ``srun`` ends the whole step when one
task fails (``--kill-on-bad-exit``), and gets the CPUs per task explicitly
(``SRUN_CPUS_PER_TASK``: since Slurm 22.05 srun no longer inherits sbatch's
``--cpus-per-task``, and with task affinity each task would get one CPU).
Every value is shell-quoted; the plan has already refused what a script cannot
carry (a newline; ``%`` in a path).

With a node range (``--nodes MIN:MAX``) the script cannot say ``--ntasks-per-node``:
sbatch would derive the job's task count from MIN and allocate MIN nodes even
when MAX are idle. It asks instead for one slot per node holding every CPU of
the node's tasks, and ``srun`` starts the tasks on however many nodes came.
"""

from __future__ import annotations

import shlex

from launcher.slurm.plan import WARNING_SIGNAL, SlurmPlan

TASK_MODULE = "launcher.slurm.task"


def task_command(plan: SlurmPlan) -> list[str]:
    """What each task runs: our wrapper around submitit's job processing (launcher.slurm.task)."""
    return [plan.python, "-u", "-P", "-m", TASK_MODULE, str(plan.folder)]


def log_pattern(plan: SlurmPlan, stream: str, task: str = "%t") -> str:
    """submitit's names for a task's log: ``JOBID_TASK_log.out`` (``ARRAYID_INDEX_TASK_log.out`` in an array)."""
    job = "%A_%a" if plan.array else "%j"
    return str(plan.folder / f"{job}_{task}_log.{stream}")


def render_sbatch(plan: SlurmPlan) -> str:
    node_range = "-" in plan.nodes
    per_node = ({"cpus-per-task": plan.cpus_per_task * plan.tasks_per_node} if node_range
                else {"ntasks-per-node": plan.tasks_per_node, "cpus-per-task": plan.cpus_per_task})
    options: dict = {
        "job-name": plan.job_name,
        "nodes": plan.nodes,
        **per_node,
        **({"gpus-per-node": plan.gpus_per_node} if plan.gpus_per_node else {}),
        **{name: value for name, value in plan.options.items() if name != "job-name"},
        "signal": f"{WARNING_SIGNAL}@{plan.signal_delay_s}",
        "requeue": True,
        "open-mode": "append",
        "output": log_pattern(plan, "out", "0"),
        "error": log_pattern(plan, "err", "0"),
    }
    if plan.array:
        throttle = f"%{plan.array_parallelism}" if plan.array_parallelism else ""
        options["array"] = f"0-{len(plan.elements) - 1}{throttle}"
    options.update(plan.additional)
    lines = ["#!/bin/bash", f"# Submitted by `launch slurm`: {plan.tasks_per_node} task(s) per node, one per worker.",
             ""]
    for name, value in options.items():
        lines.append(f"#SBATCH --{name}" if value is True else f"#SBATCH --{name}={shlex.quote(str(value))}")
    lines += [
        "",
        "export SUBMITIT_EXECUTOR=slurm",
        f"export SRUN_CPUS_PER_TASK={plan.cpus_per_task}",
        f"export OMP_NUM_THREADS={plan.threads_per_task}",
    ]
    if plan.device == "cpu":
        lines.append("export CUDA_VISIBLE_DEVICES=  # --cpu means CPU, even on a node with GPUs")
    srun = ["srun", "--unbuffered", "--kill-on-bad-exit=1", "--output", log_pattern(plan, "out"),
            "--error", log_pattern(plan, "err")]
    tasks = ""
    if node_range:  # the tasks on the nodes SLURM gave: SLURM_JOB_NUM_NODES is set in the job
        tasks = (f'--ntasks="$((SLURM_JOB_NUM_NODES * {plan.tasks_per_node}))" '
                 f"--ntasks-per-node={plan.tasks_per_node} ")
    lines += ["", shlex.join(srun[:3]) + " " + tasks + shlex.join(srun[3:] + task_command(plan)), ""]
    return "\n".join(lines)
