"""The scheduler options of ``launch slurm``, in one table: the command-line flags, the config's ``slurm:``
section and the ``#SBATCH`` lines are all read off it.

Torch's names stay torch's (nodes, tasks per node); SLURM's names appear here
and in the sbatch template only.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from ddp.settings import no_control_characters, setting


@dataclass(frozen=True)
class Option:
    name: str  # the key in the config's slurm: section, and the command-line flag (--name-with-dashes)
    kind: type
    default: Any
    doc: str
    sbatch: str | None = None  # the #SBATCH option it becomes, if it is one
    rule: dict = dataclasses.field(default_factory=dict)
    flag: str | None = None  # a flag that differs from --name-with-dashes

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


def _text(value: str) -> str | None:
    return no_control_characters(value) if isinstance(value, str) else None


OPTIONS = (
    Option("partition", str, None, "partition (queue) to submit to", "partition", {"check": _text}),
    Option("time", str, None, "time limit, in sbatch's format: MINUTES, HH:MM:SS, D-HH:MM:SS", "time",
           {"check": _text}),
    Option("account", str, None, "account to charge", "account", {"check": _text}),
    Option("qos", str, None, "quality of service", "qos", {"check": _text}),
    Option("constraint", str, None, "node features, e.g. volta32gb", "constraint", {"check": _text}),
    Option("exclude", str, None, "nodes to avoid, e.g. n[01-03]", "exclude", {"check": _text}),
    Option("cpus_per_task", int, None, "CPUs per task (per worker), for the trainer and its loader processes "
                                       "(default: data.num_workers + 1)", "cpus-per-task", {"at_least": 1}),
    Option("mem", str, None, "memory per node, e.g. 64G", "mem", {"check": _text}),
    Option("job_name", str, None, "job name (default: the run's name)", "job-name", {"check": _text}),
    Option("signal_delay_s", int, 120, "seconds before the time limit at which SLURM sends USR2 (checkpoint, "
                                       "requeue)", None, {"at_least": 0, "at_most": 86400}, flag="--signal-delay"),
    Option("max_requeues", int, 3, "how often the job may requeue itself on USR2 or be requeued by SLURM", None,
           {"at_least": 0, "at_most": 1000}),
    Option("array_parallelism", int, None, "a sweep's array job: at most this many runs at once (sbatch's %N)",
           None, {"at_least": 1}),
)
BY_NAME = {option.name: option for option in OPTIONS}
SBATCH_NAMES = {option.sbatch: option for option in OPTIONS if option.sbatch}

# sbatch options the launcher sets itself: changing them would break the one-task-per-worker
# layout, the log paths, the warning signal the workers checkpoint on, or the CPU/GPU binding.
RESERVED = {"nodes", "ntasks", "ntasks-per-node", "gpus-per-node", "output", "error", "open-mode", "signal",
            "array", "requeue", "no-requeue", "wrap", "gpus", "gpus-per-task", "gres", "cpus-per-gpu",
            "gpu-bind", "ntasks-per-gpu", "mem-per-gpu"}
_OPTION_NAME = re.compile(r"[a-z][a-z0-9-]*")


def _fields():
    for option in OPTIONS:
        hint = option.kind | None if option.default is None else option.kind
        yield option.name, hint, setting(option.default, option.doc, **option.rule)
    yield ("additional", dict, setting({}, "any other sbatch option, name: value (true: a flag), e.g. "
                                           "{mail-type: END, exclusive: true}"))


SlurmConfig = dataclasses.make_dataclass("SlurmConfig", list(_fields()), frozen=True)
SlurmConfig.__module__ = __name__
SlurmConfig.__doc__ = "The config's slurm: section: defaults for `launch slurm`; the command line wins."


class OptionError(ValueError):
    """A scheduler option that cannot be used; the message says which and what instead."""


def additional_options(raw: dict) -> dict:
    """Validate pass-through sbatch options: ``{"mail-type": "END", "exclusive": True}``."""
    options = {}
    for key, value in raw.items():
        name = str(key).strip().lstrip("-").replace("_", "-")
        if not _OPTION_NAME.fullmatch(name):
            raise OptionError(f"--sbatch {key!r}: not an sbatch option name (e.g. mail-type=END, exclusive)")
        if name in SBATCH_NAMES:
            option = SBATCH_NAMES[name]
            raise OptionError(f"--sbatch {name}: use {option.cli_flag} (or slurm.{option.name} in the config) instead")
        if name in RESERVED:
            raise OptionError(f"--sbatch {name}: the launcher sets this option itself (one task per worker, one "
                              "GPU per task, its log paths, the USR2 warning and requeueing); use --nodes, "
                              "--gpus-per-node or --nproc-per-node, --cpus-per-task, slurm.signal_delay_s and "
                              "slurm.max_requeues")
        if value is False or value is None:
            raise OptionError(f"--sbatch {name}: give a value, or no value for a flag (--sbatch {name})")
        if value is not True:
            value = str(value)
            if no_control_characters(value):
                raise OptionError(f"--sbatch {name}: {value!r} holds a newline or another control character, "
                                  "which an sbatch script cannot carry")
        options[name] = value
    return options


def parse_sbatch_flags(items: list[str]) -> dict:
    """``["mail-type=END", "exclusive"]`` -> ``{"mail-type": "END", "exclusive": True}``."""
    options: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        options[key.strip()] = value if sep else True
    return options
