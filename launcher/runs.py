"""Opening a run directory for a launch: one owner, one identity, never silently overwritten.

``claim`` is the only way a launch writes into a run directory. In order: the
directory must be writable; its lock is taken (or joined, for the other nodes
of one multi-node job), else the launch is refused naming the owner; an
existing run must be the same run (the same config, keys that change only
logging or checkpoint keeping aside; the same script and arguments), else it
is refused and the message says how to continue it; only then are
``config.yaml`` and ``launch.json`` written. A refused launch leaves the
directory as it found it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ddp.config import Config, changes_what_is_trained, differences, dump_yaml, load_config
from ddp.layout import RunDir
from ddp.lock import Owner, RunBusyError, RunLock
from ddp.settings import ConfigError


class RunDirError(RuntimeError):
    """The run directory cannot be used; the message says what to do."""


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step, with the user's umask (not mkstemp's 0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(directory: Path) -> None:
    """Refuse a run directory that cannot be written, before anything else is done."""
    probe_parent = directory
    while not probe_parent.exists():
        probe_parent = probe_parent.parent
    if not probe_parent.is_dir():
        raise RunDirError(f"cannot create the run directory {directory}: {probe_parent} is a file; choose "
                          "another run.dir")
    if not os.access(probe_parent, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write to {probe_parent} (needed for the run directory {directory}); "
                          "choose another run.dir or fix the permissions")


def saved_config(run_dir: RunDir) -> Config:
    if not run_dir.config.is_file():
        raise RunDirError(f"{run_dir.path} is not a config run's directory (no config.yaml); give the folder a run "
                          "was launched into, e.g. runs/NAME")
    try:
        return load_config(run_dir.config)
    except ConfigError as err:
        raise RunDirError(f"{run_dir.config} cannot be read ({err}); was it edited by hand?") from None


def read_record(run_dir: RunDir) -> dict:
    try:
        return json.loads(run_dir.launch_record.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise RunDirError(f"{run_dir.launch_record} cannot be read ({err}); was it edited by hand?") from None


def trained_differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """The keys that differ and change what is trained (where the run lives, logging and keeping aside)."""
    return [item for item in differences(old, new) if changes_what_is_trained(item[0])]


def resume_command(run_dir: RunDir, *changes: str) -> str:
    return run_dir.command("resume", *changes)


@dataclass
class Claim:
    """A run directory held by this launch: its lock, and whether it resumes an existing run."""

    run_dir: RunDir
    lock: RunLock
    resuming: bool
    created: bool  # the directory did not exist before this launch
    notes: list[str] = field(default_factory=list)
    _written: list[tuple[Path, bytes | None]] = field(default_factory=list)  # (file, its previous bytes)

    def write(self, path: Path, text: str) -> None:
        """Write a file of the run, remembering what it held, so a refused submission can undo it."""
        previous = path.read_bytes() if path.is_file() else None
        write_text_atomic(path, text)
        self._written.append((path, previous))

    def undo(self) -> None:
        """Put the directory back as it was before this launch (a submission that SLURM refused)."""
        for path, previous in reversed(self._written):
            if previous is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(previous)
        self.lock.release()
        if self.created:
            shutil.rmtree(self.run_dir.path, ignore_errors=True)

    def release(self) -> None:
        self.lock.release()


def this_command() -> str:
    """The command line that launched this, as the user would type it."""
    return shlex.join(["launch", *sys.argv[1:]])


def claim(run_dir: RunDir, *, kind: str, record: dict, config: Config | None = None, owner: Owner | None = None,
          resume_overrides: list[str] | None = None) -> Claim:
    """Take ``run_dir`` for a launch of ``record`` (and ``config``, for a config run); see the module docstring.

    ``resume_overrides``: ``launch resume RUN_DIR KEY=VALUE ...``: the config may differ from the saved
    one by these; the change is recorded in ``resumes.jsonl``.
    """
    check_writable(run_dir.path)
    created = not run_dir.path.exists()
    try:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir.path, prefix=".write-test"):
            pass
    except OSError as err:
        raise RunDirError(f"cannot write to the run directory {run_dir.path}: {err.strerror or err}; "
                          "choose another run.dir or fix the permissions") from None
    owner = owner or Owner.of_this_process(kind, command=this_command())
    lock = RunLock(run_dir.lock, owner)
    try:
        note = lock.acquire(run_dir.path)
    except RunBusyError:
        if created:
            shutil.rmtree(run_dir.path, ignore_errors=True)
        raise
    result = Claim(run_dir, lock, resuming=False, created=created, notes=[note] if note else [])
    try:
        if resume_overrides is not None:
            result.resuming = True
            if config is not None and resume_overrides:
                old = saved_config(run_dir).to_dict()
                line = json.dumps({"time": round(time.time(), 3), "overrides": list(resume_overrides),
                                   "changed": [key for key, _, _ in differences(old, config.to_dict())]})
                previous = run_dir.resumes.read_text() if run_dir.resumes.is_file() else ""
                result.write(run_dir.resumes, previous + line + "\n")
        else:
            result.resuming = _check_same_run(run_dir, record, config)
        if config is not None:
            if not run_dir.config.is_file() or saved_config(run_dir) != config:
                result.write(run_dir.config, dump_yaml(config))
        if lock.joined is None:
            result.write(run_dir.launch_record, json.dumps({**record, "updated": time.time()}, indent=2) + "\n")
    except BaseException:
        result.undo()
        raise
    return result


def _check_same_run(run_dir: RunDir, record: dict, config: Config | None) -> bool:
    """Whether the directory holds this same run already (True: resume it); refuses another run."""
    old_record = read_record(run_dir)
    if config is not None and run_dir.config.is_file():
        old = saved_config(run_dir)
        changed = trained_differences(old.to_dict(), config.to_dict())
        if changed:
            keys = ", ".join(key for key, _, _ in changed[:5])
            undo = [f"{key}={json.dumps(new)}" for key, _, new in changed[:5]]
            raise RunDirError(f"{run_dir.path} already holds a run with a different config (differs in {keys}). "
                              f"Continue that run with the change: `{resume_command(run_dir, *undo)}`, or "
                              "start a new one with run.name=NEW_NAME")
        return True
    if old_record.get("kind") == "script" and record.get("kind") == "script":
        if old_record.get("target") != record.get("target"):
            raise RunDirError(f"{run_dir.path} already holds a run of {describe_target(old_record)}, not of "
                              f"{describe_target(record)}. Continue it with `{resume_command(run_dir)}`, or give "
                              "this one another --run-dir")
        return True
    if old_record and old_record.get("kind") != record.get("kind"):
        raise RunDirError(f"{run_dir.path} already holds a run of {describe_target(old_record)}; give this one "
                          "another run directory")
    return False


def describe_target(record: dict) -> str:
    target = record.get("target", {})
    if "script" in target:
        return shlex.join([target["script"], *target.get("args", [])])
    if "module" in target:
        return shlex.join(["-m", target["module"], *target.get("args", [])])
    return "a config"


def python_module_command(module: str, *args: str) -> list[str]:
    """``python -P -m MODULE ARGS``: the working directory is not put on the path first, so a user's
    ``ddp.py`` or ``launcher.py`` next to their work cannot shadow our packages (the worker adds the
    working directory back after importing them)."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", module, *args]
    bootstrap = f"import runpy, sys; sys.path.pop(0); runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    return [sys.executable, "-c", bootstrap, *args]
