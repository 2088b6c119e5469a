"""Finding the job a config names: a built-in name, ``package.module:Class`` or ``path/to/file.py:Class``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from ddp.config import ConfigError, build
from ddp.env import DistEnv
from jobs.base import Job

BUILTIN = {
    "image_classification": "jobs.image_classification:ImageClassification",
}


class JobError(RuntimeError):
    """The job could not be found or constructed."""


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
        raise ConfigError(f"job.name {name!r}: cannot import {module_name} ({err}); is the package installed "
                          "or on PYTHONPATH?") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Job)):
        raise ConfigError(f"job.name {name!r}: {module_name} has no Job subclass named {class_name}")
    return cls


def _import_file(path_text: str):
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"job.name: file not found: {path}")
    module_name = f"_launcher_job_{path.stem}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def job_config(section: dict):
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
    except Exception as err:  # noqa: BLE001 - a user's constructor can raise anything
        raise JobError(f"job {cls.__module__}.{cls.__qualname__} failed in its constructor: "
                       f"{type(err).__name__}: {err}") from err
