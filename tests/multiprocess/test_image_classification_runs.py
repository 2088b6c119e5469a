"""The built-in image classification job running: it learns the digits, and its default needs no torchvision
(checked in a fresh interpreter). Its pure parts: tests/unit/test_image_classification.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ddp.env import DistEnv
from jobs.image_classification import ImageClassification
from tests.support.helpers import REPO, launch_env


def make_job(**config) -> ImageClassification:
    return ImageClassification(ImageClassification.Config(**config), DistEnv())


def test_digits_small_cnn_does_not_import_torchvision():
    code = (
        "import sys\n"
        "from ddp.env import DistEnv\n"
        "from jobs.registry import make_job\n"
        "job = make_job({'name': 'image_classification'}, DistEnv())\n"  # as a worker builds it
        "job.prepare_datasets()\n"
        "model = job.build_model()\n"
        "train, val = job.build_datasets()\n"
        "loss = job.training_step(model, (train.images[:4], train.labels[:4]))\n"
        "loss.backward()\n"
        "assert 'torchvision' not in sys.modules, 'torchvision was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=launch_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def one_thread():
    # Small ops gain nothing from threads, and lose much when other processes share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_small_cnn_learns_digits(one_thread):
    torch.manual_seed(0)
    job = make_job()  # small_cnn on digits, with augmentation
    model = job.build_model()
    train, val = job.build_datasets()
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    epochs = 2
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    for _ in range(epochs):
        model.train()
        for batch in loader:
            loss = job.training_step(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        metrics = job.evaluation_step(model, (val.images, val.labels))
    correct, n = metrics["accuracy"]
    assert correct.item() / n >= 0.9
