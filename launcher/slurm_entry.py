"""What each SLURM task runs: submitit unpickles ``SlurmTraining`` and calls it, once per task.

Where the task sits in the job comes from SLURM's variables only (``ddp.env``):
rank from ``SLURM_PROCID``, the master address from the node list, the port
from the job id. torchrun variables that leaked in from the submitting shell
(``RANK``, ``MASTER_ADDR``, ...) are dropped first, or they would win.

Stopping and requeueing. submitit installs its own handler for USR2 (call the
callable's ``checkpoint()``, ``scontrol requeue``, exit) before it calls us.
That would requeue before our workers have saved anything, so the task takes
the signals over for its whole life with the trainer's ``StopRequest``:

1. USR2 (``--signal=USR2@N`` before the time limit, or ``scancel -s USR2``) or
   SIGTERM (preemption, ``scontrol requeue``, ``scancel``) sets a flag; the
   ranks agree on it at the next log step, save a full checkpoint and return
   "stopped".
2. Rank 0 then asks SLURM what is happening to the job. Still RUNNING: nobody
   else is ending it, so this was a warning; rank 0 requeues it, as submitit
   would, if it has been requeued fewer than ``slurm.max_requeues`` times.
   Anything else (CANCELLED, already requeued by SLURM, TIMEOUT): SLURM has
   decided, and the checkpoint is what the next run resumes from.
3. The requeued job runs the same pickled callable; ``run_training`` resumes
   from the run directory's latest checkpoint.

A task that fails for another reason raises: the job ends FAILED and is not
requeued. A job SLURM itself requeued (node failure) more than
``slurm.max_requeues`` times refuses to start again.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from submitit.helpers import Checkpointable, DelayedSubmission

from ddp.env import DistEnv, read_env

log = logging.getLogger(__name__)

# Set by torchrun for its workers. Inherited by a job submitted from inside one, they
# would describe the wrong job (read_env prefers them; init_process_group keeps MASTER_*).
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID")
EVENTS = "slurm_events.jsonl"  # rank 0's record of each run of the job: started, requeued, finished, ...


class SignalLatch:
    """Holds SIGTERM/SIGUSR2 while the task imports torch, then hands them to the trainer's StopRequest.

    Importing ``ddp.signals`` (and so torch) takes seconds; installing this first, with
    nothing but the standard library, keeps a warning from reaching submitit's handler
    (or killing the task) in that time.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self):
        self.received: list[int] = []

    def install(self) -> "SignalLatch":
        for signum in self.SIGNALS:
            signal.signal(signum, lambda signum, frame: self.received.append(signum))
        return self

    def replay(self) -> None:
        """Deliver what arrived again, now that another handler is installed."""
        for signum in dict.fromkeys(self.received):
            signal.raise_signal(signum)


class RequeueError(RuntimeError):
    """The job stopped and will not run again by itself: requeued too often, or ``scontrol requeue`` failed."""


def slurm_environ(environ: dict) -> dict:
    """The task's environment without torchrun's variables, so SLURM's describe the task."""
    return {key: value for key, value in environ.items() if key not in TORCHRUN_VARIABLES}


def job_id_of(environ) -> str:
    """The id ``scontrol`` knows this job by (an array element is ``ARRAYID_INDEX``)."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID", "")


def job_state(job_id: str) -> str:
    """SLURM's state of the job (RUNNING, CANCELLED, ...), or UNKNOWN when scontrol cannot say."""
    try:
        result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("cannot ask SLURM for the state of job %s: %s", job_id, err)
        return "UNKNOWN"
    from launcher.slurm_status import parse_scontrol

    return parse_scontrol(result.stdout).get("JobState", "UNKNOWN") if result.returncode == 0 else "UNKNOWN"


class SlurmTraining(Checkpointable):
    """The submitit callable: train the run in ``run_dir`` as this task's rank."""

    def __init__(self, run_dir: str, max_requeues: int):
        self.run_dir = run_dir
        self.max_requeues = max_requeues

    def __call__(self) -> dict:
        # First, and kept until the process exits: a warning that arrives while the task is
        # still starting is kept for the trainer, and submitit's handler never runs.
        latch = SignalLatch().install()
        from ddp.signals import StopRequest

        stop = StopRequest().install()
        latch.replay()
        for key in TORCHRUN_VARIABLES:
            os.environ.pop(key, None)
        env = read_env()
        run_dir = Path(self.run_dir)
        job_id = job_id_of(os.environ)
        if env.restart_count > self.max_requeues:
            self._event(env, job_id, "refused", reason=f"requeued {env.restart_count} times")
            raise RequeueError(
                f"job {job_id} was requeued {env.restart_count} times, more than slurm.max_requeues="
                f"{self.max_requeues}; not starting again. Resubmit with `launch slurm` to continue from "
                f"the last checkpoint in {run_dir}")
        self._event(env, job_id, "started")
        from ddp.config import load_config
        from ddp.trainer import run_training

        try:
            outcome = run_training(load_config(run_dir / "config.yaml"), run_dir, env, stop=stop)
        except BaseException as err:
            self._event(env, job_id, "failed", error=f"{type(err).__name__}: {err}")
            raise
        summary = {"status": outcome.status, "step": outcome.step, "epoch": outcome.epoch, "metrics": outcome.metrics}
        if outcome.status != "stopped":
            self._event(env, job_id, outcome.status, step=outcome.step, epoch=outcome.epoch)
            return summary
        return self._after_stop(env, job_id, stop.signal_name, summary)

    def _after_stop(self, env: DistEnv, job_id: str, signal_name: str | None, summary: dict) -> dict:
        """The workers have saved a checkpoint and stopped: requeue the job, or leave it to SLURM."""
        if not env.is_main:
            return summary  # rank 0 decides for the job
        details = {"step": summary["step"], "epoch": summary["epoch"], "signal": signal_name}
        state = job_state(job_id)
        if state != "RUNNING":
            # Cancelled, timed out, or already being requeued by SLURM (preemption, scontrol requeue).
            self._event(env, job_id, "stopped", state=state, **details)
            return {**summary, "state": state}
        if self.checkpoint() is None:  # submitit's protocol says "do not requeue": the limit is reached
            self._event(env, job_id, "stopped", state=state, reason="requeue limit", **details)
            raise RequeueError(
                f"stopped by {signal_name} at step {summary['step']} after {env.restart_count} requeue(s), the "
                f"most slurm.max_requeues={self.max_requeues} allows; the checkpoint is saved. Resubmit with "
                f"`launch slurm` (same config) to continue, or raise slurm.max_requeues or --time")
        self._event(env, job_id, "requeued", **details)
        try:
            subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as err:
            said = getattr(err, "stderr", "") or str(err)
            self._event(env, job_id, "requeue-failed", error=said.strip(), **details)
            raise RequeueError(f"`scontrol requeue {job_id}` failed: {said.strip()}; the checkpoint is saved, "
                                    "resubmit with `launch slurm` to continue") from None
        log.warning("requeued job %s after the checkpoint at step %d (%s)", job_id, summary["step"], signal_name)
        return {**summary, "status": "requeued"}

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission | None:
        """submitit's requeue protocol: the submission to run again, or None for "do not requeue".

        The callable holds no state (the run directory does), so the next run is this same call.
        """
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if restarts >= self.max_requeues:
            return None
        return DelayedSubmission(self, *args, **kwargs)

    def _event(self, env: DistEnv, job_id: str, event: str, **details) -> None:
        if not env.is_main:
            return
        record = {"time": round(time.time(), 3), "job_id": job_id, "restart": env.restart_count, "event": event,
                  **{key: value for key, value in details.items() if value is not None}}
        try:
            with open(Path(self.run_dir) / EVENTS, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as err:  # the record is for `launch status`; training does not depend on it
            log.warning("cannot write %s: %s", EVENTS, err)
