"""The ``launch`` command: parse, validate, then run. The only place errors become exit codes.

    launch local [--gpus N | --cpu --nproc N] CONFIG [key=value ...]
    launch debug [--steps K] CONFIG [key=value ...]
    launch resume RUN_DIR [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ddp.config import Config, ConfigError, dump_yaml, load_config
from launcher.errors import LaunchError
from launcher.rundir import RunDirError

EXIT_USAGE = 2  # bad input: config, command line, run directory


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML config file (see configs/)")
    parser.add_argument("overrides", metavar="KEY=VALUE", nargs="*",
                        help="dotted overrides, e.g. optim.lr=0.05 data.batch_size=128")


def _add_local_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, help="workers, one per GPU, on NCCL (default: all GPUs)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU with gloo, even if there are GPUs")
    parser.add_argument("--nproc", type=int, help="number of CPU workers per node with --cpu (default 1)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes, without SLURM (torchrun style)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1")
    parser.add_argument("--rdzv-endpoint", help="HOST:PORT every node reaches (default: a free local port)")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="restart all workers up to N times when one fails; they resume from the "
                             "latest checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="print the config and the plan; start nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch", description="Train a PyTorch job on one process, "
                                     "one machine's GPUs or CPUs, or a SLURM cluster, and resume it exactly.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    local = commands.add_parser("local", help="run workers on this machine (torchrun's elastic launcher)")
    _add_local_arguments(local)
    _add_config_arguments(local)

    debug = commands.add_parser("debug", help="run in this process on the CPU, so breakpoint() and pdb work")
    debug.add_argument("--steps", type=int, help="stop after K optimizer steps")
    debug.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    _add_config_arguments(debug)

    resume = commands.add_parser("resume", help="continue a run from its directory, with its saved config")
    _add_local_arguments(resume)
    resume.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    resume.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="changes, recorded in the run")

    from launcher import slurm_cli  # registers slurm, status, cancel

    slurm_cli.add_commands(commands)
    return parser


def command_local(args: argparse.Namespace, config: Config | None = None) -> int:
    import torch

    from launcher import rundir
    from launcher.local import plan_local, run_local, usable_cores
    from launcher.preflight import check_data, check_job, check_rdzv_endpoint

    if config is None:
        config = load_config(args.config, args.overrides)
    check_job(config)
    check_data(config)
    check_rdzv_endpoint(args.rdzv_endpoint)
    run_dir = rundir.run_dir_of(config)
    plan = plan_local(gpus=args.gpus, cpu=args.cpu, nproc=args.nproc, nnodes=args.nnodes,
                      node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint,
                      max_restarts=args.max_restarts, run_dir=run_dir,
                      visible_gpus=torch.cuda.device_count(), cpu_count=usable_cores(),
                      env_threads=os.environ.get("OMP_NUM_THREADS"))
    if plan.device == "cpu" and config.train.device == "cuda":
        raise LaunchError("train.device=cuda but the launch runs on the CPU; drop --cpu or set train.device=auto")
    if args.dry_run:
        print("# resolved config")
        print(dump_yaml(config))
        print("# launch plan")
        print(plan.describe())
        return 0
    run_dir, resuming = rundir.prepare(config, plan.record())
    print(f"{'resuming' if resuming else 'starting'} run {run_dir} on {plan.world_size} {plan.device} "
          f"worker(s) ({plan.backend})", file=sys.stderr)
    code = run_local(plan)
    if code == 0:
        print(f"done. results in {run_dir}: metrics.jsonl, tensorboard/, checkpoints/best.pt, "
              f"checkpoints/last.pt, logs/", file=sys.stderr)
    return code


def command_resume(args: argparse.Namespace) -> int:
    from launcher import rundir
    from launcher.preflight import check_job

    config = rundir.reopen(args.run_dir, args.overrides, validate=check_job)
    record = rundir.read_launch_record(args.run_dir)
    if record.get("mode") == "slurm" and args.gpus is None and not args.cpu and args.nproc is None:
        # Not on a login node by accident: a SLURM run continues on the cluster.
        raise LaunchError(f"{args.run_dir} was launched with `launch slurm`; run that command again to continue "
                          "it on the cluster (it resumes from the last checkpoint), or give --cpu/--gpus to "
                          "resume it on this machine")
    if record.get("mode") == "local" and args.gpus is None and not args.cpu and args.nproc is None:
        # Launch as the run was launched, unless the command line says otherwise.
        if record.get("device") == "cpu":
            args = argparse.Namespace(**{**vars(args), "cpu": True, "nproc": record.get("nproc_per_node", 1)})
        else:
            args = argparse.Namespace(**{**vars(args), "gpus": record.get("nproc_per_node")})
    return command_local(args, config)


def command_debug(args: argparse.Namespace) -> int:
    from ddp.env import DistEnv
    from ddp.trainer import run_training
    from launcher import rundir
    from launcher.preflight import check_data, check_job, debug_config

    config = debug_config(load_config(args.config, args.overrides), steps=args.steps, device=args.device)
    check_job(config)
    check_data(config)
    run_dir = rundir.run_dir_of(config)
    rundir.check_writable(run_dir)
    rundir.reset_debug_dir(run_dir, config)
    print(f"debug run in this process ({args.device}), run directory {run_dir}", file=sys.stderr)
    outcome = run_training(config, run_dir, DistEnv(), num_workers=0)
    print(f"debug run {outcome.status} at step {outcome.step}: "
          + " ".join(f"{k}={v:.4f}" for k, v in outcome.metrics.items()), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"local": command_local, "debug": command_debug, "resume": command_resume}
    from launcher import slurm_cli

    handlers.update(slurm_cli.HANDLERS)
    try:
        return handlers[args.command](args)
    except (ConfigError, LaunchError, RunDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - everything else: one line, the traceback in the debug log
        from launcher.preflight import known_error

        if known_error(err):
            print(f"error: {err}", file=sys.stderr)
            logging.getLogger(__name__).debug("details", exc_info=True)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
