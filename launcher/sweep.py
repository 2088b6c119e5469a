"""Sweeps: one run per value.

A config sweep is written as an override with several values,
``optim.lr=0.1,0.01,0.001``; each point is a list of ordinary overrides plus a
suffix for the run name (``demo_lr0.1``, ...). Several swept keys give every
combination. Commas inside brackets, braces or quotes do not split
(``job.sizes=[1,2]``, ``run.name='a,b'``), and ``slurm.*`` keys are never
swept: they hold scheduler syntax such as ``exclude=n1,n2``.

A script's arguments are its own, so a script sweep is explicit:
``--sweep lr=0.1,0.01`` and ``{lr}`` where the value goes in the arguments.
Torch-free.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from ddp.lists import split_top_level
from launcher.errors import LaunchError


@dataclass(frozen=True)
class SweepPoint:
    overrides: tuple[str, ...]  # a config's overrides, or a script's arguments
    suffix: str  # appended to the run's name as NAME_SUFFIX; empty when nothing is swept (or run.name is)


def expand(overrides: list[str] | tuple[str, ...]) -> list[SweepPoint]:
    """Every combination of the swept values of config overrides, in command-line order."""
    choices: list[list[tuple[str, str]]] = []  # per override: (override text, suffix part)
    for override in overrides:
        key, sep, value = override.partition("=")
        values = split_top_level(value) if sep and not key.startswith("slurm.") else [value]
        if len(values) == 1:
            choices.append([(override, "")])
            continue
        _check_values(override, values)
        leaf = key.rsplit(".", 1)[-1]
        naming = key == "run.name"  # sweeping the name itself: the value is the name
        choices.append([(f"{key}={v}", "" if naming else f"{leaf}{_slug(v)}") for v in values])
    return [SweepPoint(tuple(text for text, _ in combination), "_".join(part for _, part in combination if part))
            for combination in itertools.product(*choices)]


def expand_script_sweeps(args: list[str], sweeps: list[str]) -> list[SweepPoint]:
    """``--sweep NAME=V1,V2``: every combination, with ``{NAME}`` in ``args`` replaced by the value."""
    if not sweeps:
        return [SweepPoint(tuple(args), "")]
    choices = []
    for sweep in sweeps:
        name, sep, value = sweep.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise LaunchError(f"--sweep {sweep!r}: write NAME=V1,V2,... and put {{NAME}} in the script's arguments")
        if not any("{" + name + "}" in arg for arg in args):
            raise LaunchError(f"--sweep {sweep!r}: no {{{name}}} in the script's arguments to put the value in")
        values = split_top_level(value)
        _check_values(sweep, values)
        choices.append([(name, v) for v in values])
    points = []
    for combination in itertools.product(*choices):
        replaced = list(args)
        for name, value in combination:
            replaced = [arg.replace("{" + name + "}", value.strip().strip("'\"")) for arg in replaced]
        points.append(SweepPoint(tuple(replaced), "_".join(f"{name}{_slug(value)}" for name, value in combination)))
    return points


def _check_values(text: str, values: list[str]) -> None:
    if any(not v.strip() for v in values):
        raise LaunchError(f"sweep {text!r} has an empty value; write KEY=V1,V2,... (quote a value that itself "
                          "holds a comma: KEY='a,b')")


def _slug(value: str) -> str:
    """A value as part of a folder name: letters, digits and ``.+-`` only."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", value.strip().strip("'\"")).strip("-") or "x"
