"""One owner per run directory, across processes, hosts and a shared filesystem.

A run directory is written by one job at a time. Its live owner holds
``RUN_DIR/lock.json``: host, pid, the process's start time (so a recycled pid
is not taken for the owner), the command, when it started, and a token. The
lock is created with ``link()`` from a file of our own, which is atomic on
NFS too (``O_EXCL`` and ``flock`` are not, on old NFS), and the owner touches
it every ``REFRESH_S`` seconds.

A lock is stale when its owner is gone: on the owner's own host, when the pid
no longer runs that process (``kill -9`` of ``launch`` is noticed at once);
anywhere else, when it has not been touched for ``STALE_AFTER_S`` seconds (a
lost node). A stale lock is taken over under a short-lived takeover lock, so
two launches racing for it cannot both win, and the takeover is said.

The nodes of one multi-node job share the lock: it records the job's
rendezvous, a launch with the same rendezvous joins instead of being refused,
and every member touches the lock, so it stays live while any node runs.

Torch-free.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

REFRESH_S = 10.0
STALE_AFTER_S = 60.0


class RunBusyError(RuntimeError):
    """The run directory has a live owner; the message names it and how to stop it."""


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), so a recycled pid is told from the owner."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    if start_ticks is None:
        return True
    current = process_start_ticks(pid)
    return current is None or current == start_ticks


@dataclass(frozen=True)
class Owner:
    kind: str  # "local", "slurm" or "debug"
    command: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    start_ticks: int | None = None
    started: float = field(default_factory=time.time)
    job_id: str | None = None  # a SLURM job's id
    rendezvous: str | None = None  # a multi-node job's HOST:PORT/run_id: its nodes share the lock
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def of_this_process(cls, kind: str, **details) -> Owner:
        command = details.pop("command", None) or shlex.join(sys.argv)
        return cls(kind=kind, command=command, start_ticks=process_start_ticks(os.getpid()), **details)

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        who = f"SLURM job {self.job_id}" if self.job_id else f"`{self.command}`"
        return f"{who} (pid {self.pid} on {self.host}, since {since})"

    def how_to_stop(self, run_dir: Path) -> str:
        if self.job_id:
            return f"stop it with `{shlex.join(['launch', 'cancel', str(run_dir)])}`"
        where = "" if self.host == socket.gethostname() else f" on {self.host}"
        return f"stop it with `kill -TERM {self.pid}`{where} (it saves a checkpoint and exits 75)"


def read_owner(path: Path) -> Owner | None:
    try:
        data = json.loads(Path(path).read_text())
        return Owner(**data)
    except (OSError, ValueError, TypeError):
        return None


def owner_alive(path: Path, owner: Owner, now: float | None = None) -> bool:
    """Whether the lock at ``path`` still has a live owner (see the module docstring)."""
    if owner.host == socket.gethostname() and owner.rendezvous is None:
        return pid_alive(owner.pid, owner.start_ticks)
    try:
        touched = path.stat().st_mtime
    except OSError:
        return False
    return (now or time.time()) - touched < STALE_AFTER_S


class RunLock:
    """``lock = RunLock(RUN_DIR/lock.json, owner); note = lock.acquire(); ...; lock.release()``."""

    def __init__(self, path: Path, owner: Owner):
        self.path, self.owner = Path(path), owner
        self.joined: Owner | None = None  # the owner of a multi-node job this process joined
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False

    def acquire(self, run_dir: Path | None = None) -> str | None:
        """Take the lock, join the job that holds it, or raise RunBusyError. Returns a line to say, if any."""
        run_dir = run_dir or self.path.parent
        for _ in range(5):
            if self._create():
                self._held = True
                return None
            current = read_owner(self.path)
            if current is None:  # being written, or unreadable garbage: look again, then treat as stale
                time.sleep(0.05)
                current = read_owner(self.path)
            if current is not None and current.token == self.owner.token:
                self._held = True
                return None
            if current is not None and owner_alive(self.path, current):
                if self.owner.rendezvous and current.rendezvous == self.owner.rendezvous:
                    self.joined = current
                    return None
                if self.owner.job_id and current.job_id == self.owner.job_id:
                    pass  # the same SLURM job, requeued: its previous run is over
                else:
                    raise RunBusyError(f"{run_dir} is in use by {current.describe()}; two jobs must not train "
                                       f"into one run directory. Wait for it to end, or "
                                       f"{current.how_to_stop(run_dir)}")
            if self._take_over(current):
                self._held = True
                what = current.describe() if current is not None else "an unreadable lock"
                return f"took over the run directory's lock from {what}, which is no longer running"
        raise RunBusyError(f"cannot take the lock {self.path}: it keeps changing hands; is another launch "
                           "starting this run right now?")

    def _create(self) -> bool:
        """Create the lock atomically: link a file of our own to the lock's name."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = self.path.with_name(f".{self.path.name}.{self.owner.token}")
        mine.write_text(json.dumps(asdict(self.owner)))
        try:
            os.link(mine, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: O_EXCL is the next best thing
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as handle:
                handle.write(mine.read_text())
            return True
        finally:
            mine.unlink(missing_ok=True)

    def _take_over(self, stale: Owner | None) -> bool:
        """Replace a stale lock, under a takeover lock so only one racer replaces it."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # a takeover whose process died half-way
                if time.time() - guard.stat().st_mtime > STALE_AFTER_S:
                    guard.unlink(missing_ok=True)
            except OSError:
                pass
            time.sleep(0.1)
            return False
        os.close(fd)
        try:
            current = read_owner(self.path)
            if current is not None and (stale is None or current.token != stale.token):
                return False  # someone else took it meanwhile: look again
            self.path.unlink(missing_ok=True)
            return self._create()
        finally:
            guard.unlink(missing_ok=True)

    def start_refreshing(self) -> RunLock:
        """Touch the lock every REFRESH_S seconds from a daemon thread, so other nodes see it live."""
        if self._thread is None and (self._held or self.joined):
            self._thread = threading.Thread(target=self._refresh, name="run-lock", daemon=True)
            self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # taken over after all, or the directory went away: nothing to keep fresh

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None
        if self._held:
            current = read_owner(self.path)
            if current is not None and current.token == self.owner.token:
                self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
