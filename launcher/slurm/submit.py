"""Submitting a ``SlurmPlan`` through submitit, and keeping the run's record of its jobs.

``LaunchExecutor`` is submitit's ``SlurmExecutor`` with our sbatch template
(its submission-file hook returns ``render_sbatch(plan)``) and our task entry
(``launcher.slurm.task``, which runs submitit's own job processing). A sweep
is one array job (submitit's ``batch()``), each element training in its own
run directory.

Each job id is recorded in the run's ``slurm.json`` with what identifies it
(the cluster's name, the submit time, the folder of its logs), so that
``launch status`` and ``launch cancel`` can check that a job id still belongs
to this run before they act on it.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import subprocess
import time
import uuid
from pathlib import Path

from submitit import SlurmExecutor
from submitit.core.utils import DelayedSubmission, FailedJobError, JobPaths

from ddp.layout import RunDir
from launcher.runs import write_text_atomic
from launcher.slurm.plan import SlurmPlan
from launcher.slurm.query import SlurmError, read_jobs, require_commands
from launcher.slurm.render import render_sbatch, task_command
from launcher.slurm.task import SlurmTask


class LaunchExecutor(SlurmExecutor):
    """submitit's SLURM executor, rendering our template for its submissions (single jobs and arrays)."""

    def __init__(self, plan: SlurmPlan):
        super().__init__(folder=plan.folder, max_num_timeout=plan.max_requeues, python=shlex.quote(plan.python))
        self.update_parameters(nodes=plan.max_nodes, ntasks_per_node=plan.tasks_per_node)  # for its job objects
        self.plan = plan

    @property
    def _submitit_command_str(self) -> str:
        return shlex.join(task_command(self.plan))

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        return render_sbatch(self.plan)

    def _internal_process_submissions(self, delayed_submissions: list[DelayedSubmission]):
        if len(delayed_submissions) == 1:
            return super()._internal_process_submissions(delayed_submissions)
        # An array: as submitit does it, with this executor (so this template) for the submission.
        folder = JobPaths.get_first_id_independent_folder(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        pickles = []
        for delayed in delayed_submissions:
            path = folder / f"{uuid.uuid4().hex}.pkl"
            delayed.set_timeout(60, self.max_num_timeout)
            delayed.dump(path)
            pickles.append(path)
        first = self._submit_command(self._submitit_command_str)
        jobs = [self.job_class(folder=self.folder, job_id=f"{first.job_id}_{index}", tasks=list(range(first.num_tasks)))
                for index in range(len(delayed_submissions))]
        for job, path in zip(jobs, pickles):
            job.paths.move_temporary_file(path, "submitted_pickle")
        return jobs


def test_only(plan: SlurmPlan) -> None:
    """``sbatch --test-only``: SLURM says now if it would refuse the job or never run it (too many nodes,
    an unknown partition, a time beyond the partition's limit)."""
    script = plan.folder / f".test-only-{uuid.uuid4().hex}.sh"
    plan.folder.mkdir(parents=True, exist_ok=True)
    try:
        script.write_text(render_sbatch(plan))
        result = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return  # a slow controller: the real submission will say
    finally:
        script.unlink(missing_ok=True)
    said = " ".join(line.strip() for line in (result.stderr + result.stdout).splitlines()
                    if line.strip() and "to start at" not in line)
    if result.returncode != 0:
        raise SlurmError(f"sbatch refused the job for {plan.elements[0].run_dir}: {said or 'no message'}")


def submit(plan: SlurmPlan) -> list[str]:
    """Submit the plan; returns each element's job id (``ARRAYID_INDEX`` in an array)."""
    require_commands("sbatch", "srun", "scontrol")
    test_only(plan)
    executor = LaunchExecutor(plan)
    calls = [SlurmTask(str(element.run_dir), plan.max_requeues, plan.script_signal, index)
             for index, element in enumerate(plan.elements)]
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's complaint too: it is in ours
            if plan.array:
                with executor.batch():
                    jobs = [executor.submit(call) for call in calls]
            else:
                jobs = [executor.submit(calls[0])]
    except FailedJobError as err:
        said = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise SlurmError(f"sbatch refused the job for {plan.elements[0].run_dir}: {said or 'no message'}") from None
    return [str(job.job_id) for job in jobs]


# -- the run directory's record of its jobs ---------------------------------------------------------


def record_job(run_dir: RunDir, plan: SlurmPlan, job_id: str, cluster: str | None, submitted: float) -> dict:
    """Append the job to ``RUN_DIR/slurm.json``, with what identifies it as this run's."""
    job = {"job_id": job_id, "cluster": cluster, "submitted": submitted,
           "submitted_text": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(submitted)),
           "folder": str(plan.folder), "run_dir": str(run_dir.path), "nodes": plan.nodes,
           "tasks_per_node": plan.tasks_per_node, "max_requeues": plan.max_requeues}
    jobs = read_jobs(run_dir) + [job]
    write_text_atomic(run_dir.slurm_record, json.dumps({"jobs": jobs}, indent=2) + "\n")
    return job


def describe_submission(plan: SlurmPlan, job_ids: list[str], resuming: list[bool]) -> str:
    lines = []
    for element, job_id, resumes in zip(plan.elements, job_ids, resuming):
        world = f"up to {plan.max_world_size}" if "-" in plan.nodes else str(plan.max_world_size)
        lines += [f"submitted job {job_id}: {world} task(s) on {plan.nodes} node(s)"
                  + (" (resumes from the run's last checkpoint)" if resumes else ""),
                  f"  run directory  {element.run_dir}"]
    stem = "%A_%a" if plan.array else job_ids[0]
    followed = plan.elements[0].run_dir if len(plan.elements) == 1 else plan.folder.parent
    lines += [f"  task logs      {plan.folder}/{stem}_RANK_log.out|err, RUN_DIR/logs/rank_RANK.log",
              f"  follow         launch status {shlex.quote(str(followed))}"]
    return "\n".join(lines)


def remove_submission_files(plan: SlurmPlan, before: set[Path]) -> None:
    """After a refused submission: the files submitit wrote for it (its script, its pickle)."""
    if plan.folder.is_dir():
        for path in plan.folder.rglob("*"):
            if path not in before and path.is_file():
                path.unlink(missing_ok=True)


def files_in(folder: Path) -> set[Path]:
    return set(folder.rglob("*")) if folder.is_dir() else set()
