"""``launch local``: a config or a script on this machine's GPUs or CPUs, through torch's elastic agent."""

from __future__ import annotations

import sys
from pathlib import Path

from ddp.codes import EXIT_OK
from ddp.config import dump_yaml
from ddp.layout import RunDir
from launcher import configs
from launcher.commands.common import (
    launch_record,
    load_config_target,
    results_line,
    script_entry,
    script_points,
    script_record,
    script_run_dir,
    visible_gpus,
)
from launcher.errors import LaunchError
from launcher.local.plan import Entry, LocalPlan, Request, machine_facts, plan_local
from launcher.runs import claim, this_command
from launcher.target import Target


def request_of(options) -> Request:
    return Request(gpus=options.gpus, cpu=options.cpu, nproc=options.nproc, nnodes=options.nnodes,
                   node_rank=options.node_rank, rdzv_endpoint=options.rdzv_endpoint,
                   max_restarts=options.max_restarts, tuning=options.tuning)


def command_local(options, target: Target) -> int:
    cwd = Path.cwd()
    request = request_of(options)
    if target.kind == "config":
        run = load_config_target(target, cwd)
        configs.preflight(run)
        plan = plan_local(request, machine_facts(visible_gpus()), run_dir=run.run_dir.path,
                          entry=Entry("config", str(run.run_dir.path),
                                      source=(str((cwd / target.name).resolve()), *target.rest)),
                          config_device=run.config.train.device)
        if options.dry_run:
            print("# resolved config")
            print(dump_yaml(run.config))
            print("# launch plan")
            print(plan.describe())
            return EXIT_OK
        record = launch_record("config", "local", {"config": str((cwd / target.name).resolve()),
                                                   "overrides": list(target.rest)}, plan.record())
        return execute(plan, record, run.config)
    if target.kind not in ("script", "module"):
        raise LaunchError(f"launch local runs a config, a script or a module, not {target.describe()}")
    codes = []
    machine = machine_facts(visible_gpus())
    points = script_points(target, options.sweep)
    plans = []
    for point in points:
        entry = script_entry(target, cwd, point.overrides)
        run_dir = script_run_dir(options.run_dir, entry, cwd, point.suffix)
        plans.append(plan_local(request, machine, run_dir=run_dir.path, entry=entry))
    for plan in plans:
        if options.dry_run:
            print(plan.describe())
            continue
        record = launch_record("script", "local", script_record(plan.entry), plan.record())
        codes.append(execute(plan, record, None))
    return max(codes, default=EXIT_OK)


def execute(plan: LocalPlan, record: dict, config, resume_overrides: list[str] | None = None) -> int:
    """Claim the run directory, run the plan's workers, release it. Returns the exit code."""
    from ddp.lock import Owner
    from launcher.local.agent import run_local

    run_dir = RunDir(plan.run_dir)
    rendezvous = None if plan.single_node else f"{plan.rdzv_endpoint}/{plan.rdzv_id}"
    owner = Owner.of_this_process("local", rendezvous=rendezvous, command=this_command())
    held = claim(run_dir, kind="local", record=record, config=config, owner=owner, resume_overrides=resume_overrides)
    try:
        for note in held.notes:
            print(f"launch: {note}", file=sys.stderr)
        held.lock.start_refreshing()
        what = "resuming" if held.resuming else "starting"
        nodes = f" x {plan.min_nodes}..{plan.max_nodes} nodes" if plan.elastic else \
            (f" x {plan.max_nodes} nodes" if plan.max_nodes > 1 else "")
        print(f"{what} run {run_dir.path} on {plan.nproc_per_node} {plan.device} worker(s){nodes} ({plan.backend})",
              file=sys.stderr)
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        code = run_local(plan)
    finally:
        held.release()
    if code == EXIT_OK:
        print(results_line(run_dir), file=sys.stderr)
    return code
