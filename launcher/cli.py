"""The ``launch`` command: parse, then hand over to the subcommand. The only place errors become exit codes.

    launch local  [options] CONFIG [KEY=VALUE ...]     launch local  [options] train.py [ARGS ...]
    launch debug  [options] CONFIG [KEY=VALUE ...]     launch debug  [options] -m package.module [ARGS ...]
    launch slurm  [options] CONFIG [KEY=VALUE ...]     launch slurm  [options] train.py [ARGS ...]
    launch resume [options] RUN_DIR [KEY=VALUE ...]
    launch status RUN_DIR [--plot]     launch cancel RUN_DIR     launch ls [DIR]

Options may come before or after a config and its overrides; after a script
everything is the script's. Nothing heavy is imported here: ``launch status``
and ``launch ls`` never load torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ddp.codes import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE
from ddp.settings import ConfigError
from launcher.errors import LaunchError, known_error
from launcher.slurm.options import OPTIONS
from launcher.target import Target, split


@dataclass(frozen=True)
class Parsed:
    command: str
    options: argparse.Namespace
    target: Target | None


def _local_options(parser: argparse.ArgumentParser, *, script: bool) -> None:
    parser.add_argument("--gpus", type=int, help="workers, one per GPU, on NCCL (default: every GPU)")
    parser.add_argument("--cpu", action="store_true", help="workers on the CPU with gloo, even if there are GPUs")
    parser.add_argument("--nproc", type=int, help="CPU workers per node, with --cpu (default 1)")
    parser.add_argument("--nnodes", default="1", help="nodes without SLURM, N or MIN:MAX (elastic), as torchrun")
    parser.add_argument("--node-rank", type=int, help="this node's rank with a fixed --nnodes N (as torchrun)")
    parser.add_argument("--rdzv-endpoint", help="HOST:PORT every node reaches (default: a free local port)")
    parser.add_argument("--max-restarts", type=int,
                        help="restart the workers up to N times when one fails (default 0; 3 with MIN:MAX "
                             "nodes); they resume from the latest checkpoint")
    parser.add_argument("--no-tuning", dest="tuning", action="store_false",
                        help="leave the workers' allocator and CPU affinity at their defaults")
    parser.add_argument("--dry-run", action="store_true", help="print the config and the plan; start nothing")
    if script:
        _script_options(parser)


def _script_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, help="a script run's directory (default: runs/SCRIPT_NAME)")
    parser.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                        help="a script sweep: one run per value, with {NAME} in the script's arguments replaced")


SUBCOMMANDS = {
    "local": "run workers on this machine (torchrun's elastic launcher)",
    "debug": "run in this process on the CPU, so breakpoint() and pdb work",
    "resume": "continue a run from its directory, from any working directory",
    "slurm": "submit to a SLURM cluster through submitit: one task per worker, requeued on preemption",
    "status": "where a run stands: local or SLURM, from its directory",
    "cancel": "cancel a SLURM run's job (its workers checkpoint first)",
    "ls": "the runs under runs/ (or DIR): state, progress, metrics",
}
TARGETS = {"local": "TARGET", "debug": "TARGET", "slurm": "TARGET"}


def build_parsers() -> dict[str, argparse.ArgumentParser]:
    """One parser per subcommand, for its options (the target is split off first, see launcher.target)."""
    parsers = {}
    target_help = "CONFIG [KEY=VALUE ...] | script.py [ARGS ...] | -m package.module [ARGS ...]"

    def make(name: str, usage_tail: str) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=f"launch {name}", description=SUBCOMMANDS[name],
                                         usage=f"launch {name} [options] {usage_tail}")
        parsers[name] = parser
        return parser

    _local_options(make("local", target_help), script=True)
    debug = make("debug", target_help)
    debug.add_argument("--steps", type=int, help="stop after K optimizer steps")
    debug.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    _script_options(debug)
    resume = make("resume", "RUN_DIR [KEY=VALUE ...]")
    _local_options(resume, script=False)
    slurm = make("slurm", target_help)
    slurm.add_argument("--nodes", default="1", help="nodes: N, or MIN:MAX (as many as SLURM gives; the run "
                                                    "continues on any world size)")
    slurm.add_argument("--gpus-per-node", type=int, help="GPUs per node; one worker (task) per GPU")
    slurm.add_argument("--cpu", action="store_true", help="CPU workers with gloo, no GPUs")
    slurm.add_argument("--nproc-per-node", type=int, help="CPU workers (tasks) per node with --cpu (default 1)")
    for option in OPTIONS:
        slurm.add_argument(option.cli_flag, dest=option.name, type=option.kind,
                           help=f"{option.doc} (slurm.{option.name})")
    slurm.add_argument("--sbatch", action="append", default=[], metavar="KEY[=VALUE]",
                       help="any other sbatch option, repeatable: --sbatch mail-type=END --sbatch exclusive")
    slurm.add_argument("--no-array", dest="array", action="store_false",
                       help="a sweep as one job per run, not one array job")
    slurm.add_argument("--script-signal", default="SIGUSR2",
                       help="scripts: the signal a script gets for SLURM's time-limit warning (default SIGUSR2)")
    slurm.add_argument("--dry-run", action="store_true",
                       help="print the resolved config and the sbatch script; submit nothing")
    _script_options(slurm)
    for name in ("status", "cancel"):
        parser = make(name, "RUN_DIR")
        parser.add_argument("run_dir", metavar="RUN_DIR", type=Path)
        if name == "status":
            parser.add_argument("--plot", nargs="?", const="", metavar="PNG",
                                help="also write the training and validation curves to a PNG "
                                     "(default RUN_DIR/curves.png)")
    listing = make("ls", "[DIR]")
    listing.add_argument("dir", metavar="DIR", type=Path, nargs="?", default=Path("runs"))
    return parsers


def _value_options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions if action.nargs != 0 for flag in action.option_strings}


def parse(argv: list[str]) -> Parsed:
    if not argv or argv[0] in ("-h", "--help"):
        _print_overview()
        raise SystemExit(0 if argv else EXIT_USAGE)
    command, rest = argv[0], argv[1:]
    parsers = build_parsers()
    if command not in parsers:
        raise LaunchError(f"unknown command {command!r}; the commands are {', '.join(SUBCOMMANDS)} "
                          "(launch --help)")
    parser = parsers[command]
    if command in TARGETS or command == "resume":
        if any(token in ("-h", "--help") for token in rest[:1]):
            parser.print_help()
            raise SystemExit(0)
        if command == "resume":
            target = _resume_target(rest, _value_options(parser))
            ours = _resume_options(rest, _value_options(parser))
        else:
            ours, target = split(rest, _value_options(parser))
        if target is None:
            parser.error(f"give what to run: {parser.usage.split('[options] ')[1]}")
        return Parsed(command, parser.parse_args(ours), target)
    return Parsed(command, parser.parse_args(rest), None)


def _resume_target(tokens: list[str], value_options: set[str]) -> Target | None:
    """``RUN_DIR [KEY=VALUE ...]`` among resume's options."""
    positional = _positionals(tokens, value_options)
    return Target("run", positional[0], tuple(positional[1:])) if positional else None


def _resume_options(tokens: list[str], value_options: set[str]) -> list[str]:
    ours, skip = [], False
    for i, token in enumerate(tokens):
        if skip:
            skip = False
            continue
        if token.startswith("-") and token != "-":
            ours.append(token)
            if token in value_options and i + 1 < len(tokens):
                ours.append(tokens[i + 1])
                skip = True
    return ours


def _positionals(tokens: list[str], value_options: set[str]) -> list[str]:
    out, skip = [], False
    for token in tokens:
        if skip:
            skip = False
        elif token.startswith("-") and token != "-":
            skip = token in value_options
        else:
            out.append(token)
    return out


def _print_overview() -> None:
    print(__doc__.split("\n\n")[0].replace("The ``launch`` command", "launch"))
    print("\ncommands:")
    for name, text in SUBCOMMANDS.items():
        print(f"  {name:<8} {text}")
    print("\nlaunch COMMAND --help for its options. Exit codes: 0 done, 1 a failure, 2 bad input, 75 stopped by "
          "a signal after a checkpoint, 124 the watchdog ended a stalled run, 130 a second Ctrl-C.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.getcwd() not in sys.path:
        # A job named package.module:Class imports from here, as the workers (which start here) do.
        # Our own modules are imported already, so a ddp.py or jobs.py here cannot shadow them.
        sys.path.insert(0, os.getcwd())
    try:
        parsed = parse(argv)
        from launcher import commands

        return commands.HANDLERS[parsed.command](parsed.options, parsed.target)
    except (ConfigError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `launch status RUN | head`: the reader has gone, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except Exception as err:
        if known_error(err):
            print(f"error: {err}", file=sys.stderr)
            logging.getLogger(__name__).debug("details", exc_info=True)
            return EXIT_USAGE if type(err).__name__ in USAGE_ERRORS else EXIT_FAILURE
        raise


# Known errors that mean the input was wrong (exit 2) rather than a failure while running (exit 1).
USAGE_ERRORS = {"RunDirError", "RunBusyError", "OptionError", "YamlError"}


if __name__ == "__main__":
    sys.exit(main())
