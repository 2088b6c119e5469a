"""The SLURM commands of ``launch``: slurm, status, cancel."""

from __future__ import annotations

import argparse

HANDLERS: dict = {}


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the SLURM subcommands (see launcher.slurm)."""
