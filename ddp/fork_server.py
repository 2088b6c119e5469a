"""Start the loader processes' fork server early, and from this process's own imports when that is safe.

multiprocessing's fork server is a fresh interpreter (fork, then exec): it imports
torch again (seconds of CPU) before it forks the first loader process, and the
training process waits for it at its first batch. Forked from the training process
instead, it starts with everything already imported, at no cost. A fork is only
safe while no other thread runs (a thread holding a lock at the fork leaves the
child deadlocked for ever), so this happens at the start of a worker, before the
process group, the watchdog or any loader creates threads, and only when
``/proc/self/task`` shows one thread. Otherwise the usual fork server starts now,
while the rest of the start-up runs beside it.

The server itself is CPython's (``multiprocessing.forkserver.main``, its protocol
and its command line unchanged): only how its process is created differs.
"""

from __future__ import annotations

import os
import sys
import threading
from multiprocessing import forkserver, util

SERVER_COMMAND = "from multiprocessing.forkserver import main"
_spawn = util.spawnv_passfds  # how multiprocessing creates its helper processes: fork, then exec


def start_fork_server() -> bool:
    """Start multiprocessing's fork server now, unless it runs already.

    True when this process had a single thread, so that the server is forked from it.
    """
    from ddp.loader import FORK_SERVER_PRELOAD, stop_signals_held

    forkserver.set_forkserver_preload(list(FORK_SERVER_PRELOAD))  # for a server that is not forked from here
    forked = single_threaded()
    if forked:
        util.spawnv_passfds = _fork_in_place
    try:
        with stop_signals_held():  # the server, and every loader process it forks, ignores stop signals
            forkserver.ensure_running()
    finally:
        util.spawnv_passfds = _spawn
    return forked


def single_threaded() -> bool:
    """True when this process has exactly one thread (Linux; elsewhere it cannot be told: False)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _fork_in_place(path: str, args: list[str], passfds) -> int:
    """``util.spawnv_passfds`` for the fork server's command: fork, then run that command in the child.

    As with the ``fork`` start method, the child keeps this process's descriptors (its log
    file, stdio), but not the other ends of the pipes it is given: the server must see the
    end of file on its "alive" pipe when the last training process is gone, and ends then.
    """
    command = args[-1]
    if not command.startswith(SERVER_COMMAND):  # anything else starts as usual
        return _spawn(path, args, passfds)
    passed = {int(fd) for fd in passfds}
    pipes = {_pipe_of(fd) for fd in passed} - {None}
    for stream in (sys.stdout, sys.stderr):  # else the child's children would write it out again
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for fd in _open_descriptors():
            if fd not in passed and _pipe_of(fd) in pipes:
                os.close(fd)
        forkserver._forkserver._lock = threading.Lock()  # held by the parent at the fork
        exec(command, {"__name__": "__mp_forkserver__"})
        code = 0
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else 0
    finally:
        os._exit(code)  # never the training process's atexit handlers


def _open_descriptors() -> list[int]:
    return [int(name) for name in os.listdir("/proc/self/fd")]


def _pipe_of(fd: int) -> str | None:
    """``pipe:[inode]`` for either end of a pipe, else None."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return target if target.startswith("pipe:") else None
