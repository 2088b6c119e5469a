"""CPU workers share the cores out (OMP_NUM_THREADS = cores // workers); the user's own setting wins; the process
tuning (allocator, affinity where each worker gets cores to spare) reaches the workers unless turned off."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from launcher.local.agent import _environment
from launcher.local.plan import Entry, Machine, Request, plan_local

RUN_DIR = Path("/tmp/runs/x")


def plan(nproc: int = 2, cores: int = 8, env_threads: str | None = None, tuning: bool = True):
    user = {"OMP_NUM_THREADS": env_threads} if env_threads is not None else {}
    return plan_local(Request(cpu=True, nproc=nproc, tuning=tuning),
                      Machine(visible_gpus=0, cores=cores, env_threads=env_threads, user_environment=user),
                      run_dir=RUN_DIR, entry=Entry("config", str(RUN_DIR)), port=1234)


def threads(chosen) -> str | None:
    return chosen.environment.get("OMP_NUM_THREADS")


def test_cpu_workers_share_the_cores_out():
    assert threads(plan(nproc=2, cores=2)) == "1"
    assert threads(plan(nproc=2, cores=8)) == "4"
    assert threads(plan(nproc=3, cores=8)) == "2"
    assert threads(plan(nproc=4, cores=2)) == "1"  # never 0
    described = plan(nproc=2, cores=8).describe().splitlines()
    environment = next(line for line in described if line.startswith("environment"))
    torchrun = next(line for line in described if line.startswith("torchrun"))
    assert "OMP_NUM_THREADS=4" in environment.split()
    assert "OMP_NUM_THREADS=4" in torchrun.split()[: torchrun.split().index("torchrun", 1)]  # pasteable


def test_the_users_omp_num_threads_wins():
    assert threads(plan(env_threads="3")) is None  # left to the user's variable, which the workers inherit
    assert threads(plan(cores=0)) is None  # unknown cores: torch's default


def test_the_workers_environment_is_set_only_while_they_start(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LAUNCH_TEST_KEPT", "mine")
    with _environment({"OMP_NUM_THREADS": "2", "LAUNCH_TEST_KEPT": "theirs"}):
        assert os.environ["OMP_NUM_THREADS"] == "2" and os.environ["LAUNCH_TEST_KEPT"] == "theirs"
    assert "OMP_NUM_THREADS" not in os.environ
    assert os.environ["LAUNCH_TEST_KEPT"] == "mine"


def test_tuning_keeps_freed_memory_and_pins_only_workers_with_cores_to_spare():
    roomy, cramped, untuned = plan(nproc=2, cores=8), plan(nproc=2, cores=2), plan(nproc=2, cores=8, tuning=False)
    assert roomy.environment["LAUNCH_CPU_AFFINITY"] == "1"
    assert "LAUNCH_CPU_AFFINITY" not in cramped.environment  # one core each: no room for loaders and gloo
    if sys.platform.startswith("linux"):
        assert cramped.environment["MALLOC_MMAP_THRESHOLD_"] == "16777216"
    assert not {"LAUNCH_CPU_AFFINITY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(untuned.environment)
