"""The built-in image classification job: a model name, a dataset name, cross-entropy.

In the YAML::

    job:
      name: image_classification
      model: resnet18          # small_cnn, small_mlp, resnet18, resnet50 or any torchvision.models name
      dataset: imagefolder     # digits, fake, imagefolder, cifar10, mnist
      data_dir: /data/imagenet # imagefolder: data_dir/{train,val}/<class>/<image>

The default (``small_cnn`` on scikit-learn's bundled digits) needs no files,
no network and no torchvision, so it is the quickest check that a cluster works.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ddp.job import Job, Metrics
from ddp.settings import ConfigError, setting
from jobs import datasets, models


class ImageClassification(Job):
    @dataclass(frozen=True)
    class Config:
        model: str = setting("small_cnn", "small_cnn, small_mlp, resnet18, resnet50 or any torchvision.models name")
        pretrained: bool = setting(False, "torchvision's default weights (downloaded once, on rank 0)")
        dataset: Literal["digits", "fake", "imagefolder", "cifar10", "mnist"] = setting(
            "digits", "digits (scikit-learn's bundled 1,797 8x8 digits), fake (torchvision FakeData), "
                      "imagefolder, cifar10, mnist")
        data_dir: str | None = setting(None, "imagefolder: a folder with train/<class>/<image> and "
                                                "val/<class>/<image>; cifar10/mnist: their root", path=True)
        download: bool = setting(False, "cifar10/mnist: download into data_dir (needs a network)")
        num_classes: int | None = setting(None, "override the dataset's number of classes", at_least=1)
        image_size: int | None = setting(None, "override the image size (224 for imagefolder, 32 for fake, "
                                                  "native otherwise)", at_least=1, at_most=4096)
        fake_size: int = setting(512, "fake: training samples (validation: a quarter of that)", at_least=1)
        augment: bool = setting(True, "random crops and flips (translation for digits) on the training set")
        label_smoothing: float = setting(0.0, "label smoothing of the training loss", at_least=0, below=1)
        mixup_alpha: float = setting(0.0, "mixup with Beta(alpha, alpha); 0: off", at_least=0)
        val_fraction: float = setting(0.2, "digits: the share held out for validation (a fixed split)",
                                      at_least=0, below=1)

    @classmethod
    def preflight(cls, config: ImageClassification.Config) -> None:
        """The data's folders, where it is cheap to look (not the images): the most common mistake,
        found here in a second rather than after every worker started."""
        try:
            datasets.describe(config.dataset, data_dir=config.data_dir, num_classes=config.num_classes,
                              image_size=config.image_size)
            if config.dataset == "imagefolder":
                _check_image_folders(config.data_dir)
        except datasets.DatasetError as err:
            raise ConfigError(str(err)) from None

    def data_spec(self) -> datasets.DataSpec:
        """Input channels, number of classes and image size (cheap: reads no images)."""
        c = self.config
        return datasets.describe(c.dataset, data_dir=c.data_dir, num_classes=c.num_classes,
                                 image_size=c.image_size)

    def prepare_datasets(self) -> None:
        c = self.config
        datasets.prepare(c.dataset, data_dir=c.data_dir, download=c.download)
        if c.pretrained:
            models.fetch_pretrained(c.model)

    def build_model(self) -> nn.Module:
        spec = self.data_spec()
        return models.build_model(self.config.model, num_classes=spec.num_classes,
                                  in_channels=spec.in_channels, image_size=spec.image_size,
                                  pretrained=self.config.pretrained)

    def build_datasets(self):
        c = self.config
        return datasets.build(c.dataset, data_dir=c.data_dir, download=c.download, augment=c.augment,
                              image_size=c.image_size, num_classes=c.num_classes, fake_size=c.fake_size,
                              val_fraction=c.val_fraction)

    def training_step(self, model: nn.Module, batch) -> torch.Tensor:
        images, labels = batch
        smoothing = self.config.label_smoothing
        if self.config.mixup_alpha <= 0:
            return F.cross_entropy(model(images), labels, label_smoothing=smoothing)
        # Mixup: blend each image with another of the batch, and the losses likewise.
        # Both draws come from torch's CPU generator (seeded by the library), so a run
        # makes the same draws on CPU and on GPU.
        alpha = torch.tensor(float(self.config.mixup_alpha))
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        partner = torch.randperm(len(images)).to(images.device)
        logits = model(lam * images + (1 - lam) * images[partner])
        return (lam * F.cross_entropy(logits, labels, label_smoothing=smoothing)
                + (1 - lam) * F.cross_entropy(logits, labels[partner], label_smoothing=smoothing))

    def evaluation_step(self, model: nn.Module, batch) -> Metrics:
        images, labels = batch
        logits = model(images)
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")  # no smoothing: the plain loss
        correct = (logits.argmax(dim=1) == labels).sum()
        return {"accuracy": (correct, len(labels)), "loss": (loss_sum, len(labels))}


def _check_image_folders(data_dir: str) -> None:
    """Every class folder of train/ holds an image, and val/ holds one somewhere (as the builder requires)."""
    extensions = datasets.IMAGE_EXTENSIONS

    def has_image(folder: str) -> bool:
        for _, _, files in os.walk(folder, followlinks=True):  # stops at the first image found
            if any(name.lower().endswith(extensions) for name in files):
                return True
        return False

    train, val = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    empty = [entry.name for entry in sorted(os.scandir(train), key=lambda e: e.name)
             if entry.is_dir() and not entry.name.startswith(".") and not has_image(entry.path)]
    if empty:
        where = ", ".join(os.path.join(train, name) for name in empty)
        raise datasets.DatasetError(
            f"class folder{'s' if len(empty) > 1 else ''} {where} ha{'ve' if len(empty) > 1 else 's'} no images "
            f"(classes: {', '.join(empty)}); add images ({', '.join(extensions)}) or remove the folder")
    if not has_image(val):
        raise datasets.DatasetError(f"{val} has no images; put them in {os.path.join(val, '<class>', '<image>')} "
                                    f"with extensions {', '.join(extensions)}")
