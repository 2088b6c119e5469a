"""What a config run asks for: the YAML file, its ``KEY=VALUE`` overrides, the job it names and the ``slurm:`` section.

Paths are resolved here, once, when a run is created: a relative job file
(``job.name: lm.py:MarkovLM``) and the job's path keys (``job.data_dir``)
against the config file's folder when the file gives them, against the working
directory when the command line does; ``run.dir`` against the working
directory. The run's saved config holds them absolute, so it resumes from
anywhere. Every problem found (keys, types, ranges, the job's own section) is
reported at once.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddp.config import Config, parse_override, read_yaml, set_dotted
from ddp.job import Job
from ddp.layout import RunDir
from ddp.settings import ConfigError, build
from jobs.registry import absolute, job_config, path_keys, resolve_paths
from launcher.slurm.options import SlurmConfig


@dataclass(frozen=True)
class RunConfig:
    config: Config
    slurm: SlurmConfig
    job_class: type[Job]
    job_settings: Any  # an instance of job_class.Config

    @property
    def run_dir(self) -> RunDir:
        return RunDir(Path(self.config.run.dir) / self.config.run.name)

    def with_config(self, config: Config) -> RunConfig:
        return dataclasses.replace(self, config=config)


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *, cwd: Path,
         base: dict | None = None) -> RunConfig:
    """The run's config from a file (or ``base``, a saved config's data) and overrides, paths resolved."""
    if path is not None:
        raw = read_yaml(path)
        file_dir = Path(path).expanduser().resolve().parent
    else:
        raw, file_dir = copy.deepcopy(base or {}), cwd
    given: dict = {}
    for override in overrides:
        key, value = parse_override(override)
        set_dotted(given, key, value)
    slurm_raw = _merged(_section(raw.pop("slurm", {}), "slurm"), _section(given.pop("slurm", {}), "slurm"))

    file_job, given_job = _section(raw.get("job", {}), "job"), _section(given.get("job", {}), "job")
    job = _merged(resolve_paths(file_job, file_dir), resolve_paths(given_job, cwd))
    problems: list[str] = []
    if isinstance(job.get("name"), str):
        try:
            for key in path_keys(job_config({"name": job["name"]})[0]):
                if key in given_job:
                    job[key] = absolute(given_job[key], cwd)
                elif key in file_job:
                    job[key] = absolute(file_job[key], file_dir)
        except ConfigError as err:
            problems.extend(err.problems)
    merged = _merged(raw, given)
    if job:
        merged["job"] = job
    config = build(Config, merged, problems=problems)
    slurm = build(SlurmConfig, slurm_raw, prefix="slurm.", problems=problems)
    job_class = settings = None
    if config is not None and not problems:
        try:
            job_class, settings = job_config(config.job)
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    if not Path(config.run.dir).is_absolute():
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=absolute(config.run.dir, cwd)))
    return RunConfig(config=config, slurm=slurm, job_class=job_class, job_settings=settings)


def _section(value: Any, name: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping of keys, got {value!r} ({type(value).__name__})")
    return dict(value)


def _merged(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def preflight(run: RunConfig) -> None:
    """The job's own cheap checks, on the machine that launches (its data folders for the built-in job)."""
    run.job_class.preflight(run.job_settings)
