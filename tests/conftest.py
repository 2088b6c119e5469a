"""Test tiers: each folder is a marker (see setup.cfg), so ``-m unit`` or ``-m "not slurm"`` select by tier.

    unit/          pure functions and single objects: no training, no processes (under 30 s in all)
    multiprocess/  the training code in this process, or as N real gloo ranks
    e2e/           the ``launch`` command as a user runs it, with faults injected
    slurm/         against a real SLURM cluster that the session starts (scripts/slurm_cluster.sh)
    scale/         8 to 32 CPU ranks on this machine
    gpu/           CUDA and NCCL; skipped without a GPU
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "multiprocess", "e2e", "slurm", "scale", "gpu")


# Tiers whose tests share one machine-wide resource run in one xdist worker (``--dist loadgroup``):
# the SLURM cluster's nodes, and the scale tier's dozens of processes.
SERIAL = ("slurm", "scale")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(TESTS).parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))
            if parts[0] in SERIAL:
                item.add_marker(pytest.mark.xdist_group(parts[0]))
