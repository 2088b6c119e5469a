"""What each worker of a script run runs: ``python -P -m launcher.script_worker [-m] TARGET [ARGS ...]``.

The script runs in this process, as ``python TARGET ARGS`` (or ``python -m
TARGET ARGS``) would run it: ``__main__``, ``sys.argv``, and the script's
folder first on ``sys.path``. Around it, what torchrun leaves out:

* the worker ends with the ``launch`` that started it (no orphans after ``kill -9``);
* an exception is written where the agent reports the root cause (as
  ``@record`` does), with the traceback also in ``logs/rank_N.log``;
* under ``launch local``, stderr joins stdout in the rank's log file.
"""

from __future__ import annotations

import os
import runpy
import sys


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

    run_script()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
