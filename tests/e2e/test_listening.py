"""On one machine, every socket the run listens on (rendezvous store, process-group store, gloo) is on loopback."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.support.helpers import start_launch, wait_for, write_config
from tests.support.job import JOB_NAME

pytestmark = pytest.mark.timeout(300)


def family(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, set[int]] = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, set()).add(child)
    found, todo = {pid}, [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.add(child)
            todo.append(child)
    return found


def listening(pids: set[int]) -> list[str]:
    """``ADDRESS:PORT`` of every TCP socket in LISTEN state owned by one of ``pids``."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(pid) for pid in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            found.append(line.split()[3])
    return found


def test_a_two_worker_run_listens_on_loopback_only(tmp_path):
    config = write_config(tmp_path, {
        "job": {"name": JOB_NAME, "samples": 2000, "step_sleep_s": 0.02},
        "data": {"batch_size": 8, "num_workers": 1},
        "train": {"epochs": 1, "progress_bar": False},
        "run": {"name": "sockets"},
    })
    process = start_launch("local", "--cpu", "--nproc", "2", str(config), cwd=tmp_path, log=tmp_path / "out.log")
    try:
        metrics = tmp_path / "runs" / "sockets" / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_text().strip(), 120, what="training")
        sockets = listening(family(process.pid))
        assert len(sockets) >= 3, sockets  # the rendezvous store, the process group's store, gloo's
        assert all(address.startswith("127.0.0.1:") or address.startswith("[::1]:") for address in sockets), sockets
    finally:
        process.terminate()
        process.wait(120)
