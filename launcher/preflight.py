"""Checks made in the launching process, before any worker starts, and the debug variant of a config."""

from __future__ import annotations

import dataclasses

from ddp.config import Config, ConfigError


def check_job(config: Config) -> None:
    """Import the job and validate its config section now, not in every worker."""
    from jobs.registry import job_config

    job_config(config.job)
    for key, value in (("data.batch_size", config.data.batch_size), ("train.accumulate", config.train.accumulate),
                       ("train.log_every", config.train.log_every),
                       ("train.eval_every_epochs", config.train.eval_every_epochs),
                       ("checkpoint.keep_last", config.checkpoint.keep_last)):
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    for key, value in (("train.epochs", config.train.epochs), ("data.num_workers", config.data.num_workers)):
        if value < 0:
            raise ConfigError(f"{key} must be 0 or more, got {value}")
    if config.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {config.optim.lr}")
    if config.train.max_steps is not None and config.train.max_steps < 1:
        raise ConfigError(f"train.max_steps must be at least 1 (or null), got {config.train.max_steps}")
    if config.checkpoint.every_steps is not None and config.checkpoint.every_steps < 1:
        raise ConfigError(f"checkpoint.every_steps must be at least 1 (or null), got {config.checkpoint.every_steps}")
    if config.data.eval_batch_size is not None and config.data.eval_batch_size < 1:
        raise ConfigError(f"data.eval_batch_size must be at least 1 (or null), got {config.data.eval_batch_size}")
    if not config.run.name or "/" in config.run.name or config.run.name in (".", ".."):
        raise ConfigError(f"run.name must be a plain folder name, got {config.run.name!r}")
    if config.ddp.timeout_s <= 0:
        raise ConfigError(f"ddp.timeout_s must be positive, got {config.ddp.timeout_s}")
    if config.watchdog.timeout_s is not None and config.watchdog.timeout_s <= 0:
        raise ConfigError(f"watchdog.timeout_s must be positive seconds (or null: no watchdog), "
                          f"got {config.watchdog.timeout_s}")


def check_data(config: Config) -> None:
    """The built-in image job's data, where it is cheap to look: folders, not images.

    A wrong ``data_dir`` is the most common mistake; found here it costs a second,
    not a worker start-up on every node. Only for launches on this machine: a
    SLURM job's data may be visible on the compute nodes only. Files that cannot
    be read as images are found when read, by the workers.
    """
    from jobs import datasets
    from jobs.image_classification import ImageClassification
    from jobs.registry import job_config

    job_class, settings = job_config(config.job)
    if not issubclass(job_class, ImageClassification):
        return
    try:
        datasets.describe(settings.dataset, data_dir=settings.data_dir, num_classes=settings.num_classes,
                          image_size=settings.image_size)
        if settings.dataset == "imagefolder":
            _check_image_folders(settings.data_dir)
    except datasets.DatasetError as err:
        raise ConfigError(str(err)) from None


def _check_image_folders(data_dir: str) -> None:
    """Every class folder of train/ holds an image, and val/ holds one somewhere (as the builder requires)."""
    import os

    from jobs import datasets

    extensions = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's

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


def check_rdzv_endpoint(endpoint: str | None) -> None:
    """HOST:PORT with a port torch can listen on; caught here rather than as a rendezvous timeout."""
    from launcher.errors import LaunchError

    if endpoint is None:
        return
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise LaunchError(f"--rdzv-endpoint must be HOST:PORT with a port in 1..65535, got {endpoint!r}")


def debug_config(config: Config, steps: int | None, device: str) -> Config:
    """The same job in one process: its own run directory, no loader workers, no watchdog."""
    replace = dataclasses.replace
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but this machine has no CUDA GPU; use --device cpu")
    return replace(
        config,
        run=replace(config.run, name=f"{config.run.name}-debug"),
        data=replace(config.data, num_workers=0),
        train=replace(config.train, device=device,
                      max_steps=steps if steps is not None else config.train.max_steps),
        checkpoint=replace(config.checkpoint, resume=False),
        watchdog=replace(config.watchdog, timeout_s=None),
    )


def known_errors() -> tuple[type, ...]:
    """Errors whose message is the whole story, printed in one line without a traceback."""
    from ddp.checkpoint import CheckpointError
    from ddp.consistency import RankMismatchError
    from ddp.distributed import DeviceError
    from ddp.trainer import NonFiniteLossError
    from jobs.datasets import DatasetError
    from jobs.models import ModelError
    from jobs.registry import JobError
    from launcher.slurm import SlurmError

    return (CheckpointError, DeviceError, NonFiniteLossError, JobError, DatasetError, ModelError, RankMismatchError,
            ConfigError, SlurmError)


def known_error(err: BaseException) -> bool:
    return isinstance(err, known_errors())


def known_error_names() -> set[str]:
    """The class names of the known errors and their subclasses (a worker's error arrives as text)."""
    names, todo = set(), list(known_errors())
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names
