"""The DDP core: process groups, devices, exact data order, checkpoints, stops, and the built-in trainer.

Its public pieces serve a training loop of your own (see ``ddp.session``)::

    import ddp
    with ddp.init(seed=0) as run:
        model = run.prepare(model)
        loader = run.loader(dataset, batch_size=32)
        checkpointer = run.checkpointer()
        ...

Names are imported on first use, so ``import ddp`` (and the torch-free modules
``ddp.codes``, ``ddp.layout``, ``ddp.config``, ...) does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "init": "ddp.session",
    "Session": "ddp.session",
    "Checkpointer": "ddp.checkpointer",
    "ResumableLoader": "ddp.loader",
    "unwrap": "ddp.model",
    "DistEnv": "ddp.env",
    "read_env": "ddp.env",
    "Job": "ddp.job",
    "JobError": "ddp.job",
    "setting": "ddp.settings",
    "ConfigError": "ddp.settings",
    "Config": "ddp.config",
    "DDPConfig": "ddp.config",
    "load_config": "ddp.config",
    "run_training": "ddp.trainer",
    "EXIT_RESUMABLE": "ddp.codes",
    "EXIT_STALLED": "ddp.codes",
    "STOP_SIGNALS": "ddp.codes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ddp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
