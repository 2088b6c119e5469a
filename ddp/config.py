"""The training config: typed, nested, frozen sections, each key declared with its default, range and meaning.

YAML in (read within limits, see ``ddp.yaml_safe``), frozen dataclasses out;
an unknown key, a value of the wrong type or out of its range is caught
before any process starts, naming the key, the value and what is allowed.
Dotted overrides (``optim.lr=0.1``) go through the same check. The ``job``
section is open: ``job.name`` picks the job, and the job's own ``Config``
dataclass declares and checks the rest.

Torch-free. The launcher's own section (``slurm:``) is declared by the launcher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ddp import yaml_safe
from ddp.settings import ConfigError, build, no_control_characters, plain_name, setting

__all__ = ["Config", "ConfigError", "load_config", "parse_override", "set_dotted", "differences", "dump_yaml"]


@dataclass(frozen=True)
class RunConfig:
    name: str = setting("run", "the run directory is run.dir/run.name", check=plain_name)
    dir: str = setting("runs", "the folder that holds the run directories (relative: to the working directory)",
                       check=no_control_characters)
    seed: int = setting(0, "identical initial weights on every rank; per-rank random streams; seeded loader "
                           "workers", at_least=0, at_most=2**32 - 1)
    deterministic: bool = setting(False, "torch's deterministic algorithms (and the cuBLAS workspace setting)")


@dataclass(frozen=True)
class DataConfig:
    batch_size: int = setting(64, "per worker and micro-step; the global batch is this x world size x "
                                  "train.accumulate", at_least=1)
    eval_batch_size: int | None = setting(None, "validation batch size (null: data.batch_size)", at_least=1)
    num_workers: int = setting(2, "loader processes per worker (persistent); 0 loads in the training process",
                               at_least=0, at_most=256)
    prefetch_factor: int = setting(2, "batches each loader process prepares ahead", at_least=1, at_most=1024)
    start_method: Literal["forkserver", "spawn", "fork"] = setting(
        "forkserver", "how loader processes start: forkserver (from a clean process: safe beside the threads of "
                      "gloo, async checkpoints and the watchdog), spawn, or fork (fast, but may deadlock when a "
                      "thread holds a lock at the fork)")
    pin_memory: bool = setting(True, "pinned host memory and non-blocking copies (CUDA only)")
    drop_last: bool = setting(False, "drop the last partial batch of each epoch")


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = setting("sgd", "the optimizer")
    lr: float = setting(0.1, "the peak learning rate", above=0, at_most=1e3)
    momentum: float = setting(0.9, "sgd: momentum", at_least=0, below=1)
    weight_decay: float = setting(0.0, "weight decay (decoupled for adamw)", at_least=0, at_most=10)
    betas: tuple[float, ...] = setting((0.9, 0.999), "adamw: the two betas", length=2, at_least=0, below=1)
    no_decay_bias_and_norm: bool = setting(True, "no weight decay on biases and normalisation layers")


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["constant", "cosine", "step", "plateau"] = setting(
        "cosine", "constant; cosine (to schedule.min_lr over the run); step (x gamma every step_size steps); "
                  "plateau (x factor when schedule.metric stops improving)")
    warmup_steps: int = setting(0, "linear warmup, in optimizer steps", at_least=0)
    step_size: int = setting(1000, "step: optimizer steps between reductions", at_least=1)
    gamma: float = setting(0.1, "step: the factor of each reduction", above=0, at_most=1)
    min_lr: float = setting(0.0, "cosine: the learning rate at the end; plateau: the floor", at_least=0)
    metric: str = setting("val/loss", "plateau: the validation metric watched")
    mode: Literal["min", "max"] = setting("min", "plateau: whether lower or higher values of the metric are better")
    factor: float = setting(0.1, "plateau: the factor of each reduction", above=0, below=1)
    patience: int = setting(2, "plateau: evaluations without improvement before a reduction", at_least=0)
    threshold: float = setting(1e-4, "plateau: the relative change that counts as an improvement", at_least=0)


@dataclass(frozen=True)
class EarlyStopConfig:
    metric: str | None = setting(None, "the validation metric watched (null: no early stopping)")
    mode: Literal["min", "max"] = setting("min", "whether lower or higher values are better")
    patience: int = setting(5, "evaluations without improvement before the run stops", at_least=1)
    min_delta: float = setting(0.0, "the change that counts as an improvement", at_least=0)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(1, "epochs to train (the run ends at train.epochs or train.max_steps)", at_least=0)
    max_steps: int | None = setting(None, "optimizer steps to train at most (null: no limit)", at_least=1)
    precision: Literal["fp32", "fp16", "bf16"] = setting(
        "fp32", "fp16 (autocast and a gradient scaler) or bf16 (autocast, CPU too)")
    accumulate: int = setting(1, "micro-batches per optimizer step; the gradient all-reduce runs on the last "
                                 "(no_sync)", at_least=1)
    clip_grad_norm: float | None = setting(None, "clip the global gradient norm to this (after unscaling "
                                                    "under fp16)", above=0)
    sync_bn: bool = setting(False, "BatchNorm -> SyncBatchNorm on CUDA with more than one worker")
    channels_last: bool = setting(False, "channels-last memory format for the model and images")
    compile: bool = setting(False, "torch.compile the model")
    log_every: int = setting(10, "optimizer steps between logged scalars", at_least=1)
    eval_every_epochs: int = setting(1, "epochs between validations", at_least=1)
    progress_bar: bool = setting(True, "a progress bar on rank 0 when the console is a terminal")
    on_nonfinite: Literal["error", "skip"] = setting(
        "error", "a NaN/inf loss: error stops the run; skip drops that step on every rank")
    stop_check_s: float = setting(0.5, "how often the ranks agree on a stop signal (0: every step)",
                                  at_least=0, at_most=3600)
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "auto: cuda when there is a GPU, else cpu")
    early_stop: EarlyStopConfig = EarlyStopConfig()


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int | None = setting(None, "also checkpoint every N optimizer steps (always at the end of "
                                               "each epoch and at a stop)", at_least=1)
    keep_last: int = setting(2, "valid step checkpoints kept (the newest valid one is never deleted)", at_least=1)
    best_metric: str | None = setting("val/accuracy", "what best.pt is best at (null: no best.pt)")
    best_mode: Literal["max", "min"] = setting("max", "whether higher or lower values of best_metric are better")
    async_save: bool = setting(False, "copy to host memory, write in a background thread")
    resume: bool = setting(True, "resume from the run directory's latest valid checkpoint (false: start over; "
                                 "the old checkpoints are moved aside)")


@dataclass(frozen=True)
class DDPConfig:
    backend: Literal["nccl", "gloo"] | None = setting(None, "process group backend (null: nccl on CUDA, "
                                                               "else gloo)")
    timeout_s: float = setting(1800.0, "collective timeout; raised to outlast the watchdog",
                               at_least=10, at_most=7 * 24 * 3600)
    bucket_cap_mb: float = setting(25.0, "DDP's gradient bucket size", above=0, at_most=65536)
    gradient_as_bucket_view: bool = setting(True, "gradients live in DDP's buckets (saves a copy per step)")
    static_graph: bool = setting(False, "the graph is the same every step (lets DDP skip checks)")
    find_unused_parameters: bool = setting(False, "set true only if some parameters get no gradient")
    exact_resume: bool = setting(True, "with more than 2 ranks, the first step sums gradients in the order the "
                                       "later steps do, so a resumed run ends bitwise equal (a comm hook; set "
                                       "false to register your own hook)")


@dataclass(frozen=True)
class WatchdogConfig:
    timeout_s: Union[Literal["auto"], float, None] = setting(
        "auto", "no training progress for this long ends the run with every rank's stack (exit 124); auto: "
                "calibrated from the observed step, evaluation and checkpoint times; null: off", above=0)
    floor_s: float = setting(60.0, "auto: never less than this once the first step is done", above=0)
    startup_s: float = setting(900.0, "auto: the limit until the first step, first evaluation and first "
                                      "checkpoint have been timed", above=0)
    straggler_factor: float = setting(1.5, "a rank this many times slower than the median is a straggler",
                                      above=1)
    straggler_windows: int = setting(5, "log windows in a row a rank must be slow before it is named",
                                     at_least=1)


@dataclass(frozen=True)
class Config:
    job: dict = field(default_factory=lambda: {"name": "image_classification"})
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    ddp: DDPConfig = DDPConfig()
    watchdog: WatchdogConfig = WatchdogConfig()

    def __post_init__(self):
        problems = []
        if self.schedule.min_lr > self.optim.lr:
            problems.append(f"schedule.min_lr ({self.schedule.min_lr:g}) must not exceed optim.lr "
                            f"({self.optim.lr:g})")
        if not isinstance(self.job.get("name"), str) or not self.job.get("name"):
            problems.append("job.name is missing; give a built-in job (image_classification), "
                            "package.module:Class or path/to/file.py:Class")
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def hash(self) -> str:
        """A short digest of everything that changes what is trained."""
        data = self.to_dict()
        for section, key in NOT_IN_HASH:
            if key is None:
                data.pop(section, None)
            else:
                data[section].pop(key, None)
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Keys that change how a run is watched, stored or logged, not what it computes: they may
# differ between a run and its resumption, and do not enter the config hash.
NOT_IN_HASH = (
    ("watchdog", None),
    ("run", "dir"),
    ("run", "name"),
    ("train", "progress_bar"),
    ("train", "log_every"),
    ("train", "stop_check_s"),
    ("checkpoint", "keep_last"),
    ("checkpoint", "async_save"),
    ("checkpoint", "every_steps"),
    ("checkpoint", "resume"),
)


def changes_what_is_trained(dotted_key: str) -> bool:
    section, _, key = dotted_key.partition(".")
    return not any(section == s and (k is None or key == k or key.startswith(k + ".")) for s, k in NOT_IN_HASH)


def differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every leaf that differs between two plain config dicts."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and a and b:
            out.extend(differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


# -- loading -------------------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (within limits), apply ``key=value`` overrides, validate."""
    raw = read_yaml(path) if path is not None else {}
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(raw, key, value)
    return build(Config, raw)


def read_yaml(path: str | Path) -> dict:
    try:
        data = yaml_safe.read_file(path)
    except yaml_safe.YamlError as err:
        raise ConfigError(str(err)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (job:, data:, ...), "
                          f"got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``optim.lr=0.1`` -> ("optim.lr", 0.1); the value is read as YAML (so 1e-3, true, [1,2])."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part.strip() for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form section.key=value, e.g. optim.lr=0.05")
    if not value.strip():
        return key, ""
    try:
        parsed = yaml_safe.load_text(value)
    except yaml_safe.YamlError as err:
        if "not valid YAML" not in str(err):
            raise ConfigError(f"override {key}: {err}") from None
        parsed = value  # e.g. a path with a colon: keep it as text
    return key, parsed


def set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {'.'.join(parents[: i + 1])} is not a section")
        node = child
    node[leaf] = value


def _plain(value: Any) -> Any:
    """Tuples to lists, so the dict dumps as plain YAML and round-trips."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_yaml(config: Config | dict) -> str:
    data = config.to_dict() if isinstance(config, Config) else config
    return yaml.safe_dump(data, sort_keys=False)
