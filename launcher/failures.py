"""Turning failed workers into the one message a user needs: the root cause, its traceback, its log.

When one worker fails, the others usually fail too, a moment later, because
their peer is gone ("Connection closed by peer"): those are consequences. The
root cause is the first failure that is not one, among those within two
seconds of the first (torch stamps failures in whole seconds). A worker ended
by SIGTERM is one too: the agent ends the survivors of a failure with it.
"""

from __future__ import annotations

from pathlib import Path

from ddp.codes import EXIT_STALLED, describe_exit
from ddp.failure_text import is_consequence, split_error
from ddp.layout import RunDir
from launcher.errors import known_error_names

NO_ERROR_FILE = "<N/A>"  # torch.distributed.elastic.multiprocessing.errors._NOT_AVAILABLE


def failure_text(failure) -> str | None:
    """The error message a worker left (its error file, written by ``@record``), or None if it left none
    (torch's placeholder text then only says so)."""
    # torch marks a worker that left no error file with the error file "<N/A>" (and its error data with a
    # placeholder "<NONE>" message); the message is then made up from the exit code ("Signal 9 ... received").
    if getattr(failure, "error_file", NO_ERROR_FILE) == NO_ERROR_FILE or not getattr(failure, "error_file_data", None):
        return None
    message = failure.message
    if isinstance(message, dict):  # {"message": ..., "extraInfo": {"py_callstack": ...}}
        message = message.get("message")
    return str(message or "").strip() or None


def failure_traceback(failure) -> str:
    message = failure.message
    if isinstance(message, dict):
        return message.get("extraInfo", {}).get("py_callstack", "") or ""
    return ""


def root_cause(failures: dict) -> tuple[int, object]:
    """(rank, failure) of the root cause among ``{rank: ProcessFailure}``."""
    earliest = min(failure.timestamp for failure in failures.values())
    close = [(rank, failure) for rank, failure in failures.items() if failure.timestamp <= earliest + 2]
    return min(close, key=lambda item: (is_consequence(failure_text(item[1]), item[1].exitcode), item[1].timestamp,
                                        item[0]))


def describe_failure(failures: dict, run_dir: RunDir | Path) -> str:
    """The root cause: its message alone for a known error, else its rank, exit code, traceback and log."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    rank, first = root_cause(failures)
    text = failure_text(first) or ""
    log_file = run_dir.rank_log(rank)
    name, message = split_error(text)
    if first.exitcode == EXIT_STALLED or name == "WatchdogTimeout":
        return "\n".join([f"error: {message}",
                          f"every worker was ended by the watchdog (exit code {EXIT_STALLED}); continue with "
                          f"`{run_dir.command('resume')}` once the cause is fixed"])
    if name in known_error_names():
        return "\n".join([f"error: {message}",
                          f"(rank {rank} failed with {name}, exit code {first.exitcode}; its traceback is in "
                          f"{log_file})"])
    if not text:
        text = describe_exit(first.exitcode) if first.exitcode < 0 else "no error report (see its log)"
    lines = [f"error: worker rank {rank} failed (exit code {first.exitcode}, pid {first.pid}): {text}"]
    trace = failure_traceback(first)
    if trace.strip():
        lines += ["", "worker traceback (root cause):", trace.rstrip()]
    others = sorted(r for r in failures if r != rank)
    if others:
        lines.append(f"other failed ranks (most likely as a consequence): {', '.join(map(str, others))}")
    lines.append(f"worker log: {log_file}")
    return "\n".join(lines)
