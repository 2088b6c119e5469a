"""Modules loaded from a file path (a job named ``path/to/job.py:Class``), importable by name everywhere.

Such a module has no importable name, so a process this one starts (a loader process from a
fork server, or spawned) could not unpickle a class defined in it: a dataset of the job's own.
Here the module gets a name of its own, the name and its file travel in the environment
(``LAUNCH_MODULE_FILES``), and a finder on ``sys.meta_path`` imports it by that name in any
process that has imported this module. Torch-free.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

VARIABLE = "LAUNCH_MODULE_FILES"
PREFIX = "_launcher_file_"


class _FileModules(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if not name.startswith(PREFIX):
            return None
        file = json.loads(os.environ.get(VARIABLE, "{}")).get(name)
        return importlib.util.spec_from_file_location(name, file) if file else None


def install(known: dict[str, str] | None = None) -> None:
    """The finder, in this process; ``known`` (from ``known_files()`` of another process) adds its names."""
    if known:
        os.environ[VARIABLE] = json.dumps({**json.loads(os.environ.get(VARIABLE, "{}")), **known})
    if not any(isinstance(finder, _FileModules) for finder in sys.meta_path):
        sys.meta_path.append(_FileModules())


def known_files() -> dict[str, str]:
    """The modules loaded from files in this process: name -> file."""
    return json.loads(os.environ.get(VARIABLE, "{}"))


def load(path: Path) -> ModuleType:
    """The module of the Python file at ``path``, under a name any process of the run can import."""
    install()
    path = Path(path).resolve()
    name = f"{PREFIX}{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    os.environ[VARIABLE] = json.dumps({**json.loads(os.environ.get(VARIABLE, "{}")), name: str(path)})
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


install()
