"""What a checkpoint holds, and putting a trainer back exactly where it was.

A checkpoint is a dict of tensors and plain values only (``weights_only=True``
reads it): model, optimizer, LR schedule, gradient scaler, the loop's position
(epoch, optimizer step, samples of the epoch consumed, globally), the random
generators of every rank, the best metric, and the config with its hash.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ddp import rng
from ddp.checkpoint import CheckpointError, strip_module_prefix
from ddp.env import DistEnv
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


def changed_only_by_optimizer_step(trainer: "Trainer") -> frozenset[int]:
    """The storages of the parameters and of the optimizer's state: nothing but the optimizer step
    changes them (forward and backward only read them), so an asynchronous checkpoint may copy
    them while the next step's forward and backward run. Buffers (BatchNorm's statistics) are not
    among them: the forward pass updates those."""
    tensors = list(unwrap(trainer.model).parameters())
    tensors += [value for state in trainer.optimizer.state.values() for value in state.values()
                if isinstance(value, torch.Tensor)]
    return frozenset(t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0)


def restore_state(trainer: "Trainer", saved: dict) -> TrainState:
    advice = _advice(saved.get("config"), trainer.config.to_dict())
    if saved.get("train_size") != trainer.train_size:
        raise ResumeError(f"the checkpoint was trained on {saved.get('train_size')} samples but this config's "
                          f"training set has {trainer.train_size}; resuming would not be the same run. {advice}")
    model = unwrap(trainer.model)
    state_dict = strip_module_prefix(saved["model"])
    _check_model_shapes(model.state_dict(), state_dict, advice)
    saved_optimizer = (saved.get("config") or {}).get("optim", {}).get("name", trainer.config.optim.name)
    _check_optimizer(trainer.optimizer.state_dict(), saved["optimizer"], saved_optimizer == trainer.config.optim.name,
                     advice)
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


def _advice(saved_config: dict | None, current: dict) -> str:
    """What to do about a checkpoint that does not fit: name the changed keys and their saved values."""
    changed = _changed(_with_job_defaults(saved_config or {}), _with_job_defaults(current))
    if not changed:
        return "Use a new run.name (or checkpoint.resume=false) to start afresh"
    undo = " ".join(f"{key}={json.dumps(old)}" for key, old, _ in changed[:4])
    listed = ", ".join(f"{key} {json.dumps(old)} -> {json.dumps(new)}" for key, old, new in changed[:4])
    return (f"The config changed since the checkpoint was written ({listed}): undo that with "
            f"`launch resume RUN_DIR {undo}`, or start afresh with a new run.name")


def _with_job_defaults(config: dict) -> dict:
    """The ``job`` section holds only the keys a config sets; compare the job's full config instead."""
    from dataclasses import asdict, is_dataclass

    from jobs.registry import job_config

    try:
        cls, job = job_config(config.get("job", {}))
    except Exception:  # noqa: BLE001 - a job that no longer imports: compare what was written
        return config
    full = asdict(job) if is_dataclass(job) else {}
    return {**config, "job": {"name": config["job"].get("name"), **full}}


def _changed(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) for the keys that differ, except where and how it runs."""
    from ddp.config import changes_what_is_trained

    out = []
    for key in sorted(set(saved) | set(current), key=str):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict) and prefix + key != "slurm":
            out += _changed(old, new, f"{prefix}{key}.")
        elif old != new and changes_what_is_trained(prefix + key) and prefix + key not in ("run.name", "run.dir"):
            out.append((prefix + key, old, new))
    return out


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


def _check_optimizer(current: dict, saved: dict, same_kind: bool, advice: str) -> None:
    """Another optimizer (or other parameter groups) would load, then fail at the first step.

    Only the groups' sizes are compared, not their option names, which change between torch versions.
    """
    sizes = [len(group["params"]) for group in current["param_groups"]]
    saved_sizes = [len(group["params"]) for group in saved.get("param_groups", [])]
    if sizes != saved_sizes or not same_kind:
        raise ResumeError("the checkpoint's optimizer state does not fit this config's optimizer (another "
                          f"optimizer, or other parameter groups). {advice}")


# -- restarts -------------------------------------------------------------------

NO_REPORT = ("no error report: killed by a signal (kill -9, the out-of-memory killer, a node going away) "
             "or crashed in native code")


def previous_attempt_failures(error_file: str | None, restart_count: int) -> list[dict]:
    """What the workers of the attempt before this one left behind, as ``{"local_rank", "error"}``.

    Torch's elastic agent gives each worker an error file,
    ``.../attempt_N/LOCAL_RANK/error.json``, where ``@record`` (or the watchdog)
    writes an exception's message. The previous attempt's directory is this one's
    sibling. A worker with no file there died without raising: a signal or a crash.
    """
    if not error_file or restart_count < 1:
        return []
    previous = Path(error_file).parent.parent.with_name(f"attempt_{restart_count - 1}")
    if not previous.is_dir():
        return []
    failures = []
    for rank_dir in sorted((d for d in previous.iterdir() if d.name.isdigit()), key=lambda d: int(d.name)):
        error = None
        try:
            message = json.loads((rank_dir / "error.json").read_text()).get("message")
            error = message.get("message") if isinstance(message, dict) else str(message)
        except (OSError, ValueError, AttributeError):
            pass
        failures.append({"local_rank": int(rank_dir.name), "error": error})
    return failures


def describe_cause(env: DistEnv, failures: list[dict]) -> str:
    if env.source == "slurm":
        return "requeued by SLURM (preemption, node failure or a time limit)"
    if not failures:
        return "unknown (the previous attempt left no error files)"
    # Ranks that left no report first: the others mostly failed because a peer vanished.
    ordered = sorted(failures, key=lambda item: item["error"] is not None)
    return "; ".join(f"local rank {item['local_rank']}: {_first_line(item['error']) if item['error'] else NO_REPORT}"
                     for item in ordered)


def _first_line(message: str, limit: int = 160) -> str:
    line = (message.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def record_restart(run_dir: Path, env: DistEnv, resumed_from: Path | None, state: TrainState) -> dict:
    """Rank 0 of a restarted attempt: one line in ``RUN_DIR/restarts.jsonl`` and one in the log."""
    failures = previous_attempt_failures(os.environ.get("TORCHELASTIC_ERROR_FILE"), env.restart_count)
    record = {
        "time": round(time.time(), 3),
        "restart": env.restart_count,
        "launched_by": env.source,
        "cause": describe_cause(env, failures),
        "failures": failures,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "step": state.step,
        "epoch": state.epoch,
    }
    with open(run_dir / "restarts.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    log.warning("restart %d of the workers (cause: %s); %s", env.restart_count, record["cause"],
                f"resuming from {resumed_from.name} at step {state.step}" if resumed_from
                else "no checkpoint yet: starting from the beginning")
    return record
