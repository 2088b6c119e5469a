"""What a run trained on, from what the test job's workers recorded (``job.record_dir``): every sample of
each epoch once across restarts and world-size changes, and one learning-rate curve."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.support.helpers import metrics
from tests.support.job import recorded_ids


def effective_batches(record_dir: Path) -> dict[int, list[dict]]:
    """For each micro-batch position, the records of the last attempt that trained it (replays replace).

    An attempt is a set of worker processes; a later attempt's processes started later."""
    rows = recorded_ids(record_dir)
    started = {}
    for row in rows:
        started[row["pid"]] = min(started.get(row["pid"], row["time"]), row["time"])
    by_position: dict[int, list[dict]] = {}
    for row in rows:
        by_position.setdefault(row["position"], []).append(row)
    out = {}
    for position, found in by_position.items():
        latest = max(started[row["pid"]] for row in found)
        # The workers of one attempt start within seconds of each other; an attempt is seconds after another.
        out[position] = [row for row in found if started[row["pid"]] >= latest - 5]
    return out


def assert_every_sample_once(run_dir: Path, record_dir: Path, samples: int, epochs: int) -> None:
    """Each epoch trained every sample once (and at most a world size's padding, as DistributedSampler pads)."""
    epoch_ends = sorted(r["step"] for r in metrics(run_dir) if "train/epoch_time_s" in r)
    assert len(epoch_ends) == epochs
    ids_by_epoch: dict[int, Counter] = {}
    for position, rows in effective_batches(record_dir).items():
        epoch = sum(1 for end in epoch_ends if end <= position)  # position p trains step p + 1
        for row in rows:
            ids_by_epoch.setdefault(epoch, Counter()).update(row["ids"])
    assert sorted(ids_by_epoch) == list(range(epochs))
    world = max(row["world_size"] for row in recorded_ids(record_dir))  # the most padding an epoch can have
    for epoch, counts in sorted(ids_by_epoch.items()):
        assert set(counts) == set(range(samples)), f"epoch {epoch} missed samples"
        assert sum(counts.values()) - samples < world, f"epoch {epoch} repeated more than the padding"


def assert_one_lr_curve(run_dir: Path, min_lr: float) -> None:
    """Each step logged once, no jump at a change (at most 4x the typical step's change), ending at min_lr."""
    lrs = {r["step"]: r["train/lr"] for r in metrics(run_dir) if "train/lr" in r}
    steps = sorted(lrs)
    assert steps == list(range(1, steps[-1] + 1))
    jumps = [abs(lrs[s + 1] - lrs[s]) for s in steps[:-1]]
    typical = sorted(jumps)[len(jumps) // 2]
    assert max(jumps) <= 4 * typical + 1e-9, max(jumps)
    assert lrs[steps[-1]] == pytest.approx(min_lr)
