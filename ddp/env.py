"""Where this process sits in the job: read once from the environment, then passed around.

Three sources, in order: torchrun's variables (``RANK``, ``LOCAL_RANK``, ...),
SLURM's (``SLURM_PROCID``, ...) when a job runs one task per worker, and the
single-process defaults. Torch's names are used everywhere; SLURM's appear in
exactly one table below.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ddp.lists import split_top_level

# torch name -> SLURM variable, for jobs that run one SLURM task per worker.
SLURM_VARIABLES = {
    "rank": "SLURM_PROCID",
    "local_rank": "SLURM_LOCALID",
    "world_size": "SLURM_NTASKS",
    "node_rank": "SLURM_NODEID",
    "nnodes": "SLURM_JOB_NUM_NODES",
}


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    nnodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    restart_count: int = 0  # how often torchrun's agent has restarted the workers
    source: str = "single"  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the process's place in the job from torchrun, SLURM or the defaults."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            world_size=int(environ["WORLD_SIZE"]),
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", 1)),
            node_rank=int(environ.get("GROUP_RANK", 0)),
            nnodes=int(environ.get("GROUP_WORLD_SIZE", 0))
            or max(1, int(environ["WORLD_SIZE"]) // max(1, int(environ.get("LOCAL_WORLD_SIZE", 1)))),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
            restart_count=int(environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
            source="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        values = {name: int(environ[var]) for name, var in SLURM_VARIABLES.items() if var in environ}
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", "127.0.0.1")
        # SLURM_JOB_ID, not SLURM_ARRAY_JOB_ID: every element of an array has its own job id,
        # while the array id is shared, and elements sharing a node would fight over one port.
        job_id = environ.get("SLURM_JOB_ID", "0")
        world_size = values["world_size"]
        nnodes = values.get("nnodes", 1)
        return DistEnv(
            rank=values["rank"],
            local_rank=values.get("local_rank", 0),
            world_size=world_size,
            local_world_size=max(1, world_size // max(1, nnodes)),
            node_rank=values.get("node_rank", 0),
            nnodes=nnodes,
            master_addr=expand_nodelist(nodelist)[0],
            master_port=port_for_job(job_id),
            restart_count=int(environ.get("SLURM_RESTART_COUNT", 0)),
            source="slurm",
        )
    return DistEnv()


# Below Linux's ephemeral range (32768-60999), where the kernel hands out ports to clients.
JOB_PORTS = range(20000, 32768)


def port_for_job(job_id: str) -> int:
    """A rendezvous port derived from the job id, so jobs sharing a node do not collide."""
    digits = int(re.sub(r"\D", "", str(job_id)) or 0)
    return JOB_PORTS.start + digits % len(JOB_PORTS)


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: ``gpu[1-3,5],cpu07`` -> gpu1 gpu2 gpu3 gpu5 cpu07.

    Zero padding is kept (``n[08-10]`` -> n08 n09 n10), as SLURM does.
    """
    hosts: list[str] = []
    for item in (item for item in split_top_level(nodelist.strip(), quotes=False) if item):
        match = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", item)
        if not match:
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            if not high:
                hosts.extend(expand_nodelist(f"{prefix}{low}{suffix}"))
                continue
            width = len(low)
            for number in range(int(low), int(high) + 1):
                hosts.extend(expand_nodelist(f"{prefix}{number:0{width}d}{suffix}"))
    return hosts
