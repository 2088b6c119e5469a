"""``launch resume RUN_DIR [KEY=VALUE ...]``: continue exactly that run, from any working directory.

The run is launched as it was (its recorded plan: the same workers, or the same
SLURM job), in the working directory it was launched from, unless the command
line gives other workers (``--cpu --nproc N``, ``--gpus N``, ``--nnodes``): then
it continues on this machine with those, a SLURM run included.
``KEY=VALUE`` changes are applied to the saved config and recorded in
``resumes.jsonl``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ddp.codes import EXIT_OK
from ddp.config import dump_yaml
from ddp.layout import RunDir
from ddp.settings import ConfigError
from launcher import configs
from launcher.commands.common import launch_record, visible_gpus
from launcher.commands.local import execute, request_of
from launcher.local.plan import Entry, LocalPlan, machine_facts, plan_local
from launcher.ports import free_port
from launcher.runs import RunDirError, read_record, saved_config
from launcher.target import Target

DEVICE_OPTIONS = ("gpus", "cpu", "nproc", "rdzv_endpoint", "node_rank")


def command_resume(options, target: Target) -> int:
    run_dir = RunDir(Path(target.name).expanduser().resolve())
    record = read_record(run_dir)
    if not record and not run_dir.config.is_file():
        raise RunDirError(f"{run_dir.path} is not a run directory (no launch.json or config.yaml); give the folder "
                          "a run was launched into, e.g. runs/NAME")
    overrides = list(target.rest)
    moved = [o for o in overrides if o.split("=", 1)[0] in ("run.dir", "run.name")]
    if moved:
        raise ConfigError(f"{moved[0].split('=', 1)[0]} cannot be changed on resume: the run is the directory "
                          f"{run_dir.path}; copy the folder to continue it elsewhere")
    cwd = Path(record.get("cwd") or os.getcwd())
    if cwd.is_dir() and cwd != Path.cwd():
        os.chdir(cwd)  # the run continues where it was launched: relative paths of a script, its modules
    config = None
    kind = record.get("kind", "config")
    if kind == "config":
        saved = saved_config(run_dir).to_dict()
        saved["run"].update(dir=str(run_dir.path.parent), name=run_dir.name)
        run = configs.load(None, overrides, cwd=Path(os.getcwd()), base=saved)
        config = run.config
    asked = any(getattr(options, name, None) not in (None, False) for name in DEVICE_OPTIONS) or options.nnodes != "1"
    if record.get("mode") == "slurm" and not asked:
        from launcher.commands.slurm import resubmit

        return resubmit(run_dir, record, config, overrides, options)
    plan = replan(options, record, run_dir, config)
    if options.dry_run:
        if config is not None:
            print("# resolved config")
            print(dump_yaml(config))
        print("# launch plan")
        print(plan.describe())
        return EXIT_OK
    new_record = {**launch_record(kind, "local", record.get("target", {}), plan.record()),
                  "cwd": record.get("cwd") or os.getcwd()}
    return execute(plan, new_record, config, resume_overrides=overrides)


def replan(options, record: dict, run_dir: RunDir, config) -> LocalPlan:
    """The recorded plan with a fresh rendezvous port, or a new one when the command line names workers."""
    entry = Entry("config", str(run_dir.path)) if record.get("kind", "config") == "config" else None
    recorded = record.get("plan") if record.get("mode") == "local" else None
    asked = any(getattr(options, name, None) not in (None, False) for name in DEVICE_OPTIONS) or options.nnodes != "1"
    if recorded and recorded.get("entry") and not asked:
        plan = LocalPlan.from_record(recorded)
        changes = {"run_dir": run_dir.path, "entry": entry or plan.entry}
        if plan.single_node:
            changes["rdzv_endpoint"] = f"127.0.0.1:{free_port()}"
        if options.max_restarts is not None:
            changes["max_restarts"] = options.max_restarts
        return dataclasses.replace(plan, **changes)
    if entry is None:
        target = record.get("target", {})
        kind = "module" if "module" in target else "script"
        entry = Entry(kind, target.get(kind), tuple(target.get("args", [])))
    if not asked and recorded:  # an older record: as it was launched, device and workers
        options = dataclasses.replace(options) if dataclasses.is_dataclass(options) else options
        if recorded.get("device") == "cpu":
            options.cpu, options.nproc = True, recorded.get("nproc_per_node", 1)
        else:
            options.gpus = recorded.get("nproc_per_node")
    return plan_local(request_of(options), machine_facts(visible_gpus()), run_dir=run_dir.path, entry=entry,
                      config_device=config.train.device if config is not None else "auto")
