"""`launch slurm`, `launch status` and `launch cancel` on the real two-node SLURM cluster.

Five jobs run side by side on the cluster of ``scripts/slurm_cluster.sh`` while
``launch local --cpu --nproc 2`` trains the same demo config as the reference:

- A and B: one sweep over the run name (``run.name=plain,preempted``), so one
  array job of two elements, each the demo on 2 nodes x 1 CPU task, in a run
  directory whose name holds spaces, quotes, ``$(...)`` and backticks;
  - A runs uninterrupted;
  - B is interrupted twice mid-run: first with USR2 (what submitit's
    ``job._interrupt()`` sends: the workers checkpoint and the job requeues
    itself), then with ``scontrol requeue`` (SLURM's own preemption: SIGTERM,
    and SLURM requeues it). Both resumes must be exact;
- C: a slow job with ``--time 1``: SLURM's own time-limit warning (USR2)
  makes it checkpoint and requeue itself, and it completes;
- D, E: a job cancelled with ``launch cancel``, and one that fails: neither
  is requeued. D is then continued with ``launch resume``, which submits it
  again (the same plan) to resume from its checkpoint.

A and B must end with weights bitwise equal to the local run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.helpers import REPO, assert_same_weights, final_weights, run_launch, write_config
from tests.support.job import JOB_NAME

DEMO = REPO / "configs" / "demo.yaml"
# One CPU per task (the demo's loader process shares it), as the cluster's 2 x 2 CPUs are planned below.
TWO_NODES = ["--cpu", "--nproc-per-node", "1", "--nodes", "2", "--cpus-per-task", "1"]
WAIT_S = 300  # per wait; the whole module takes about 2 minutes
SLOW_EPOCHS, SLOW_STEPS = 15, 15 * 32  # the slow job: 256 samples in batches of 8, 0.1 s per step
FAIL_AT = 4  # E's rank 0 raises in its fifth training step (position 4)
RESUME_EPOCHS = 3  # D, cancelled early in its first epoch, is resumed to train 3 epochs (96 steps) in all

pytestmark = pytest.mark.timeout(1200)


# -- helpers ----------------------------------------------------------------------------------


def job_record(run_dir: Path) -> dict:
    """The run's newest job, as `launch slurm` recorded it in slurm.json."""
    return json.loads((run_dir / "slurm.json").read_text())["jobs"][-1]


def job_id(run_dir: Path) -> str:
    return job_record(run_dir)["job_id"]


def task_log(run_dir: Path, rank: int, stream: str = "err") -> Path:
    """A task's stdout/stderr file, in the folder of the run's job (a sweep's: the array's folder)."""
    return Path(job_record(run_dir)["folder"]) / f"{job_id(run_dir)}_{rank}_log.{stream}"


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "slurm_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def event(run_dir: Path, name: str, restart: int) -> dict | None:
    return next((e for e in events(run_dir) if e["event"] == name and e["restart"] == restart), None)


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    steps = [json.loads(line)["step"] for line in lines if line.strip().endswith("}")]
    return steps[-1] if steps else -1


def scontrol(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
    value = [part.split("=", 1)[1] for part in out.split() if part.startswith(f"{field}=")]
    return value[0] if value else ""


def slurm(*command: str) -> None:
    subprocess.run(list(command), check=True, capture_output=True, text=True, timeout=60)


def wait_until(condition, what: str, run_dir: Path, timeout: float = WAIT_S):
    """Poll until ``condition()`` is truthy; on timeout cancel the job and fail with its logs."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            job = job_id(run_dir)
            folder = Path(job_record(run_dir)["folder"])
            logs = "\n".join(f"----- {path}\n{path.read_text(errors='replace')[-3000:]}"
                             for path in sorted(folder.glob(f"{job}_*_log.err")))
            subprocess.run(["scancel", job], capture_output=True, timeout=30)
            pytest.fail(f"{what}: not after {timeout} s (job {job}, state {scontrol(job, 'JobState')})\n"
                        f"events: {events(run_dir)}\n{logs}")
        time.sleep(0.2)


def submit(*args: str, cwd: Path) -> str:
    result = run_launch("slurm", *args, cwd=cwd, timeout=120)
    assert result.returncode == 0, f"launch slurm failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


# -- the drivers, one thread per job ------------------------------------------------------------


def drive_preemption(run_dir: Path) -> dict:
    job = job_id(run_dir)
    wait_until(lambda: logged_step(run_dir) >= 30, "B trains", run_dir)
    slurm("scancel", "--signal=USR2", job)  # = submitit's SlurmJob._interrupt(timeout=True)
    first = wait_until(lambda: event(run_dir, "requeued", 0), "B requeues itself after USR2", run_dir)
    wait_until(lambda: event(run_dir, "started", 1), "B restarts", run_dir)
    wait_until(lambda: logged_step(run_dir) >= first["step"] + 30, "B trains after its first resume", run_dir)
    slurm("scontrol", "requeue", job)  # SLURM's own preemption: SIGTERM, then SLURM requeues the job
    second = wait_until(lambda: event(run_dir, "stopped", 1), "B checkpoints on SIGTERM", run_dir)
    done = wait_until(lambda: event(run_dir, "finished", 2), "B finishes after its second resume", run_dir)
    return {"first": first, "second": second, "done": done, "restarts": scontrol(job, "Restarts")}


def drive_time_limit(run_dir: Path) -> dict:
    job = job_id(run_dir)
    first = wait_until(lambda: event(run_dir, "requeued", 0), "C is warned before its time limit", run_dir)
    wait_until(lambda: scontrol(job, "JobState") == "PENDING", "C is pending again", run_dir)
    # SLURM's smallest limit is a minute, and it warns up to 30 s early, so the requeued job would
    # be warned again within seconds of starting. A real job's limit is hours; give the rest room.
    slurm("scontrol", "update", f"JobId={job}", "TimeLimit=5")
    done = wait_until(lambda: event(run_dir, "finished", 1), "C finishes after its requeue", run_dir)
    return {"first": first, "done": done, "restarts": scontrol(job, "Restarts")}


def drive_cancel(run_dir: Path, cwd: Path) -> dict:
    job = job_id(run_dir)
    wait_until(lambda: logged_step(run_dir) >= 10, "D trains", run_dir)
    cancelled = run_launch("cancel", str(run_dir), cwd=cwd)
    stopped = wait_until(lambda: event(run_dir, "stopped", 0), "D checkpoints on cancel", run_dir)
    wait_until(lambda: scontrol(job, "JobState") == "CANCELLED", "D ends cancelled", run_dir)
    status = run_launch("status", str(run_dir), cwd=cwd)
    restarts = scontrol(job, "Restarts")
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").glob("step_*.pt"))  # before the resume
    # As the cancel said: `launch resume RUN_DIR` continues the run, as a new job of the same plan.
    resumed = run_launch("resume", str(run_dir), f"train.epochs={RESUME_EPOCHS}", cwd=cwd, timeout=120)
    again = job_id(run_dir) if resumed.returncode == 0 else None
    done = again and wait_until(lambda: next((e for e in events(run_dir) if e["job_id"] == again
                                              and e["event"] in ("finished", "failed")), None),
                                "D finishes after `launch resume`", run_dir)
    return {"job": job, "cancelled": cancelled, "stopped": stopped, "status": status, "restarts": restarts,
            "checkpoints": checkpoints,
            "resumed": resumed, "again": again, "done": done,
            "status_after": run_launch("status", str(run_dir), cwd=cwd)}


def after_a_then_local(plain: Path, *args: str, cwd: Path):
    wait_until(lambda: event(plain, "finished", 0), "A finishes", plain)
    return run_launch("local", "--cpu", "--nproc", "2", *args, cwd=cwd, timeout=WAIT_S)


def submit_while_busy(run_dir: Path, args: list[str], cwd: Path) -> tuple[str, object]:
    """``launch slurm`` again for a run whose job is queued or running: must be refused."""
    wait_until(lambda: event(run_dir, "started", 0), "B starts", run_dir)
    return job_id(run_dir), run_launch("slurm", *args, cwd=cwd)


def wait_for_failure(run_dir: Path, cwd: Path) -> dict:
    job = job_id(run_dir)
    wait_until(lambda: scontrol(job, "JobState") == "FAILED", "E fails", run_dir)
    return {"status": run_launch("status", str(run_dir), cwd=cwd), "restarts": scontrol(job, "Restarts"),
            "events": events(run_dir)}


@dataclass
class Runs:
    base: Path
    plain: Path  # A
    preempted: Path  # B
    time_limited: Path  # C
    cancelled: Path  # D
    failing: Path  # E
    local: Path
    submitted: str  # launch slurm's output for A and B
    local_result: object  # futures: the reference run and the drivers
    preemption: object
    time_limit: object
    cancel: object
    failure: object
    busy: object


def slow_job(**extra) -> dict:
    """The test job as a linear regression whose steps take 0.1 s: 256 samples in batches of 8."""
    return {"name": JOB_NAME, "model": "linear", "samples": 256, "val_samples": 0, "features": 4,
            "step_sleep_s": 0.1, **extra}


@pytest.fixture(scope="module")
def runs(slurm_cluster, tmp_path_factory):
    """Submit A..E, train the local reference, and drive each job from its own thread.

    The cluster has 2 CPUs per node. C holds one on n1 for about a minute, so A and B (one task
    on each node) take turns on n1's other CPU: A first (short), then B, whose requeues then find
    n1 free. D and E go to n2 first.
    """
    base = tmp_path_factory.mktemp("slurm-e2e")
    awkward = base / "runs with 'quotes' $(touch pwned) `touch pwned2`"
    # The demo's steps take milliseconds: B must stop within a few of them, so its ranks vote on a
    # stop every step (the slow jobs C, D and E keep the default cadence).
    common = [str(DEMO), "train.progress_bar=false", "train.stop_check_s=0"]
    train = {"epochs": SLOW_EPOCHS, "log_every": 5, "progress_bar": False}
    data = {"batch_size": 8, "num_workers": 0}
    slow = write_config(base, {"job": slow_job(), "run": {"name": "slow"}, "data": data, "train": train},
                        name="slow.yaml")
    failing_config = write_config(base, {"job": slow_job(faults=[{"kind": "raise", "rank": 0, "at": FAIL_AT}]),
                                         "run": {"name": "failing"}, "data": data, "train": train},
                                  name="failing.yaml")
    # C: 480 steps of 0.1 s (48 s), still training when SLURM warns it 13-45 s into its 1-minute
    # limit: it asks for 15 s, and SLURM checks every 30 s. Later than 13 s, as a task may take
    # seconds to start on a loaded machine, and a warning before it runs is lost.
    submit("--cpu", "--time", "1", "--signal-delay", "15", "--sbatch", "nodelist=n1", str(slow), cwd=base)
    pool = ThreadPoolExecutor(max_workers=7)
    # D and E: short, on n2, before A and B, so they are over by the time B needs n2.
    on_n2 = ["--cpu", "--sbatch", "nodelist=n2"]
    failing = pool.submit(submit, *on_n2, str(failing_config), cwd=base)
    cancelled = pool.submit(submit, *on_n2, str(slow), "run.name=cancelled", "train.epochs=50", cwd=base)
    failing.result(), cancelled.result()
    # A and B: one sweep over the run name (one array job), in the awkward directory.
    submitted = submit(*TWO_NODES, *common, f"run.dir={awkward}", "run.name=plain,preempted", cwd=base)
    # The reference, once A is done: B's requeues leave the CPUs idle for seconds at a time.
    local = pool.submit(after_a_then_local, awkward / "plain", *common, f"run.dir={base / 'local'}", cwd=base)
    runs_dir = base / "runs"
    yield Runs(base=base, plain=awkward / "plain", preempted=awkward / "preempted", time_limited=runs_dir / "slow",
               cancelled=runs_dir / "cancelled", failing=runs_dir / "failing", local=base / "local" / "demo",
               submitted=submitted, local_result=local,
               preemption=pool.submit(drive_preemption, awkward / "preempted"),
               time_limit=pool.submit(drive_time_limit, runs_dir / "slow"),
               cancel=pool.submit(drive_cancel, runs_dir / "cancelled", base),
               failure=pool.submit(wait_for_failure, runs_dir / "failing", base),
               busy=pool.submit(submit_while_busy, awkward / "preempted", [*TWO_NODES, *common, f"run.dir={awkward}",
                                                                          "run.name=preempted"], base))
    pool.shutdown(wait=True)
    for run_dir in (awkward / "plain", awkward / "preempted", runs_dir / "slow", runs_dir / "cancelled",
                    runs_dir / "failing"):
        if (run_dir / "slurm.json").is_file():
            subprocess.run(["scancel", job_id(run_dir)], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def local_weights(runs):
    result = runs.local_result.result()
    assert result.returncode == 0, result.stderr
    return final_weights(runs.local)


# -- what SLURM refuses, said in one message (first: they run while the jobs train) ---------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("option, slurm_said", [
    (["--partition", "nosuchpartition"], "invalid partition"),
    (["--nodes", "3"], "requested node configuration is not available"),
])
def test_a_rejected_submission_says_what_sbatch_said(runs, tmp_path, option, slurm_said):
    result = run_launch("slurm", "--cpu", *option, str(DEMO), f"run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 1
    assert f"error: sbatch refused the job for {tmp_path / 'demo'}: " in result.stderr
    assert slurm_said in result.stderr.lower() and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # All or nothing: the refused submission leaves no run behind, so the fixed command just works.
    assert not (tmp_path / "demo" / "config.yaml").exists() and not (tmp_path / "demo" / "slurm.json").exists()


@pytest.mark.timeout(120)
def test_a_time_limit_sbatch_cannot_read_is_refused_before_submitting(runs, tmp_path):
    result = run_launch("slurm", "--cpu", "--time", "soon", str(DEMO), f"run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert "error: --time 'soon' is not a time sbatch reads" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()


@pytest.mark.timeout(120)
def test_without_slurm_on_path_the_message_says_so(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    result = run_launch("slurm", "--cpu", str(DEMO), f"run.dir={tmp_path}", cwd=tmp_path,
                        env={"PATH": str(empty)})
    assert result.returncode == 1
    assert "SLURM's sbatch, srun, scontrol not found on PATH: run this on a SLURM login node" in result.stderr
    run_dir = tmp_path / "demo"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text(DEMO.read_text())
    (run_dir / "slurm.json").write_text('{"jobs": [{"job_id": "1"}]}')
    status = run_launch("status", str(run_dir), cwd=tmp_path, env={"PATH": str(empty)})
    assert status.returncode == 1 and "SLURM's scontrol not found on PATH" in status.stderr


# -- the claims -----------------------------------------------------------------------------------


def resumed_at(run_dir: Path, step: int) -> bool:
    """Rank 0's log says a run resumed from the checkpoint of ``step``."""
    log = (run_dir / "logs" / "rank_0.log").read_text()
    return any("resuming from" in line and f": step {step}," in line for line in log.splitlines())


def test_two_node_job_trains_the_demo_to_the_same_weights_as_launch_local(runs, local_weights):
    run_dir = runs.plain
    job, record = job_id(run_dir), job_record(run_dir)
    array = job.split("_")[0]
    folder = Path(record["folder"])
    assert job == f"{array}_0" and job_id(runs.preempted) == f"{array}_1"  # the sweep is one array job
    assert f"submitted job {job}: 2 task(s) on 2 node(s)" in runs.submitted
    assert runs.submitted.count("submitted job") == 2  # the sweep over run.name: A and B
    assert str(run_dir) in runs.submitted and f"{folder}/%A_%a_RANK_log.out|err" in runs.submitted
    cluster = next(line.split("=", 1)[1].strip() for line in Path(os.environ["SLURM_CONF"]).read_text().splitlines()
                   if line.startswith("ClusterName="))
    assert (record["run_dir"], record["cluster"]) == (str(run_dir), cluster)
    assert folder == run_dir.parent / "plain_sweep" / "slurm" == Path(job_record(runs.preempted)["folder"])
    assert abs(record["submitted"] - time.time()) < 1800
    done = wait_until(lambda: event(run_dir, "finished", 0), "A finishes", run_dir)
    assert done["epoch"] == 8
    assert_same_weights(final_weights(run_dir), local_weights)
    environment = json.loads((run_dir / "env.jsonl").read_text().splitlines()[-1])
    assert (environment["world_size"], environment["nnodes"], environment["launched_by"]) == (2, 2, "slurm")
    for rank in (0, 1):
        assert task_log(run_dir, rank).is_file()
        assert (run_dir / "logs" / f"rank_{rank}.log").is_file()
    assert not list(runs.base.rglob("pwned*")), "a run directory's name was executed"
    status = run_launch("status", str(run_dir), cwd=runs.base)
    assert status.returncode == 0, status.stderr
    assert f"job            {job}: COMPLETED on n[1-2]" in status.stdout, status.stdout
    assert "requeues       0 (at most 3)" in status.stdout
    assert "progress       step 184, epoch 8; last checkpoint step_00000184.pt" in status.stdout, status.stdout


def test_the_submitted_script_is_the_one_the_dry_run_prints(runs):
    array = job_id(runs.plain).split("_")[0]
    dry = run_launch("slurm", *TWO_NODES, "--dry-run", str(DEMO), "train.progress_bar=false", "train.stop_check_s=0",
                     f"run.dir={runs.plain.parent}", "run.name=plain,preempted", cwd=runs.base)
    assert dry.returncode == 0, dry.stderr
    script = dry.stdout.split("# sbatch script (submitted through submitit)\n", 1)[1]
    submitted = Path(job_record(runs.plain)["folder"]) / f"{array}_submission.sh"
    assert submitted.read_text() == script.rstrip("\n") + "\n"


def test_preempted_job_resumes_exactly_and_ends_with_the_same_weights(runs, local_weights):
    outcome = runs.preemption.result()
    first, second = outcome["first"], outcome["second"]
    assert first["signal"] == "SIGUSR2" and 0 < first["step"] < 184
    assert second["signal"] == "SIGTERM" and second["state"] != "RUNNING" and first["step"] < second["step"] < 184
    assert outcome["done"]["step"] == 184 and outcome["restarts"] == "2"
    assert resumed_at(runs.preempted, first["step"]) and resumed_at(runs.preempted, second["step"])
    assert_same_weights(final_weights(runs.preempted), local_weights)
    status = run_launch("status", str(runs.preempted), cwd=runs.base)
    assert "requeues       2 (at most 3)" in status.stdout, status.stdout
    assert f"last stop      stopped (step {second['step']}, signal SIGTERM" in status.stdout, status.stdout


def test_time_limit_warning_checkpoints_requeues_and_completes(runs):
    outcome = runs.time_limit.result()
    assert outcome["first"]["signal"] == "SIGUSR2" and outcome["first"]["step"] < SLOW_STEPS
    assert outcome["done"]["step"] == SLOW_STEPS and outcome["restarts"] == "1"
    assert "received SIGUSR2" in (runs.time_limited / "logs" / "rank_0.log").read_text()
    assert resumed_at(runs.time_limited, outcome["first"]["step"])


def test_a_run_whose_job_is_queued_or_running_is_not_submitted_twice(runs):
    job, again = runs.busy.result()
    assert again.returncode == 2 and f"already has job {job} (" in again.stderr, again.stderr
    assert "two jobs must not train into one run directory" in again.stderr


def test_cancel_checkpoints_and_does_not_requeue(runs):
    outcome = runs.cancel.result()
    job = outcome["job"]  # the run's first job (`launch resume` submits a second one)
    cancelled, stopped = outcome["cancelled"], outcome["stopped"]
    assert cancelled.returncode == 0 and f"cancelled job {job} (was RUNNING)" in cancelled.stdout, cancelled.stderr
    assert stopped["signal"] == "SIGTERM" and stopped["state"] != "RUNNING"
    assert f"step_{stopped['step']:08d}.pt" in outcome["checkpoints"]
    assert outcome["restarts"] == "0"
    status = outcome["status"].stdout
    assert f"{job}: CANCELLED" in status and "the job was cancelled" in status, status


def test_resume_submits_a_cancelled_run_again_and_it_continues_from_its_checkpoint(runs):
    outcome = runs.cancel.result()
    resumed, stopped = outcome["resumed"], outcome["stopped"]
    assert resumed.returncode == 0, f"{resumed.stdout}\n{resumed.stderr}"
    jobs = json.loads((runs.cancelled / "slurm.json").read_text())["jobs"]
    first, again = outcome["job"], outcome["again"]
    assert [job["job_id"] for job in jobs] == [first, again] and again != first
    assert f"submitted job {again}: 1 task(s) on 1 node(s) (resumes from the run's last checkpoint)" in resumed.stdout
    assert outcome["done"]["event"] == "finished" and outcome["done"]["step"] == RESUME_EPOCHS * 32, outcome["done"]
    assert resumed_at(runs.cancelled, stopped["step"])
    assert scontrol(again, "NodeList") == "n2"  # the same plan, its --sbatch options too
    resumes = [json.loads(line) for line in (runs.cancelled / "resumes.jsonl").read_text().splitlines()]
    assert resumes[-1]["overrides"] == [f"train.epochs={RESUME_EPOCHS}"]
    status = outcome["status_after"].stdout
    assert f"job            {again}: COMPLETED" in status and f"earlier jobs   {first}" in status, status


def test_a_failing_job_is_not_requeued_and_status_shows_the_root_cause(runs):
    outcome = runs.failure.result()
    job = job_id(runs.failing)
    error = f"ValueError: rank 0 exploded at position {FAIL_AT}"
    assert outcome["restarts"] == "0"
    assert [e["event"] for e in outcome["events"]] == ["started", "failed"]
    assert error in outcome["events"][-1]["error"]
    status = outcome["status"].stdout
    assert f"job            {job}: FAILED" in status and "a task exited with an error, exit code 1:0" in status, status
    assert f"first error    {task_log(runs.failing, 0)}:" in status
    assert error in status
