"""Dataset builders for the image classification job.

Every builder returns ``(train, val)`` datasets of ``(image_tensor, label)``
items. Random augmentations draw from torch's global generator only, which the
library seeds per sample. torchvision is imported only by the builders that
need it: ``digits`` is plain torch plus scikit-learn's bundled copy, so a quick
run needs neither torchvision nor a network.

Layouts:

* ``digits``: nothing on disk (scikit-learn's 1,797 8x8 digits).
* ``imagefolder``: ``data_dir/train/<class>/<image>`` and ``data_dir/val/<class>/<image>``.
* ``cifar10``, ``mnist``: torchvision's layout under ``data_dir``; ``download=True``
  fetches it (``prepare``, on rank 0 only).
* ``fake``: random images (torchvision ``FakeData``), for throughput tests.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

DATASETS = ("digits", "fake", "imagefolder", "cifar10", "mnist")
SPLITS = ("train", "val")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
DIGITS_SPLIT_SEED = 0  # the train/val split of digits is fixed: the same for every rank and run


class DatasetError(ValueError):
    """Data that cannot be used; the message names the path or key and says what to do."""


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its inputs and outputs."""

    in_channels: int
    num_classes: int
    image_size: int


def describe(name: str, *, data_dir: str | None = None, num_classes: int | None = None,
             image_size: int | None = None) -> DataSpec:
    """The shape of a dataset's images and its number of classes, without loading it.

    ``num_classes`` overrides the dataset's count (it may be larger, not smaller);
    for ``imagefolder`` the count is that of the class folders in ``data_dir/train``.
    """
    _check_name(name)
    if name == "digits":
        _check_digits_size(image_size)
    if name == "imagefolder":
        _split_dir(data_dir, "val")  # fail now, not after the model is built
        found = len(_find_classes(_split_dir(data_dir, "train")))
    else:
        found = {"digits": 10, "mnist": 10, "cifar10": 10, "fake": num_classes or 10}[name]
    if num_classes is not None and num_classes < found:
        raise DatasetError(f"job.num_classes={num_classes} but the {name} dataset has {found} classes; "
                           "unset job.num_classes to use the dataset's count")
    size = image_size or {"digits": 8, "mnist": 28, "cifar10": 32, "fake": 32, "imagefolder": 224}[name]
    channels = 1 if name in ("digits", "mnist") else 3
    return DataSpec(in_channels=channels, num_classes=num_classes or found, image_size=size)


def prepare(name: str, *, data_dir: str | None = None, download: bool = False) -> None:
    """Downloads, if asked for: call once (on rank 0) before ``build`` in any process."""
    _check_name(name)
    if name in ("cifar10", "mnist") and download:
        root = _root(name, data_dir)
        cls = _torchvision_class(name)
        for train in (True, False):
            try:
                cls(root, train=train, download=True)
            except Exception as err:  # URLError, RuntimeError, OSError, ...
                raise DatasetError(f"could not download {name} into {root} ({type(err).__name__}: {err}); "
                                   "downloading needs network access; on an offline machine copy the "
                                   f"files into {root} and set job.download=false") from err


def build(name: str, *, data_dir: str | None = None, download: bool = False, augment: bool = True,
          image_size: int | None = None, num_classes: int | None = None, fake_size: int = 512,
          val_fraction: float = 0.2) -> tuple[Dataset, Dataset | None]:
    """(train, val) for a dataset name; see the module docstring for the layouts on disk."""
    _check_name(name)
    if name == "digits":
        _check_digits_size(image_size)
        return build_digits(val_fraction=val_fraction, augment=augment)
    if name == "fake":
        return build_fake(size=fake_size, image_size=image_size or 32, num_classes=num_classes or 10,
                          augment=augment)
    if name == "imagefolder":
        return build_imagefolder(data_dir, image_size=image_size or 224, augment=augment)
    return build_torchvision(name, data_dir, download=download, augment=augment, image_size=image_size)


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid names are {', '.join(DATASETS)}")


def _check_digits_size(image_size: int | None) -> None:
    if image_size not in (None, 8):
        raise DatasetError(f"the digits images are 8x8; unset job.image_size (got {image_size})")


# -- digits: pure torch ---------------------------------------------------------------------------


class TensorImages(Dataset):
    """In-memory images ``(N, C, H, W)`` and labels, optionally shifted by up to ``shift`` pixels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int = 0):
        self.images, self.labels, self.shift = images, labels, shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.shift:
            # Pad with the background (0) and cut a random window: a translation of up to
            # `shift` pixels each way, drawn from torch's global generator.
            s = self.shift
            padded = torch.nn.functional.pad(image, (s, s, s, s))
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            image = padded[:, dy : dy + image.shape[1], dx : dx + image.shape[2]]
        return image, int(self.labels[index])


def build_digits(val_fraction: float = 0.2, augment: bool = True) -> tuple[Dataset, Dataset | None]:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1], split with a fixed seed.

    The split does not depend on the run's seed, so every rank and every run
    (and a resumed one) agrees on which images are for validation.
    ``val_fraction=0`` gives no validation set.
    """
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"job.val_fraction must be in [0, 1), got {val_fraction}")
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    train_idx, val_idx = split_indices(len(labels), val_fraction)
    train = TensorImages(images[train_idx], labels[train_idx], shift=1 if augment else 0)
    val = TensorImages(images[val_idx], labels[val_idx]) if len(val_idx) else None
    return train, val


def split_indices(length: int, val_fraction: float, seed: int = DIGITS_SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices: a permutation from its own generator, so the global seed has no say."""
    order = torch.randperm(length, generator=torch.Generator().manual_seed(seed))
    n_val = round(length * val_fraction)
    return order[n_val:], order[:n_val]


# -- image folders ------------------------------------------------------------------------------


class ImageFiles(Dataset):
    """``(path, label)`` samples read with ``load_image`` and then ``transform``.

    Like torchvision's ImageFolder, but built from an explicit class list, so
    val/ is labelled with train/'s classes, and picklable for any worker start method.
    """

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform: Callable):
        self.samples, self.classes, self.transform = samples, classes, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(load_image(path)), label


def load_image(path: str):
    """An RGB PIL image; a file PIL cannot read raises DatasetError naming the file."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as err:  # UnidentifiedImageError, truncated files, DecompressionBombError, ...
        raise DatasetError(f"cannot read image {path} ({type(err).__name__}: {err}); "
                           "delete or replace the file") from err


def build_imagefolder(data_dir: str | None, image_size: int = 224,
                      augment: bool = True) -> tuple[Dataset, Dataset]:
    """``data_dir/{train,val}/<class>/<image>`` with ImageNet-style transforms and normalisation."""
    from torchvision import transforms as T
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    train_dir, val_dir = _split_dir(data_dir, "train"), _split_dir(data_dir, "val")
    classes = _find_classes(train_dir)
    extra = sorted(set(_find_classes(val_dir)) - set(classes))
    if extra:
        raise DatasetError(f"{val_dir} has class folders that {train_dir} lacks: {', '.join(extra)}; "
                           "val/ must use the class names of train/")
    class_to_idx = {name: i for i, name in enumerate(classes)}
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    resize = round(image_size * 256 / 224)  # ImageNet's 256 -> 224 ratio
    evaluation = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), normalize])
    training = (T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
                if augment else evaluation)
    try:
        train_samples = make_dataset(train_dir, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:  # "Found no valid file for the classes ..."
        raise _empty_classes_error(train_dir, err) from None
    # A validation set may lack some classes, but not all of them.
    val_samples = make_dataset(val_dir, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not val_samples:
        raise DatasetError(f"{val_dir} has no images; put them in {os.path.join(val_dir, '<class>', '<image>')} "
                           f"with extensions {', '.join(IMG_EXTENSIONS)}")
    return ImageFiles(train_samples, classes, training), ImageFiles(val_samples, classes, evaluation)


def _split_dir(data_dir: str | None, split: str) -> str:
    layout = "data_dir/train/<class>/<image> and data_dir/val/<class>/<image>"
    if not data_dir:
        raise DatasetError(f"the imagefolder dataset needs job.data_dir, a folder laid out as {layout}")
    if not os.path.isdir(data_dir):
        raise DatasetError(f"dataset folder {data_dir} does not exist; job.data_dir must be laid out as {layout}")
    path = os.path.join(data_dir, split)
    if not os.path.isdir(path):
        raise DatasetError(f"{data_dir} has no {split}/ folder; job.data_dir must be laid out as {layout}")
    return path


def _find_classes(directory: str) -> list[str]:
    """Sorted class folder names; hidden folders (``.ipynb_checkpoints``, ...) are not classes."""
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"{directory} is empty: it has no class folders; put each class's images "
                           f"in {os.path.join(directory, '<class>', '<image>')}")
    return classes


def _empty_classes_error(directory: str, err: FileNotFoundError) -> DatasetError:
    match = re.search(r"Found no valid file for the classes (.*?)\. ", str(err))
    if not match:
        return DatasetError(f"{directory}: {err}")
    names = match.group(1).split(", ")
    where = ", ".join(os.path.join(directory, name) for name in names)
    return DatasetError(f"class folder{'s' if len(names) > 1 else ''} {where} "
                        f"ha{'ve' if len(names) > 1 else 's'} no images (classes: {match.group(1)}); "
                        "add images (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff or .webp) or remove the folder")


# -- torchvision's datasets ---------------------------------------------------------------------


def build_fake(size: int = 512, image_size: int = 32, num_classes: int = 10,
               augment: bool = True) -> tuple[Dataset, Dataset]:
    """Random images: ``size`` for training and ``size // 4`` (at least 1) for validation.

    Each image is a function of its index and offset, so every rank and run sees
    the same data; the validation offset starts where training's ends, so they differ.
    """
    if size < 1:
        raise DatasetError(f"job.fake_size must be at least 1, got {size}")
    from torchvision import transforms as T
    from torchvision.datasets import FakeData

    evaluation = T.ToTensor()
    training = T.Compose([T.RandomHorizontalFlip(), T.ToTensor()]) if augment else evaluation
    shape = (3, image_size, image_size)
    train = FakeData(size, shape, num_classes, transform=training, random_offset=0)
    val = FakeData(max(1, size // 4), shape, num_classes, transform=evaluation, random_offset=size)
    return train, val


def build_torchvision(name: str, data_dir: str | None, download: bool = False, augment: bool = True,
                      image_size: int | None = None) -> tuple[Dataset, Dataset]:
    """CIFAR-10 or MNIST from ``data_dir``. Never downloads: ``prepare`` does that, on rank 0."""
    from torchvision import transforms as T

    root = _root(name, data_dir)
    native = 32 if name == "cifar10" else 28
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (MNIST_MEAN, MNIST_STD)
    resize = [T.Resize(image_size)] if image_size and image_size != native else []
    evaluation = T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])
    if not augment:
        training = evaluation
    elif name == "cifar10":
        training = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *resize, T.ToTensor(),
                              T.Normalize(mean, std)])
    else:
        training = T.Compose([T.RandomCrop(28, padding=2), *resize, T.ToTensor(), T.Normalize(mean, std)])
    cls = _torchvision_class(name)
    try:
        return (cls(root, train=True, transform=training, download=False),
                cls(root, train=False, transform=evaluation, download=False))
    except RuntimeError as err:  # "Dataset not found or corrupted. You can use download=True ..."
        if download:
            hint = ("although job.download=true: the download runs on rank 0 only, so job.data_dir must "
                    "be on a filesystem that every node shares")
        else:
            hint = ("set job.download=true to download it (this needs network access), or copy "
                    "torchvision's files for it there")
        raise DatasetError(f"{name} not found in {root} {hint} ({err})") from err


def _root(name: str, data_dir: str | None) -> str:
    if not data_dir:
        raise DatasetError(f"the {name} dataset needs job.data_dir, the folder that holds (or will hold, "
                           "with job.download=true) its files")
    return data_dir


def _torchvision_class(name: str):
    from torchvision import datasets

    return {"cifar10": datasets.CIFAR10, "mnist": datasets.MNIST}[name]
