"""``launch slurm``: one SLURM job per run, submitted through submitit, one task per worker.

Three steps, as for ``launch local``:

- ``plan_slurm`` is pure: the validated config and the command line become a
  ``SlurmPlan`` (nodes, tasks per node, sbatch options). Nothing is touched.
- ``render_sbatch`` is pure: the exact script submitit will hand to ``sbatch``,
  made by submitit's own ``_make_sbatch_string`` from the plan's parameters.
  The dry run prints it; tests read it as text.
- ``submit`` submits the plan with submitit's ``SlurmExecutor`` (the same
  parameters, so the same script) and records the job in ``RUN_DIR/slurm.json``.

Each task runs ``launcher.slurm_entry.SlurmTraining`` (see there for what
happens on the time-limit warning, preemption and requeue). submitit's files
(the script, the pickled callable, each task's stdout/stderr) live in
``RUN_DIR/slurm/``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ddp.config import Config
from launcher.errors import LaunchError

SIGNAL = "USR2"  # what ddp.signals turns into a checkpoint; not USR1, which NCCL may use

# sbatch options with a dedicated command-line flag and config key: --sbatch may not set them.
DEDICATED = {name: f"--{name.replace('_', '-')}" for name in
             ("partition", "time", "account", "qos", "constraint", "exclude", "cpus_per_task", "mem", "job_name")}
# sbatch options the launcher sets itself: changing them would break the one-task-per-worker
# layout, the log paths or the warning signal the workers checkpoint on.
RESERVED = {"nodes", "ntasks", "ntasks-per-node", "gpus-per-node", "output", "error", "open-mode", "signal",
            "array", "requeue", "no-requeue", "wrap"}
_OPTION_NAME = re.compile(r"[a-z][a-z0-9-]*")


class SlurmError(RuntimeError):
    """SLURM is missing, refused a request or reports a failure; the message includes what SLURM said."""


@dataclass(frozen=True)
class SlurmPlan:
    run_dir: Path  # absolute: the tasks may start in another working directory
    nodes: int
    tasks_per_node: int  # one task per worker: GPUs per node, or CPU workers per node
    device: str  # "cuda" or "cpu"
    gpus_per_node: int | None
    options: dict = field(default_factory=dict)  # partition, time, ... as submitit names them; None = unset
    additional: dict = field(default_factory=dict)  # any other sbatch option, name -> value (True: a flag)
    signal_delay_s: int = 120
    max_requeues: int = 3
    python: str = "python3"  # the interpreter the tasks run, as a path
    # OMP_NUM_THREADS of each task: the CPUs SLURM gives it (--cpus-per-task, default 1), unless the
    # submitting shell sets OMP_NUM_THREADS. Without it torch takes every core of the node, and
    # tasks sharing a node fight over them (and compute in another order than `launch local`).
    threads_per_task: int = 1

    @property
    def folder(self) -> Path:
        """submitit's folder: the script, the pickled callable, each task's stdout and stderr."""
        return self.run_dir / "slurm"

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def command(self) -> str:
        """What each task runs (submitit's own bootstrap), as submitit spells it."""
        return f"{shlex.quote(self.python)} -u -m submitit.core._submit {shlex.quote(str(self.folder))}"

    def parameters(self) -> dict:
        """submitit's ``SlurmExecutor.update_parameters`` arguments (the names of ``_make_sbatch_string``)."""
        setup = [f"export OMP_NUM_THREADS={self.threads_per_task}"]
        if self.device == "cpu":
            setup.append("export CUDA_VISIBLE_DEVICES=")  # --cpu means CPU, even on a node with GPUs
        return {
            "nodes": self.nodes,
            "ntasks_per_node": self.tasks_per_node,
            "gpus_per_node": self.gpus_per_node,
            **self.options,
            "wckey": None,  # submitit's default "submitit" means nothing to our users' accounting
            "signal_delay_s": self.signal_delay_s,
            "setup": setup,
            # The job must be requeueable for SLURM to accept `scontrol requeue`; the signal is set
            # here, not from submitit's SUBMITIT_PREEMPT_SIGNAL, so the script never depends on it.
            "additional_parameters": {"requeue": True, "signal": f"{SIGNAL}@{self.signal_delay_s}",
                                      **self.additional},
        }

    def log_paths(self, job_id: str) -> list[tuple[int, Path, Path]]:
        """(rank, stdout, stderr) of each task, as submitit names them."""
        return [(rank, self.folder / f"{job_id}_{rank}_log.out", self.folder / f"{job_id}_{rank}_log.err")
                for rank in range(self.world_size)]

    def describe(self) -> str:
        resources = f"{self.gpus_per_node} GPU(s)" if self.device == "cuda" else "CPU"
        lines = [
            f"world size     {self.world_size} ({self.nodes} node(s) x {self.tasks_per_node} task(s), {resources})",
            f"threads        {self.threads_per_task} per task (OMP_NUM_THREADS)",
            f"rendezvous     first host of the job's node list, port derived from the job id",
            f"on USR2        checkpoint and requeue (signal {self.signal_delay_s} s before the time limit; "
            f"at most {self.max_requeues} requeue(s))",
            f"run directory  {self.run_dir}",
            f"task logs      {self.folder}/JOBID_RANK_log.out|err and {self.run_dir}/logs/rank_RANK.log",
        ]
        return "\n".join(lines)

    def record(self) -> dict:
        """For launch.json: how the run was launched."""
        return {"mode": "slurm", "nodes": self.nodes, "tasks_per_node": self.tasks_per_node, "device": self.device,
                "gpus_per_node": self.gpus_per_node, "options": self.options, "additional": self.additional,
                "signal_delay_s": self.signal_delay_s, "max_requeues": self.max_requeues,
                "threads_per_task": self.threads_per_task, "run_dir": str(self.run_dir)}


def plan_slurm(config: Config, *, nodes: int, gpus_per_node: int | None, cpu: bool, nproc_per_node: int | None,
               run_dir: Path, python: str, env_threads: str | None = None) -> SlurmPlan:
    """Check the request and decide the job's shape. Starts nothing, touches nothing.

    Scheduler options come from ``config.slurm`` (the command line has already been
    merged into it, so it wins over the config file). ``env_threads`` is the submitting
    shell's ``OMP_NUM_THREADS``, which wins over ``--cpus-per-task``.
    """
    if cpu and gpus_per_node is not None:
        raise LaunchError("--cpu and --gpus-per-node exclude each other: pick one")
    if not cpu and gpus_per_node is None:
        raise LaunchError("say what each node runs: --gpus-per-node G (one worker per GPU) or "
                          "--cpu --nproc-per-node P (P CPU workers per node)")
    if nproc_per_node is not None and not cpu:
        raise LaunchError("--nproc-per-node is for --cpu; on GPUs one worker runs per GPU (--gpus-per-node)")
    tasks = gpus_per_node if not cpu else (nproc_per_node if nproc_per_node is not None else 1)
    for flag, value in (("--nodes", nodes), ("--gpus-per-node" if not cpu else "--nproc-per-node", tasks)):
        if value < 1:
            raise LaunchError(f"{flag} must be at least 1, got {value}")
    if cpu and config.train.device == "cuda":
        raise LaunchError("train.device=cuda but the job runs on the CPU (--cpu); drop --cpu or set train.device=auto")
    if not cpu and config.train.device == "cpu":
        raise LaunchError("train.device=cpu but the job asks for GPUs (--gpus-per-node); use --cpu --nproc-per-node P")
    slurm = config.slurm
    if slurm.cpus_per_task is not None and slurm.cpus_per_task < 1:
        raise LaunchError(f"--cpus-per-task (slurm.cpus_per_task) must be at least 1, got {slurm.cpus_per_task}")
    if slurm.signal_delay_s < 0:
        raise LaunchError(f"slurm.signal_delay_s must be 0 or more, got {slurm.signal_delay_s}")
    if slurm.max_requeues < 0:
        raise LaunchError(f"slurm.max_requeues must be 0 or more, got {slurm.max_requeues}")
    threads = slurm.cpus_per_task or 1
    if env_threads is not None:
        if not env_threads.strip().isdigit() or int(env_threads) < 1:
            raise LaunchError(f"OMP_NUM_THREADS={env_threads!r} is not a positive whole number; fix or unset it")
        threads = int(env_threads)
    run_dir = Path(run_dir)
    _check_script_safe("the run directory", str(run_dir), percent=True)
    _check_script_safe("the python path", python, percent=False)
    options = {name: getattr(slurm, name) for name in DEDICATED}
    options["job_name"] = options["job_name"] or config.run.name
    for name, value in options.items():
        if value is not None:
            _check_script_safe(DEDICATED[name], str(value), percent=False)
    return SlurmPlan(run_dir=run_dir, nodes=nodes, tasks_per_node=tasks, device="cpu" if cpu else "cuda",
                     gpus_per_node=None if cpu else gpus_per_node, options=options,
                     additional=additional_options(slurm.additional), signal_delay_s=slurm.signal_delay_s,
                     max_requeues=slurm.max_requeues, python=python, threads_per_task=threads)


def additional_options(raw: dict) -> dict:
    """Validate pass-through sbatch options: ``{"mail-type": "END", "exclusive": True}``."""
    options = {}
    for key, value in raw.items():
        name = str(key).strip().lstrip("-").replace("_", "-")
        if not _OPTION_NAME.fullmatch(name):
            raise LaunchError(f"--sbatch {key!r}: not an sbatch option name (e.g. mail-type=END, exclusive)")
        field_name = name.replace("-", "_")
        if field_name in DEDICATED:
            raise LaunchError(f"--sbatch {name}: use {DEDICATED[field_name]} (or slurm.{field_name} in the config) instead")
        if name in RESERVED:
            raise LaunchError(f"--sbatch {name}: the launcher sets this option itself (one task per worker, "
                              "its log paths, the USR2 warning and requeueing); use --nodes, --gpus-per-node or "
                              "--nproc-per-node, slurm.signal_delay_s and slurm.max_requeues")
        if value is False or value is None:
            raise LaunchError(f"--sbatch {name}: give a value, or no value for a flag (--sbatch {name})")
        if value is not True:
            value = str(value)
            _check_script_safe(f"--sbatch {name}", value, percent=False)
        options[name] = value
    return options


def _check_script_safe(what: str, value: str, *, percent: bool) -> None:
    """Refuse what an ``#SBATCH`` line cannot carry. Quoting handles spaces, quotes, ``$(...)`` and backticks.

    A newline would end the ``#SBATCH`` line and turn the rest into a shell command; sbatch
    reads ``%`` in log paths as a pattern (``%j``: the job id), so a run directory with one
    would scatter the logs.
    """
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise LaunchError(f"{what} {value!r} holds a newline or another control character, which an sbatch "
                          "script cannot carry; choose another name")
    if percent and "%" in value:
        raise LaunchError(f"{what} {value!r} holds '%', which sbatch reads as a file name pattern in the log "
                          "paths; choose a run.dir/run.name without it")


def render_sbatch(plan: SlurmPlan) -> str:
    """The sbatch script of the plan, exactly as ``submit`` hands it to sbatch. Pure."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=plan.command(), folder=plan.folder, **plan.parameters())


# -- submitting -----------------------------------------------------------------------------


def require_commands(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise SlurmError(f"SLURM's {', '.join(missing)} not found on PATH: run this on a SLURM login node "
                         "(or add SLURM's bin directory to PATH)")


def submit(plan: SlurmPlan) -> str:
    """Submit the plan through submitit; returns the job id."""
    require_commands("sbatch", "srun")
    from submitit import SlurmExecutor
    from submitit.core.utils import FailedJobError

    from launcher.slurm_entry import SlurmTraining

    executor = SlurmExecutor(folder=plan.folder, max_num_timeout=plan.max_requeues, python=shlex.quote(plan.python))
    executor.update_parameters(**plan.parameters())
    try:
        # submitit also prints sbatch's complaint to stderr; it is in our message, once.
        with contextlib.redirect_stderr(io.StringIO()):
            job = executor.submit(SlurmTraining(str(plan.run_dir), plan.max_requeues))
    except FailedJobError as err:
        said = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise SlurmError(f"sbatch refused the job for {plan.run_dir}: {said or 'no message'}") from None
    return str(job.job_id)


# -- the run directory's record of its jobs ---------------------------------------------------

RECORD = "slurm.json"


def read_jobs(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("jobs", [])


def record_job(plan: SlurmPlan, job_id: str) -> None:
    """Append the job to ``RUN_DIR/slurm.json``, so ``launch status|cancel RUN_DIR`` find it."""
    from launcher.rundir import write_text_atomic

    jobs = read_jobs(plan.run_dir)
    jobs.append({"job_id": job_id, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "nodes": plan.nodes,
                 "tasks_per_node": plan.tasks_per_node, "max_requeues": plan.max_requeues,
                 "folder": str(plan.folder)})
    write_text_atomic(plan.run_dir / RECORD, json.dumps({"jobs": jobs}, indent=2) + "\n")


def describe_submission(plan: SlurmPlan, job_id: str) -> str:
    lines = [f"submitted job {job_id}: {plan.world_size} task(s) on {plan.nodes} node(s)",
             f"  run directory  {plan.run_dir}",
             f"  task logs      {plan.folder}/{job_id}_RANK_log.out|err (RANK 0..{plan.world_size - 1}), "
             f"{plan.run_dir}/logs/rank_RANK.log",
             f"  follow         launch status {shlex.quote(str(plan.run_dir))}"]
    return "\n".join(lines)
