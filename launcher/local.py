"""``launch local``: workers on this machine through torch's elastic launcher (torchrun's engine).

``plan_local`` is pure: it turns the command line and the machine's facts into a
``LocalPlan`` (which the dry run prints). ``run_local`` carries a plan out with
``elastic_launch`` and, when workers fail, reports the first failure as the
root cause: rank, exit code, the worker's own traceback, and its log.

A stop signal to ``launch`` (SIGTERM, or SIGUSR2 as SLURM sends before a time
limit) is forwarded once to the workers, which save a checkpoint at their next
step and exit; ``launch`` then exits with ``EXIT_RESUMABLE`` (75), and running
the same command again resumes. Torch's agent waits for the workers for
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (default 30) before killing them.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from launcher.errors import LaunchError
from launcher.failures import describe_failure, root_cause


@dataclass(frozen=True)
class LocalPlan:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    rdzv_endpoint: str  # HOST:PORT
    device: str  # "cuda" or "cpu"
    backend: str  # "nccl" or "gloo"
    max_restarts: int
    run_dir: Path
    # OMP_NUM_THREADS of each worker: the node's cores shared out, so workers do not fight over
    # them (two 2-thread workers on 2 cores run ~5x slower than two 1-thread ones). None: the
    # user's own OMP_NUM_THREADS stands, or torch's default when the core count is unknown.
    threads_per_worker: int | None = None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def worker_args(self) -> list[str]:
        return ["-m", "launcher.worker", str(self.run_dir)]

    def torchrun_command(self) -> list[str]:
        """The equivalent command line, for users who want to run torchrun by hand."""
        return [
            "torchrun",
            f"--nnodes={self.nnodes}",
            f"--nproc-per-node={self.nproc_per_node}",
            f"--node-rank={self.node_rank}" if self.nnodes > 1 else "--standalone",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.rdzv_endpoint}",
            f"--max-restarts={self.max_restarts}",
            *self.worker_args(),
        ]

    def describe(self) -> str:
        lines = [
            f"world size     {self.world_size} ({self.nnodes} node(s) x {self.nproc_per_node} worker(s))",
            f"device         {self.device}, backend {self.backend}",
            f"rendezvous     {self.rdzv_endpoint} (c10d)",
            f"max restarts   {self.max_restarts}",
            f"threads        {self.threads_per_worker} per worker (OMP_NUM_THREADS)" if self.threads_per_worker
            else "threads        per worker as OMP_NUM_THREADS says (or torch's default)",
            f"run directory  {self.run_dir}",
            f"torchrun       {shlex.join(self.worker_environment_prefix() + self.torchrun_command())}",
        ]
        return "\n".join(lines)

    def worker_environment(self) -> dict[str, str]:
        """Variables the workers get on top of the launcher's environment."""
        return {} if self.threads_per_worker is None else {"OMP_NUM_THREADS": str(self.threads_per_worker)}

    def worker_environment_prefix(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.worker_environment().items()]

    def record(self) -> dict:
        data = asdict(self)
        data["run_dir"] = str(self.run_dir)
        return {"mode": "local", **data}


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, as taskset and SLURM's cgroups set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def plan_local(*, gpus: int | None, cpu: bool, nproc: int | None, nnodes: int, node_rank: int,
               rdzv_endpoint: str | None, max_restarts: int, run_dir: Path, visible_gpus: int,
               port: int | None = None, cpu_count: int | None = None,
               env_threads: str | None = None) -> LocalPlan:
    """Check the request against the machine and decide how to launch. Starts nothing.

    ``cpu_count`` is the cores this process may use; ``env_threads`` the user's
    ``OMP_NUM_THREADS``, which wins over the share computed from ``cpu_count``.
    """
    if cpu and gpus is not None:
        raise LaunchError("--cpu and --gpus exclude each other: pick one")
    if cpu or gpus is None and visible_gpus == 0:
        workers = nproc if nproc is not None else 1
        device = "cpu"
    else:
        if nproc is not None and gpus is not None and nproc != gpus:
            raise LaunchError("--nproc and --gpus disagree; on GPUs one worker runs per GPU, give only --gpus")
        workers = gpus if gpus is not None else (nproc if nproc is not None else visible_gpus)
        if visible_gpus == 0:
            raise LaunchError(f"--gpus {workers} asked for GPUs but this machine has none; "
                              "use --cpu --nproc N to run N workers on the CPU")
        if workers > visible_gpus:
            raise LaunchError(f"--gpus {workers} is more than the {visible_gpus} GPU(s) this machine has; "
                              f"use --gpus {visible_gpus} or fewer (or --cpu --nproc N)")
        device = "cuda"
    if workers < 1:
        raise LaunchError(f"the number of workers must be at least 1, got {workers}")
    if nnodes < 1:
        raise LaunchError(f"--nnodes must be at least 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node-rank must be in 0..{nnodes - 1}, got {node_rank}")
    if nnodes > 1:
        if not rdzv_endpoint:
            raise LaunchError("several nodes need --rdzv-endpoint HOST:PORT (the same on every node, a host "
                              "all nodes can reach), as with torchrun")
        host, sep, port_text = rdzv_endpoint.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise LaunchError(f"--rdzv-endpoint must be HOST:PORT, got {rdzv_endpoint!r}")
        endpoint = rdzv_endpoint
    else:
        endpoint = rdzv_endpoint or f"127.0.0.1:{port if port is not None else free_port()}"
    if max_restarts < 0:
        raise LaunchError(f"--max-restarts must be 0 or more, got {max_restarts}")
    return LocalPlan(
        nproc_per_node=workers,
        nnodes=nnodes,
        node_rank=node_rank,
        rdzv_endpoint=endpoint,
        device=device,
        backend="nccl" if device == "cuda" else "gloo",
        max_restarts=max_restarts,
        run_dir=run_dir,
        threads_per_worker=None if env_threads is not None or not cpu_count else max(1, cpu_count // workers),
    )


def run_local(plan: LocalPlan) -> int:
    """Start the workers and wait for them. Returns the exit code for the command line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=plan.nnodes,
        max_nodes=plan.nnodes,
        nproc_per_node=plan.nproc_per_node,
        run_id=f"launch-{plan.run_dir.name}",
        rdzv_backend="c10d",
        rdzv_endpoint=plan.rdzv_endpoint,
        rdzv_configs={"rank": plan.node_rank} if plan.nnodes > 1 else {},
        max_restarts=plan.max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
        signals_to_handle=AGENT_SIGNALS,
    )
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        with stop_signals_forwarded(), environment_set({**plan.worker_environment(), **restart_safe_store()}):
            elastic_launch(config, sys.executable)(*plan.worker_args())
    except ChildFailedError as failure:
        if failure.failures and all(f.exitcode == EXIT_RESUMABLE for f in failure.failures.values()):
            return report_stop(None, plan.run_dir)  # a stop signal sent to the workers themselves
        print(describe_failure(failure, plan.run_dir), file=sys.stderr)
        return first_exit_code(failure)
    except SignalException as stop:
        return report_stop(signal.Signals(stop.sigval), plan.run_dir)
    return 0


@contextmanager
def environment_set(variables: dict[str, str]):
    """``variables`` in ``os.environ`` while the agent starts workers (which inherit it), then as before."""
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


EXIT_RESUMABLE = 75  # as the workers' (ddp.signals), without importing torch here
FORWARDED = (signal.SIGTERM, signal.SIGUSR2)  # handled by stop_signals_forwarded
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"  # the agent's own handlers, installed whenever it starts workers


@contextmanager
def stop_signals_forwarded():
    """SIGTERM and SIGUSR2 to ``launch`` reach the workers once, and ``launch`` waits for them.

    Torch's agent turns SIGTERM into a ``SignalException``, forwards the signal to
    the workers and waits for them to exit. But a second SIGTERM interrupts that
    wait, leaving workers that are still writing a checkpoint behind a launcher
    that has gone (a new ``launch`` could then race them), and SIGUSR2 it does
    not handle at all: the default action would kill ``launch`` on the spot.
    Here the first of either signal goes the agent's way; repeats are ignored.
    (The agent must not install its handler over this one: see ``AGENT_SIGNALS``.)
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException

    received: list[signal.Signals] = []

    def handle(signum, frame):
        if received:
            print(f"launch: already stopping on {received[0].name}; waiting for the workers to save",
                  file=sys.stderr)
            return
        received.append(signal.Signals(signum))
        raise SignalException(f"launch received {received[0].name}", sigval=received[0])

    saved = {signum: signal.signal(signum, handle) for signum in FORWARDED}
    try:
        yield received
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def restart_safe_store() -> dict[str, str]:
    """Restarted workers must not meet the keys their predecessors left in the rendezvous store.

    Since torch 2.5 the agent shares one TCPStore with every attempt of the workers and
    ``init_process_group`` adds no per-attempt prefix, so after a restart a worker may read
    the previous attempt's addresses and fail (gloo: "connectFullMesh failed ... Connection
    refused"; NCCL likewise): pytorch/pytorch#135712, #167288. With sharing off, each
    rendezvous round gets a store of its own, as before torch 2.5. A user's setting wins.
    """
    variable = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
    return {variable: os.environ.get(variable, "1")}


def report_stop(signum: signal.Signals | None, run_dir: Path) -> int:
    """After the workers were stopped by a signal (None: sent to them, not to ``launch``): where the run
    stands, and how to go on."""
    from ddp.checkpoint import list_step_checkpoints

    # Only the completion markers, no checksums: a scheduler's kill may be seconds away.
    saved = [found for found in list_step_checkpoints(run_dir / "checkpoints")
             if found.path.with_name(found.path.name + ".done").exists()]
    where = f"latest checkpoint {saved[-1].path.name} (step {saved[-1].step})" if saved else "no checkpoint yet"
    if signum is None or signum in FORWARDED:
        print(f"stopped by {signum.name if signum else 'a stop signal to the workers'}: {where}. Continue with `launch resume {run_dir}` "
              "(or the same launch command)", file=sys.stderr)
        return EXIT_RESUMABLE
    print(f"interrupted by {signum.name}: {where}. Continue with `launch resume {run_dir}`", file=sys.stderr)
    return 128 + int(signum)


def first_exit_code(failure) -> int:
    """The exit code of the failure reported as the root cause (not torch's first, which may be a lost peer)."""
    _, first = root_cause(failure)
    return first.exitcode if first.exitcode > 0 else 1
