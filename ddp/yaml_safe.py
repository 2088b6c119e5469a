"""Reading YAML that may be careless or hostile, within limits: plain data only, bounded in size.

``yaml.safe_load`` never runs code, but it will still build whatever a file
describes: a "billion laughs" file (aliases of aliases) is a few hundred
bytes that expand to billions of nodes as soon as anything walks the result,
and a 10,000-deep nesting ends in a 3,000-line ``RecursionError``. Here a
file must be a regular file under ``MAX_BYTES``, nesting stops at
``MAX_DEPTH``, and aliases at ``MAX_ALIASES`` or ``MAX_NODES`` nodes once
expanded, each with one message.

YAML 1.1's base-60 numbers are off: ``time: 4:00:00`` stays the text sbatch
reads, not the integer 14400.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 4 * 2**20
MAX_DEPTH = 64
MAX_ALIASES = 64
MAX_NODES = 100_000


class YamlError(ValueError):
    """YAML that cannot be used; the message says where and why."""


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def resolve(self, kind, value, implicit):
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and ":" in value and tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
            return "tag:yaml.org,2002:str"
        return tag

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise YamlError(f"more than {MAX_ALIASES} aliases (*name); a config needs few, if any")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlError(f"nested deeper than {MAX_DEPTH} levels at line {mark.line + 1}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Nodes in the tree the document becomes once aliases are expanded (shared nodes counted each time)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [item for pair in node.value for item in pair]
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_size(child, sizes)
        if total > MAX_NODES:
            break
    sizes[id(node)] = total
    return total


def load_text(text: str) -> Any:
    """Plain data from YAML text, within the limits above; raises YamlError."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_NODES:
            raise YamlError(f"expands to more than {MAX_NODES:,} values (aliases of aliases?); a config is "
                            "far smaller")
        return loader.construct_document(node)
    except yaml.constructor.ConstructorError as err:
        # A tag such as !!python/object, which could run code: configs hold only plain data.
        raise YamlError(f"refused a YAML tag that is not plain data ({err.problem}); configs hold only plain "
                        "values") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise YamlError(f"not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise YamlError(f"nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()


def read_file(path: str | os.PathLike) -> Any:
    """A YAML file's data: it must be a regular file of at most MAX_BYTES. Raises YamlError."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise YamlError(f"config file not found: {path}") from None
    except OSError as err:
        raise YamlError(f"cannot read the config file {path}: {err.strerror or err}") from None
    if stat.S_ISDIR(info.st_mode):
        raise YamlError(f"{path} is a directory, not a config file; give a YAML file such as configs/demo.yaml")
    if not stat.S_ISREG(info.st_mode):
        raise YamlError(f"{path} is not a regular file (a device, a pipe or a socket); give a YAML file")
    if info.st_size > MAX_BYTES:
        raise YamlError(f"{path} is {info.st_size:,} bytes, more than a config may be ({MAX_BYTES:,}); "
                        "is it the right file?")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as err:
        raise YamlError(f"cannot read the config file {path}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise YamlError(f"{path}: not UTF-8 text (byte {err.start}); is it the right file?") from None
    try:
        return load_text(text)
    except YamlError as err:
        raise YamlError(f"{path}: {err}") from None
