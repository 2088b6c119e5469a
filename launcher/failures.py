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


def split_error(text: str) -> tuple[str, str]:
    """``"DatasetError: cannot read ..."`` -> ("DatasetError", "cannot read ...").

    An error raised in a DataLoader worker arrives wrapped ("Caught DatasetError in
    DataLoader worker process 0. Original Traceback ..."): its last line is the real one.
    """
    text = text.strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].strip()
    name, sep, message = text.partition(": ")
    if not sep or " " in name:
        return "", text
    return name.rsplit(".", 1)[-1], message.strip()


# A rank that lost its peer fails too, often within the same second (torch's timestamps are
# whole seconds): such errors are consequences, not the root cause.
_CONSEQUENCES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker crashing",
                 "DistBackendError", "NCCL communicator was aborted", "ProcessGroupNCCL")


def root_cause(error) -> tuple[int, object]:
    """The first failure, preferring (within two seconds of it) one that is not a lost peer."""
    failures = error.failures
    earliest = min(failure.timestamp for failure in failures.values())

    def lost_peer(failure) -> bool:
        text, _ = _message_and_traceback(failure)
        return any(marker in text for marker in _CONSEQUENCES)

    close = [(rank, failure) for rank, failure in failures.items() if failure.timestamp <= earliest + 2]
    return min(close, key=lambda item: (lost_peer(item[1]), item[1].timestamp, item[0]))


def describe_failure(error, run_dir: Path) -> str:
    """The first failed worker as the root cause: rank, exit code, its own traceback, its log.

    A known error (a bad dataset, a stalled rank, a failed checkpoint write) is
    its message alone; its traceback stays in the worker's log. Anything else is
    a bug worth the traceback, shown under a header.
    """
    from ddp.watchdog import EXIT_STALLED
    from launcher.preflight import known_error_names

    rank, first = root_cause(error)
    text, trace = _message_and_traceback(first)
    log_file = run_dir / "logs" / f"rank_{rank}.log"
    name, message = split_error(text)
    if first.exitcode == EXIT_STALLED or name == "WatchdogTimeout":
        return "\n".join([f"error: {message}",
                           f"every worker was ended by the watchdog (exit code {EXIT_STALLED}); continue with "
                           f"`launch resume {run_dir}` once the cause is fixed"])
    if name in known_error_names():
        return "\n".join([f"error: {message}",
                           f"(rank {rank} failed with {name}, exit code {first.exitcode}; its traceback is in "
                           f"{log_file})"])
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
    lines.append(f"worker log: {log_file}")
    return "\n".join(lines)
