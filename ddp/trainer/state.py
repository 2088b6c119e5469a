"""The built-in trainer's checkpoint protocol: what it saves beyond the parts, and whether a checkpoint fits.

The parts (model, optimizer, schedule, scaler, loader) save themselves through
``ddp.Checkpointer``; ``TrainState`` is the loop's own position and records.
``check_fits`` refuses a checkpoint that would resume something else: another
training set, model shape or optimizer, naming the config keys that changed
and how to undo them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from ddp.checkpoint import CheckpointError, strip_module_prefix
from ddp.config import changes_what_is_trained, differences


class ResumeError(CheckpointError):
    """The checkpoint does not fit this config (another model, another dataset)."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    best: float | None = None  # the best value of checkpoint.best_metric so far
    early_stop: dict = field(default_factory=dict)  # the early-stopping watch's state
    stopped_early: dict | None = None  # {"epoch", "best", "best_epoch"} once early stopping ended the run

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key in self.__dataclass_fields__:
                setattr(self, key, value)


def check_fits(saved: dict, *, config: dict, train_size: int, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, full_job_config) -> None:
    """Raise ResumeError if ``saved`` cannot continue this run; ``full_job_config(job_section)`` expands a job
    section with its defaults, so a changed default is named too."""
    advice = _advice(saved.get("config"), config, full_job_config)
    if saved.get("train_size") != train_size:
        raise ResumeError(f"the checkpoint was trained on {saved.get('train_size')} samples but this config's "
                          f"training set has {train_size}; resuming would not be the same run. {advice}")
    _check_model_shapes(model.state_dict(), strip_module_prefix(saved["model"]), advice)
    saved_optimizer = (saved.get("config") or {}).get("optim", {}).get("name", config["optim"]["name"])
    sizes = [len(group["params"]) for group in optimizer.state_dict()["param_groups"]]
    saved_sizes = [len(group["params"]) for group in saved["optimizer"].get("param_groups", [])]
    if sizes != saved_sizes or saved_optimizer != config["optim"]["name"]:
        # Only the groups' sizes are compared, not their option names, which change between torch versions.
        raise ResumeError("the checkpoint's optimizer state does not fit this config's optimizer (another "
                          f"optimizer, or other parameter groups). {advice}")


def _advice(saved_config: dict | None, current: dict, full_job_config) -> str:
    """What to do about a checkpoint that does not fit: name the changed keys and their saved values."""
    saved = dict(saved_config or {})
    current = dict(current)
    try:
        saved["job"], current["job"] = full_job_config(saved.get("job", {})), full_job_config(current["job"])
    except Exception:
        pass
    changed = [(key, old, new) for key, old, new in differences(saved, current)
               if changes_what_is_trained(key)]
    if not changed:
        return "Use a new run.name (or checkpoint.resume=false) to start afresh"
    undo = " ".join(f"{key}={json.dumps(old)}" for key, old, _ in changed[:4])
    listed = ", ".join(f"{key} {json.dumps(old)} -> {json.dumps(new)}" for key, old, new in changed[:4])
    return (f"The config changed since the checkpoint was written ({listed}): undo that with "
            f"`launch resume RUN_DIR {undo}`, or start afresh with a new run.name")


def _check_model_shapes(current: dict, saved: dict, advice: str) -> None:
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
                          f"). {advice}")
