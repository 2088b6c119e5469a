"""The run directory: where a run's config, logs, checkpoints and metrics live.

``runs/NAME/`` holds ``config.yaml`` (the resolved config), ``launch.json``
(how it was launched, so ``launch resume`` can do it again), ``env.json``,
``checkpoints/``, ``logs/``, ``tensorboard/`` and ``metrics.jsonl``.

Launching a config whose run directory already exists resumes it when the
config is the same, and refuses when it differs: a run is never silently
overwritten.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from ddp.config import Config, ConfigError, build, changes_what_is_trained, dump_yaml, load_config


class RunDirError(RuntimeError):
    """The run directory cannot be used; the message says what to do."""


def run_dir_of(config: Config) -> Path:
    return Path(config.run.dir) / config.run.name


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(directory: Path) -> None:
    """Refuse a run directory that cannot be written, before any worker starts."""
    probe_parent = directory
    while not probe_parent.exists():
        probe_parent = probe_parent.parent
    if not os.access(probe_parent, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write to {probe_parent} (needed for the run directory {directory}); "
                          "choose another run.dir or fix the permissions")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test"):
            pass
    except OSError as err:
        raise RunDirError(f"cannot write to the run directory {directory}: {err.strerror or err}; "
                          "choose another run.dir or fix the permissions") from None


def saved_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory (no config.yaml); give the folder a run was "
                          "launched into, e.g. runs/NAME")
    return load_config(path)


def config_differences(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ."""
    differences: list[str] = []

    def walk(a, b, prefix):
        for key in sorted(set(a) | set(b)):
            va, vb = a.get(key), b.get(key)
            if isinstance(va, dict) and isinstance(vb, dict) and not prefix + key == "slurm.additional":
                walk(va, vb, f"{prefix}{key}.")
            elif va != vb:
                differences.append(f"{prefix}{key}")

    walk(old.to_dict(), new.to_dict(), "")
    return differences


def prepare(config: Config, launch_record: dict | None = None) -> tuple[Path, bool]:
    """Create or reopen the config's run directory. Returns (path, resuming)."""
    run_dir = run_dir_of(config)
    existing = run_dir / "config.yaml"
    if existing.is_file():
        old = saved_config(run_dir)
        differences = [key for key in config_differences(old, config) if changes_what_is_trained(key)]
        if differences:
            raise RunDirError(
                f"{run_dir} already holds a run with a different config (differs in {', '.join(differences[:5])}). "
                f"Continue that run with `launch resume {run_dir} KEY=VALUE ...`, or start a new one with "
                "run.name=NEW_NAME")
        check_writable(run_dir)
        if old != config:  # only keys that do not change what is trained: take the new values
            write_text_atomic(existing, dump_yaml(config))
        resuming = True
    else:
        check_writable(run_dir)
        write_text_atomic(existing, dump_yaml(config))
        resuming = False
    if launch_record is not None:
        write_text_atomic(run_dir / "launch.json", json.dumps(launch_record, indent=2))
    return run_dir, resuming


def reopen(run_dir: Path, overrides: list[str], validate=None) -> Config:
    """The run's saved config with ``overrides`` applied; the change is recorded and saved.

    ``validate(config)`` runs before anything is written, so a bad override leaves the run as it was.
    """
    config = saved_config(run_dir)
    if not overrides:
        return config
    from ddp.config import parse_override, set_dotted

    raw = config.to_dict()
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(raw, key, value)
    new = build(Config, raw, prefix="")
    if run_dir_of(new).resolve() != run_dir.resolve():
        raise ConfigError("run.dir and run.name cannot be changed on resume; they name the run directory")
    if validate is not None:
        validate(new)
    with open(run_dir / "resumes.jsonl", "a") as handle:
        handle.write(json.dumps({"time": time.time(), "overrides": list(overrides),
                                 "changed": config_differences(config, new)}) + "\n")
    write_text_atomic(run_dir / "config.yaml", dump_yaml(new))
    return new


def read_launch_record(run_dir: Path) -> dict:
    path = run_dir / "launch.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def reset_debug_dir(run_dir: Path, config: Config) -> None:
    """A debug run's directory is scratch: each ``launch debug`` starts it afresh."""
    import shutil

    for name in ("checkpoints", "tensorboard", "logs"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    write_text_atomic(run_dir / "config.yaml", dump_yaml(config))
