"""The subcommands of ``launch``, one module each; ``launcher.cli`` parses and calls them."""

from __future__ import annotations


def _lazy(module: str, name: str):
    def call(options, target):
        import importlib

        return getattr(importlib.import_module(f"launcher.commands.{module}"), name)(options, target)

    return call


HANDLERS = {
    "local": _lazy("local", "command_local"),
    "resume": _lazy("resume", "command_resume"),
    "debug": _lazy("debug", "command_debug"),
    "slurm": _lazy("slurm", "command_slurm"),
    "status": _lazy("status", "command_status"),
    "cancel": _lazy("status", "command_cancel"),
    "ls": _lazy("status", "command_ls"),
}
