"""Splitting a comma-separated list whose items may hold commas of their own.

``gpu[1-3,5],cpu07`` (a SLURM node list) and ``0.1,[1,2],'a,b'`` (sweep values)
split only on the commas outside brackets, braces and quotes. Torch-free.
"""

from __future__ import annotations


def split_top_level(text: str, quotes: bool = True) -> list[str]:
    """Split on commas that are not inside ``[]``, ``{}`` or (with ``quotes``) quotes."""
    parts, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif quotes and char in "'\"":
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
