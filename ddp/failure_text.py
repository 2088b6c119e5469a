"""Reading a failed worker's error text: the real error, and whether it is only a consequence of another.

Shared by the launcher's root-cause report and the restart record a restarted
worker writes. Torch-free.
"""

from __future__ import annotations

import signal

# A rank that lost its peer fails too, often within the same second: such errors are
# consequences of another rank's failure, not the root cause.
CONSEQUENCES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker crashing",
                "DistBackendError", "NCCL communicator was aborted", "ProcessGroupNCCL", "Socket Timeout",
                "connectFullMesh failed", "Connection refused")


def real_error(text: str) -> str:
    """The error itself. One raised in a DataLoader worker arrives wrapped ("Caught DatasetError in
    DataLoader worker process 0. Original Traceback ..."); its last line is the real one."""
    text = (text or "").strip()
    if "Original Traceback" in text:
        return text.splitlines()[-1].strip()
    return text


def split_error(text: str) -> tuple[str, str]:
    """``"DatasetError: cannot read ..."`` -> ("DatasetError", "cannot read ...")."""
    text = real_error(text)
    name, sep, message = text.partition(": ")
    if not sep or " " in name:
        return "", text
    return name.rsplit(".", 1)[-1], message.strip()


# The agent ends the survivors of a failed worker with SIGTERM.
ENDED_BY_AGENT = -signal.SIGTERM


def is_consequence(text: str | None, exit_code: int | None = None) -> bool:
    """Whether a failure (its error text, its exit code) follows from another rank's."""
    return exit_code == ENDED_BY_AGENT or (bool(text) and any(marker in text for marker in CONSEQUENCES))


def first_line(text: str, limit: int = 300) -> str:
    line = (real_error(text).splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."
