"""What ``launch`` says when a run stopped on a signal: where it stands, and how to go on. Torch-free."""

from __future__ import annotations

import signal

from ddp.layout import RunDir, latest_complete


def report_stop(run_dir: RunDir, signum: signal.Signals | None, saved_only: bool = False) -> str:
    """One line after a stop; ``signum``: what reached ``launch`` (None: a signal sent to the workers)."""
    # Only the completion markers' sizes, no checksums: a scheduler's kill may be seconds away.
    found = latest_complete(run_dir.checkpoints)
    where = f"latest checkpoint {found.path.name} (step {found.step})" if found else "no checkpoint yet"
    resume = f"`{run_dir.command('resume')}`"
    if saved_only:
        return f"{where}. Continue with {resume}"
    what = signum.name if signum else "a stop signal to the workers"
    return f"stopped by {what}: {where}. Continue with {resume} (or the same launch command)"
