"""The log window: what the loop measured since the last log step, reduced over ranks in one all-reduce.

The window's micro-batch losses stay on the device, unread, until its log step:
no host synchronisation and no extra kernel per step (a list append costs
~0.1 us; each tensor op ~5 us on a CPU). At the log step each rank fills its
row of a small table (loss sum and count, non-finite losses, time waiting for
data, time in its own work) and one all-reduce gathers every row.

Each rank's own work (data wait and forward, before DDP's gradient all-reduce
makes the fast ranks wait for the slow one) names a straggler: a rank slower
than ``factor`` times the median for ``windows`` windows in a row is named
once, with its host and by how much.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field

import torch

from ddp import distributed

log = logging.getLogger(__name__)

# Below this many seconds per step of own work, differences between ranks are noise.
STRAGGLER_MIN_S = 0.002


@dataclass
class Reduced:
    loss: float  # mean of the finite losses over every rank
    bad_steps: list[tuple[int, int]]  # (first non-finite step, rank) of each rank that had one
    data_wait_share: float  # the ranks' mean share of the window spent waiting for data
    own_s: list[float]  # each rank's own work in the window (data wait and forward), in seconds


@dataclass
class Window:
    accumulate: int
    first_step: int
    losses: list = field(default_factory=list)
    samples: int = 0  # this rank's samples in the window
    own_s: float = 0.0  # this rank's time in its own forward passes

    def reduce(self, device: torch.device, data_wait_s: float, seconds: float) -> Reduced:
        values = torch.stack(self.losses).double().tolist() if self.losses else []
        bad = [self.first_step + 1 + i // self.accumulate for i, value in enumerate(values) if not math.isfinite(value)]
        # A skipped NaN must not make the logged loss NaN: only finite losses are averaged.
        row = [sum(value for value in values if math.isfinite(value)), float(len(values)), float(len(bad)),
               float(bad[0]) if bad else -1.0, data_wait_s, data_wait_s + self.own_s]
        rows = distributed.gather_rows(row, device)
        totals = [sum(column) for column in zip(*rows)]
        finite = totals[1] - totals[2]
        return Reduced(loss=totals[0] / finite if finite > 0 else float("nan"),
                       bad_steps=[(int(r[3]), rank) for rank, r in enumerate(rows) if r[2] > 0],
                       data_wait_share=totals[4] / len(rows) / max(seconds, 1e-9),
                       own_s=[r[5] for r in rows])


class Stragglers:
    """Names a rank that stays slower than the others: ``factor`` x the median for ``windows`` windows."""

    def __init__(self, factor: float, windows: int, hostnames: list[str]):
        self.factor, self.windows, self.hostnames = factor, windows, hostnames
        self.slow_for = [0] * len(hostnames)
        self.named: set[int] = set()

    def observe(self, own_s: list[float], steps: int) -> list[dict]:
        """New stragglers in this window: ``{"rank", "host", "slowdown", "own_ms_per_step", ...}``."""
        if len(own_s) < 2 or steps < 1:
            return []
        median = statistics.median(own_s)
        found = []
        for rank, seconds in enumerate(own_s):
            slow = seconds > self.factor * median and (seconds - median) / steps > STRAGGLER_MIN_S
            self.slow_for[rank] = self.slow_for[rank] + 1 if slow else 0
            if not slow:
                self.named.discard(rank)
            elif self.slow_for[rank] >= self.windows and rank not in self.named:
                self.named.add(rank)
                found.append({"rank": rank, "host": self.hostnames[rank],
                              "slowdown": seconds / median if median > 0 else float("inf"),
                              "own_ms_per_step": 1000 * seconds / steps, "median_ms_per_step": 1000 * median / steps,
                              "windows": self.slow_for[rank]})
        return found
