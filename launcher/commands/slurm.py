"""``launch slurm``: a config or a script as a SLURM job (a sweep as one array job), through submitit.

Submission is all or nothing: each run directory is claimed (refused if a job
of that run is still queued or running, or a local launch holds it), its
``config.yaml`` and ``launch.json`` written, and the job submitted; if SLURM
refuses, every file this submission wrote is removed again, so the fixed
command simply works. A run that has finished is not submitted again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from ddp.codes import EXIT_OK
from ddp.config import dump_yaml
from ddp.layout import RunDir, SweepDir
from ddp.settings import ConfigError
from launcher import configs
from launcher.commands.common import (
    launch_record,
    load_config_target,
    script_entry,
    script_points,
    script_run_dir,
)
from launcher.errors import LaunchError
from launcher.listing import read_state
from launcher.runs import Claim, claim, write_text_atomic
from launcher.slurm.options import OPTIONS, parse_sbatch_flags
from launcher.slurm.plan import Element, Request, SlurmPlan, plan_slurm
from launcher.slurm.render import render_sbatch
from launcher.sweep import expand
from launcher.target import Target

FINISHED = ("finished", "early-stopped")


def request_of(options) -> Request:
    return Request(nodes=options.nodes, gpus_per_node=options.gpus_per_node, cpu=options.cpu,
                   nproc_per_node=options.nproc_per_node, array=options.array, script_signal=options.script_signal)


def with_command_line(slurm, options):
    """The config's slurm: section with the command line's options on top (the command line wins)."""
    given = {option.name: getattr(options, option.name) for option in OPTIONS
             if getattr(options, option.name) is not None}
    additional = {**slurm.additional, **parse_sbatch_flags(options.sbatch)}
    return dataclasses.replace(slurm, **given, additional=additional)


def command_slurm(options, target: Target) -> int:
    cwd = Path.cwd()
    runs: list[tuple[Element, object]] = []  # (element, config or None)
    if target.kind == "config":
        slurm = base = None
        for point in expand(list(target.rest)):
            run = load_config_target(Target("config", target.name, point.overrides), cwd)
            config = run.config
            base = base or run.run_dir.path
            if point.suffix:
                config = dataclasses.replace(config, run=dataclasses.replace(config.run,
                                                                             name=f"{config.run.name}_{point.suffix}"))
            slurm = slurm or with_command_line(run.slurm, options)
            run_dir = Path(config.run.dir) / config.run.name
            runs.append((Element(run_dir, _config_entry(run_dir)), config))
        num_workers, device = runs[0][1].data.num_workers, runs[0][1].train.device
    else:
        slurm = with_command_line(configs.load(None, [], cwd=cwd).slurm, options)
        base = script_run_dir(options.run_dir, script_entry(target, cwd), cwd).path
        for point in script_points(target, options.sweep):
            entry = script_entry(target, cwd, point.overrides)
            runs.append((Element(script_run_dir(options.run_dir, entry, cwd, point.suffix).path, entry), None))
        num_workers, device = 0, "auto"
    run_dirs = [element.run_dir for element, _ in runs]
    if len(set(run_dirs)) != len(run_dirs):
        raise ConfigError("two points of the sweep would share a run directory; sweep values that differ in "
                          "more than punctuation, or sweep run.name too")
    array = options.array and len(runs) > 1
    folder = SweepDir(base.with_name(f"{base.name}_sweep")).slurm_folder if array else runs[0][0].run_dir / "slurm"
    plan = plan_slurm(request_of(options), slurm, elements=[element for element, _ in runs], folder=folder,
                      python=sys.executable, config_device=device, num_workers=num_workers,
                      env_threads=os.environ.get("OMP_NUM_THREADS"))
    if options.dry_run:
        if array or len(runs) == 1:
            return dry_run(plan, [config for _, config in runs])
        for index, (element, config) in enumerate(runs, 1):  # one job per run, as submitted: each its own script
            print(f"# ===== job {index} of {len(runs)}: {element.run_dir}")
            dry_run(plan.for_element(element), [config])
        return EXIT_OK
    config_file = str((cwd / target.name).resolve()) if target.kind == "config" else None
    if not array:
        return max(submit_runs(plan.for_element(element), [(element, config)], config_file)
                   for element, config in runs)
    return submit_runs(plan, runs, config_file)


def _config_entry(run_dir: Path):
    from launcher.local.plan import Entry

    return Entry("config", str(run_dir))


def dry_run(plan: SlurmPlan, configs_: list) -> int:
    for index, (element, config) in enumerate(zip(plan.elements, configs_), 1):
        if len(plan.elements) > 1:
            print(f"# ===== run {index} of {len(plan.elements)}: {element.run_dir}")
        if config is not None:
            print("# resolved config")
            print(dump_yaml(config))
    print("# launch plan")
    print(plan.describe())
    print("\n# sbatch script (submitted through submitit)")
    print(render_sbatch(plan))
    return EXIT_OK


def submit_runs(plan: SlurmPlan, runs: list, config_file: str | None,
                resume_overrides: list[str] | None = None) -> int:
    """Claim each run, submit the plan once, record the jobs; undo everything if SLURM refuses."""
    from launcher.slurm.query import cluster_name, require_commands
    from launcher.slurm.status import active_jobs
    from launcher.slurm.submit import describe_submission, files_in, record_job, remove_submission_files, submit

    require_commands("sbatch", "srun", "scontrol")
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for element, _config in runs:
        run_dir = RunDir(element.run_dir)
        if run_dir.slurm_record.is_file():
            busy = active_jobs(run_dir)
            if busy:
                job_id, state = busy[0]
                raise LaunchError(f"{run_dir.path} already has job {job_id} ({state}); two jobs must not train into "
                                  f"one run directory. Wait for it, or `{run_dir.command('cancel')}` first")
    held: list[Claim] = []
    submitting = []
    before = files_in(plan.folder)
    try:
        for element, config in runs:
            run_dir = RunDir(element.run_dir)
            kind = "config" if config is not None else "script"
            target_record = {"config": config_file} if config is not None else _script_target(element)
            record = launch_record(kind, "slurm", target_record, plan.for_element(element).record())
            claimed = claim(run_dir, kind="slurm", record=record, config=config, resume_overrides=resume_overrides)
            held.append(claimed)
            state = read_state(run_dir)
            if claimed.resuming and state.get("status") in FINISHED:
                print(f"{run_dir.path} has finished already ({state['status']} at step {state.get('step')}); "
                      "nothing to submit. Change it with `launch resume RUN_DIR KEY=VALUE` (e.g. more train.epochs)",
                      file=sys.stderr)
                continue
            submitting.append((element, claimed))
        if not submitting:
            return EXIT_OK
        plan = dataclasses.replace(plan, elements=tuple(element for element, _ in submitting),
                                   array=plan.array and len(submitting) > 1)
        submitted = time.time()
        job_ids = submit(plan)
    except BaseException:
        for claimed in held:
            claimed.undo()
        remove_submission_files(plan, before)
        raise
    finally:
        for claimed in held:
            claimed.release()  # the job's rank 0 takes the lock when it starts
    cluster = cluster_name()
    for (element, _claimed), job_id in zip(submitting, job_ids):
        record_job(RunDir(element.run_dir), plan, job_id, cluster, submitted)
    if plan.array:
        sweep = SweepDir(plan.folder.parent)
        write_text_atomic(sweep.record, json.dumps({"job_id": job_ids[0].split("_")[0], "cluster": cluster,
                                                    "submitted": submitted, "folder": str(plan.folder),
                                                    "runs": [str(e.run_dir) for e, _ in submitting]}, indent=2) + "\n")
    print(describe_submission(plan, job_ids, [claimed.resuming for _, claimed in submitting]))
    return EXIT_OK


def _script_target(element: Element) -> dict:
    key = "module" if element.entry.kind == "module" else "script"
    return {key: element.entry.target, "args": list(element.entry.args)}


def resubmit(run_dir: RunDir, record: dict, config, overrides: list[str], options) -> int:
    """``launch resume RUN_DIR`` of a SLURM run: the same job again (its recorded plan), resuming."""
    plan = SlurmPlan.from_record(record["plan"])
    element = Element(run_dir.path, plan.elements[0].entry if plan.elements else _config_entry(run_dir.path))
    plan = plan.for_element(element)
    if getattr(options, "dry_run", False):
        return dry_run(plan, [config])
    return submit_runs(plan, [(element, config)], (record.get("target") or {}).get("config"),
                       resume_overrides=overrides)
