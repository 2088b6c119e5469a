"""Typed, nested run configuration: YAML in, frozen dataclasses out.

Every section is a dataclass, so an unknown key or a value of the wrong type is
caught before any process starts, with the key's dotted name and the valid
ones. Dotted command-line overrides (``optim.lr=0.1``) go through the same check.
The ``job`` section is open: ``job.name`` picks the job, and the job's own
``Config`` dataclass validates the rest (see ``jobs.registry``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 numbers.

    Plain YAML 1.1 reads ``time: 4:00:00`` as the integer 14400, which sbatch would take
    as 14400 minutes; here anything with a colon stays text, as YAML 1.2 has it.
    """

    def resolve(self, kind, value, implicit):
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and ":" in value and tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
            return "tag:yaml.org,2002:str"
        return tag


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    dir: str = "runs"  # the run directory is DIR/NAME
    seed: int = 0
    deterministic: bool = False


@dataclass(frozen=True)
class DataConfig:
    batch_size: int = 64  # per process, per micro-step
    eval_batch_size: Optional[int] = None  # default: batch_size
    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool = True  # only takes effect on CUDA
    drop_last: bool = False


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1  # for the whole job (see scale_lr)
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    no_decay_bias_and_norm: bool = True


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["constant", "cosine", "step"] = "cosine"
    warmup_steps: int = 0
    step_size: int = 1000  # "step": multiply by gamma every step_size optimizer steps
    gamma: float = 0.1
    min_lr: float = 0.0  # "cosine": the floor


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    max_steps: Optional[int] = None  # optimizer steps; stops early when reached
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    accumulate: int = 1  # micro-batches per optimizer step
    clip_grad_norm: Optional[float] = None
    sync_bn: bool = False
    channels_last: bool = False
    compile: bool = False
    log_every: int = 10  # optimizer steps between logged scalars
    eval_every_epochs: int = 1
    progress_bar: bool = True
    on_nonfinite: Literal["error", "skip"] = "error"
    stop_check_s: float = 0.5  # ranks agree on a stop signal about this often (0: every step)
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: Optional[int] = None  # also written at the end of every epoch
    keep_last: int = 2
    best_metric: Optional[str] = "val/accuracy"
    best_mode: Literal["max", "min"] = "max"
    async_save: bool = False
    resume: bool = True  # resume from the run directory's latest checkpoint


@dataclass(frozen=True)
class DDPConfig:
    backend: Optional[Literal["nccl", "gloo"]] = None  # default: nccl on CUDA, else gloo
    timeout_s: float = 1800.0
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = True
    static_graph: bool = False
    find_unused_parameters: bool = False


@dataclass(frozen=True)
class WatchdogConfig:
    timeout_s: Optional[float] = None  # no training progress for this long: dump stacks, exit


@dataclass(frozen=True)
class SlurmConfig:
    partition: Optional[str] = None
    time: Optional[str] = None  # sbatch format, e.g. "4:00:00"
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    job_name: Optional[str] = None
    signal_delay_s: int = 120  # USR2 this long before the time limit
    max_requeues: int = 3
    additional: dict = field(default_factory=dict)  # any other sbatch option


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
    slurm: SlurmConfig = SlurmConfig()

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def hash(self) -> str:
        """A short digest of everything that changes what is trained."""
        data = self.to_dict()
        for section, key in NOT_IN_HASH:
            if key is None:
                data.pop(section)
            else:
                data[section].pop(key)
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Keys that change how a run is watched, stored or scheduled, not what it computes: they may
# differ between a run and its resumption, and do not enter the config hash.
NOT_IN_HASH = (
    ("slurm", None),
    ("watchdog", None),
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
    return not any(section == s and (k is None or key == k) for s, k in NOT_IN_HASH)


# -- loading -----------------------------------------------------------------


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (safely), apply ``key=value`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        raw = read_yaml(path)
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(raw, key, value)
    return build(Config, raw, prefix="")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a safe loader
    except yaml.constructor.ConstructorError as err:
        # safe_load refuses tags such as !!python/object, which could run code.
        raise ConfigError(f"{path}: refused a YAML tag that is not plain data ({err.problem}); "
                          "configs hold only plain values") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML{_yaml_location(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _yaml_location(err: yaml.YAMLError) -> str:
    """`` at line 3, column 7: expected ',' or ']'`` in one line (PyYAML's own message spans several)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}"


def parse_override(text: str) -> tuple[str, Any]:
    """``optim.lr=0.1`` -> ("optim.lr", 0.1); the value is read as YAML (so 1e-3, true, [1,2])."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        parsed = yaml.load(value, Loader=_Loader) if value.strip() else ""  # noqa: S506 - a safe loader
    except yaml.YAMLError:
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


def build(cls: type, raw: Any, prefix: str):
    """Turn a plain mapping into the dataclass ``cls``, checking every key and type."""
    where = prefix.rstrip(".") or "the config"
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; valid keys in {where}: {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        values[name] = coerce(hints[name], value, f"{prefix}{name}")
    return cls(**values)


def coerce(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint``; convert only where it is lossless."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value if value is not None else {}, prefix=key + ".")
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(option, value, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {_describe(value)}")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. job_name: 123
    elif hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif hint is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    else:
        return value
    raise ConfigError(f"{key} must be {_type_name(hint)}, got {_describe(value)}")


def _type_name(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping", tuple: "a list"}.get(hint, getattr(hint, "__name__", str(hint)))


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _plain(value: Any) -> Any:
    """Tuples to lists, so the dict dumps as plain YAML and round-trips."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
