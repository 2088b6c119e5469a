"""Where a run stands, from its directory alone (no torch, no scheduler): ``launch ls`` and ``launch status``.

The state comes from ``lock.json`` (a live owner: running) and ``state.json``
(written by rank 0: finished, stopped, failed, early-stopped, or running at
some step); a run whose state says running but whose owner is gone ended
without a word (killed), and counts as failed. The metrics come from the end
of ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ddp.layout import RunDir, SweepDir, latest_complete
from ddp.lock import owner_alive, read_owner

METRICS_TAIL_BYTES = 64 * 1024  # the end of metrics.jsonl holds the latest records


def read_state(run_dir: RunDir) -> dict:
    try:
        data = json.loads(run_dir.state.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def latest_metrics(run_dir: RunDir) -> dict:
    """The newest value of each metric, from the end of metrics.jsonl: {name: (value, step)}."""
    try:
        with open(run_dir.metrics, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - METRICS_TAIL_BYTES))
            lines = handle.read().decode(errors="replace").splitlines()[1 if size > METRICS_TAIL_BYTES else 0:]
    except OSError:
        return {}
    found: dict = {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        for key, value in record.items():
            if "/" in key and isinstance(value, (int, float)):
                found[key] = (value, record.get("step"))
    return found


@dataclass(frozen=True)
class RunSummary:
    name: str
    path: Path
    state: str  # running, finished, stopped, failed, early-stopped, queued, new
    where: str  # "pid 123 on host" or "SLURM job 45"
    step: int | None
    epoch: int | None
    loss: float | None
    metric: tuple[str, float] | None  # the newest validation metric
    best: float | None
    checkpoint: str | None
    age_s: float | None  # since the run last wrote its state
    detail: str = ""  # a stop's signal, a failure's error, an early stop's result


def summarize(run_dir: RunDir, now: float | None = None) -> RunSummary:
    now = now or time.time()
    state = read_state(run_dir)
    owner = read_owner(run_dir.lock)
    live = owner is not None and owner_alive(run_dir.lock, owner)
    jobs = _read_json(run_dir.slurm_record).get("jobs", [])
    status = state.get("status", "new")
    detail = ""
    if live:
        status = "running"
        where = f"SLURM job {owner.job_id}" if owner.job_id else f"pid {owner.pid} on {owner.host}"
    else:
        where = f"SLURM job {jobs[-1]['job_id']}" if jobs else (f"pid {state['pid']} on {state['host']}"
                                                                  if "pid" in state else "")
        if status == "running":
            status, detail = "failed", "ended without a report (killed?)"
        elif status == "new" and jobs:
            status = "queued"
    if status == "failed" and state.get("error"):
        detail = state["error"]
    elif status == "stopped" and state.get("signal"):
        detail = f"by {state['signal']}"
    elif status == "early-stopped" and state.get("early_stop"):
        early = state["early_stop"]
        detail = f"at epoch {early.get('epoch')}, best {early.get('best'):.4g} at epoch {early.get('best_epoch')}"
    metrics = latest_metrics(run_dir)
    validation = sorted((name, value) for name, (value, _) in metrics.items() if name.startswith("val/"))
    checkpoint = latest_complete(run_dir.checkpoints)
    return RunSummary(name=run_dir.name, path=run_dir.path, state=status, where=where, step=state.get("step"),
                      epoch=state.get("epoch"), loss=metrics.get("train/loss", (None,))[0],
                      metric=validation[0] if validation else None, best=state.get("best"),
                      checkpoint=checkpoint.path.name if checkpoint else None,
                      age_s=now - state["updated"] if "updated" in state else None, detail=detail)


def progress_summary(run_dir: RunDir) -> str:
    """``step 120, epoch 3; last checkpoint step_00000120.pt``."""
    summary = summarize(run_dir)
    where = f"step {summary.step}, epoch {summary.epoch}" if summary.step is not None else "no step recorded yet"
    return f"{where}; last checkpoint {summary.checkpoint or 'none yet'}"


def find_runs(directory: Path, depth: int = 2) -> list[RunDir]:
    """The run directories under ``directory`` (and one level of sweep or group folders)."""
    found = []
    if not directory.is_dir():
        return found
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        run_dir = RunDir(entry)
        if run_dir.exists() or run_dir.launch_record.is_file() or run_dir.state.is_file():
            found.append(run_dir)
        elif depth > 1 and not SweepDir(entry).exists():
            found.extend(find_runs(entry, depth - 1))
    return found


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def table(summaries: list[RunSummary]) -> str:
    header = ("NAME", "STATE", "WHERE", "STEP", "EPOCH", "LOSS", "METRIC", "BEST", "CHECKPOINT", "AGE")
    rows = [header]
    for s in summaries:
        state = s.state + (f" ({s.detail})" if s.detail and s.state in ("stopped", "early-stopped") else "")
        metric = f"{s.metric[0]}={s.metric[1]:.4g}" if s.metric else "-"
        rows.append((s.name, state, s.where or "-", "-" if s.step is None else str(s.step),
                     "-" if s.epoch is None else str(s.epoch), "-" if s.loss is None else f"{s.loss:.4g}", metric,
                     "-" if s.best is None else f"{s.best:.4g}", s.checkpoint or "-", _age(s.age_s)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
