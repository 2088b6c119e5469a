"""The built-in image classification job: datasets, models, steps. CPU only, no network, no training runs
(those, and the import check in a fresh process: tests/multiprocess/test_image_classification_runs.py)."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddp.config import ConfigError
from ddp.env import DistEnv
from jobs import datasets, models
from jobs.datasets import DatasetError
from jobs.image_classification import ImageClassification
from jobs.models import ModelError
from jobs.registry import job_config


def make_job(**config) -> ImageClassification:
    return ImageClassification(ImageClassification.Config(**config), DistEnv())


@pytest.fixture(scope="module")
def digits():
    return datasets.build_digits(val_fraction=0.2, augment=False)


# -- digits ---------------------------------------------------------------------------------------


def test_digits_split_sizes_and_values(digits):
    train, val = digits
    assert (len(train), len(val)) == (1438, 359)  # 1797 images, 20% held out
    image, label = train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1
    assert isinstance(label, int) and 0 <= label < 10


def test_digits_split_is_disjoint_and_covers_everything():
    train_idx, val_idx = datasets.split_indices(1797, 0.2)
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(1797))


def test_digits_split_ignores_the_global_seed(digits):
    torch.manual_seed(1234)
    _, val_a = datasets.build_digits(augment=False)
    torch.manual_seed(99)
    _, val_b = datasets.build_digits(augment=False)
    assert torch.equal(val_a.images, val_b.images) and torch.equal(val_a.labels, digits[1].labels)


def test_digits_val_fraction_zero_means_no_validation():
    train, val = datasets.build_digits(val_fraction=0.0)
    assert len(train) == 1797 and val is None


def test_digits_augmentation_shifts_train_only():
    train, val = datasets.build_digits(augment=True)
    draws = set()
    for seed in range(12):
        torch.manual_seed(seed)
        image, _ = train[5]
        assert image.shape == (1, 8, 8)
        draws.add(image.numpy().tobytes())
    assert len(draws) > 1  # a random translation, from torch's global generator
    torch.manual_seed(0)
    first = train[5][0]
    torch.manual_seed(0)
    assert torch.equal(first, train[5][0])  # ... and reproducible from it
    assert torch.equal(val[3][0], val[3][0])
    assert torch.equal(val[3][0], val.images[3])  # validation is never augmented


# -- models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,size", [(1, 8), (1, 28), (3, 32)])
def test_small_models_forward_shapes(channels, size):
    x = torch.randn(4, channels, size, size)
    for build in (models.small_cnn, models.small_mlp):
        model = build(10, in_channels=channels, image_size=size)
        assert model(x).shape == (4, 10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in models.small_mlp(10).modules())


def test_torchvision_model_with_one_channel():
    model = models.build_model("resnet18", num_classes=7, in_channels=1, image_size=32)
    assert model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelError, match="unknown model 'resnet19'.*small_cnn.*resnet18"):
        models.build_model("resnet19", num_classes=10)


def test_builtin_model_has_no_pretrained_weights():
    with pytest.raises(ModelError, match="pretrained=false"):
        models.build_model("small_cnn", num_classes=10, pretrained=True)


def test_pretrained_download_failure_is_clear(monkeypatch):
    from torchvision.models import WeightsEnum

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(ModelError, match="resnet18.*network access.*pretrained=false"):
        models.build_model("resnet18", num_classes=10, pretrained=True)
    with pytest.raises(ModelError, match="network access"):
        make_job(model="resnet18", pretrained=True).prepare_datasets()


def test_pretrained_head_and_first_conv_are_adapted(monkeypatch):
    from torchvision.models import WeightsEnum, get_model

    torch.manual_seed(0)
    reference = get_model("shufflenet_v2_x0_5")  # small, 1000 classes: stands in for the download
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: reference.state_dict())
    model = models.build_model("shufflenet_v2_x0_5", num_classes=4, in_channels=1, pretrained=True)
    assert model.fc.out_features == 4
    assert torch.equal(model.conv5[0].weight, reference.conv5[0].weight)  # the body is kept
    assert torch.allclose(model.conv1[0].weight, reference.conv1[0].weight.sum(1, keepdim=True))
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)


# -- the steps ------------------------------------------------------------------------------------


def test_evaluation_step_on_a_handmade_batch():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 2, 1])  # argmax is right for rows 0 and 2
    metrics = make_job().evaluation_step(nn.Identity(), (logits, labels))
    correct, n = metrics["accuracy"]
    loss_sum, m = metrics["loss"]
    assert isinstance(correct, torch.Tensor) and isinstance(loss_sum, torch.Tensor)
    assert (correct.item(), n, m) == (2, 4, 4)
    expected = sum(-torch.log_softmax(logits[i], 0)[labels[i]] for i in range(4))
    assert torch.allclose(loss_sum, expected)


def test_training_step_label_smoothing():
    logits, labels = torch.tensor([[4.0, 0.0], [0.0, 4.0]]), torch.tensor([0, 1])
    plain = make_job().training_step(nn.Identity(), (logits, labels))
    smooth = make_job(label_smoothing=0.2).training_step(nn.Identity(), (logits, labels))
    assert torch.allclose(plain, F.cross_entropy(logits, labels))
    assert smooth > plain


def test_mixup_changes_the_loss_but_not_the_shapes():
    images, labels = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    torch.manual_seed(0)
    model = models.small_cnn(10, in_channels=1, image_size=8)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    plain = make_job().training_step(model, (images, labels))
    losses = []
    for _ in range(2):
        torch.manual_seed(1)
        losses.append(make_job(mixup_alpha=0.4).training_step(model, (images, labels)))
    assert seen == [images.shape] * 3
    assert losses[0].shape == plain.shape == ()
    assert torch.equal(losses[0], losses[1])  # the draws come from torch's global generator
    assert not torch.allclose(losses[0], plain)
    losses[0].backward()


def test_config_rejects_bad_values():
    # As every launch reads the job: section (jobs.registry), each problem named with its key.
    with pytest.raises(ConfigError, match="job.label_smoothing must be >= 0 and < 1, got 1.5"):
        job_config({"name": "image_classification", "label_smoothing": 1.5})
    with pytest.raises(ConfigError, match="job.mixup_alpha must be >= 0, got -1.0"):
        job_config({"name": "image_classification", "mixup_alpha": -1.0})
    with pytest.raises(ConfigError, match="job.val_fraction must be >= 0 and < 1, got 1.0"):
        job_config({"name": "image_classification", "val_fraction": 1.0})
    with pytest.raises(ConfigError) as info:
        job_config({"name": "image_classification", "label_smoothing": 1.5, "dataset": "imagenet"})
    assert len(info.value.problems) == 2 and "job.dataset must be one of digits, fake" in str(info.value)
    cls, settings = job_config({"name": "image_classification", "label_smoothing": 0.1})
    assert cls is ImageClassification and settings.label_smoothing == 0.1


# -- image folders --------------------------------------------------------------------------------


def write_tree(root: Path, layout: dict[str, dict[str, int]], size: int = 12) -> None:
    """layout: {"train": {"cat": 3, ...}, "val": {...}}, the number of PNGs per class."""
    from PIL import Image

    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                color = (40 * i, 200 if name == "cat" else 20, 90)
                Image.new("RGB", (size, size + 2 * i), color).save(folder / f"{i}.png")


def test_imagefolder_builds(tmp_path):
    write_tree(tmp_path, {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    job = make_job(dataset="imagefolder", data_dir=str(tmp_path), image_size=8)
    assert job.data_spec() == datasets.DataSpec(in_channels=3, num_classes=2, image_size=8)
    train, val = job.build_datasets()
    assert (len(train), len(val)) == (5, 2)
    assert train.classes == val.classes == ["cat", "dog"]
    image, label = train[4]
    assert image.shape == (3, 8, 8) and label == 1
    assert [val[i][1] for i in range(2)] == [0, 1]
    assert job.build_model()(image[None]).shape == (1, 2)


def test_imagefolder_val_uses_train_classes(tmp_path):
    write_tree(tmp_path, {"train": {"ant": 1, "bee": 1, "cat": 1}, "val": {"cat": 1}})
    _, val = datasets.build_imagefolder(str(tmp_path), image_size=8)
    assert val[0][1] == 2  # "cat" is class 2 in train/, although it is val/'s only folder


def test_imagefolder_missing_folders(tmp_path):
    with pytest.raises(DatasetError, match="needs job.data_dir"):
        datasets.build_imagefolder(None)
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=rf"{missing} does not exist.*data_dir/train/<class>/<image>"):
        datasets.build_imagefolder(str(missing))
    write_tree(tmp_path, {"train": {"cat": 1}})
    with pytest.raises(DatasetError, match="has no val/ folder"):
        datasets.build_imagefolder(str(tmp_path))
    with pytest.raises(DatasetError, match="has no val/ folder"):
        make_job(dataset="imagefolder", data_dir=str(tmp_path)).build_model()


def test_imagefolder_empty(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        datasets.build_imagefolder(str(tmp_path))


def test_imagefolder_class_without_images_is_named(tmp_path):
    write_tree(tmp_path, {"train": {"cat": 2, "dog": 0}, "val": {"cat": 1}})
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"train/dog has no images.*classes: dog"):
        datasets.build_imagefolder(str(tmp_path))


def test_imagefolder_val_with_unknown_class(tmp_path):
    write_tree(tmp_path, {"train": {"cat": 1}, "val": {"cat": 1, "cow": 1}})
    with pytest.raises(DatasetError, match="class folders that .* lacks: cow"):
        datasets.build_imagefolder(str(tmp_path))


def test_corrupt_image_is_named_when_loaded(tmp_path):
    write_tree(tmp_path, {"train": {"cat": 2}, "val": {"cat": 1}})
    broken = tmp_path / "train" / "cat" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    train, _ = datasets.build_imagefolder(str(tmp_path), image_size=8)
    index = [path for path, _ in train.samples].index(str(broken))
    with pytest.raises(DatasetError, match=rf"cannot read image {broken}"):
        train[index]


# -- other datasets and names ---------------------------------------------------------------------


def test_fake_dataset():
    job = make_job(dataset="fake", fake_size=8, image_size=16, num_classes=5, augment=False)
    train, val = job.build_datasets()
    assert (len(train), len(val)) == (8, 2)
    image, label = train[3]
    assert image.shape == (3, 16, 16) and 0 <= label < 5
    assert torch.equal(train[3][0], image)  # a function of the index
    assert not torch.equal(val[0][0], train[0][0])  # validation is other images
    assert job.data_spec() == datasets.DataSpec(in_channels=3, num_classes=5, image_size=16)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'.*digits, fake, imagefolder"):
        datasets.build("imagenet")
    with pytest.raises(DatasetError, match="unknown dataset"):
        datasets.describe("imagenet")


def test_num_classes_too_small():
    with pytest.raises(DatasetError, match="num_classes=5 but the digits dataset has 10"):
        make_job(num_classes=5).build_model()
    assert make_job(num_classes=12).data_spec().num_classes == 12


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_missing_download_says_what_to_do(name, tmp_path):
    with pytest.raises(DatasetError, match="needs job.data_dir"):
        make_job(dataset=name).build_datasets()
    job = make_job(dataset=name, data_dir=str(tmp_path))
    job.prepare_datasets()  # download=false: nothing to do
    with pytest.raises(DatasetError, match="not found .*job.download=true.*network"):
        job.build_datasets()
    with pytest.raises(DatasetError, match="filesystem that every node shares"):
        make_job(dataset=name, data_dir=str(tmp_path), download=True).build_datasets()


def test_failed_download_says_what_to_do(monkeypatch, tmp_path):
    from torchvision.datasets import CIFAR10

    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(DatasetError, match="could not download cifar10.*network access"):
        make_job(dataset="cifar10", data_dir=str(tmp_path), download=True).prepare_datasets()
