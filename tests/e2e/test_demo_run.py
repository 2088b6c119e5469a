"""The README's demo through ``launch local``, as a user runs it: 2 CPU workers on configs/demo.yaml."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support.helpers import REPO, run_launch

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
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
    assert f"results in {run_dir}" in result.stderr
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
    assert last["loader"]["epoch"] == config.train.epochs
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
    assert f"`launch resume {run_dir} optim.lr=0.3`" in result.stderr and "Traceback" not in result.stderr
