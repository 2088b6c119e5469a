"""``launch slurm``, planned: the validated request in, a ``SlurmPlan`` out. Pure: it starts and touches nothing.

One plan is one submission: one job, or one job array whose elements are the
runs of a sweep (each element its own run directory). Every check of the
request is made here: counts, devices, conflicting GPU and CPU options, what
an ``#SBATCH`` line cannot carry, and a warning when the time-limit warning
would come before the job can do anything.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from launcher.errors import LaunchError
from launcher.local.plan import Entry
from launcher.slurm.options import OPTIONS, OptionError, additional_options

WARNING_SIGNAL = "USR2"  # what the workers checkpoint on; not USR1, which NCCL may use


@dataclass(frozen=True)
class Element:
    """One run of the submission: its directory and what each of its tasks runs."""

    run_dir: Path
    entry: Entry


@dataclass(frozen=True)
class SlurmPlan:
    elements: tuple[Element, ...]
    folder: Path  # submitit's folder: the script, the pickles, each task's stdout and stderr
    nodes: str  # "N", or "MIN-MAX" (SLURM gives what it can; the run continues on any world size)
    tasks_per_node: int  # one task per worker: GPUs per node, or CPU workers per node
    device: str  # "cuda" or "cpu"
    gpus_per_node: int | None
    cpus_per_task: int
    threads_per_task: int  # OMP_NUM_THREADS of each task
    options: dict = field(default_factory=dict)  # sbatch option -> value, for those set
    additional: dict = field(default_factory=dict)  # any other sbatch option, name -> value (True: a flag)
    signal_delay_s: int = 120
    max_requeues: int = 3
    array: bool = False  # the elements are one array job
    array_parallelism: int | None = None
    script_signal: str = WARNING_SIGNAL  # scripts: the signal a script gets for SLURM's warning
    python: str = "python3"
    warnings: tuple[str, ...] = ()

    @property
    def min_nodes(self) -> int:
        return int(self.nodes.split("-")[0])

    @property
    def max_nodes(self) -> int:
        return int(self.nodes.split("-")[-1])

    @property
    def max_world_size(self) -> int:
        return self.max_nodes * self.tasks_per_node

    @property
    def job_name(self) -> str:
        """``slurm.job_name``, else the run's name (an array job: its sweep folder's), so that each job of a
        sweep submitted one job per run (``for_element``) is named after its own run."""
        if self.options.get("job-name"):
            return self.options["job-name"]
        return self.elements[0].run_dir.name if len(self.elements) == 1 else self.folder.parent.name

    def describe(self) -> str:
        resources = f"{self.gpus_per_node} GPU(s) per node" if self.device == "cuda" else "CPU"
        nodes = f"{self.nodes} node(s)" + (" (as many as SLURM gives)" if "-" in self.nodes else "")
        lines = [
            f"world size     up to {self.max_world_size} ({nodes} x {self.tasks_per_node} task(s), {resources})",
            f"cpus           {self.cpus_per_task} per task (SRUN_CPUS_PER_TASK); "
            f"OMP_NUM_THREADS={self.threads_per_task}",
            "rendezvous     rank 0's node, a port outside the ephemeral range chosen per job",
            f"on {WARNING_SIGNAL}        checkpoint and requeue ({WARNING_SIGNAL} {self.signal_delay_s} s before "
            f"the time limit; at most {self.max_requeues} requeue(s))",
            f"submission     {'one array job of ' + str(len(self.elements)) + ' runs' if self.array else 'one job'}"
            + (f", at most {self.array_parallelism} at once" if self.array and self.array_parallelism else ""),
            f"task logs      {self.folder}/JOBID_RANK_log.out|err and RUN_DIR/logs/rank_RANK.log",
        ]
        lines += [f"run directory  {element.run_dir}" for element in self.elements]
        return "\n".join(lines + [f"warning        {text}" for text in self.warnings])

    def record(self) -> dict:
        data = dataclasses.asdict(self)
        data["elements"] = [{"run_dir": str(e.run_dir), "entry": dataclasses.asdict(e.entry)} for e in self.elements]
        data["folder"] = str(self.folder)
        return {"mode": "slurm", **data}

    def for_element(self, element: Element) -> SlurmPlan:
        """The plan of one run on its own (a sweep's runs submitted one job each, or a resubmission)."""
        return dataclasses.replace(self, elements=(element,), folder=element.run_dir / "slurm", array=False)

    @classmethod
    def from_record(cls, data: dict) -> SlurmPlan:
        data = {key: value for key, value in data.items() if key in {f.name for f in dataclasses.fields(cls)}}
        data["elements"] = tuple(Element(Path(e["run_dir"]), Entry(**{**e["entry"], "args": tuple(e["entry"]["args"]),
                                                                       "source": tuple(e["entry"].get("source", ()))}))
                                 for e in data["elements"])
        data["folder"] = Path(data["folder"])
        data["warnings"] = tuple(data.get("warnings", ()))
        return cls(**data)


@dataclass(frozen=True)
class Request:
    """What ``launch slurm`` was asked for, beyond the config."""

    nodes: str = "1"  # N or MIN:MAX (MIN-MAX)
    gpus_per_node: int | None = None
    cpu: bool = False
    nproc_per_node: int | None = None
    array: bool = True  # a sweep as one array job
    script_signal: str = WARNING_SIGNAL


def plan_slurm(request: Request, slurm, *, elements: list[Element], folder: Path, python: str,
               config_device: str = "auto", num_workers: int = 0, env_threads: str | None = None) -> SlurmPlan:
    """Check the request and decide the job's shape. ``slurm``: the merged ``SlurmConfig`` (command line wins)."""
    cpu = request.cpu
    if cpu and request.gpus_per_node is not None:
        raise LaunchError("--cpu and --gpus-per-node exclude each other: pick one")
    if not cpu and request.gpus_per_node is None:
        raise LaunchError("say what each node runs: --gpus-per-node G (one worker per GPU) or "
                          "--cpu --nproc-per-node P (P CPU workers per node)")
    if request.nproc_per_node is not None and not cpu:
        raise LaunchError("--nproc-per-node is for --cpu; on GPUs one worker runs per GPU (--gpus-per-node)")
    tasks = request.gpus_per_node if not cpu else (1 if request.nproc_per_node is None else request.nproc_per_node)
    if tasks < 1:
        raise LaunchError(f"{'--nproc-per-node' if cpu else '--gpus-per-node'} must be at least 1, got {tasks}")
    nodes = _parse_nodes(request.nodes)
    if cpu and config_device == "cuda":
        raise LaunchError("train.device=cuda but the job runs on the CPU (--cpu); drop --cpu or set train.device=auto")
    if not cpu and config_device == "cpu":
        raise LaunchError("train.device=cpu but the job asks for GPUs (--gpus-per-node); use --cpu --nproc-per-node P")
    if request.script_signal.upper().removeprefix("SIG") not in ("USR1", "USR2", "TERM", "INT", "HUP"):
        raise LaunchError(f"--script-signal must be one of SIGUSR2, SIGTERM, SIGINT, SIGHUP, SIGUSR1, got "
                          f"{request.script_signal!r}")
    cpus = slurm.cpus_per_task or num_workers + 1  # the trainer and each of its loader processes
    threads = cpus
    if env_threads is not None:
        if not env_threads.strip().isdigit() or int(env_threads) < 1:
            raise LaunchError(f"OMP_NUM_THREADS={env_threads!r} is not a positive whole number; fix or unset it")
        threads = int(env_threads)
    for what, value in [("the run directory", str(e.run_dir)) for e in elements] + [("the python path", python)]:
        _check_script_safe(what, value, percent=what == "the run directory")
    try:
        additional = additional_options(slurm.additional)
    except OptionError as err:
        raise LaunchError(str(err)) from None
    options = {option.sbatch: getattr(slurm, option.name) for option in OPTIONS
               if option.sbatch and option.name != "cpus_per_task" and getattr(slurm, option.name) is not None}
    for name, value in options.items():  # from the command line too, which the config's checks do not see
        _check_script_safe(f"--{name}", str(value), percent=False)
    warnings = []
    limit = parse_time_limit(options.get("time"))
    if options.get("time") is not None and limit is None:
        raise LaunchError(f"--time {options['time']!r} is not a time sbatch reads: MINUTES, MM:SS, HH:MM:SS, "
                          "D-HH, D-HH:MM or D-HH:MM:SS")
    if limit is not None and slurm.signal_delay_s >= limit:
        warnings.append(f"the time-limit warning comes {slurm.signal_delay_s} s before a limit of {limit} s: at the "
                        "very start. Lower slurm.signal_delay_s (--signal-delay) or raise --time")
    return SlurmPlan(elements=tuple(elements), folder=folder, nodes=nodes, tasks_per_node=tasks,
                     device="cpu" if cpu else "cuda", gpus_per_node=None if cpu else request.gpus_per_node,
                     cpus_per_task=cpus, threads_per_task=threads, options=options, additional=additional,
                     signal_delay_s=slurm.signal_delay_s, max_requeues=slurm.max_requeues,
                     array=request.array and len(elements) > 1, array_parallelism=slurm.array_parallelism,
                     script_signal="SIG" + request.script_signal.upper().removeprefix("SIG"), python=python,
                     warnings=tuple(warnings))


def _parse_nodes(text: str) -> str:
    low, sep, high = str(text).replace("-", ":").partition(":")
    try:
        low_n, high_n = int(low), int(high) if sep else int(low)
    except ValueError:
        raise LaunchError(f"--nodes must be N or MIN:MAX, got {text!r}") from None
    if low_n < 1 or high_n < low_n:
        raise LaunchError(f"--nodes must be at least 1 (MIN:MAX with MIN <= MAX), got {text!r}")
    return str(low_n) if low_n == high_n else f"{low_n}-{high_n}"


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time_limit(text: str | None) -> int | None:
    """sbatch's ``--time`` in seconds (MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS); None if unreadable."""
    if text is None or str(text).strip() in ("", "UNLIMITED", "infinite"):
        return None
    match = _TIME.match(str(text).strip())
    if not match:
        return None
    days, first, second, third = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + int(first) * 3600 + int(second or 0) * 60 + int(third or 0)
    if third is not None:  # HH:MM:SS
        return int(first) * 3600 + int(second) * 60 + int(third)
    if second is not None:  # MM:SS
        return int(first) * 60 + int(second)
    return int(first) * 60  # MINUTES


def _check_script_safe(what: str, value: str, *, percent: bool) -> None:
    """Refuse what an sbatch script cannot carry. Quoting handles spaces, quotes, ``$(...)`` and backticks.

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
    if percent and "\\" in value:
        raise LaunchError(f"{what} {value!r} holds a backslash, which sbatch reads as an escape in the log "
                          "paths; choose a run.dir/run.name without it")

