"""What a checkpoint holds, and putting a trainer back exactly where it was.

A checkpoint is a dict of tensors and plain values only (``weights_only=True``
reads it): model, optimizer, LR schedule, gradient scaler, the loop's position
(epoch, optimizer step, samples of the epoch consumed, globally), the random
generators of every rank, the best metric, and the config with its hash.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ddp import rng
from ddp.checkpoint import CheckpointError, strip_module_prefix
from ddp.model import unwrap

if TYPE_CHECKING:
    from ddp.trainer import Trainer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class ResumeError(CheckpointError):
    """The checkpoint does not fit this config (another model, another dataset)."""


@dataclass
class TrainState:
    epoch: int = 0  # finished epochs
    step: int = 0  # optimizer steps taken
    consumed: int = 0  # samples of the current epoch already trained on, over all ranks
    best: float | None = None


def capture_state(trainer: "Trainer", rng_states: list[dict]) -> dict:
    return {
        "format": FORMAT_VERSION,
        "model": unwrap(trainer.model).state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "train_state": asdict(trainer.state),
        "world_size": trainer.env.world_size,
        "train_size": trainer.train_size,
        "rng": rng_states,
        "config": trainer.config.to_dict(),
        "config_hash": trainer.config.hash(),
    }


def restore_state(trainer: "Trainer", saved: dict) -> TrainState:
    path_hint = "the checkpoint"
    if saved.get("train_size") != trainer.train_size:
        raise ResumeError(f"{path_hint} was trained on {saved.get('train_size')} samples but this config's "
                          f"training set has {trainer.train_size}; resuming would not be the same run. "
                          "Use a new run.name (or checkpoint.resume=false) to start afresh")
    model = unwrap(trainer.model)
    state_dict = strip_module_prefix(saved["model"])
    _check_model_shapes(model.state_dict(), state_dict)
    model.load_state_dict(state_dict)
    trainer.optimizer.load_state_dict(saved["optimizer"])
    trainer.scheduler.load_state_dict(saved["scheduler"])
    trainer.scaler.load_state_dict(saved["scaler"])
    states = saved["rng"]
    if len(states) != trainer.env.world_size:
        log.warning("resuming %d-process checkpoint with %d processes: the epoch continues with every "
                    "remaining sample seen once; random streams map rank r -> saved rank r %% %d",
                    len(states), trainer.env.world_size, len(states))
    rng.restore(rng.state_for_rank(states, trainer.env.rank))
    return TrainState(**saved["train_state"])


def _check_model_shapes(current: dict, saved: dict) -> None:
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    mismatched = [f"{name}: checkpoint {tuple(saved[name].shape)} vs model {tuple(current[name].shape)}"
                  for name in current if name in saved and tuple(saved[name].shape) != tuple(current[name].shape)]
    if missing or unexpected or mismatched:
        details = []
        if mismatched:
            details.append("different shapes: " + "; ".join(mismatched[:3]))
        if missing:
            details.append("not in the checkpoint: " + ", ".join(missing[:3]))
        if unexpected:
            details.append("not in the model: " + ", ".join(unexpected[:3]))
        raise ResumeError("the checkpoint's model does not match this config's model (" + " | ".join(details) +
                          "). Resume with the config the run was started with (launch resume RUN_DIR), "
                          "or start a new run.name")
