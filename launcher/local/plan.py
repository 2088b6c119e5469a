"""``launch local``, planned: the command line and the machine's facts in, a ``LocalPlan`` out. Starts nothing.

The dry run prints the plan; ``launch resume`` rebuilds it from the run's
record (``LocalPlan.from_record``); ``launcher.local.agent`` carries it out.
Every check of the request (devices, counts, the rendezvous) is made here.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from launcher.errors import LaunchError
from launcher.ports import free_port, interface_of, is_loopback, local_address_towards, parse_endpoint
from launcher.runs import python_module_command

WORKERS_PER_CORE_WARNING = 4  # more CPU workers than this many per core: warned about in the plan
# CPU workers are pinned to their share of the cores only when it leaves room for their helpers (loader
# processes, gloo's threads): one core each (2 workers on 2 cores) made the tiny MLP's step ~20% slower
# and the CNN's no faster (docs/performance.md). GPU workers are pinned near their GPU.
MIN_CORES_TO_PIN = 2


@dataclass(frozen=True)
class Entry:
    """What each worker runs: the config worker on a run directory, a script, or a module (``-m``)."""

    kind: str  # "config", "script" or "module"
    target: str  # the run directory, the script's absolute path, or the module's name
    args: tuple[str, ...] = ()
    source: tuple[str, ...] = ()  # a config run: the config file and its overrides (for a torchrun line)

    def argv(self) -> list[str]:
        """The worker's command line (through our wrapper, which adds no-orphan, logs and the root cause)."""
        if self.kind == "config":
            return python_module_command("launcher.worker", self.target)
        flag = ["-m"] if self.kind == "module" else []
        return python_module_command("launcher.script_worker", *flag, self.target, *self.args)

    def plain_argv(self) -> list[str]:
        """What torchrun would be given to run the same thing by hand."""
        if self.kind == "config":
            return ["-m", "launcher.worker", *(("--config", *self.source) if self.source else (self.target,))]
        return ["-m", self.target, *self.args] if self.kind == "module" else [self.target, *self.args]


@dataclass(frozen=True)
class Request:
    """What ``launch local`` (or ``launch resume``) was asked, as parsed from the command line."""

    gpus: int | None = None
    cpu: bool = False
    nproc: int | None = None
    nnodes: str = "1"  # N or MIN:MAX
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    max_restarts: int | None = None
    tuning: bool = True


@dataclass(frozen=True)
class Machine:
    """The facts of this machine that a plan depends on (passed in, so planning stays pure)."""

    visible_gpus: int
    cores: int
    env_threads: str | None = None  # the user's OMP_NUM_THREADS
    user_environment: dict = field(default_factory=dict)  # variables a user set, which win over ours


@dataclass(frozen=True)
class LocalPlan:
    run_dir: Path
    entry: Entry
    nproc_per_node: int
    min_nodes: int
    max_nodes: int
    node_rank: int | None  # None: assigned by the rendezvous (elastic)
    rdzv_endpoint: str  # HOST:PORT
    rdzv_id: str
    device: str  # "cuda" or "cpu"
    backend: str  # "nccl" or "gloo"
    max_restarts: int
    bind_host: str  # the address stores listen on: loopback on one node
    environment: dict = field(default_factory=dict)  # variables the workers get on top of launch's
    warnings: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.max_nodes

    @property
    def elastic(self) -> bool:
        return self.min_nodes != self.max_nodes

    @property
    def single_node(self) -> bool:
        return self.max_nodes == 1

    def torchrun_command(self) -> list[str]:
        """The equivalent command line, to run by hand with torchrun (works when pasted)."""
        nodes = str(self.max_nodes) if not self.elastic else f"{self.min_nodes}:{self.max_nodes}"
        command = ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={self.nproc_per_node}"]
        if self.single_node:
            command.append("--standalone")
        else:
            if self.node_rank is not None:
                command.append(f"--node-rank={self.node_rank}")
            command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}", f"--rdzv-id={self.rdzv_id}"]
        command.append(f"--max-restarts={self.max_restarts}")
        return command + self.entry.plain_argv()

    def describe(self) -> str:
        nodes = f"{self.min_nodes}..{self.max_nodes} node(s), elastic" if self.elastic else f"{self.max_nodes} node(s)"
        environment = " ".join(f"{key}={value}" for key, value in sorted(self.environment.items())
                               if key not in ("LAUNCH_RUN_DIR",))
        lines = [
            f"world size     {self.world_size} ({nodes} x {self.nproc_per_node} worker(s))",
            f"device         {self.device}, backend {self.backend}",
            f"rendezvous     {self.rdzv_endpoint} (c10d, id {self.rdzv_id}); stores listen on {self.bind_host} only",
            f"max restarts   {self.max_restarts}",
            f"environment    {environment or '(as launch has it)'}",
            f"run directory  {self.run_dir}",
            f"runs           {shlex.join(self.entry.plain_argv())}",
            f"torchrun       {shlex.join(self.torchrun_prefix() + self.torchrun_command())}",
        ]
        return "\n".join(lines + [f"warning        {text}" for text in self.warnings])

    def torchrun_prefix(self) -> list[str]:
        return [f"{key}={value}" for key, value in sorted(self.environment.items()) if key != "LAUNCH_RUN_DIR"]

    def record(self) -> dict:
        data = asdict(self)
        data["run_dir"] = str(self.run_dir)
        return data

    @classmethod
    def from_record(cls, data: dict) -> LocalPlan:
        data = dict(data)
        data["run_dir"] = Path(data["run_dir"])
        data["entry"] = Entry(**{**data["entry"], "args": tuple(data["entry"].get("args", ())),
                                 "source": tuple(data["entry"].get("source", ()))})
        data["warnings"] = tuple(data.get("warnings", ()))
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in fields})


def parse_nnodes(text: str) -> tuple[int, int]:
    """``"2"`` -> (2, 2); ``"1:4"`` -> (1, 4), as torchrun's ``--nnodes``."""
    low, sep, high = str(text).partition(":")
    try:
        nodes = (int(low), int(high)) if sep else (int(low), int(low))
    except ValueError:
        raise LaunchError(f"--nnodes must be N or MIN:MAX, got {text!r}") from None
    if nodes[0] < 1 or nodes[1] < nodes[0]:
        raise LaunchError(f"--nnodes must be N >= 1, or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return nodes


def plan_local(request: Request, machine: Machine, *, run_dir: Path, entry: Entry, config_device: str = "auto",
               port: int | None = None) -> LocalPlan:
    """Check the request against the machine and decide how to launch. Starts nothing."""
    if request.cpu and request.gpus is not None:
        raise LaunchError("--cpu and --gpus exclude each other: pick one")
    if request.cpu or (request.gpus is None and machine.visible_gpus == 0):
        workers, device = (request.nproc if request.nproc is not None else 1), "cpu"
    else:
        if request.nproc is not None and request.gpus is not None and request.nproc != request.gpus:
            raise LaunchError("--nproc and --gpus disagree; on GPUs one worker runs per GPU, give only --gpus")
        workers = request.gpus if request.gpus is not None else (request.nproc or machine.visible_gpus)
        if machine.visible_gpus == 0:
            raise LaunchError(f"--gpus {workers} asked for GPUs but this machine has none; "
                              "use --cpu --nproc N to run N workers on the CPU")
        if workers > machine.visible_gpus:
            raise LaunchError(f"--gpus {workers} is more than the {machine.visible_gpus} GPU(s) this machine has; "
                              f"use --gpus {machine.visible_gpus} or fewer (or --cpu --nproc N)")
        device = "cuda"
    if workers < 1:
        raise LaunchError(f"the number of workers must be at least 1, got {workers}")
    if device == "cpu" and config_device == "cuda":
        raise LaunchError("train.device=cuda but the launch runs on the CPU; drop --cpu or set train.device=auto")
    min_nodes, max_nodes = parse_nnodes(request.nnodes)
    if request.node_rank is not None and not 0 <= request.node_rank < max_nodes:
        raise LaunchError(f"--node-rank must be in 0..{max_nodes - 1}, got {request.node_rank}")
    if max_nodes > 1:
        if not request.rdzv_endpoint:
            raise LaunchError("several nodes need --rdzv-endpoint HOST:PORT (the same on every node, a host all "
                              "nodes can reach), as with torchrun")
        host, rdzv_port = parse_endpoint(request.rdzv_endpoint)
        endpoint = request.rdzv_endpoint
        bind_host = "127.0.0.1" if is_loopback(host) else local_address_towards(host, rdzv_port)
    else:
        if request.rdzv_endpoint:
            host, _ = parse_endpoint(request.rdzv_endpoint)
            if not is_loopback(host):
                raise LaunchError(f"--rdzv-endpoint {request.rdzv_endpoint}: a run on one node listens on the "
                                  "loopback interface only; give 127.0.0.1:PORT, or --nnodes for several nodes")
        endpoint = request.rdzv_endpoint or f"127.0.0.1:{port if port is not None else free_port()}"
        bind_host = "127.0.0.1"
    max_restarts = request.max_restarts if request.max_restarts is not None else (3 if min_nodes != max_nodes else 0)
    if max_restarts < 0:
        raise LaunchError(f"--max-restarts must be 0 or more, got {max_restarts}")
    warnings = []
    if device == "cpu" and machine.cores and workers > WORKERS_PER_CORE_WARNING * machine.cores:
        warnings.append(f"{workers} CPU workers on {machine.cores} core(s): each gets a sliver of a core and the "
                        f"start-up alone (a Python and torch each) takes long; {machine.cores} to "
                        f"{2 * machine.cores} is usual")
    environment = _worker_environment(request, machine, workers, device, bind_host, run_dir)
    return LocalPlan(run_dir=run_dir, entry=entry, nproc_per_node=workers, min_nodes=min_nodes,
                     max_nodes=max_nodes, node_rank=request.node_rank, rdzv_endpoint=endpoint,
                     rdzv_id=f"launch-{run_dir.name}-{uuid.uuid5(uuid.NAMESPACE_URL, str(run_dir)).hex[:8]}",
                     device=device, backend="nccl" if device == "cuda" else "gloo", max_restarts=max_restarts,
                     bind_host=bind_host, environment=environment, warnings=tuple(warnings))


def _worker_environment(request: Request, machine: Machine, workers: int, device: str, bind_host: str,
                        run_dir: Path) -> dict:
    """Variables the workers get; a variable the user set wins (it is left out here)."""
    user = machine.user_environment
    wanted = {"LAUNCH_RUN_DIR": str(run_dir)}
    if request.tuning:
        # glibc's allocator keeps freed memory instead of returning it to the kernel after every step:
        # a small CNN's step faulted ~800 pages in each time without this (see docs/performance.md).
        if sys.platform.startswith("linux"):
            wanted.update(MALLOC_MMAP_THRESHOLD_="16777216", MALLOC_TRIM_THRESHOLD_="268435456")
        if device == "cuda" or (machine.cores and machine.cores // workers >= MIN_CORES_TO_PIN):
            wanted["LAUNCH_CPU_AFFINITY"] = "1"  # each worker (and its loader processes) on its own cores
    # OpenMP threads: the node's cores shared out, so workers do not fight over them (two 2-thread
    # workers on 2 cores run ~5x slower than two 1-thread ones). torchrun sets 1 for any number.
    if machine.env_threads is None and machine.cores:
        wanted["OMP_NUM_THREADS"] = str(max(1, machine.cores // workers))
    # gloo and NCCL open their own sockets besides the stores: on one node, on loopback only.
    interface = interface_of(bind_host)
    if interface:
        wanted["GLOO_SOCKET_IFNAME"] = interface
        if device == "cuda":
            wanted["NCCL_SOCKET_IFNAME"] = interface
    return {key: value for key, value in wanted.items() if key not in user or key == "LAUNCH_RUN_DIR"}


TUNING_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LAUNCH_CPU_AFFINITY")


def machine_facts(visible_gpus: int) -> Machine:
    """This machine, as a plan needs it."""
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use (taskset, SLURM's cgroups)
    except AttributeError:  # macOS has no affinity masks
        cores = os.cpu_count() or 1
    names = ("OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MALLOC_MMAP_THRESHOLD_",
             "MALLOC_TRIM_THRESHOLD_", "LAUNCH_CPU_AFFINITY")
    return Machine(visible_gpus=visible_gpus, cores=cores, env_threads=os.environ.get("OMP_NUM_THREADS"),
                   user_environment={name: os.environ[name] for name in names if name in os.environ})
