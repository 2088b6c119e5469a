"""``launch debug``: the same code in this process, on the CPU, world size 1: ``breakpoint()`` and pdb work.

A config run trains through the very trainer the workers run (no loader
processes, no watchdog) in ``runs/NAME-debug/``, which each debug run starts
afresh. A script runs as ``python script.py ARGS`` would, with torchrun's
variables for one process set, so its own ``init_process_group`` works.
"""

from __future__ import annotations

import dataclasses
import os
import runpy
import shutil
import sys
from pathlib import Path

from ddp.codes import EXIT_OK
from ddp.config import dump_yaml
from ddp.layout import RunDir
from ddp.settings import ConfigError
from launcher import configs
from launcher.commands.common import launch_record, load_config_target, script_entry, script_record, script_run_dir
from launcher.errors import LaunchError
from launcher.ports import free_port
from launcher.runs import claim
from launcher.target import Target


def debug_config(config, steps: int | None, device: str):
    """The same job in one process: its own run directory, no loader processes, no watchdog, no resume."""
    replace = dataclasses.replace
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise LaunchError("--device cuda but this machine has no CUDA GPU; use --device cpu")
    return replace(
        config,
        run=replace(config.run, name=f"{config.run.name}-debug"),
        data=replace(config.data, num_workers=0),
        train=replace(config.train, device=device, max_steps=steps if steps is not None else config.train.max_steps),
        checkpoint=replace(config.checkpoint, resume=False),
        watchdog=replace(config.watchdog, timeout_s=None),
    )


def command_debug(options, target: Target) -> int:
    cwd = Path.cwd()
    if target.kind == "config":
        return debug_config_run(options, target, cwd)
    entry = script_entry(target, cwd)
    run_dir = script_run_dir(options.run_dir, entry, cwd, "debug")
    held = claim(run_dir, kind="debug", record=launch_record("script", "debug", script_record(entry), {}))
    try:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_RANK": "0", "ROLE_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                           "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
                           "TORCHELASTIC_RUN_ID": "debug", "LAUNCH_RUN_DIR": str(run_dir.path)})
        print(f"debug run of {target.describe()} in this process, run directory {run_dir.path}", file=sys.stderr)
        sys.argv = [entry.target, *entry.args]
        try:
            if entry.kind == "module":
                sys.path.insert(0, str(cwd))
                runpy.run_module(entry.target, run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, str(Path(entry.target).parent))
                runpy.run_path(entry.target, run_name="__main__")
        except SystemExit as done:
            code = done.code
            return code if isinstance(code, int) else (EXIT_OK if code is None else 1)
        return EXIT_OK
    finally:
        held.release()


def debug_config_run(options, target: Target, cwd: Path) -> int:
    from ddp.env import DistEnv
    from ddp.trainer import run_training
    from jobs.registry import make_job

    run = load_config_target(target, cwd)
    config = debug_config(run.config, steps=options.steps, device=options.device)
    run = run.with_config(config)
    configs.preflight(run)
    run_dir = run.run_dir
    held = claim(run_dir, kind="debug", record=launch_record("config", "debug", {"config": target.name}, {}))
    try:
        reset_debug_dir(run_dir)
        held.write(run_dir.config, dump_yaml(config))
        print(f"debug run in this process ({options.device}), run directory {run_dir.path}", file=sys.stderr)
        env = DistEnv()
        outcome = run_training(config, run_dir, env, make_job(config.job, env), num_workers=0)
    finally:
        held.release()
    print(f"debug run {outcome.status} at step {outcome.step}: "
          + " ".join(f"{k}={v:.4f}" for k, v in outcome.metrics.items()), file=sys.stderr)
    return EXIT_OK


def reset_debug_dir(run_dir: RunDir) -> None:
    """A debug run's directory is scratch: each ``launch debug`` starts it afresh."""
    for folder in (run_dir.checkpoints, run_dir.tensorboard, run_dir.logs):
        shutil.rmtree(folder, ignore_errors=True)
    for path in (run_dir.metrics, run_dir.state, run_dir.env_log):
        path.unlink(missing_ok=True)
