"""Turning torch elastic's ``ChildFailedError`` into the one message a user needs."""

from __future__ import annotations

import signal
from pathlib import Path


def _message_and_traceback(failure) -> tuple[str, str]:
    message = failure.message
    if isinstance(message, dict):  # written by @record: {"message": ..., "extraInfo": {"py_callstack": ...}}
        text = message.get("message", "")
        trace = message.get("extraInfo", {}).get("py_callstack", "")
        return text, trace
    return str(message or ""), ""


def describe_failure(error, run_dir: Path) -> str:
    """The first failed worker as the root cause: rank, exit code, its own traceback, its log."""
    rank, first = error.get_first_failure()
    text, trace = _message_and_traceback(first)
    if first.exitcode < 0:
        try:
            cause = f"killed by signal {signal.Signals(-first.exitcode).name}"
        except ValueError:
            cause = f"killed by signal {-first.exitcode}"
        text = text if text and not text.startswith("Signal") else cause
    lines = [f"error: worker rank {rank} failed (exit code {first.exitcode}, pid {first.pid}): {text.strip()}"]
    if trace.strip():
        lines += ["", "worker traceback (root cause):", trace.rstrip()]
    others = sorted(r for r in error.failures if r != rank)
    if others:
        lines.append(f"other failed ranks (most likely as a consequence): {', '.join(map(str, others))}")
    lines.append(f"worker log: {run_dir / 'logs' / f'rank_{rank}.log'}")
    return "\n".join(lines)
