"""Watching a validation metric for improvement: for best.pt, the plateau schedule and early stopping.

Every rank sees the same all-reduced metrics, so every rank's watch holds the
same state; it is saved in the checkpoint and restored with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class MetricWatch:
    metric: str
    mode: str = "min"  # "min": lower is better; "max": higher is better
    min_delta: float = 0.0  # an absolute change that counts as an improvement
    threshold: float = 0.0  # a relative change that counts as an improvement
    best: float | None = None
    best_epoch: int | None = None
    bad: int = 0  # evaluations in a row without improvement

    def improves(self, value: float) -> bool:
        if self.best is None:
            return True
        margin = max(self.min_delta, abs(self.best) * self.threshold)
        return value < self.best - margin if self.mode == "min" else value > self.best + margin

    def observe(self, metrics: dict, epoch: int) -> bool | None:
        """True if ``metrics`` improve on the best, False if not; None if the metric is not among them."""
        value = metrics.get(self.metric)
        if value is None:
            return None
        if self.improves(value):
            self.best, self.best_epoch, self.bad = value, epoch, 0
            return True
        self.bad += 1
        return False

    def state_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key in ("best", "best_epoch", "bad")}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad = state.get("best"), state.get("best_epoch"), state.get("bad", 0)
