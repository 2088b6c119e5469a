"""Telling what to launch: a config (``.yaml``/``.yml``), a script (``.py``) or a module (``-m``), and splitting
the command line around it.

Everything after a script (or ``-m MODULE``) is the script's own arguments,
untouched. After a config, ``KEY=VALUE`` overrides and ``launch``'s own options
may come in any order. Nothing is guessed from a file's content: a name that is
neither gets one message saying what is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launcher.errors import LaunchError

CONFIG_SUFFIXES = (".yaml", ".yml")
SCRIPT_SUFFIXES = (".py",)


@dataclass(frozen=True)
class Target:
    kind: str  # "config", "script" or "module"
    name: str  # the config or script path as given, or the module's dotted name
    rest: tuple[str, ...] = ()  # a config's overrides, or a script's arguments

    def describe(self) -> str:
        if self.kind == "config":
            return f"config {self.name}"
        return f"module {self.name}" if self.kind == "module" else f"script {self.name}"


def split(tokens: list[str], value_options: set[str], *, allow_script: bool = True) -> tuple[list[str], Target | None]:
    """(launch's own option tokens, the target); ``value_options``: our options that take a value."""
    ours: list[str] = []
    target: Target | None = None
    overrides: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if target is None and token in ("-m", "--module"):
            if not allow_script:
                raise LaunchError("-m runs a module as a script; this command takes a config")
            if i + 1 >= len(tokens):
                raise LaunchError("-m needs a module name: -m package.module [ARGS ...]")
            return ours, Target("module", tokens[i + 1], tuple(tokens[i + 2:]))
        if token.startswith("-") and token != "-":
            ours.append(token)
            if token in value_options and i + 1 < len(tokens):
                ours.append(tokens[i + 1])
                i += 1
        elif target is None:
            target = classify(token, allow_script)
            if target.kind == "script":
                return ours, Target("script", token, tuple(tokens[i + 1:]))
        else:
            overrides.append(token)
        i += 1
    if target is not None:
        target = Target(target.kind, target.name, tuple(overrides))
    return ours, target


def classify(token: str, allow_script: bool = True) -> Target:
    suffix = Path(token).suffix.lower()
    if suffix in CONFIG_SUFFIXES:
        return Target("config", token)
    if suffix in SCRIPT_SUFFIXES and allow_script:
        return Target("script", token)
    accepted = "a config (.yaml or .yml), a Python script (.py) or -m package.module" if allow_script \
        else "a config (.yaml or .yml)"
    if "=" in token and "." in token.split("=")[0]:
        raise LaunchError(f"{token!r} looks like an override, but no config came before it; give the config "
                          f"first: launch ... CONFIG.yaml {token}")
    raise LaunchError(f"{token!r}: launch takes {accepted}; {token!r} is none of these by its name "
                      "(a config must end in .yaml or .yml, a script in .py)")
