"""Tier 2: a SLURM task's view of the job, from SLURM's variables; and what status makes of SLURM's answers."""

import json
import os
import signal
from pathlib import Path

import pytest

from ddp.env import DistEnv, read_env
from ddp.signals import StopRequest
from launcher import slurm_entry, slurm_status
from launcher.rundir import RunDirError
from launcher.slurm_entry import RequeueError, SignalLatch, SlurmTraining, job_id_of, slurm_environ


def task(procid, localid, nodeid, *, ntasks=4, nnodes=2, nodelist="n[1-2]", job_id="4242", **extra):
    """The variables srun gives one task of a job with one task per worker."""
    return {"SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid),
            "SLURM_NTASKS": str(ntasks), "SLURM_JOB_NUM_NODES": str(nnodes), "SLURM_JOB_NODELIST": nodelist,
            "SLURM_JOB_ID": job_id, **extra}


@pytest.mark.parametrize("nodelist, master", [
    ("gpu[1-3,5]", "gpu1"),
    ("n[08-10]", "n08"),
    ("a,b[1-2]", "a"),
    ("gpu-a100-[017-018],gpu-v100-003", "gpu-a100-017"),
    ("node7", "node7"),
])
def test_the_master_is_the_first_host_of_the_node_list(nodelist, master):
    assert read_env(task(0, 0, 0, nodelist=nodelist)).master_addr == master


def test_every_task_of_a_two_node_job_knows_its_place():
    envs = [read_env(task(rank, rank % 2, rank // 2)) for rank in range(4)]
    assert [(e.rank, e.local_rank, e.node_rank) for e in envs] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    assert {(e.world_size, e.local_world_size, e.nnodes, e.source) for e in envs} == {(4, 2, 2, "slurm")}
    assert len({e.master_port for e in envs}) == 1  # every task meets at the same port


def test_a_requeued_job_counts_its_restarts():
    assert read_env(task(0, 0, 0, SLURM_RESTART_COUNT="2")).restart_count == 2


def test_torchrun_variables_leaked_from_the_submitting_shell_are_dropped():
    # Submitted from inside a torchrun worker: sbatch exports its RANK, MASTER_ADDR, ...
    leaked = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "old-host", "MASTER_PORT": "29500",
              "TORCHELASTIC_RESTART_COUNT": "3", "PATH": "/usr/bin"}
    environ = slurm_environ({**leaked, **task(3, 1, 1)})
    env = read_env(environ)
    assert (env.source, env.rank, env.world_size, env.master_addr) == ("slurm", 3, 4, "n1")
    assert env.restart_count == 0
    assert "MASTER_ADDR" not in environ and environ["PATH"] == "/usr/bin"


def test_array_elements_sharing_a_node_get_different_ports():
    first = read_env(task(0, 0, 0, job_id="501", SLURM_ARRAY_JOB_ID="500", SLURM_ARRAY_TASK_ID="0"))
    second = read_env(task(0, 0, 0, job_id="502", SLURM_ARRAY_JOB_ID="500", SLURM_ARRAY_TASK_ID="1"))
    assert first.master_port != second.master_port


def test_scontrol_knows_an_array_element_by_array_id_and_index():
    assert job_id_of({"SLURM_JOB_ID": "501", "SLURM_ARRAY_JOB_ID": "500", "SLURM_ARRAY_TASK_ID": "1"}) == "500_1"
    assert job_id_of({"SLURM_JOB_ID": "77"}) == "77"


def test_a_signal_during_start_up_reaches_the_trainer():
    """The latch holds USR2 while torch is imported; the trainer's StopRequest then sees it."""
    saved = {signum: signal.getsignal(signum) for signum in SignalLatch.SIGNALS}
    try:
        latch = SignalLatch().install()
        os.kill(os.getpid(), signal.SIGUSR2)
        stop = StopRequest().install()
        assert not stop.requested
        latch.replay()
        assert stop.signal_name == "SIGUSR2"
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_submitit_checkpoint_requeues_until_the_limit(monkeypatch):
    training = SlurmTraining("/runs/demo", max_requeues=2)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    delayed = training.checkpoint()
    assert delayed is not None and delayed.function is training
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert training.checkpoint() is None


# -- after the workers stopped: requeue, or leave it to SLURM (scontrol stubbed; real in test_slurm_e2e) -----


@pytest.fixture
def stopped(tmp_path, monkeypatch):
    """Rank 0 of job 12 after a stop at step 30; returns (training, calls to scontrol requeue)."""
    calls = []
    monkeypatch.setattr(slurm_entry.subprocess, "run", lambda command, **kwargs: calls.append(command))
    return SlurmTraining(str(tmp_path), max_requeues=2), calls


def after_stop(training, restarts=0, signal_name="SIGUSR2"):
    summary = {"status": "stopped", "step": 30, "epoch": 1, "metrics": {}}
    return training._after_stop(DistEnv(restart_count=restarts), "12", signal_name, summary)


def test_a_warned_running_job_requeues_itself(stopped, monkeypatch):
    training, calls = stopped
    monkeypatch.setattr(slurm_entry, "job_state", lambda job_id: "RUNNING")
    assert after_stop(training)["status"] == "requeued"
    assert calls == [["scontrol", "requeue", "12"]]
    recorded = json.loads((Path(training.run_dir) / "slurm_events.jsonl").read_text())
    assert (recorded["event"], recorded["step"], recorded["signal"]) == ("requeued", 30, "SIGUSR2")


@pytest.mark.parametrize("state", ["CANCELLED", "COMPLETING", "PENDING", "TIMEOUT", "UNKNOWN"])
def test_a_job_slurm_is_already_ending_or_requeueing_is_left_to_slurm(stopped, monkeypatch, state):
    training, calls = stopped
    monkeypatch.setattr(slurm_entry, "job_state", lambda job_id: state)
    assert after_stop(training, signal_name="SIGTERM")["state"] == state
    assert calls == []


def test_the_requeue_limit_ends_the_job_with_what_to_do(stopped, monkeypatch):
    training, calls = stopped
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.setattr(slurm_entry, "job_state", lambda job_id: "RUNNING")
    with pytest.raises(RequeueError, match="after 2 requeue.*slurm.max_requeues=2.*Resubmit with `launch slurm`"):
        after_stop(training, restarts=2)
    assert calls == []


def test_other_ranks_leave_the_decision_to_rank_0(stopped):
    training, calls = stopped
    summary = {"status": "stopped", "step": 30, "epoch": 1, "metrics": {}}
    assert training._after_stop(DistEnv(rank=1, world_size=2), "12", "SIGUSR2", summary) == summary
    assert calls == []


# -- what `launch status` makes of SLURM's answers ------------------------------------------------

SCONTROL = ("JobId=12 JobName=demo run UserId=root(0) GroupId=root(0) Priority=1 JobState=NODE_FAIL "
            "Reason=NodeDown Dependency=(null) Requeue=1 Restarts=1 BatchFlag=1 ExitCode=0:0 RunTime=00:00:31 "
            "TimeLimit=01:00:00 NodeList=n[1-2] StdErr=/runs/my runs/slurm/12_0_log.err")


def test_scontrol_output_is_read_field_by_field():
    fields = slurm_status.parse_scontrol(SCONTROL)
    assert (fields["JobState"], fields["Reason"], fields["Restarts"], fields["NodeList"]) == (
        "NODE_FAIL", "NodeDown", "1", "n[1-2]")
    assert fields["JobName"] == "demo"  # values with spaces are cut: only single-word fields are used


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A run directory with one recorded job; SLURM's answer is set by each test."""
    monkeypatch.setattr(slurm_status, "require_commands", lambda *names: None)
    (tmp_path / "slurm.json").write_text(json.dumps({"jobs": [{"job_id": "12", "max_requeues": 3}]}))
    (tmp_path / "metrics.jsonl").write_text('{"step": 40, "epoch": 1}\n{"step": 50, "epoch": 2}\n')
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for step in (40, 50):
        (checkpoints / f"step_{step:08d}.pt").write_bytes(b"x")
    (checkpoints / "step_00000040.pt.done").write_text("{}")  # 50 is still being written
    return tmp_path


def test_status_names_a_node_failure_as_slurm_reports_it(run_dir, monkeypatch):
    monkeypatch.setattr(slurm_status, "scheduler_view", lambda job_id: slurm_status.parse_scontrol(SCONTROL))
    (run_dir / "slurm").mkdir()
    (run_dir / "slurm" / "12_1_log.err").write_text("Traceback (most recent call last):\n  ...\n"
                                                    "RuntimeError: Connection reset by peer\n")
    text = slurm_status.status_text(run_dir)
    assert "job            12: NODE_FAIL on n[1-2] for 00:00:31 of 01:00:00 (reason: NodeDown)" in text
    assert "SLURM reports that a node of the job failed" in text
    assert "requeues       1 (at most 3)" in text
    assert "progress       step 50, epoch 2; last checkpoint checkpoints/step_00000040.pt" in text
    assert "RuntimeError: Connection reset by peer" in text


def test_status_falls_back_to_the_runs_own_record(run_dir, monkeypatch):
    monkeypatch.setattr(slurm_status, "scheduler_view", lambda job_id: {})
    events = [{"job_id": "12", "restart": 0, "event": "started"},
              {"job_id": "12", "restart": 0, "event": "requeued", "step": 30, "signal": "SIGUSR2"},
              {"job_id": "12", "restart": 1, "event": "started"},
              {"job_id": "12", "restart": 1, "event": "finished", "step": 50}]
    (run_dir / "slurm_events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"cut sho')
    text = slurm_status.status_text(run_dir)
    assert "SLURM no longer knows it; the run's last record: finished" in text
    assert "requeues       1 (at most 3)" in text
    assert "last stop      requeued (step 30, signal SIGUSR2)" in text
    assert "finished at step 50" in text


def test_cancel_with_nothing_running_says_so(run_dir, monkeypatch):
    monkeypatch.setattr(slurm_status, "scheduler_view", lambda job_id: {"JobState": "COMPLETED"})
    assert slurm_status.cancel(run_dir).startswith("nothing to cancel")


def test_status_of_a_directory_without_a_slurm_job_says_what_it_is(tmp_path):
    with pytest.raises(RunDirError, match="no SLURM job"):
        slurm_status.status_text(tmp_path)
