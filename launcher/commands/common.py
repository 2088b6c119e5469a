"""What the subcommands share: reading the target, naming script runs, the launch record, the closing line."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from ddp.layout import RunDir
from ddp.settings import ConfigError
from launcher import configs
from launcher.errors import LaunchError
from launcher.local.plan import Entry
from launcher.runs import this_command
from launcher.sweep import SweepPoint, expand_script_sweeps
from launcher.target import Target


def load_config_target(target: Target, cwd: Path) -> configs.RunConfig:
    """The config run a target names; a YAML error says that the file was read as a config, and why."""
    try:
        return configs.load(target.name, list(target.rest), cwd=cwd)
    except ConfigError as err:
        if "not valid YAML" in str(err):
            raise ConfigError(f"{err} ({target.name} was read as a config because its name ends in "
                              f"{Path(target.name).suffix}; a Python script must end in .py)") from None
        raise


def script_entry(target: Target, cwd: Path, args: tuple[str, ...] | None = None) -> Entry:
    """The entry of a script or module target, after checking that it is there."""
    args = target.rest if args is None else args
    if target.kind == "module":
        sys.path.insert(0, str(cwd))
        try:
            found = importlib.util.find_spec(target.name)
        except (ImportError, ValueError):
            found = None
        finally:
            sys.path.remove(str(cwd))
        if found is None:
            raise LaunchError(f"-m {target.name}: no such module here (looked in {cwd} and the installed "
                              "packages); run from the folder that holds it, or install it")
        return Entry("module", target.name, tuple(args))
    path = (cwd / target.name).resolve()
    if not path.is_file():
        raise LaunchError(f"script not found: {target.name} (read as a Python script because its name ends in "
                          ".py)")
    return Entry("script", str(path), tuple(args))


def script_record(entry: Entry) -> dict:
    key = "module" if entry.kind == "module" else "script"
    return {key: entry.target, "args": list(entry.args)}


def script_run_dir(run_dir_option: Path | None, entry: Entry, cwd: Path, suffix: str = "") -> RunDir:
    """``--run-dir``, or ``runs/NAME`` after the script (or module); a sweep point adds its suffix."""
    if run_dir_option is not None:
        base = (cwd / run_dir_option).resolve()
    else:
        name = entry.target.rsplit(".", 1)[-1] if entry.kind == "module" else Path(entry.target).stem
        base = (cwd / "runs" / name).resolve()
    return RunDir(base.with_name(f"{base.name}_{suffix}") if suffix else base)


def script_points(target: Target, sweeps: list[str]) -> list[SweepPoint]:
    return expand_script_sweeps(list(target.rest), sweeps)


def launch_record(kind: str, mode: str, target: dict, plan: dict) -> dict:
    return {"kind": kind, "mode": mode, "target": target, "plan": plan, "cwd": os.getcwd(), "python": sys.executable,
            "command": this_command(), "created": round(time.time(), 3)}


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def results_line(run_dir: RunDir) -> str:
    """The closing line of a finished run: what it left, naming only files that exist."""
    names = ["metrics.jsonl", "tensorboard/", "checkpoints/best.pt", "checkpoints/last.pt", "logs/"]
    present = [name for name in names if (run_dir.path / name.rstrip("/")).exists()]
    return f"done. results in {run_dir.path}: {', '.join(present) if present else 'nothing was trained'}"
