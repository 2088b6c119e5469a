"""Turning a scheduler's "you will be stopped soon" into a checkpoint at the next step boundary.

SIGTERM (torchrun forwarding a stop, a preemption) and SIGUSR2 (SLURM's
``--signal=USR2@N`` warning; not USR1, which NCCL may use) only set a flag
here. The training loop agrees on the flag across ranks, saves a checkpoint
and exits with ``EXIT_RESUMABLE`` so a launcher knows to resume, not give up.
A second signal while the checkpoint is being written changes nothing.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: "try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class StopRequest:
    """Set by a stop signal; read by the training loop at step boundaries."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            log.warning("received %s: saving a checkpoint at the next step boundary, then stopping",
                        self.signal_name)

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
