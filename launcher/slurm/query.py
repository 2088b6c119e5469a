"""Asking SLURM about a job, and making sure a job id still belongs to the run that recorded it.

Job ids are not forever: a controller whose state was reset starts again at 1,
ids wrap around, and a run directory on storage shared by two clusters may be
read from the other one. Before ``launch status`` reports a job or ``launch
cancel`` cancels it, the job SLURM knows by that id must match what the run
recorded: the cluster, the folder of its logs, and the time it was submitted.
Torch-free.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

from ddp.layout import RunDir


# A value runs to the next " Key=": paths (StdOut, Command, WorkDir) and job names may hold spaces.
class SlurmError(RuntimeError):
    """SLURM is missing, refused a request or reports a failure; the message includes what SLURM said."""


def require_commands(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise SlurmError(f"SLURM's {', '.join(missing)} not found on PATH: run this on a SLURM login node "
                         "(or add SLURM's bin directory to PATH)")


def cluster_name() -> str | None:
    try:
        result = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ClusterName":
            return value.strip()
    return None


def read_jobs(run_dir: RunDir) -> list[dict]:
    try:
        return json.loads(run_dir.slurm_record.read_text()).get("jobs", [])
    except (OSError, ValueError, AttributeError):
        return []


_FIELD = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|\s*$)", re.DOTALL)
SUBMIT_TOLERANCE_S = 300  # clocks of the login node and the controller may differ a little


def parse_scontrol(text: str) -> dict[str, str]:
    """``scontrol show job -o`` output -> {"JobState": "RUNNING", ...}; the first of each key wins."""
    fields: dict[str, str] = {}
    for key, value in _FIELD.findall(text):
        fields.setdefault(key, value)
    return fields


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def scheduler_view(job_id: str) -> dict[str, str]:
    """What SLURM says about the job: JobState, Reason, Restarts, StdOut, ... ({} if it no longer knows it)."""
    try:
        result = _run(["scontrol", "show", "job", "-o", job_id])
    except (OSError, subprocess.SubprocessError):
        return {}
    if result.returncode == 0 and result.stdout.strip():
        return parse_scontrol(result.stdout)
    try:  # finished long ago: accounting, where the cluster keeps it
        result = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode,Elapsed,NodeList,Submit"])
    except (OSError, subprocess.SubprocessError):
        return {}
    line = result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else ""
    if not line:
        return {}
    state, exit_code, elapsed, nodes, submit = (line.split("|") + ["", "", "", "", ""])[:5]
    return {"JobState": state.split()[0], "ExitCode": exit_code, "RunTime": elapsed, "NodeList": nodes,
            "SubmitTime": submit, "source": "sacct"}


def submit_time(view: dict[str, str]) -> float | None:
    text = view.get("SubmitTime", "")
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def not_ours(job: dict, view: dict[str, str], cluster: str | None) -> str | None:
    """Why the job SLURM holds under ``job["job_id"]`` is not the one the run recorded, or None if it is."""
    if job.get("cluster") and cluster and job["cluster"] != cluster:
        return f"the run's job {job['job_id']} was submitted to cluster {job['cluster']}, not {cluster}"
    out = view.get("StdOut")
    folder = job.get("folder")
    if out and folder and not out.startswith(folder.rstrip("/") + "/"):
        return f"job {job['job_id']} writes its logs to {out}, not to the run's {folder}"
    submitted, recorded = submit_time(view), job.get("submitted")
    if submitted is not None and isinstance(recorded, (int, float)) and abs(submitted - recorded) > SUBMIT_TOLERANCE_S:
        return (f"job {job['job_id']} was submitted at {view.get('SubmitTime')}, the run's at "
                f"{job.get('submitted_text', recorded)}")
    return None
