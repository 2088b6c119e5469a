"""``restarts.jsonl``: each restart of the workers, with every failed worker's error, the root cause first."""

from __future__ import annotations

import json

from torch.distributed.elastic.agent.server.api import RunResult, WorkerState
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from ddp.layout import RunDir
from launcher.failures import describe_failure
from launcher.local.agent import _failures
from launcher.restarts import NO_REPORT, describe_cause, record_restart


def failed(tmp_path, rank: int, exitcode: int, message: str | None) -> ProcessFailure:
    """A worker's failure as torch's agent reports it: with the error file ``@record`` wrote, or none."""
    error_file = tmp_path / f"error_{rank}.json"
    if message is not None:
        error_file.write_text(json.dumps({"message": {"message": message, "extraInfo": {
            "py_callstack": "Traceback ...", "timestamp": "1700000000"}}}))
    return ProcessFailure(local_rank=rank, pid=4000 + rank, exitcode=exitcode, error_file=str(error_file))


def test_the_failures_are_listed_root_cause_first(tmp_path):
    # Rank 1 was killed (no error report); rank 0 then lost its peer: a consequence.
    result = RunResult(state=WorkerState.FAILED, failures={
        0: failed(tmp_path, 0, 1, "RuntimeError: Connection closed by peer\nmore"),
        1: failed(tmp_path, 1, -9, None),
    })
    failures = _failures(result)
    assert failures == [{"rank": 1, "exit_code": -9, "error": None},
                        {"rank": 0, "exit_code": 1, "error": "RuntimeError: Connection closed by peer\nmore"}]
    cause = describe_cause(failures)
    assert cause.startswith("rank 1: no error report: killed by a signal")  # the likely root cause first
    assert cause.endswith("rank 0: RuntimeError: Connection closed by peer")  # its first line only
    assert _failures(None) == []
    assert describe_cause([]).startswith("unknown")


def test_a_worker_the_agent_ended_is_not_the_root_cause(tmp_path):
    # Rank 1 aborted at exit; the agent then ended rank 0 with SIGTERM, in the same second.
    failures = {0: failed(tmp_path, 0, -15, None), 1: failed(tmp_path, 1, -6, None)}
    assert [item["rank"] for item in _failures(RunResult(state=WorkerState.FAILED, failures=failures))] == [1, 0]
    report = describe_failure(failures, tmp_path)
    assert report.startswith("error: worker rank 1 failed (exit code -6, pid 4001): killed by signal SIGABRT")
    assert "other failed ranks (most likely as a consequence): 0" in report


def test_a_restart_is_one_line_with_why_and_where_it_resumes(tmp_path, capsys):
    run_dir = RunDir(tmp_path)
    failures = [{"rank": 1, "exit_code": -9, "error": None}]
    record_restart(run_dir, restart=1, old_world_size=2, new_world_size=2, why="failure", failures=failures,
                   resumed_from=str(tmp_path / "checkpoints" / "step_00000008.pt"), step=8)
    record_restart(run_dir, restart=2, old_world_size=2, new_world_size=4, why="membership change (a node joined)",
                   failures=[], resumed_from=None, step=0)
    first, second = [json.loads(line) for line in run_dir.restarts.read_text().splitlines()]
    assert {key: first[key] for key in ("restart", "why", "cause", "failures", "old_world_size", "new_world_size",
                                        "resumed_from", "step")} == {
        "restart": 1, "why": "failure", "cause": f"rank 1: {NO_REPORT}", "failures": failures,
        "old_world_size": 2, "new_world_size": 2,
        "resumed_from": str(tmp_path / "checkpoints" / "step_00000008.pt"), "step": 8}
    assert (second["cause"], second["new_world_size"], second["resumed_from"], second["step"]) == (
        "membership change (a node joined)", 4, None, 0)
    out = capsys.readouterr().out
    assert f"launch: restart 1 of the workers (rank 1: {NO_REPORT}); resuming from step 8" in out
    assert "world size 2 -> 4; no checkpoint yet: starting from the beginning" in out
