"""Config keys declared once, with their type, default, valid range and meaning, and checked in one place.

A config section is a frozen dataclass whose fields are declared with
``setting``::

    @dataclass(frozen=True)
    class DataConfig:
        batch_size: int = setting(64, "per worker and micro-step", at_least=1)

``build`` turns plain data (from YAML, or dotted overrides) into the
dataclass, checking every key, type and range; every caller (the command line,
the workers, ``launch debug``, tests, a user's own code) gets the same check.
Every problem found is reported, one line per key, naming the key, the value
and what is allowed. The generated config reference (docs/configuration.md)
is read off the same declarations, so it cannot drift.

Torch-free.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A config file, override or value that cannot be used; the message says how to fix it."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems in the config:\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(message)


@dataclass(frozen=True)
class Rule:
    """What a setting allows beyond its type."""

    doc: str
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    length: int | None = None  # for a list: exactly this many items, each checked against the bounds
    path: bool = False  # a file or folder: resolved to an absolute path when a run is created
    check: Callable[[Any], str | None] | None = None  # more: returns what is wrong, or None

    def range_text(self) -> str:
        parts = []
        if self.at_least is not None:
            parts.append(f">= {_number(self.at_least)}")
        if self.above is not None:
            parts.append(f"> {_number(self.above)}")
        if self.at_most is not None:
            parts.append(f"<= {_number(self.at_most)}")
        if self.below is not None:
            parts.append(f"< {_number(self.below)}")
        text = " and ".join(parts)
        if self.length is not None:
            return f"{self.length} numbers" + (f", each {text}" if text else "")
        return text


def _number(value: float) -> str:
    return f"{int(value):,}".replace(",", "_") if float(value).is_integer() and abs(value) >= 10**6 else f"{value:g}"


def setting(default: Any, doc: str, **rule: Any) -> Any:
    """A dataclass field with its rule: ``at_least``, ``above``, ``at_most``, ``below``, ``length``, ``path``,
    ``check``."""
    metadata = {"rule": Rule(doc=doc, **rule)}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def rule_of(f: dataclasses.Field) -> Rule | None:
    return f.metadata.get("rule")


# -- checks shared by several keys -------------------------------------------------------------------


def plain_name(value: str) -> str | None:
    """A folder name: no separators, no control characters, not '.' or '..'."""
    if not value or value in (".", "..") or "/" in value or "\\" in value:
        return "must be a plain folder name (no '/', not '.' or '..'); put the parent folder in run.dir"
    return no_control_characters(value)


def no_control_characters(value: str) -> str | None:
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        return "must not hold a newline, NUL or another control character"
    return None


# -- building a section from plain data --------------------------------------------------------------


def build(cls: type, raw: Any, prefix: str = "", problems: list[str] | None = None):
    """Turn a plain mapping into the dataclass ``cls``, checking every key, type and range.

    Raises one ConfigError listing every problem (``problems``: collect into a caller's list instead).
    """
    collect = problems is not None
    problems = problems if collect else []
    where = prefix.rstrip(".") or "the config"
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        problems.append(f"{where} must be a mapping of keys, got {describe(raw)}")
        if not collect:
            raise ConfigError(problems)
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in sorted(set(raw) - set(fields), key=str):
        problems.append(f"unknown key {prefix}{name}; valid keys in {where}: {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        try:
            values[name] = coerce(hints[name], value, f"{prefix}{name}", problems)
            check_rule(rule_of(fields[name]), values[name], f"{prefix}{name}")
        except ConfigError as err:
            problems.extend(err.problems)
    if problems and not collect:
        raise ConfigError(problems)
    if problems:
        return None
    try:
        return cls(**values)  # a section's __post_init__ checks keys against each other
    except ConfigError as err:
        if not collect:
            raise
        problems.extend(err.problems)
        return None


def check_rule(rule: Rule | None, value: Any, key: str) -> None:
    if rule is None or value is None:
        return
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if rule.length is not None and len(values) != rule.length:
        raise ConfigError(f"{key} must be a list of {rule.length} numbers, got {describe(value)}")
    for item in values:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            break
        if ((rule.at_least is not None and item < rule.at_least) or (rule.above is not None and item <= rule.above)
                or (rule.at_most is not None and item > rule.at_most)
                or (rule.below is not None and item >= rule.below)):
            raise ConfigError(f"{key} must be {rule.range_text()}, got {_shown(value)}")
    if isinstance(value, str) and "\x00" in value:
        raise ConfigError(f"{key} must not hold a NUL character, got {value!r}")
    if rule.check is not None:
        problem = rule.check(value)
        if problem:
            raise ConfigError(f"{key} {problem}, got {value!r}")


def coerce(hint: Any, value: Any, key: str, problems: list[str] | None = None) -> Any:
    """Check ``value`` against the type ``hint``; convert only where it is lossless."""
    if dataclasses.is_dataclass(hint):
        section = build(hint, value if value is not None else {}, prefix=key + ".", problems=problems)
        if section is None:
            raise ConfigError([])  # its problems are in the caller's list already
        return section
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
        if type(None) in options and len(errors) == 1:
            raise ConfigError(f"{errors[0].problems[0]} (or null)")
        raise ConfigError(f"{key} must be {' or '.join(type_name(o) for o in options)}, got {describe(value)}")
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {describe(value)}")
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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return number
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
            items = tuple(value)
            args = get_args(hint)
            if args and args[-1] is Ellipsis:
                items = tuple(coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(items))
            return items
    else:
        return value
    raise ConfigError(f"{key} must be {type_name(hint)}, got {describe(value)}")


def type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, get_args(hint)))
    if hint is tuple or origin is tuple:
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(hint, getattr(hint, "__name__", str(hint)))


def describe(value: Any) -> str:
    return f"{_shown(value)} ({type(value).__name__})"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- reading the declarations back ----------------------------------------------------------------


@dataclass(frozen=True)
class Documented:
    key: str
    type: str
    default: Any
    allowed: str
    doc: str


def declared(cls: type, prefix: str) -> list[Documented]:
    """Every key of a section, with its type, default, range and meaning (for the config reference)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(declared(hint, f"{prefix}{f.name}."))
            continue
        rule = rule_of(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        union = get_origin(hint) in (Union, types.UnionType)
        options = [o for o in get_args(hint) if o is not type(None)] if union else [hint]
        nullable = union and type(None) in get_args(hint)
        kind = " or ".join(type_name(o) for o in options) + (" or null" if nullable else "")
        rows.append(Documented(f"{prefix}{f.name}", kind, default, rule.range_text() if rule else "",
                               rule.doc if rule else ""))
    return rows
