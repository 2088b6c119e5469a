"""``restarts.jsonl``: one line per restart or membership change of a run's workers, written by the launcher.

Each line says why (each failed worker's error, the root cause first), the world
size before and after, and the checkpoint (and step) the workers resume from.
Torch-free.
"""

from __future__ import annotations

import json
import logging
import time

from ddp.failure_text import first_line
from ddp.layout import RunDir

log = logging.getLogger(__name__)

NO_REPORT = ("no error report: killed by a signal (kill -9, the out-of-memory killer, a node going away) "
             "or crashed in native code")


def describe_cause(failures: list[dict]) -> str:
    if not failures:
        return "unknown (the previous attempt left no error reports)"
    return "; ".join(f"rank {item['rank']}: {first_line(item['error']) if item.get('error') else NO_REPORT}"
                     for item in failures)


def record_restart(run_dir: RunDir, *, restart: int, old_world_size: int, new_world_size: int, why: str,
                   failures: list[dict], resumed_from: str | None, step: int, launched_by: str = "launch") -> dict:
    record = {
        "time": round(time.time(), 3),
        "restart": restart,
        "launched_by": launched_by,
        "why": why,
        "cause": describe_cause(failures) if failures else why,
        "failures": failures,
        "old_world_size": old_world_size,
        "new_world_size": new_world_size,
        "resumed_from": resumed_from,
        "step": step,
    }
    try:
        with open(run_dir.restarts, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as err:
        log.warning("cannot write %s: %s", run_dir.restarts, err)
    size = f"; world size {old_world_size} -> {new_world_size}" if old_world_size != new_world_size else ""
    where = f"resuming from step {step}" if resumed_from else "no checkpoint yet: starting from the beginning"
    print(f"launch: restart {restart} of the workers ({record['cause']}){size}; {where}", flush=True)
    return record
