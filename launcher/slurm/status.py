"""``launch status`` and ``launch cancel`` of a SLURM run: its jobs, as SLURM and the run see them.

SLURM's view comes from ``scontrol show job`` (jobs it still holds), then
``sacct`` (where the cluster keeps accounting); a job id is used only after
``query.not_ours`` agrees it is still this run's job. The run's own view comes
from its directory: ``slurm.json``, ``slurm_events.jsonl``, state.json and the
task logs. No torch here: status must answer at once.
"""

from __future__ import annotations

import re
from pathlib import Path

from ddp.failure_text import is_consequence
from ddp.layout import RunDir
from ddp.reporting import read_jsonl
from launcher.slurm.query import SlurmError, cluster_name, not_ours, read_jobs, require_commands, scheduler_view

# States in which a job holds, or will again hold, resources.
ACTIVE = {"PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "REQUEUED", "REQUEUE_FED",
          "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "SPECIAL_EXIT", "RESV_DEL_HOLD"}
# What a user should know about the end states that are not success.
EXPLAIN = {
    "FAILED": "a task exited with an error",
    "NODE_FAIL": "SLURM reports that a node of the job failed",
    "BOOT_FAIL": "SLURM could not boot a node of the job",
    "TIMEOUT": "the job hit its time limit before finishing; the workers saved what they could",
    "OUT_OF_MEMORY": "a task ran out of memory (raise --mem)",
    "PREEMPTED": "the job was preempted",
    "CANCELLED": "the job was cancelled",
    "DEADLINE": "the job reached its deadline",
}
# torch's launchers prefix a rank's lines ("[rank1]: Traceback ..."), and so may srun (--label).
_TRACEBACK = re.compile(r"^(?:\[[^\]]*\]:?\s*|\d+:\s*)?Traceback \(most recent call last\)")
_ERROR_LINE = re.compile(r"^(?:\[[^\]]*\]:?\s*|\d+:\s*)?(error: |watchdog: |[A-Za-z_.]*(Error|Exception|Timeout)\b)")
# The trainer's own log lines (ddp.reporting.LOG_FORMAT): an error is logged in one line, its traceback
# goes to RUN_DIR/logs/rank_N.log.
# srun on a task that died: "srun: error: n2: task 1: Killed" (or "Exited with exit code 1").
_TASK_DIED = re.compile(r"srun: error: \S+: tasks? [\d,-]+: (Killed|Exited with exit code|Terminated)")
_LOGGED_ERROR = re.compile(r"^\d\d:\d\d:\d\d \[rank \d+\] (?:ERROR|CRITICAL) ")
# What a task prints last when it fails (launcher/slurm/task.py): on ranks other than 0 the log
# line above goes to the rank's log file only, so this is the error's one line in the task's stderr.
TASK_FAILED = "launch: task failed: "


def checked_jobs(run_dir: RunDir) -> list[tuple[dict, dict, str | None]]:
    """(the run's job record, SLURM's view of it, why it is not this run's job or None), newest first."""
    jobs = read_jobs(run_dir)
    if not jobs:
        raise SlurmError(f"{run_dir.path} has no SLURM job (no slurm.json); it was not launched with "
                         "`launch slurm`; `launch ls` lists local runs too")
    require_commands("scontrol")
    cluster = cluster_name()
    out = []
    for job in reversed(jobs):
        view = scheduler_view(job["job_id"])
        out.append((job, view, not_ours(job, view, cluster) if view else None))
    return out


def first_error(folder: Path, job_id: str, lines: int = 8) -> tuple[Path, list[str]] | None:
    """The root cause in the tasks' logs: srun's word on a task killed by a signal (it names the node), else
    the first error that is not a lost peer's, lowest rank first, else any error, else srun's exit codes."""
    def rank_of(path: Path) -> int:
        parts = path.name[len(job_id) + 1:].split("_")
        return int(parts[0]) if parts and parts[0].isdigit() else 0

    found = []
    for path in sorted(folder.glob(f"{job_id}_*_log.err"), key=rank_of):
        text = path.read_text(errors="replace").splitlines()
        died = [line for line in text if _TASK_DIED.search(line)]
        killed = [line for line in died if "Exited with exit code" not in line]
        if killed:  # a task that died by a signal: its own log could not say so
            found.append((0, rank_of(path), path, killed[-lines:]))
            continue
        if died:
            found.append((3, rank_of(path), path, died[-lines:]))
        marks = [i for i, line in enumerate(text)
                 if _TRACEBACK.match(line) or _ERROR_LINE.match(line) or _LOGGED_ERROR.match(line)
                 or line.startswith(TASK_FAILED)]
        if marks:
            tail = [line for line in text[marks[0]:] if line.strip()][-lines:]
            found.append((2 if is_consequence(" ".join(tail)) else 1, rank_of(path), path, tail))
    if not found:
        return None
    _, _, path, tail = min(found, key=lambda item: item[:2])
    return path, tail


def status_text(run_dir: RunDir) -> str:
    checked = checked_jobs(run_dir)
    job, view, foreign = checked[0]
    job_id = job["job_id"]
    events = [event for event in read_jsonl(run_dir.slurm_events) if str(event.get("job_id")) == job_id]
    state = None if foreign else view.get("JobState")
    lines = [f"run directory  {run_dir.path}"]
    if foreign:
        lines.append(f"job            {job_id}: not this run's any more ({foreign}); the run's last record: "
                     f"{events[-1]['event'] if events else 'none'}")
    elif state is None:
        last = events[-1]["event"] if events else "no record"
        lines.append(f"job            {job_id}: SLURM no longer knows it; the run's last record: {last}")
    else:
        where = f" on {view['NodeList']}" if view.get("NodeList") not in (None, "", "(null)") else ""
        limit = f" of {view['TimeLimit']}" if view.get("TimeLimit") else ""
        ran = f" for {view['RunTime']}{limit}" if view.get("RunTime") else ""
        reason = f" (reason: {view['Reason']})" if view.get("Reason") not in (None, "", "None") else ""
        lines.append(f"job            {job_id}: {state}{where}{ran}{reason}")
        if state in EXPLAIN:
            exit_code = f", exit code {view['ExitCode']}" if view.get("ExitCode") else ""
            lines.append(f"               {EXPLAIN[state]}{exit_code}")
    restarts = None if foreign else view.get("Restarts")
    if restarts is None:
        restarts = str(max((event.get("restart", 0) for event in events), default=0))
    lines.append(f"requeues       {restarts} (at most {job.get('max_requeues', '?')})")
    stops = [event for event in events if event["event"] in ("requeued", "stopped", "refused", "failed")]
    if stops:
        event = stops[-1]
        keys = ("step", "signal", "state", "reason", "error")
        what = ", ".join(f"{key} {event[key]}" for key in keys if key in event)
        lines.append(f"last stop      {event['event']}" + (f" ({what})" if what else ""))
    lines += progress_lines(run_dir)
    folder = Path(job.get("folder") or run_dir.slurm_folder)
    lines.append(f"task logs      {folder}/{job_id}_RANK_log.out|err, {run_dir.logs}/rank_RANK.log")
    if state in EXPLAIN and state != "CANCELLED" or (events and events[-1]["event"] == "failed"):
        tail = first_error(folder, job_id)
        if tail is not None:
            lines.append(f"first error    {tail[0]}:")
            lines.extend(f"    {line}" for line in tail[1])
    if len(checked) > 1:
        earlier = ", ".join(f"{j['job_id']}" for j, _, _ in checked[1:6])
        lines.append(f"earlier jobs   {earlier}")
    return "\n".join(lines)


def progress_lines(run_dir: RunDir) -> list[str]:
    """Where training stands, from state.json and the checkpoints (shared with local runs' status)."""
    from launcher.listing import progress_summary

    return [f"progress       {progress_summary(run_dir)}"]


def active_jobs(run_dir: RunDir) -> list[tuple[str, str]]:
    """(job id, state) of the run's jobs that SLURM still runs or will run, and that are this run's."""
    found = []
    for job, view, foreign in checked_jobs(run_dir):
        state = view.get("JobState", "")
        if state in ACTIVE and foreign is None:
            found.append((job["job_id"], state))
    return found


def cancel(run_dir: RunDir) -> str:
    import subprocess

    require_commands("scontrol", "scancel")
    checked = checked_jobs(run_dir)
    foreign = [(job["job_id"], why) for job, view, why in checked if why and view.get("JobState") in ACTIVE]
    active = [(job["job_id"], view["JobState"]) for job, view, why in checked
              if why is None and view.get("JobState") in ACTIVE]
    lines = [f"not cancelling job {job_id}: {why}" for job_id, why in foreign]
    if not active:
        return "\n".join(lines + [f"nothing to cancel: no job of {run_dir.path} is pending or running"])
    for job_id, state in active:
        result = subprocess.run(["scancel", job_id], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise SlurmError(f"scancel {job_id} failed: {result.stderr.strip() or result.stdout.strip()}")
        lines.append(f"cancelled job {job_id} (was {state})")
    lines.append("running workers save a checkpoint as they stop; `launch resume RUN_DIR` continues the run")
    return "\n".join(lines)
