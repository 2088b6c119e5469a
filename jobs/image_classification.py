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

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ddp.config import ConfigError
from jobs import datasets, models
from jobs.base import Job, Metrics


class ImageClassification(Job):
    @dataclass(frozen=True)
    class Config:
        model: str = "small_cnn"  # small_cnn, small_mlp, resnet18, resnet50 or any torchvision.models name
        pretrained: bool = False  # torchvision's default weights (downloaded on rank 0)
        dataset: Literal["digits", "fake", "imagefolder", "cifar10", "mnist"] = "digits"
        data_dir: Optional[str] = None  # imagefolder: data_dir/{train,val}/<class>/<image>; cifar10/mnist: root
        download: bool = False  # cifar10/mnist: fetch into data_dir (needs network access)
        num_classes: Optional[int] = None  # default: the dataset's
        image_size: Optional[int] = None  # default: 224 for imagefolder, 32 for fake, native otherwise
        fake_size: int = 512  # fake: training samples (validation: a quarter of that)
        augment: bool = True
        label_smoothing: float = 0.0
        mixup_alpha: float = 0.0  # 0: off; else lambda ~ Beta(alpha, alpha)
        val_fraction: float = 0.2  # digits: held out with a fixed seed, the same for every run

        def __post_init__(self):
            if not 0 <= self.label_smoothing < 1:
                raise ConfigError(f"job.label_smoothing must be in [0, 1), got {self.label_smoothing}")
            if self.mixup_alpha < 0:
                raise ConfigError(f"job.mixup_alpha must be >= 0 (0 turns mixup off), got {self.mixup_alpha}")
            if not 0 <= self.val_fraction < 1:
                raise ConfigError(f"job.val_fraction must be in [0, 1), got {self.val_fraction}")
            if self.fake_size < 1:
                raise ConfigError(f"job.fake_size must be at least 1, got {self.fake_size}")
            for key in ("num_classes", "image_size"):
                value = getattr(self, key)
                if value is not None and value < 1:
                    raise ConfigError(f"job.{key} must be a positive integer or null, got {value}")

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
