"""A write to the run directory that fails (a full disk, a quota, a read-only mount) as one clear error.

A failed write in the training thread raises ``StorageError`` at once. One in a
background thread (the log file's handler, the watchdog's heartbeat) cannot
raise where it happens: it is kept here, the first one only, and the training
loop raises it at its next log step (``raise_if_failed``). Either way the run
ends with one line saying what to free or fix, and resumes from its last
checkpoint once that is done. Torch-free.
"""

from __future__ import annotations

import errno
import threading
from pathlib import Path

ADVICE = {
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is used up: free some space or ask for more",
    errno.EFBIG: "a file-size limit stopped it (`ulimit -f`, or the job's limits): raise the limit",
    errno.EACCES: "the directory is not writable: fix its permissions",
    errno.EPERM: "the directory is not writable: fix its permissions",
    errno.EROFS: "the file system is read-only: write the run elsewhere (run.dir)",
}


class StorageError(RuntimeError):
    """A file of the run directory could not be written; the message says what to do."""


def advice_for(err: OSError) -> str:
    return ADVICE.get(err.errno, "check the file system")


def storage_error(path: Path, err: OSError, error_class: type = StorageError) -> Exception:
    return error_class(f"could not write {path}: {err.strerror or err}; {advice_for(err)}, then continue the run "
                       "with `launch resume RUN_DIR`")


_lock = threading.Lock()
_first: list[StorageError] = []


def record_failure(path: Path, err: OSError) -> None:
    """From a thread that cannot raise: keep the first failure for the training loop."""
    with _lock:
        if not _first:
            _first.append(storage_error(path, err))


def raise_if_failed() -> None:
    if _first:
        raise _first[0]


def reset() -> None:
    with _lock:
        _first.clear()
