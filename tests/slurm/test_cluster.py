"""The real two-node SLURM cluster of scripts/slurm_cluster.sh (the ``slurm_cluster`` fixture).

They check the properties the launcher relies on: one task per node across two nodes, two
tasks on one node, node names that resolve, signal delivery (scancel -s and --signal=USR2@N),
a fast requeue round trip, and job end states without slurmdbd.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.slurm_cluster import SCRIPT, SlurmCluster

TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
}


def run(cluster: SlurmCluster, *cmd: str, timeout: float = 60) -> str:
    proc = subprocess.run(
        list(cmd), env=cluster.env(), capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, (
        f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\n"
        f"{cluster.logs()}"
    )
    return proc.stdout


def sbatch(cluster: SlurmCluster, script: Path, *opts: str) -> str:
    script.chmod(0o755)
    return run(cluster, "sbatch", "--parsable", *opts, str(script)).strip().split(";")[0]


def job_field(cluster: SlurmCluster, job_id: str, field: str) -> str:
    out = run(cluster, "scontrol", "show", "job", "-o", job_id)
    m = re.search(rf"\b{field}=(\S+)", out)
    assert m, f"no {field} in: {out}"
    return m.group(1)


def wait_for_state(cluster: SlurmCluster, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = job_field(cluster, job_id, "JobState")
        if state in TERMINAL_STATES:
            return state
        if time.monotonic() > deadline:
            run(cluster, "scancel", job_id)
            pytest.fail(f"job {job_id} still {state} after {timeout} s\n{cluster.logs()}")
        time.sleep(0.5)


def wait_for_text(path: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return path.read_text()
        time.sleep(0.25)
    return path.read_text() if path.exists() else ""


def test_srun_one_task_on_each_of_two_nodes(slurm_cluster: SlurmCluster) -> None:
    out = run(
        slurm_cluster, "srun", "-N", "2", "-n", "2", "bash", "-c",
        "echo $SLURMD_NODENAME $SLURM_PROCID $SLURM_NODEID $SLURM_LOCALID"
        " $SLURM_NTASKS $SLURM_JOB_NUM_NODES $SLURM_JOB_NODELIST",
        timeout=60,
    )
    rows = sorted(line.split() for line in out.splitlines() if line.strip())
    assert rows == [
        ["n1", "0", "0", "0", "2", "2", "n[1-2]"],
        ["n2", "1", "1", "0", "2", "2", "n[1-2]"],
    ], out


def test_two_tasks_on_one_node(slurm_cluster: SlurmCluster) -> None:
    out = run(
        slurm_cluster, "srun", "-N", "1", "--ntasks-per-node", "2", "bash", "-c",
        "echo $SLURMD_NODENAME $SLURM_PROCID $SLURM_LOCALID $SLURM_NTASKS",
        timeout=60,
    )
    rows = sorted(line.split() for line in out.splitlines() if line.strip())
    assert len(rows) == 2, out
    assert rows[0][0] == rows[1][0] and rows[0][0] in slurm_cluster.nodes, out
    assert [r[1:] for r in rows] == [["0", "0", "2"], ["1", "1", "2"]], out


def test_two_nodes_with_two_tasks_each(slurm_cluster: SlurmCluster) -> None:
    out = run(
        slurm_cluster, "srun", "-N", "2", "--ntasks-per-node", "2", "bash", "-c",
        "echo $SLURMD_NODENAME $SLURM_PROCID", timeout=60,
    )
    rows = sorted(line.split() for line in out.splitlines() if line.strip())
    assert sorted(r[1] for r in rows) == ["0", "1", "2", "3"], out
    assert sorted(r[0] for r in rows) == ["n1", "n1", "n2", "n2"], out


def test_node_names_resolve_to_loopback(slurm_cluster: SlurmCluster) -> None:
    # A master address derived from SLURM_JOB_NODELIST (n1) must be reachable.
    for node in slurm_cluster.nodes:
        assert socket.gethostbyname(node) == "127.0.0.1"


def test_nodes_have_two_cpus_and_the_default_partition_two_nodes(slurm_cluster: SlurmCluster) -> None:
    out = run(slurm_cluster, "sinfo", "-h", "-N", "-o", "%P %N %c %m")
    rows = sorted(line.split() for line in out.splitlines() if line.strip())
    assert rows == sorted([["debug*", "n1", "2", "4000"], ["debug*", "n2", "2", "4000"]]
                          + [["four", node, "2", "4000"] for node in slurm_cluster.nodes]), out


def test_batch_end_states_recorded_without_slurmdbd(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    ok = tmp_path / "ok.sh"
    ok.write_text("#!/bin/bash\necho fine\n")
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nexit 3\n")
    ok_id = sbatch(slurm_cluster, ok, "-o", str(tmp_path / "ok.out"))
    bad_id = sbatch(slurm_cluster, bad, "-o", str(tmp_path / "bad.out"))
    assert wait_for_state(slurm_cluster, ok_id, 60) == "COMPLETED"
    assert wait_for_state(slurm_cluster, bad_id, 60) == "FAILED"
    assert job_field(slurm_cluster, bad_id, "ExitCode") == "3:0"
    # jobcomp/filetxt keeps the end states after the job records expire (MinJobAge).
    comp = (slurm_cluster.rundir / "jobcomp.log").read_text()
    assert re.search(rf"JobId={ok_id} .*JobState=COMPLETED", comp), comp
    assert re.search(rf"JobId={bad_id} .*JobState=FAILED", comp), comp


def test_scancel_signal_reaches_step_processes(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    out = tmp_path / "sig.out"
    script = tmp_path / "sig.sh"
    script.write_text(
        "#!/bin/bash\n"
        "srun -n 1 bash -c 'trap \"echo got-USR2; exit 0\" USR2; echo ready;"
        " for i in $(seq 600); do sleep 0.1; done; echo no-signal'\n"
    )
    job_id = sbatch(slurm_cluster, script, "-o", str(out))
    assert "ready" in wait_for_text(out, "ready", 30), out.read_text()
    run(slurm_cluster, "scancel", "--signal=USR2", job_id)
    assert wait_for_state(slurm_cluster, job_id, 30) == "COMPLETED"
    assert "got-USR2" in out.read_text()


def test_signal_option_delivers_usr2_before_time_limit(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """--signal=USR2@N as submitit uses it: slurmctld sends it from its time-limit check,
    which runs every 30 s, so with a 60 s limit and N=55 it arrives 0-30 s after start."""
    out = tmp_path / "warn.out"
    script = tmp_path / "warn.sh"
    script.write_text(
        "#!/bin/bash\n"
        "srun -n 1 bash -c 'trap \"echo got-USR2; exit 0\" USR2;"
        " for i in $(seq 500); do sleep 0.1; done; echo no-signal'\n"
    )
    start = time.monotonic()
    job_id = sbatch(slurm_cluster, script, "-o", str(out), "--time=1", "--signal=USR2@55")
    assert wait_for_state(slurm_cluster, job_id, 75) == "COMPLETED"
    text = out.read_text()
    assert "got-USR2" in text, f"{text}\n{slurm_cluster.logs()}"
    assert time.monotonic() - start < 45, text


def test_requeue_round_trip_is_fast(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """scontrol requeue (what submitit does) restarts the job after ~cred_expire+1 s."""
    out = tmp_path / "rq.out"
    script = tmp_path / "rq.sh"
    script.write_text(
        "#!/bin/bash\n"
        'echo "run restart=${SLURM_RESTART_COUNT:-0} at $(date +%s.%N)"\n'
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then\n'
        "  scontrol requeue $SLURM_JOB_ID\n"
        "  sleep 60\n"
        "fi\n"
        "echo done\n"
    )
    job_id = sbatch(slurm_cluster, script, "-o", str(out), "--open-mode=append", "--requeue")
    assert wait_for_state(slurm_cluster, job_id, 60) == "COMPLETED", out.read_text()
    text = out.read_text()
    starts = [float(t) for t in re.findall(r"run restart=\d+ at (\S+)", text)]
    assert re.findall(r"run restart=(\d+)", text) == ["0", "1"], text
    assert "done" in text
    assert job_field(slurm_cluster, job_id, "Restarts") == "1"
    # Default slurm.conf would keep it PENDING (BeginTime) for ~120 s.
    assert starts[1] - starts[0] < 30, text


def test_start_again_is_quick_and_idempotent(slurm_cluster: SlurmCluster) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SCRIPT), "start", str(slurm_cluster.rundir)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"export SLURM_CONF={slurm_cluster.conf}" in proc.stdout
    assert "already running" in proc.stdout
    assert time.monotonic() - t0 < 10
