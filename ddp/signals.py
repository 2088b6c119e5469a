"""Turning a scheduler's "you will be stopped soon" into a checkpoint at the next step boundary.

SIGTERM (torchrun forwarding a stop, a preemption) and SIGUSR2 (SLURM's
``--signal=USR2@N`` warning; not USR1, which NCCL may use) only set a flag
here. ``StopVote`` makes every rank agree on the flag at the same step, the
training loop saves a checkpoint and exits with ``EXIT_RESUMABLE`` so a
launcher knows to resume, not give up. A second signal while the checkpoint
is being written changes nothing.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

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


class StopVote:
    """Whether any rank was asked to stop, agreed by every rank at the same step, without a stall.

    A signal reaches the ranks at different moments, so each rank's flag alone
    would make them stop at different steps (and the others wait forever in the
    next collective). At every step boundary each rank starts a one-integer
    all-reduce (max) of its flag on a small gloo group of its own and reads the
    one it started at the previous boundary, which finished long ago. Every rank
    thus reads the same answer at the same step, with no device synchronisation
    and no wait on the training path; the price is that a stop takes effect one
    step after the signal reached the last rank. With one process it is the flag.
    """

    def __init__(self, stop: StopRequest):
        self.stop = stop
        # Its own group: never queued behind (or interleaved with) DDP's gradient all-reduces.
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._pending: tuple | None = None

    def agreed(self) -> bool:
        """Call at every step boundary, on every rank. True on all ranks at once when any rank must stop."""
        if self._group is None:
            return self.stop.requested
        if self._pending is not None:
            work, flag = self._pending
            self._pending = None
            work.wait()
            if flag.item():
                return True
        flag = torch.tensor([1 if self.stop.requested else 0], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return False

    def close(self) -> None:
        """Finish the last vote (every rank started it), so the process group can be torn down cleanly."""
        if self._pending is not None:
            work, _ = self._pending
            self._pending = None
            work.wait()
