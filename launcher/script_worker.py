"""What each worker of a script run runs: ``python -P -m launcher.script_worker [-m] TARGET [ARGS ...]``.

The script runs in this process, as ``python TARGET ARGS`` (or ``python -m
TARGET ARGS``) would run it: ``__main__``, ``sys.argv``, and the script's
folder first on ``sys.path``. Around it, what torchrun leaves out:

* the worker ends with the ``launch`` that started it (no orphans after ``kill -9``);
* an exception is written where the agent reports the root cause (as
  ``@record`` does), with the traceback also in ``logs/rank_N.log``;
* under ``launch local``, stderr joins stdout in the rank's log file;
* the process ends without the interpreter's teardown (see ``exit_without_teardown``).
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys
import threading
import traceback


def main(argv: list[str]) -> int:
    if os.environ.get("LAUNCH_PID", "").isdigit():
        from ddp.process import die_with_parent

        die_with_parent(int(os.environ["LAUNCH_PID"]))
    if os.environ.get("LAUNCH_CPU_AFFINITY") == "1":
        import torch

        from ddp.process import pin_to_share

        pin_to_share(int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                     gpu=torch.cuda.is_available())
    if os.environ.get("LAUNCH_JOIN_STDERR") == "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(1, 2)
    module = argv[0] == "-m"
    target, args = (argv[1], argv[2:]) if module else (argv[0], argv[1:])
    from torch.distributed.elastic.multiprocessing.errors import record

    @record
    def run_script() -> None:
        if module:
            sys.path.insert(0, os.getcwd())
            sys.argv = [target, *args]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            sys.argv = [target, *args]
            runpy.run_path(target, run_name="__main__")

    try:
        run_script()
    except SystemExit as exit_request:
        return exit_code(exit_request.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130
    except BaseException:  # reported as the interpreter would, then the exit code 1
        traceback.print_exc()
        return 1
    return 0


def exit_code(code: object) -> int:
    """The exit status ``sys.exit(code)`` gives: None is 0, an int itself, anything else printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def exit_without_teardown(code: int) -> None:
    """Ends as the interpreter would, up to its teardown: waits for the script's threads, runs its
    ``atexit`` handlers, flushes the streams, then ``os._exit``.

    With gloo, the teardown itself can abort (``terminate called without an active
    exception``, SIGABRT) after a script that finished and destroyed its process
    group: about one exit in ten with torch 2.14 on this project's CPU machine,
    under plain torchrun too. Skipping it turns a finished run's failure into its
    success; nothing the script asked for is skipped.
    """
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main(sys.argv[1:]))
