"""The launcher's named errors, and which errors are "known": their message is the whole story.

Only the command line turns errors into exit codes. A known error is printed in
one line, without a traceback (that goes to the rank's log); anything else is a
bug and keeps its traceback. Errors from workers arrive as text, so they are
told by name, and an error's class counts as known if any class it derives
from is named here: no import of the training stack is needed to tell.
"""

from __future__ import annotations


class LaunchError(RuntimeError):
    """The launch request cannot be carried out as given; the message says what to do."""


KNOWN_ERRORS = frozenset({
    "CheckpointError", "ResumeError", "DeviceError", "NonFiniteLossError", "JobError", "DatasetError",
    "ModelError", "RankMismatchError", "ConfigError", "StorageError", "SlurmError", "RequeueError",
    "RunBusyError", "RunDirError", "LaunchError", "OptionError", "YamlError", "WatchdogTimeout",
})


def known_error(err: BaseException) -> bool:
    return any(cls.__name__ in KNOWN_ERRORS for cls in type(err).__mro__)


def known_error_names() -> frozenset[str]:
    return KNOWN_ERRORS
