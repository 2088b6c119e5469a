"""Issue 5: the performance options train correctly, and the hot loop stays cheap.

* DDP's options (bucket_cap_mb, gradient_as_bucket_view, static_graph,
  find_unused_parameters) reach DDP and train like the defaults: 2 gloo processes.
* channels_last and torch.compile train like the plain run: one process.
* Per-sample seeding (seeded only where the dataset draws) gives every item
  exactly as if every generator had been seeded before it.
* No host-device synchronisation per step; the data-wait share is logged.
* TensorBoard files written without tensorboard are read by tensorboard.
* The demo's path imports neither torchvision, tensorboard nor submitit.
* CPU workers get OMP_NUM_THREADS = cores // workers.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Dataset, TensorDataset

from ddp.config import DataConfig, DDPConfig, load_config
from ddp.data import PerSampleSeeded, ResumableDistributedSampler, make_loader, sample_seed
from ddp.env import DistEnv, read_env
from tests.helpers import REPO, final_weights

pytestmark = pytest.mark.timeout(300)


def mlp_config(tmp_path, name, *overrides):
    return load_config(REPO / "configs" / "demo.yaml", [
        f"run.dir={tmp_path}", f"run.name={name}", "job.model=small_mlp", "data.batch_size=16",
        "data.num_workers=0", "optim.lr=0.1", "schedule.name=constant", "schedule.warmup_steps=0",
        "train.max_steps=6", "train.progress_bar=false", "checkpoint.every_steps=null", *overrides,
    ])


def train_here(config, run_dir):
    from ddp.trainer import run_training

    return run_training(config, run_dir, DistEnv(), num_workers=0)


def assert_close_weights(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol)


# -- DDP options: 2 processes on gloo ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_rank(rank, world_size, port, config, run_dir, record):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import ddp.trainer as trainer

    real_wrap = trainer.wrap

    def recording_wrap(*args, **kwargs):  # what DDP was actually built with
        model = real_wrap(*args, **kwargs)
        if rank == 0:
            reducer_options = {
                "bucket_bytes_cap": model.bucket_bytes_cap,
                "gradient_as_bucket_view": model.gradient_as_bucket_view,
                "static_graph": model.static_graph,
                "find_unused_parameters": model.find_unused_parameters,
            }
            with open(record, "w") as handle:
                json.dump(reducer_options, handle)
        return model

    trainer.wrap = recording_wrap
    trainer.run_training(config, run_dir, read_env())


def train_two_processes(config, run_dir, record):
    mp.start_processes(_train_rank, args=(2, free_port(), config, run_dir, str(record)), nprocs=2,
                       start_method="spawn")
    with open(record) as handle:
        return json.load(handle), final_weights(run_dir)


@pytest.fixture(scope="module")
def ddp_defaults(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp-defaults")
    return train_two_processes(mlp_config(tmp_path, "defaults"), tmp_path / "defaults", tmp_path / "record.json")


@pytest.mark.parametrize("option, value, expected", [
    ("bucket_cap_mb", 0.001, ("bucket_bytes_cap", 1048)),  # a bucket per parameter
    ("gradient_as_bucket_view", False, ("gradient_as_bucket_view", False)),
    ("static_graph", True, ("static_graph", True)),
    ("find_unused_parameters", True, ("find_unused_parameters", True)),
])
def test_each_ddp_option_reaches_ddp_and_trains_like_the_defaults(tmp_path, ddp_defaults, option, value, expected):
    default_options, default_weights = ddp_defaults
    assert default_options[expected[0]] != expected[1]  # the option changes something
    config = mlp_config(tmp_path, option, f"ddp.{option}={value}")
    assert getattr(config.ddp, option) == value
    options, weights = train_two_processes(config, tmp_path / option, tmp_path / "record.json")
    assert options[expected[0]] == expected[1]
    assert_close_weights(weights, default_weights, atol=1e-6)


def test_ddp_options_have_torchs_defaults_but_view_gradients_in_their_buckets():
    assert (DDPConfig().bucket_cap_mb, DDPConfig().static_graph, DDPConfig().find_unused_parameters) == (25.0, False,
                                                                                                         False)
    assert DDPConfig().gradient_as_bucket_view  # saves a copy of every gradient per step


# -- channels_last and torch.compile: one process ------------------------------------------------


def test_channels_last_trains_like_the_default_layout(tmp_path, monkeypatch):
    from jobs.image_classification import ImageClassification

    layouts = []
    real_step = ImageClassification.training_step

    def recording_step(self, model, batch):
        # One input channel fits either layout; the 32-channel features and the second conv's
        # weights show which one is used.
        first, second = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][:2]
        with torch.no_grad():
            features = first(batch[0])
        layouts.append((features.is_contiguous(memory_format=torch.channels_last),
                        second.weight.is_contiguous(memory_format=torch.channels_last)))
        return real_step(self, model, batch)

    monkeypatch.setattr(ImageClassification, "training_step", recording_step)
    cnn = ("job.model=small_cnn", "train.max_steps=5", "job.val_fraction=0")
    train_here(mlp_config(tmp_path, "plain", *cnn), tmp_path / "plain")
    assert set(layouts) == {(False, False)}
    layouts.clear()
    train_here(mlp_config(tmp_path, "cl", *cnn, "train.channels_last=true"), tmp_path / "cl")
    assert set(layouts) == {(True, True)}
    assert_close_weights(final_weights(tmp_path / "cl"), final_weights(tmp_path / "plain"), atol=1e-4)


@pytest.mark.timeout(900)  # the first compile of a process takes a while, more on a busy machine
def test_torch_compile_trains_like_eager(tmp_path):
    train_here(mlp_config(tmp_path, "eager", "train.max_steps=4"), tmp_path / "eager")
    outcome = train_here(mlp_config(tmp_path, "compiled", "train.max_steps=4", "train.compile=true"),
                         tmp_path / "compiled")
    assert outcome.status == "finished"
    # The checkpoint holds the bare model's keys (no _orig_mod.), and the same weights up to rounding.
    assert_close_weights(final_weights(tmp_path / "compiled"), final_weights(tmp_path / "eager"), atol=1e-5)


# -- the hot loop ----------------------------------------------------------------------------------


def test_no_host_sync_per_step(tmp_path, monkeypatch):
    """Reading a tensor's value (item, tolist, cpu, bool, float) inside the loop happens per log window only."""
    import ddp.trainer as trainer

    reads = {"count": 0, "counting": False}
    for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            if reads["counting"]:
                reads["count"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    real_epoch = trainer.Trainer._train_epoch

    def counting_epoch(self):
        reads["counting"] = True
        try:
            return real_epoch(self)
        finally:
            reads["counting"] = False

    monkeypatch.setattr(trainer.Trainer, "_train_epoch", counting_epoch)

    class NotCountingData(trainer.Waited):  # the dataset's own reads (labels to int, ...) are not the loop's
        def __next__(self):
            reads["counting"] = False
            try:
                return super().__next__()
            finally:
                reads["counting"] = True

    monkeypatch.setattr(trainer, "Waited", NotCountingData)
    counts = {}
    for steps in (20, 40):
        reads["count"] = 0
        train_here(mlp_config(tmp_path, f"sync{steps}", f"train.max_steps={steps}", "train.log_every=100",
                              "data.batch_size=8"), tmp_path / f"sync{steps}")
        counts[steps] = reads["count"]
    # One log window per run (the last step); twice the steps must not mean more reads.
    assert counts[40] == counts[20] <= 3, counts


def test_the_share_of_time_waiting_for_data_is_logged(tmp_path):
    train_here(mlp_config(tmp_path, "wait", "train.log_every=2"), tmp_path / "wait")
    records = [json.loads(line) for line in open(tmp_path / "wait" / "metrics.jsonl")]
    shares = [r["train/data_wait_share"] for r in records if "train/loss" in r]
    assert len(shares) == 3 and all(0 <= share <= 1 for share in shares)


# -- per-sample seeding ------------------------------------------------------------------------------


class Draws(Dataset):
    """Items drawing from the generators named for them (some items none), like augmentations do."""

    def __init__(self, plan):
        self.plan = plan  # index -> generators it draws from

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, index):
        sources = self.plan[index]
        return torch.tensor([
            torch.rand(()).item() if "torch" in sources else -1.0,
            float(np.random.rand()) if "numpy" in sources else -1.0,
            float(np.random.randn()) if "gauss" in sources else -1.0,
            random.random() if "random" in sources else -1.0,
            float(index),
        ], dtype=torch.float64)


def reference(dataset, seed, epoch, index):
    """The item under every generator freshly seeded from (seed, epoch, index): the promise."""
    item_seed = sample_seed(seed, epoch, index)
    random.seed(item_seed)
    np.random.seed(item_seed % 2**32)
    torch.manual_seed(item_seed)
    return dataset[index]


PLANS = {
    "none": [()] * 24,
    "torch only": [("torch",)] * 24,
    "everything": [("torch", "numpy", "random", "gauss")] * 24,
    # The first draws come late, and from one item only: a batch must be produced again.
    "late and rare": [()] * 13 + [("random", "gauss")] + [()] * 4 + [("numpy",)] + [("torch",)] * 5,
}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("plan", list(PLANS))
def test_every_item_is_as_if_every_generator_was_seeded_for_it(plan, workers):
    dataset = Draws(PLANS[plan])
    sampler = ResumableDistributedSampler(len(dataset), 0, 1, seed=3)
    loader = make_loader(dataset, sampler, DataConfig(num_workers=workers), 4, seed=3, rank=0,
                         device=torch.device("cpu"))
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        got = torch.cat(list(loader))
        expected = torch.stack([reference(dataset, 3, epoch, int(index)) for index in got[:, 4]])
        assert torch.equal(got, expected)


def test_loading_in_the_training_process_leaves_its_generators_alone():
    for cached_gaussian in (False, True):
        dataset = PerSampleSeeded(Draws(PLANS["late and rare"]), seed=1)  # nothing learnt yet
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        if cached_gaussian:
            np.random.randn()  # numpy now holds the second gaussian of a pair
        before = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        items = dataset.__getitems__([(0, i) for i in range(24)])
        after = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        assert torch.equal(before[0], after[0]) and before[1] == after[1]
        assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(before[2], after[2]))
        assert all(torch.equal(item, reference(Draws(PLANS["late and rare"]), 1, 0, i)) for i, item in enumerate(items))


def test_tensors_in_memory_pass_through_unchanged():
    data = TensorDataset(torch.arange(10.0), torch.arange(10))
    wrapped = PerSampleSeeded(data, seed=0)
    state = torch.get_rng_state()
    assert [tuple(map(int, item)) for item in wrapped.__getitems__([(0, 3), (1, 7)])] == [(3, 3), (7, 7)]
    assert torch.equal(torch.get_rng_state(), state)


# -- TensorBoard without tensorboard ----------------------------------------------------------------------


def test_tensorboard_reads_our_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ddp.reporting import MetricsSink
    from ddp.tensorboard_events import crc32c, masked_crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    assert masked_crc32c(b"") == ((((0 >> 15) | (0 << 17)) + 0xA282EAD8) & 0xFFFFFFFF)
    sink = MetricsSink(tmp_path, enabled=True)
    for step in range(1, 6):
        sink.write(step, {"train/loss": 1.0 / step, "train/lr": 0.1}, epoch=0)
    sink.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr"}
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")] == [(s, round(1 / s, 6))
                                                                                    for s in range(1, 6)]
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]


# -- imports and threads -------------------------------------------------------------------------------------


def test_the_demo_path_imports_neither_torchvision_tensorboard_nor_submitit(tmp_path):
    script = (
        "import sys\n"
        "from launcher.cli import main\n"
        f"code = main(['debug', {str(REPO / 'configs' / 'demo.yaml')!r}, 'train.max_steps=2', "
        f"'run.dir={tmp_path}'])\n"
        "print('IMPORTED', sorted(m for m in ('torchvision', 'tensorboard', 'submitit') if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "IMPORTED []" in result.stdout, result.stdout


def test_building_the_command_line_imports_no_torch():
    script = ("import sys\nfrom launcher.cli import build_parser\nbuild_parser()\n"
              "print(sorted(m for m in ('torch', 'submitit', 'tensorboard', 'torchvision') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def plan(**overrides):
    from launcher.local import plan_local

    arguments = dict(gpus=None, cpu=True, nproc=2, nnodes=1, node_rank=0, rdzv_endpoint=None, max_restarts=0,
                     run_dir=REPO / "runs" / "x", visible_gpus=0, port=1234, cpu_count=8, env_threads=None)
    arguments.update(overrides)
    return plan_local(**arguments)


def test_cpu_workers_share_the_cores_out():
    assert plan(nproc=2, cpu_count=2).threads_per_worker == 1
    assert plan(nproc=2, cpu_count=8).threads_per_worker == 4
    assert plan(nproc=3, cpu_count=8).threads_per_worker == 2
    assert plan(nproc=4, cpu_count=2).threads_per_worker == 1  # never 0
    described = plan(nproc=2, cpu_count=8).describe()
    assert "4 per worker" in described and "OMP_NUM_THREADS=4 torchrun" in described


def test_the_users_omp_num_threads_wins():
    chosen = plan(env_threads="3")
    assert chosen.threads_per_worker is None and chosen.worker_environment() == {}
    assert plan(cpu_count=None).worker_environment() == {}  # unknown cores: torch's default


def test_the_workers_environment_is_set_only_while_they_start(monkeypatch):
    from launcher.local import environment_set

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with environment_set({"OMP_NUM_THREADS": "2"}):
        assert os.environ["OMP_NUM_THREADS"] == "2"
    assert "OMP_NUM_THREADS" not in os.environ


# -- the bench harness's arithmetic ---------------------------------------------------------------------


def test_a_comparison_reports_the_median_of_paired_ratios():
    from bench.harness import Comparison

    result = Comparison("x", "s", target=1.03, ours=[1.0, 2.2, 3.0], baseline=[1.0, 2.0, 2.0])
    assert result.ratios == [1.0, 1.1, 1.5] and result.median == 1.1 and not result.met
    assert result.best_ratio == 1.0
    throughput = Comparison("y", "samples/s", target=1.0, higher_is_better=True, ours=[10.0], baseline=[8.0])
    assert throughput.met and "met" in throughput.summary()
