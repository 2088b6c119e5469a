"""``launch status RUN_DIR`` and ``launch cancel RUN_DIR``: a run's SLURM jobs, as SLURM and the run see them.

SLURM's view comes from ``scontrol show job`` (jobs it still holds in memory),
then ``sacct`` (when the cluster keeps accounting). The run's own view comes
from its directory: the job ids (``slurm.json``), what each run of the job did
(``slurm_events.jsonl``, written by rank 0), metrics and checkpoints. No torch
here: status must answer at once.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from launcher.rundir import RunDirError
from launcher.slurm import SlurmError, read_jobs, require_commands

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
_FIELD = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=(\S*)")
_STEP_FILE = re.compile(r"step_(\d{8})\.pt")  # ddp.checkpoint's names (not imported: it needs torch)


def parse_scontrol(text: str) -> dict[str, str]:
    """``scontrol show job -o`` output -> {"JobState": "RUNNING", ...}; the first of each key wins."""
    fields: dict[str, str] = {}
    for key, value in _FIELD.findall(text):
        fields.setdefault(key, value)
    return fields


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def scheduler_view(job_id: str) -> dict[str, str]:
    """What SLURM says about the job: JobState, Reason, Restarts, ... ({} if it no longer knows it)."""
    result = _run(["scontrol", "show", "job", "-o", job_id])
    if result.returncode == 0 and result.stdout.strip():
        return parse_scontrol(result.stdout)
    try:  # finished long ago: accounting, where the cluster keeps it
        result = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode,Elapsed,NodeList"])
    except OSError:
        return {}
    line = result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else ""
    if not line:
        return {}
    state, exit_code, elapsed, nodes = (line.split("|") + ["", "", "", ""])[:4]
    return {"JobState": state.split()[0], "ExitCode": exit_code, "RunTime": elapsed, "NodeList": nodes,
            "source": "sacct"}


def read_events(run_dir: Path) -> list[dict]:
    path = run_dir / "slurm_events.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed task
    return events


def last_step(run_dir: Path) -> tuple[int | None, int | None]:
    """(step, epoch) of the last metrics line."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, None
    step = epoch = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step, epoch = record.get("step", step), record.get("epoch", epoch)
    return step, epoch


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete step checkpoint (with its ``.done`` marker)."""
    folder = run_dir / "checkpoints"
    found = sorted(path for path in folder.glob("step_*.pt")
                   if _STEP_FILE.fullmatch(path.name) and path.with_name(path.name + ".done").is_file())
    return found[-1] if found else None


def _error_tail(run_dir: Path, job_id: str, lines: int = 6) -> tuple[Path, list[str]] | None:
    """The end of the first task log (lowest rank) with a Python traceback: the root cause."""
    for path in sorted((run_dir / "slurm").glob(f"{job_id}_*_log.err"),
                       key=lambda p: int(p.name.split("_")[1]) if p.name.split("_")[1].isdigit() else 0):
        text = path.read_text(errors="replace").splitlines()
        if any(line.startswith("Traceback") for line in text):
            return path, [line for line in text if line.strip()][-lines:]
    return None


def status_text(run_dir: Path) -> str:
    jobs = read_jobs(run_dir)
    if not jobs:
        raise RunDirError(f"{run_dir} has no SLURM job (no slurm.json); it was not launched with `launch slurm`")
    require_commands("scontrol")
    job = jobs[-1]
    job_id = job["job_id"]
    view = scheduler_view(job_id)
    events = [event for event in read_events(run_dir) if str(event.get("job_id")) == job_id]
    state = view.get("JobState")
    lines = [f"run directory  {run_dir}"]
    if state is None:
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
    restarts = view.get("Restarts")
    if restarts is None:
        restarts = str(max((event.get("restart", 0) for event in events), default=0))
    lines.append(f"requeues       {restarts} (at most {job.get('max_requeues', '?')})")
    stops = [event for event in events if event["event"] in ("requeued", "stopped", "refused", "failed")]
    if stops:
        event = stops[-1]
        keys = ("step", "signal", "state", "reason", "error")
        what = ", ".join(f"{key} {event[key]}" for key in keys if key in event)
        lines.append(f"last stop      {event['event']}" + (f" ({what})" if what else ""))
    step, epoch = last_step(run_dir)
    checkpoint = last_checkpoint(run_dir)
    progress = f"step {step}, epoch {epoch}" if step is not None else "no step logged yet"
    lines.append(f"progress       {progress}; last checkpoint "
                 f"{checkpoint.relative_to(run_dir) if checkpoint else 'none yet'}")
    if events and events[-1]["event"] in ("finished", "already_finished"):
        lines.append(f"result         finished at step {events[-1].get('step')}: {run_dir / 'checkpoints' / 'last.pt'}")
    lines.append(f"task logs      {run_dir / 'slurm'}/{job_id}_RANK_log.out|err, {run_dir / 'logs'}/rank_RANK.log")
    if state in EXPLAIN and state != "CANCELLED":
        tail = _error_tail(run_dir, job_id)
        if tail is not None:
            lines.append(f"first error    {tail[0]}:")
            lines.extend(f"    {line}" for line in tail[1])
    return "\n".join(lines)


def active_jobs(run_dir: Path) -> list[tuple[str, str]]:
    """(job id, state) of the run's jobs that SLURM still runs or will run."""
    found = []
    for job in read_jobs(run_dir):
        state = scheduler_view(job["job_id"]).get("JobState", "")
        if state in ACTIVE:
            found.append((job["job_id"], state))
    return found


def cancel(run_dir: Path) -> str:
    if not read_jobs(run_dir):
        raise RunDirError(f"{run_dir} has no SLURM job (no slurm.json); it was not launched with `launch slurm`")
    require_commands("scontrol", "scancel")
    active = active_jobs(run_dir)
    if not active:
        return f"nothing to cancel: no job of {run_dir} is pending or running"
    lines = []
    for job_id, state in active:
        result = _run(["scancel", job_id])
        if result.returncode != 0:
            raise SlurmError(f"scancel {job_id} failed: {result.stderr.strip() or result.stdout.strip()}")
        lines.append(f"cancelled job {job_id} (was {state})")
    lines.append("running workers save a checkpoint as they stop; `launch slurm` with the same config continues "
                 "the run")
    return "\n".join(lines)
