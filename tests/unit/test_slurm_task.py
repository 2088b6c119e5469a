"""A SLURM task's view of the job (torchrun's variables from SLURM's), its signal latch, and what rank 0 does
after the workers stopped: requeue the job, or leave it to SLURM (scontrol stubbed; for real: tests/slurm).

What `launch status` makes of SLURM's answers: tests/unit/test_slurm_status.py.
"""

import json
import os
import signal

import pytest

from ddp.codes import STOP_SIGNALS as STOPS
from ddp.env import port_for_job, read_env
from ddp.layout import RunDir
from ddp.signals import StopRequest
from launcher.latch import SignalLatch
from launcher.slurm import task as slurm_task
from launcher.slurm.task import (
    RequeueError,
    SlurmTask,
    job_id_of,
    rendezvous_port,
    torchrun_environment,
)


def task(procid, localid, nodeid, *, ntasks=4, nnodes=2, nodelist="n[1-2]", job_id="4242", **extra):
    """The variables srun gives one task of a job with one task per worker."""
    return {"SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid),
            "SLURM_NTASKS": str(ntasks), "SLURM_JOB_NUM_NODES": str(nnodes), "SLURM_JOB_NODELIST": nodelist,
            "SLURM_JOB_ID": job_id, **extra}


def as_worker(environ, port=29400, max_requeues=3):
    """What a worker reads once the task has set torchrun's variables from SLURM's."""
    return read_env({**environ, **torchrun_environment(environ, port, max_requeues)})


@pytest.fixture
def handlers():
    """The tests install signal handlers; put the previous ones back."""
    saved = {signum: signal.getsignal(signum) for signum in STOPS}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("nodelist, master", [
    ("gpu[1-3,5]", "gpu1"),
    ("n[08-10]", "n08"),
    ("a,b[1-2]", "a"),
    ("gpu-a100-[017-018],gpu-v100-003", "gpu-a100-017"),
    ("node7", "node7"),
])
def test_the_master_is_the_first_host_of_the_node_list(nodelist, master):
    assert read_env(task(0, 0, 0, nodelist=nodelist)).master_addr == master
    assert torchrun_environment(task(2, 0, 1, nodelist=nodelist), 29400, 3)["MASTER_ADDR"] == master


def test_every_task_of_a_two_node_job_knows_its_place():
    for read in (read_env, as_worker):
        envs = [read(task(rank, rank % 2, rank // 2)) for rank in range(4)]
        assert [(e.rank, e.local_rank, e.node_rank) for e in envs] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
        assert {(e.world_size, e.local_world_size, e.nnodes) for e in envs} == {(4, 2, 2)}
        assert len({e.master_port for e in envs}) == 1  # every task meets at the same port
    assert {as_worker(task(0, 0, 0)).source, read_env(task(0, 0, 0)).source} == {"torchrun", "slurm"}


def test_a_requeued_job_counts_its_restarts():
    assert read_env(task(0, 0, 0, SLURM_RESTART_COUNT="2")).restart_count == 2
    assert as_worker(task(0, 0, 0, SLURM_RESTART_COUNT="2")).restart_count == 2


def test_torchrun_variables_leaked_from_the_submitting_shell_are_replaced():
    # Submitted from inside a torchrun worker: sbatch exports its RANK, MASTER_ADDR, ...
    leaked = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
              "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "old-host", "MASTER_PORT": "29500",
              "TORCHELASTIC_RESTART_COUNT": "3", "TORCHELASTIC_RUN_ID": "old", "PATH": "/usr/bin"}
    environ = {**leaked, **task(3, 1, 1)}
    ours = torchrun_environment(environ, 29400, 3)
    assert set(leaked) - {"PATH"} <= set(ours)  # every leaked variable is set afresh
    env = read_env({**environ, **ours})
    assert (env.source, env.rank, env.world_size, env.local_world_size, env.node_rank, env.nnodes) == (
        "torchrun", 3, 4, 2, 1, 2)
    assert (env.master_addr, env.master_port, env.restart_count) == ("n1", 29400, 0)
    assert ours["TORCHELASTIC_RUN_ID"] == "4242"


def test_array_elements_sharing_a_node_get_different_ports():
    first = task(0, 0, 0, job_id="501", SLURM_ARRAY_JOB_ID="500", SLURM_ARRAY_TASK_ID="0")
    second = task(0, 0, 0, job_id="502", SLURM_ARRAY_JOB_ID="500", SLURM_ARRAY_TASK_ID="1")
    assert read_env(first).master_port != read_env(second).master_port
    assert port_for_job(job_id_of(first)) != port_for_job(job_id_of(second))  # where rank 0 starts looking


def test_rank_0_publishes_a_free_port_and_the_others_read_it(tmp_path):
    run_dir = RunDir(tmp_path)
    port = rendezvous_port(run_dir, "500_1", 0, is_main=True)
    assert 20000 <= port < 32768
    assert rendezvous_port(run_dir, "500_1", 0, is_main=False, timeout_s=5) == port
    with pytest.raises(RuntimeError, match="rank 0 did not publish the rendezvous port"):
        rendezvous_port(run_dir, "500_1", 1, is_main=False, timeout_s=0.3)  # the next restart's: not yet


def test_scontrol_knows_an_array_element_by_array_id_and_index():
    assert job_id_of({"SLURM_JOB_ID": "501", "SLURM_ARRAY_JOB_ID": "500", "SLURM_ARRAY_TASK_ID": "1"}) == "500_1"
    assert job_id_of({"SLURM_JOB_ID": "77"}) == "77"


def test_a_signal_during_start_up_reaches_the_trainer(handlers):
    """The latch holds USR2 while torch is imported; the trainer's StopRequest then sees it."""
    latch = SignalLatch().install()
    os.kill(os.getpid(), signal.SIGUSR2)
    stop = StopRequest().install()
    assert not stop.requested
    latch.replay()
    assert stop.signal_name == "SIGUSR2"


def test_a_job_requeued_more_often_than_allowed_does_not_start(tmp_path, monkeypatch, handlers):
    for key, value in task(0, 0, 0, job_id="12", SLURM_RESTART_COUNT="3").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RequeueError, match=r"job 12 was requeued 3 times, more than slurm.max_requeues=2; .*"
                                           rf"`launch resume {tmp_path}`"):
        SlurmTask(str(tmp_path), max_requeues=2)()
    event = json.loads(RunDir(tmp_path).slurm_events.read_text())
    assert (event["event"], event["restart"], event["reason"]) == ("refused", 3, "requeued 3 times")
    assert not RunDir(tmp_path).lock.exists()  # refused before it took the run


# -- after the workers stopped: requeue, or leave it to SLURM ------------------------------------------


@pytest.fixture
def stopped(tmp_path, monkeypatch):
    """Rank 0 of job 12 after a stop at step 30; returns (its task, the scontrol requeue calls)."""
    calls = []

    def run(command, **kwargs):
        calls.append(command)

    monkeypatch.setattr(slurm_task.subprocess, "run", run)
    return SlurmTask(str(tmp_path), max_requeues=2), calls


def after_stop(training, restarts=0, signal_name="SIGUSR2", is_main=True):
    summary = {"status": "stopped", "step": 30, "epoch": 1, "metrics": {}, "signal": signal_name}
    return training._after_stop(is_main, "12", restarts, summary)


def events(training) -> list[dict]:
    return [json.loads(line) for line in RunDir(training.run_dir).slurm_events.read_text().splitlines()]


def test_a_warned_running_job_requeues_itself(stopped, monkeypatch):
    training, calls = stopped
    monkeypatch.setattr(slurm_task, "job_state", lambda job_id: "RUNNING")
    assert after_stop(training)["status"] == "requeued"
    assert calls == [["scontrol", "requeue", "12"]]
    recorded = events(training)[-1]
    assert (recorded["event"], recorded["step"], recorded["signal"]) == ("requeued", 30, "SIGUSR2")


@pytest.mark.parametrize("state", ["CANCELLED", "COMPLETING", "PENDING", "TIMEOUT", "UNKNOWN"])
def test_a_job_slurm_is_already_ending_or_requeueing_is_left_to_slurm(stopped, monkeypatch, state):
    training, calls = stopped
    monkeypatch.setattr(slurm_task, "job_state", lambda job_id: state)
    result = after_stop(training, signal_name="SIGTERM")
    assert (result["status"], result["state"]) == ("stopped", state)
    assert calls == []
    assert (events(training)[-1]["event"], events(training)[-1]["state"]) == ("stopped", state)


def test_the_requeue_limit_ends_the_job_with_what_to_do(stopped, monkeypatch):
    training, calls = stopped
    monkeypatch.setattr(slurm_task, "job_state", lambda job_id: "RUNNING")
    with pytest.raises(RequeueError, match=r"after 2 requeue.*slurm.max_requeues=2.*"
                                           rf"Continue with `launch resume {training.run_dir}`"):
        after_stop(training, restarts=2)
    assert calls == []
    assert events(training)[-1]["reason"] == "requeue limit"


def test_a_failed_requeue_says_what_scontrol_said(stopped, monkeypatch):
    import subprocess

    training, _ = stopped
    monkeypatch.setattr(slurm_task, "job_state", lambda job_id: "RUNNING")

    def refuse(command, **kwargs):
        raise subprocess.CalledProcessError(1, command, stderr="Requested operation is presently disabled")

    monkeypatch.setattr(slurm_task.subprocess, "run", refuse)
    with pytest.raises(RequeueError, match="`scontrol requeue 12` failed: Requested operation is presently "
                                           "disabled; the checkpoint is saved"):
        after_stop(training)
    assert events(training)[-1]["event"] == "requeue-failed"


def test_other_ranks_leave_the_decision_to_rank_0(stopped, monkeypatch):
    training, calls = stopped
    monkeypatch.setattr(slurm_task, "job_state", lambda job_id: pytest.fail("only rank 0 asks SLURM"))
    summary = {"status": "stopped", "step": 30, "epoch": 1, "metrics": {}}
    assert training._after_stop(False, "12", 0, summary) == summary
    assert calls == [] and not RunDir(training.run_dir).slurm_events.exists()
