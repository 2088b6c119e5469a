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


def debug_config(config: Config, steps: int | None, device: str) -> Config:
    """The same job in one process: its own run directory, no loader workers, no watchdog."""
    replace = dataclasses.replace
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
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
