"""Sweeps: ``optim.lr=0.1,0.01,0.001`` on the command line means one run per value.

Each point of the sweep is a list of ordinary overrides plus a suffix for the run
name, so every run gets its own directory (``demo_lr0.1``, ``demo_lr0.01``, ...).
Several swept keys give every combination. Commas inside brackets, braces or
quotes do not split (``job.sizes=[1,2]``, ``run.name='a,b'``), and ``slurm.*``
keys are never swept: they hold scheduler syntax such as ``exclude=n1,n2``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from ddp.config import ConfigError


@dataclass(frozen=True)
class SweepPoint:
    overrides: tuple[str, ...]
    suffix: str  # appended to run.name as NAME_SUFFIX; empty when nothing is swept (or run.name is)


def split_values(text: str) -> list[str]:
    """Split on commas that are not inside brackets, braces or quotes."""
    parts, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    parts.append(current)
    return parts


def expand(overrides: list[str] | tuple[str, ...]) -> list[SweepPoint]:
    """Every combination of the swept values, in command-line order."""
    choices: list[list[tuple[str, str]]] = []  # per override: (override text, suffix part)
    for override in overrides:
        key, sep, value = override.partition("=")
        values = split_values(value) if sep and not key.startswith("slurm.") else [value]
        if len(values) == 1:
            choices.append([(override, "")])
            continue
        if any(not v.strip() for v in values):
            raise ConfigError(f"sweep {override!r} has an empty value; write KEY=V1,V2,... (quote a value "
                              "that itself holds a comma: KEY='a,b')")
        leaf = key.rsplit(".", 1)[-1]
        naming = key == "run.name"  # sweeping the name itself: the value is the name
        choices.append([(f"{key}={v}", "" if naming else f"{leaf}{_slug(v)}") for v in values])
    points = []
    for combination in itertools.product(*choices):
        suffix = "_".join(part for _, part in combination if part)
        points.append(SweepPoint(tuple(text for text, _ in combination), suffix))
    return points


def _slug(value: str) -> str:
    """A value as part of a folder name: letters, digits and ``.+-`` only."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", value.strip().strip("'\"")).strip("-") or "x"
