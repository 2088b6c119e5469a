"""Holding stop signals while a worker starts, to hand them to its stop request once it has one.

Importing torch takes seconds. A stop signal (SIGTERM, SIGUSR2, Ctrl-C) in that time would
otherwise end the process with the default action, before it could save anything. The latch
is installed first, with nothing but the standard library, and replays what it held.
"""

from __future__ import annotations

import signal

from ddp.codes import STOP_SIGNALS


class SignalLatch:
    def __init__(self):
        self.received: list[int] = []

    def install(self) -> SignalLatch:
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda signum, frame: self.received.append(signum))
        return self

    def replay(self) -> None:
        """Deliver what arrived again, now that another handler is installed."""
        for signum in dict.fromkeys(self.received):
            signal.raise_signal(signum)
