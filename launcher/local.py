"""``launch local``: workers on this machine through torch's elastic launcher (torchrun's engine).

``plan_local`` is pure: it turns the command line and the machine's facts into a
``LocalPlan`` (which the dry run prints). ``run_local`` carries a plan out with
``elastic_launch`` and, when workers fail, reports the first failure as the
root cause: rank, exit code, the worker's own traceback, and its log.
"""

from __future__ import annotations

import shlex
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from launcher.errors import LaunchError
from launcher.failures import describe_failure


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
            f"run directory  {self.run_dir}",
            f"torchrun       {shlex.join(self.torchrun_command())}",
        ]
        return "\n".join(lines)

    def record(self) -> dict:
        data = asdict(self)
        data["run_dir"] = str(self.run_dir)
        return {"mode": "local", **data}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def plan_local(*, gpus: int | None, cpu: bool, nproc: int | None, nnodes: int, node_rank: int,
               rdzv_endpoint: str | None, max_restarts: int, run_dir: Path, visible_gpus: int,
               port: int | None = None) -> LocalPlan:
    """Check the request against the machine and decide how to launch. Starts nothing."""
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
    )
    try:
        elastic_launch(config, sys.executable)(*plan.worker_args())
    except ChildFailedError as failure:
        print(describe_failure(failure, plan.run_dir), file=sys.stderr)
        return first_exit_code(failure)
    return 0


def first_exit_code(failure) -> int:
    _, first = failure.get_first_failure()
    return first.exitcode if first.exitcode > 0 else 1
