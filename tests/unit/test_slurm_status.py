"""What `launch status` and `launch cancel` make of SLURM's answers (scontrol stubbed; for real: tests/slurm)."""

import json

import pytest

from ddp.layout import RunDir
from launcher.slurm import status as slurm_status
from launcher.slurm.query import SlurmError, not_ours, parse_scontrol

SCONTROL = ("JobId=12 JobName=demo run UserId=root(0) GroupId=root(0) Priority=1 JobState=NODE_FAIL "
            "Reason=NodeDown Dependency=(null) Requeue=1 Restarts=1 BatchFlag=1 ExitCode=0:0 RunTime=00:00:31 "
            "TimeLimit=01:00:00 NodeList=n[1-2] StdErr=/runs/my runs/slurm/12_0_log.err")


def test_scontrol_output_is_read_field_by_field():
    fields = parse_scontrol(SCONTROL)
    assert (fields["JobState"], fields["Reason"], fields["Restarts"], fields["NodeList"]) == (
        "NODE_FAIL", "NodeDown", "1", "n[1-2]")
    # Values run to the next key: names and paths with spaces come out whole.
    assert fields["JobName"] == "demo run" and fields["StdErr"] == "/runs/my runs/slurm/12_0_log.err"


def test_a_job_id_that_now_names_another_job_is_not_ours():
    job = {"job_id": "12", "cluster": "c1", "folder": "/runs/demo/slurm", "submitted": 1_700_000_000}
    assert not_ours(job, {"StdOut": "/runs/demo/slurm/12_0_log.out"}, "c1") is None
    assert "submitted to cluster c1, not c2" in not_ours(job, {}, "c2")
    assert "writes its logs to /elsewhere/12.out, not to the run's /runs/demo/slurm" in not_ours(
        job, {"StdOut": "/elsewhere/12.out"}, "c1")


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A run directory with one recorded job; SLURM's answer is set by each test."""
    monkeypatch.setattr(slurm_status, "require_commands", lambda *names: None)
    monkeypatch.setattr(slurm_status, "cluster_name", lambda: None)
    run = RunDir(tmp_path)
    run.slurm_record.write_text(json.dumps({"jobs": [{"job_id": "12", "max_requeues": 3}]}))
    run.state.write_text(json.dumps({"status": "running", "step": 50, "epoch": 2}))
    run.checkpoints.mkdir()
    for step in (40, 50):
        (run.checkpoints / f"step_{step:08d}.pt").write_bytes(b"x")
    (run.checkpoints / "step_00000040.pt.done").write_text('{"size": 1, "sha256": ""}')  # 50 is still being written
    return run


def test_status_names_a_node_failure_as_slurm_reports_it(run_dir, monkeypatch):
    monkeypatch.setattr(slurm_status, "scheduler_view", lambda job_id: parse_scontrol(SCONTROL))
    run_dir.slurm_folder.mkdir()
    (run_dir.slurm_folder / "12_1_log.err").write_text("Traceback (most recent call last):\n  ...\n"
                                                        "RuntimeError: Connection reset by peer\n")
    text = slurm_status.status_text(run_dir)
    assert "job            12: NODE_FAIL on n[1-2] for 00:00:31 of 01:00:00 (reason: NodeDown)" in text
    assert "SLURM reports that a node of the job failed" in text
    assert "requeues       1 (at most 3)" in text
    assert "progress       step 50, epoch 2; last checkpoint step_00000040.pt" in text
    assert f"first error    {run_dir.slurm_folder / '12_1_log.err'}:" in text
    assert "RuntimeError: Connection reset by peer" in text


def test_status_falls_back_to_the_runs_own_record(run_dir, monkeypatch):
    monkeypatch.setattr(slurm_status, "scheduler_view", lambda job_id: {})
    run_dir.state.write_text(json.dumps({"status": "finished", "step": 50, "epoch": 2}))
    events = [{"job_id": "12", "restart": 0, "event": "started"},
              {"job_id": "12", "restart": 0, "event": "requeued", "step": 30, "signal": "SIGUSR2"},
              {"job_id": "12", "restart": 1, "event": "started"},
              {"job_id": "12", "restart": 1, "event": "finished", "step": 50}]
    run_dir.slurm_events.write_text("".join(json.dumps(e) + "\n" for e in events) + '{"cut sho')
    text = slurm_status.status_text(run_dir)
    assert "SLURM no longer knows it; the run's last record: finished" in text
    assert "requeues       1 (at most 3)" in text
    assert "last stop      requeued (step 30, signal SIGUSR2)" in text
    assert "progress       step 50, epoch 2; last checkpoint step_00000040.pt" in text


def test_cancel_with_nothing_running_says_so(run_dir, monkeypatch):
    monkeypatch.setattr(slurm_status, "scheduler_view", lambda job_id: {"JobState": "COMPLETED"})
    assert slurm_status.cancel(run_dir).startswith(f"nothing to cancel: no job of {run_dir.path} is pending")


def test_status_of_a_directory_without_a_slurm_job_says_what_it_is(tmp_path):
    with pytest.raises(SlurmError, match="has no SLURM job .*not launched with `launch slurm`"):
        slurm_status.status_text(RunDir(tmp_path))
