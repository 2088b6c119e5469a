"""The SLURM commands of ``launch``: slurm, status, cancel.

    launch slurm CONFIG [key=value ...] --nodes N (--gpus-per-node G | --cpu --nproc-per-node P)
                 [--partition P --time T ... --sbatch KEY=VALUE ...] [--dry-run]
    launch status RUN_DIR
    launch cancel RUN_DIR

Only argument parsing lives here, and nothing heavy is imported until a
handler runs: ``launch local`` must not pay for submitit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

# Command-line flag -> SlurmConfig field; the command line wins over the config's slurm: section.
SCHEDULER_OPTIONS = {
    "partition": (str, "partition (queue) to submit to"),
    "time": (str, "time limit, in sbatch's format: MINUTES, HH:MM:SS, D-HH:MM:SS"),
    "account": (str, "account to charge"),
    "qos": (str, "quality of service"),
    "constraint": (str, "node features, e.g. volta32gb"),
    "exclude": (str, "nodes to avoid, e.g. n[01-03]"),
    "cpus_per_task": (int, "CPUs per task (per worker), for the trainer and its data loader workers"),
    "mem": (str, "memory per node, e.g. 64G"),
    "job_name": (str, "job name (default: run.name)"),
    "signal_delay_s": (int, "seconds before the time limit at which SLURM sends USR2 (checkpoint, requeue)"),
    "max_requeues": (int, "how often the job may requeue itself on USR2 or be requeued by SLURM"),
}


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the SLURM subcommands (see launcher.slurm)."""
    slurm = commands.add_parser(
        "slurm", help="submit to a SLURM cluster through submitit: one task per worker, requeued on preemption",
        description="Submit CONFIG as a SLURM job: one task per worker on --nodes nodes. On the time-limit "
                    "warning (USR2) or preemption the workers checkpoint and the job requeues itself; the "
                    "requeued job resumes. Several values of a key (optim.lr=0.1,0.01) submit one job each.")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    slurm.add_argument("--gpus-per-node", type=int, help="GPUs per node; one worker (task) per GPU")
    slurm.add_argument("--cpu", action="store_true", help="CPU workers with gloo, no GPUs")
    slurm.add_argument("--nproc-per-node", type=int, help="CPU workers (tasks) per node with --cpu (default 1)")
    for name, (kind, text) in SCHEDULER_OPTIONS.items():
        flag = "--signal-delay" if name == "signal_delay_s" else f"--{name.replace('_', '-')}"
        slurm.add_argument(flag, dest=name, type=kind, help=f"{text} (slurm.{name})")
    slurm.add_argument("--sbatch", action="append", default=[], metavar="KEY[=VALUE]",
                       help="any other sbatch option, repeatable: --sbatch mail-type=END --sbatch exclusive")
    slurm.add_argument("--dry-run", action="store_true",
                       help="print the resolved config and the sbatch script; submit nothing")
    slurm.add_argument("config", metavar="CONFIG", help="YAML config file (see configs/)")
    slurm.add_argument("overrides", metavar="KEY=VALUE", nargs="*",
                       help="dotted overrides; KEY=V1,V2,... submits one job per value")

    status = commands.add_parser("status", help="a SLURM run's job state, requeues, last step and checkpoint")
    status.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    cancel = commands.add_parser("cancel", help="cancel a SLURM run's job (its workers checkpoint first)")
    cancel.add_argument("run_dir", metavar="RUN_DIR", type=Path)


def parse_sbatch_options(items: list[str]) -> dict:
    """``["mail-type=END", "exclusive"]`` -> ``{"mail-type": "END", "exclusive": True}``."""
    options: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        options[key.strip()] = value if sep else True
    return options


def with_command_line(config, args: argparse.Namespace, suffix: str):
    """The config with the command line's scheduler options (and a sweep's run-name suffix) applied."""
    slurm = config.slurm
    given = {name: getattr(args, name) for name in SCHEDULER_OPTIONS if getattr(args, name) is not None}
    additional = {**slurm.additional, **parse_sbatch_options(args.sbatch)}
    config = dataclasses.replace(config, slurm=dataclasses.replace(slurm, **given, additional=additional))
    if suffix:
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, name=f"{config.run.name}_{suffix}"))
    return config


def command_slurm(args: argparse.Namespace) -> int:
    from ddp.config import ConfigError, dump_yaml, load_config
    from launcher import rundir, sweep
    from launcher.errors import LaunchError
    from launcher.preflight import check_job
    from launcher.slurm import (describe_submission, plan_slurm, read_jobs, record_job, render_sbatch,
                                require_commands, submit)

    runs = []
    for point in sweep.expand(args.overrides):
        config = with_command_line(load_config(args.config, list(point.overrides)), args, point.suffix)
        check_job(config)
        plan = plan_slurm(config, nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpu=args.cpu,
                          nproc_per_node=args.nproc_per_node, run_dir=rundir.run_dir_of(config).absolute(),
                          python=sys.executable, env_threads=os.environ.get("OMP_NUM_THREADS"))
        runs.append((config, plan))
    run_dirs = [plan.run_dir for _, plan in runs]
    if len(set(run_dirs)) != len(run_dirs):
        raise ConfigError("two points of the sweep would share a run directory; sweep values that differ in "
                          "more than punctuation, or sweep run.name too")
    if args.dry_run:
        for index, (config, plan) in enumerate(runs, 1):
            if len(runs) > 1:
                print(f"# ===== job {index} of {len(runs)}: {plan.run_dir}")
            print("# resolved config")
            print(dump_yaml(config))
            print("# launch plan")
            print(plan.describe())
            print("\n# sbatch script (submitted through submitit)")
            print(render_sbatch(plan))
        return 0
    require_commands("sbatch", "srun")
    from launcher.slurm_status import active_jobs

    for config, plan in runs:
        busy = active_jobs(plan.run_dir) if read_jobs(plan.run_dir) else []
        if busy:
            job_id, state = busy[0]
            raise LaunchError(f"{plan.run_dir} already has job {job_id} ({state}); two jobs must not train into "
                              f"one run directory. Wait for it, or `launch cancel {plan.run_dir}` first")
    for index, (config, plan) in enumerate(runs):
        _, resuming = rundir.prepare(config, plan.record())
        try:
            job_id = submit(plan)
        except Exception:
            if index:
                print(f"submitted {index} of {len(runs)} jobs before this error; see above", file=sys.stderr)
            raise
        record_job(plan, job_id)
        resumes = "\n  resumes        from the run's last checkpoint" if resuming else ""
        print(describe_submission(plan, job_id) + resumes)
    return 0


def command_status(args: argparse.Namespace) -> int:
    from launcher.slurm_status import status_text

    print(status_text(args.run_dir.absolute()))
    return 0


def command_cancel(args: argparse.Namespace) -> int:
    from launcher.slurm_status import cancel

    print(cancel(args.run_dir.absolute()))
    return 0


HANDLERS: dict = {"slurm": command_slurm, "status": command_status, "cancel": command_cancel}
