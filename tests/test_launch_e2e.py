"""Tier 4: the `launch` command end to end, as a user runs it."""

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, run_launch, write_config

pytestmark = pytest.mark.timeout(600)

REGRESSION = {"name": "tests.jobs_cli:Regression"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's demo: 2 CPU workers on the demo config."""
    runs = tmp_path_factory.mktemp("demo")
    result = run_launch("local", "--cpu", "--nproc", "2", str(REPO / "configs" / "demo.yaml"),
                        f"run.dir={runs}", "train.progress_bar=false", cwd=runs)
    return result, runs / "demo"


def test_demo_trains_to_95_percent_with_two_workers(demo_run):
    result, run_dir = demo_run
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["val/accuracy"] for r in records if "val/accuracy" in r]
    assert accuracy and accuracy[-1] >= 0.95
    assert f"results in {run_dir.relative_to(run_dir.parent.parent)}" in result.stderr or str(run_dir) in result.stderr
    environment = json.loads((run_dir / "env.jsonl").read_text().splitlines()[-1])
    assert environment["world_size"] == 2 and environment["backend"] == "gloo"


def test_demo_writes_tensorboard_scalars(demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = demo_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "val/accuracy", "train/epoch_time_s"} <= tags
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses[-1] < losses[0]


def test_demo_leaves_loadable_best_and_last_checkpoints(demo_run):
    from ddp.config import load_config
    from ddp.env import DistEnv
    from jobs.registry import make_job

    _, run_dir = demo_run
    config = load_config(run_dir / "config.yaml")
    for name in ("best.pt", "last.pt"):
        state = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        model = make_job(config.job, DistEnv()).build_model()
        model.load_state_dict(state["model"])
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["train_state"]["epoch"] == config.train.epochs
    assert (run_dir / "logs" / "rank_0.log").is_file() and (run_dir / "logs" / "rank_1.log").is_file()


def test_launching_a_finished_run_again_does_not_overwrite_it(demo_run):
    _, run_dir = demo_run
    before = (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns
    again = run_launch("local", "--cpu", "--nproc", "2", str(REPO / "configs" / "demo.yaml"),
                       f"run.dir={run_dir.parent}", "train.progress_bar=false")
    assert again.returncode == 0, again.stderr
    assert "already finished" in again.stderr
    assert (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns == before


def test_the_same_run_name_with_another_config_is_refused(demo_run):
    _, run_dir = demo_run
    result = run_launch("local", "--cpu", "--nproc", "2", str(REPO / "configs" / "demo.yaml"),
                        f"run.dir={run_dir.parent}", "optim.lr=0.3")
    assert result.returncode == 2
    assert "already holds a run with a different config (differs in optim.lr)" in result.stderr
    assert "launch resume" in result.stderr and "Traceback" not in result.stderr


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path):
    config = write_config(tmp_path, {"job": REGRESSION, "run": {"name": "dry"}})
    result = run_launch("local", "--cpu", "--nproc", "3", "--max-restarts", "2", "--dry-run", str(config),
                        "optim.lr=0.01")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "lr: 0.01" in out
    assert "world size     3 (1 node(s) x 3 worker(s))" in out
    assert "backend gloo" in out and "max restarts   2" in out
    assert "torchrun --nnodes=1 --nproc-per-node=3 --standalone" in out
    assert not (tmp_path / "runs").exists()


def test_a_failing_worker_is_reported_as_the_root_cause(tmp_path):
    config = write_config(tmp_path, {"job": {**REGRESSION, "fail_on_rank": 1, "fail_at_step": 3},
                                     "run": {"name": "fails"}, "data": {"num_workers": 0, "batch_size": 8}})
    result = run_launch("local", "--cpu", "--nproc", "2", str(config))
    assert result.returncode == 1
    err = result.stderr
    assert "error: worker rank 1 failed (exit code 1" in err
    assert "ValueError: rank 1 exploded at step 3" in err
    assert "worker traceback (root cause):" in err and "jobs_cli.py" in err
    assert f"worker log: {tmp_path / 'runs' / 'fails' / 'logs' / 'rank_1.log'}" in err


def test_gpus_on_a_machine_without_any_names_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = write_config(tmp_path, {"job": REGRESSION})
    result = run_launch("local", "--gpus", "2", str(config))
    assert result.returncode == 2
    assert "this machine has none; use --cpu --nproc N" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_runs_in_process_and_stops_at_a_breakpoint(tmp_path):
    pid_file = tmp_path / "pid"
    config = write_config(tmp_path, {"job": {**REGRESSION, "breakpoint_file": str(pid_file)},
                                     "run": {"name": "dbg"}, "train": {"epochs": 1}, "data": {"batch_size": 16}})
    process = subprocess.Popen([sys.executable, "-m", "launcher", "debug", str(config), "--steps", "5"],
                               cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    out, err = process.communicate("p 'stopped-in-' + type(model).__name__\ncontinue\n", timeout=300)
    assert process.returncode == 0, err
    assert "(Pdb)" in out and "stopped-in-Linear" in out
    assert int(pid_file.read_text()) == process.pid  # the job ran in the launching process itself
    assert "debug run finished at step 5" in err
