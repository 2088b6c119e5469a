"""Turning "you will be stopped soon" into a checkpoint at the next step boundary.

SIGTERM (``launch`` forwarding a stop, a preemption), SIGUSR2 (SLURM's
``--signal=USR2@N`` warning; not USR1, which NCCL may use) and SIGINT (Ctrl-C)
only set a flag here (``ddp.codes.STOP_SIGNALS``). ``StopVote`` makes every
rank agree on the flag at the same step, the training loop saves a checkpoint
and exits with ``EXIT_RESUMABLE`` so a launcher knows to resume, not give up.
A second SIGTERM or SIGUSR2 while the checkpoint is being written changes
nothing; a second SIGINT (Ctrl-C twice) stops at once, with KeyboardInterrupt.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import torch
import torch.distributed as dist

from ddp.codes import STOP_SIGNALS

log = logging.getLogger(__name__)


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
            log.warning("received %s: saving a checkpoint at the next step boundary, then stopping%s",
                        self.signal_name, " (Ctrl-C again stops at once)" if signum == signal.SIGINT else "")
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt("a second Ctrl-C: stopping at once, without a checkpoint")

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


def ignore_stop_signals() -> None:
    """Once training has returned or raised: a late stop signal must not turn a result into a kill."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


class StopVote:
    """Whether any rank was asked to stop, agreed by every rank at the same step, without a stall.

    A signal reaches the ranks at different moments, so each rank's flag alone
    would make them stop at different steps (and the others wait forever in the
    next collective). At a vote step each rank starts a small all-reduce (max)
    of its flag on a gloo group of its own and reads the one it started at the
    previous vote, which finished long ago: every rank reads the same answer at
    the same step, with no device synchronisation and no wait on the training path.

    A vote costs a little (~0.5 ms of gloo work on a busy CPU), which matters
    for steps of a millisecond. So votes are spaced about ``every_s`` seconds
    apart: each vote also carries the slowest rank's time since the previous
    one, and every rank derives the next vote step from that same reduced value,
    so they stay in step. A stop then takes effect within about two intervals
    (one step with slow steps). With one process it is the flag, every step.
    """

    MAX_INTERVAL_STEPS = 10_000

    def __init__(self, stop: StopRequest, every_s: float = 0.5):
        self.stop = stop
        self.every_s = every_s
        # Its own group: never queued behind (or interleaved with) DDP's gradient all-reduces.
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._pending: tuple | None = None  # (work, tensor, steps the carried time spans)
        self._countdown = 1  # steps to the next vote
        self._interval = 1  # steps between votes
        self._last_vote = None  # perf_counter() at the previous vote
        self._interval_since_last = 0  # steps from the previous vote to the next

    def agreed(self) -> bool:
        """Call at every step boundary, on every rank. True on all ranks at once when any rank must stop."""
        if self._group is None:
            return self.stop.requested
        self._countdown -= 1
        if self._countdown > 0:
            return False
        if self._pending is not None:
            work, values, spanned = self._pending
            self._pending = None
            work.wait()
            stop, slowest_s = bool(values[0].item()), values[1].item()
            if stop:
                return True
            if spanned:  # the same reduced value on every rank: the same next interval
                per_step = slowest_s / spanned
                wanted = self.every_s / per_step if per_step > 0 else self.MAX_INTERVAL_STEPS
                self._interval = int(min(self.MAX_INTERVAL_STEPS, max(1, wanted)))
        now = time.perf_counter()
        spanned = self._interval_since_last if self._last_vote is not None else 0
        elapsed = now - self._last_vote if self._last_vote is not None else 0.0
        values = torch.tensor([1.0 if self.stop.requested else 0.0, elapsed], dtype=torch.float64)
        self._pending = (dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self._group, async_op=True),
                         values, spanned)
        self._last_vote, self._interval_since_last = now, self._interval
        self._countdown = self._interval
        return False

    def close(self) -> None:
        """Finish the last vote (every rank started it), so the process group can be torn down cleanly."""
        if self._pending is not None:
            work, *_ = self._pending
            self._pending = None
            work.wait()
