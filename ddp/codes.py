"""Exit codes and stop signals: the contract between a worker, its launcher and a scheduler.

Torch-free, so that ``launch`` can speak it without importing torch.

A worker (ours, or a user's script under ``launch``) that saved a checkpoint
after a stop signal exits ``EXIT_RESUMABLE``: the launcher reports a stop,
not a failure, and a SLURM job requeues itself. ``EXIT_STALLED`` is the
watchdog's, as timeout(1) has it.
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_FAILURE = 1  # a runtime failure: a worker failed, a checkpoint could not be written, SLURM refused
EXIT_USAGE = 2  # bad input: config, command line, run directory; nothing was started or written
EXIT_RESUMABLE = 75  # EX_TEMPFAIL, "try again later": stopped by a signal after saving a checkpoint
EXIT_STALLED = 124  # the watchdog ended a run that made no progress
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once, without a checkpoint (128 + SIGINT)

# Each asks for an agreed stop at the next step: a checkpoint, then EXIT_RESUMABLE.
# SIGTERM: kill, Kubernetes, SLURM's preemption; SIGUSR2: SLURM's time-limit warning as
# `launch slurm` asks for it (not USR1, which NCCL may use); SIGINT: Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)

EXIT_MEANINGS = {
    EXIT_OK: "success",
    EXIT_FAILURE: "a runtime failure (a worker failed, a checkpoint could not be written, SLURM refused the job)",
    EXIT_USAGE: "bad input (config, command line, run directory); nothing was started or written",
    EXIT_RESUMABLE: "stopped by a signal after saving a checkpoint; resume to continue",
    EXIT_STALLED: "the watchdog ended a stalled run",
    EXIT_INTERRUPTED: "interrupted by a second Ctrl-C, without a checkpoint",
}


def describe_exit(code: int) -> str:
    """``-9`` -> "killed by signal SIGKILL"; ``75`` -> its meaning; else "exit code N"."""
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return EXIT_MEANINGS.get(code, f"exit code {code}")
