"""A process that must not outlive its parent: a worker whose ``launch`` was killed, a loader of a dead worker.

Linux's ``PR_SET_PDEATHSIG`` has the kernel send SIGKILL when the parent
exits, however it exits (``kill -9`` included). Elsewhere a daemon thread polls
the parent's pid instead. Torch-free.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int | None = None) -> None:
    """End this process with SIGKILL as soon as its parent is gone.

    ``expected_parent``: the pid the parent had when this process was started (for the race
    where the parent dies before this call: the process is then already orphaned).
    """
    parent = os.getppid() if expected_parent is None else expected_parent
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:  # died before the prctl took effect
                    os.kill(os.getpid(), signal.SIGKILL)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
