"""The performance options train like the plain run, and the hot loop stays cheap: one process.

* channels_last and torch.compile train like the plain run.
* No host-device synchronisation per step; the data-wait share is logged.
"""

from __future__ import annotations

import json

import pytest
import torch

from ddp.config import load_config
from tests.support.helpers import REPO, final_weights, train_here

pytestmark = pytest.mark.timeout(300)


def mlp_config(tmp_path, name, *overrides):
    return load_config(REPO / "configs" / "demo.yaml", [
        f"run.dir={tmp_path}", f"run.name={name}", "job.model=small_mlp", "data.batch_size=16",
        "data.num_workers=0", "optim.lr=0.1", "schedule.name=constant", "schedule.warmup_steps=0",
        "train.max_steps=6", "train.progress_bar=false", "checkpoint.every_steps=null", *overrides,
    ])


def assert_close_weights(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol)


# -- channels_last and torch.compile ----------------------------------------------------------------


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
    import ddp.trainer.loop as loop

    reads = {"count": 0, "counting": False}
    for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            if reads["counting"]:
                reads["count"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    real_epoch = loop.Trainer.train_epoch

    def counting_epoch(self):
        reads["counting"] = True
        try:
            return real_epoch(self)
        finally:
            reads["counting"] = False

    monkeypatch.setattr(loop.Trainer, "train_epoch", counting_epoch)

    class NotCountingData(loop.Waited):  # the dataset's own reads (labels to int, ...) are not the loop's
        def __next__(self):
            reads["counting"] = False
            try:
                return super().__next__()
            finally:
                reads["counting"] = True

    monkeypatch.setattr(loop, "Waited", NotCountingData)
    counts = {}
    for steps in (20, 40):
        reads["count"] = 0
        train_here(mlp_config(tmp_path, f"sync{steps}", f"train.max_steps={steps}", "train.log_every=100",
                              "data.batch_size=8"), tmp_path / f"sync{steps}")
        counts[steps] = reads["count"]
    # One log window per run (the last step); twice the steps must not mean more reads.
    assert 0 < counts[40] == counts[20] <= 3, counts


def test_the_share_of_time_waiting_for_data_is_logged(tmp_path):
    train_here(mlp_config(tmp_path, "wait", "train.log_every=2"), tmp_path / "wait")
    records = [json.loads(line) for line in (tmp_path / "wait" / "metrics.jsonl").read_text().splitlines()]
    shares = [r["train/data_wait_share"] for r in records if "train/loss" in r]
    assert len(shares) == 3 and all(0 <= share <= 1 for share in shares)
