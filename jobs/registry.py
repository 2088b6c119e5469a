"""Finding the job a config names: a built-in name, ``package.module:Class`` or ``path/to/file.py:Class``.

The launcher and the workers look jobs up here, by name; the core never does (it
is handed a job). Relative file paths are resolved when a run is created
(``resolve_paths``), so a run's saved config names its job absolutely and
resumes from any working directory.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

from ddp import file_modules
from ddp.env import DistEnv
from ddp.job import Job, JobError
from ddp.settings import ConfigError, build, rule_of

BUILTIN = {
    "image_classification": "jobs.image_classification:ImageClassification",
}


def resolve(name: str) -> type[Job]:
    target = BUILTIN.get(name, name)
    module_name, sep, class_name = target.rpartition(":")
    if not sep or not module_name or not class_name:
        raise ConfigError(f"job.name {name!r} is neither a built-in job ({', '.join(BUILTIN)}) nor of the "
                          "form package.module:Class or path/to/file.py:Class")
    try:
        module = _import_file(module_name) if module_name.endswith(".py") else importlib.import_module(module_name)
    except ConfigError:
        raise
    except ModuleNotFoundError as err:
        raise ConfigError(f"job.name {name!r}: cannot import {module_name} ({err}); run from the folder that "
                          "holds the package (it is put on the path), install it, or add its folder to "
                          "PYTHONPATH; or give path/to/file.py:Class") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Job)):
        raise ConfigError(f"job.name {name!r}: {module_name} has no Job subclass named {class_name}")
    return cls


def _import_file(path_text: str):
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"job.name: file not found: {path}")
    return file_modules.load(path)


def job_config(section: dict) -> tuple[type[Job], Any]:
    """The job class and its validated config from the config's ``job:`` section."""
    section = dict(section)
    name = section.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"job.name is missing; give a built-in job ({', '.join(BUILTIN)}) or package.module:Class")
    cls = resolve(name)
    return cls, build(cls.Config, section, prefix="job.")


def make_job(section: dict, env: DistEnv) -> Job:
    cls, config = job_config(section)
    try:
        return cls(config, env)
    except Exception as err:
        raise JobError(f"job {section.get('name')} failed in its constructor: "
                       f"{type(err).__name__}: {err}") from err


def resolve_paths(section: dict, base: Path) -> dict:
    """The ``job:`` section with a relative job file and the job's path keys made absolute against ``base``.

    Only the keys present are touched, so values from the file and from the command line can be
    resolved against different bases (the config file's folder; the working directory).
    """
    out = dict(section)
    name = out.get("name")
    if isinstance(name, str) and name not in BUILTIN:
        module_name, sep, class_name = name.rpartition(":")
        if sep and module_name.endswith(".py") and not Path(module_name).expanduser().is_absolute():
            out["name"] = f"{(base / Path(module_name).expanduser()).resolve()}:{class_name}"
    return out


def path_keys(cls: type[Job]) -> list[str]:
    """The keys of a job's config declared as paths (``setting(..., path=True)``)."""
    return [f.name for f in dataclasses.fields(cls.Config) if (rule := rule_of(f)) is not None and rule.path]


def absolute(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        return str((base / Path(value).expanduser()).resolve())
    if isinstance(value, str) and value.startswith("~"):
        return str(Path(value).expanduser())
    return value
