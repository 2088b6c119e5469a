"""What each worker of a config run runs: ``python -P -m launcher.worker RUN_DIR``.

torch's elastic agent (``launch local``) sets the environment; the config is
the run directory's ``config.yaml``, so every worker trains exactly what the
launcher validated and saved. Pasted from a dry run under plain ``torchrun``,
``python -m launcher.worker --config CONFIG [KEY=VALUE ...]`` loads the config
itself.

The worker ends with the process that started it (no orphans after a
``kill -9`` of ``launch``), ignores stop signals once training has returned,
and exits with ``os._exit``: at a normal exit, multiprocessing would wait for
the loader processes, which an error can leave waiting for work.
"""

from __future__ import annotations

from launcher.latch import SignalLatch

_latch = SignalLatch().install()  # before torch is imported: a stop signal then is kept, not fatal

import logging
import os
import sys
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from ddp.codes import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_RESUMABLE
from ddp.config import load_config
from ddp.env import read_env
from ddp.layout import RunDir
from ddp.process import die_with_parent, pin_to_share
from ddp.reporting import setup_logging
from ddp.signals import StopRequest, ignore_stop_signals
from ddp.trainer import failure_recorded, run_training
from jobs.registry import make_job


def standalone_run_dir(argv: list[str]) -> RunDir:
    """``--config CONFIG [KEY=VALUE ...]``: the run directory, its config.yaml written by rank 0 if new."""
    from launcher import configs
    from launcher.runs import write_text_atomic

    loaded = configs.load(argv[1], argv[2:], cwd=Path.cwd())
    run_dir = loaded.run_dir
    env = read_env()
    if env.is_main and not run_dir.config.is_file():
        run_dir.path.mkdir(parents=True, exist_ok=True)
        from ddp.config import dump_yaml

        write_text_atomic(run_dir.config, dump_yaml(loaded.config))
    return run_dir


@record  # writes the error where torch's elastic agent finds it, to name the root cause
def main(argv: list[str], stop: StopRequest | None = None) -> int:
    run_dir = standalone_run_dir(argv) if argv[0] == "--config" else RunDir(argv[0])
    if argv[0] == "--config":
        import time

        while not run_dir.config.is_file():
            time.sleep(0.1)
    config = load_config(run_dir.config)
    env = read_env()
    # A job that fails in its constructor is reported like a failure in training: its message on the
    # console, its traceback in the rank's log, "failed" in state.json.
    with failure_recorded(run_dir, env, setup_logging(run_dir, env)):
        job = make_job(config.job, env)
    outcome = run_training(config, run_dir, env, job, stop=stop)
    return EXIT_RESUMABLE if outcome.status == "stopped" else EXIT_OK


def run(argv: list[str]) -> int:
    if os.environ.get("LAUNCH_PID", "").isdigit():
        die_with_parent(int(os.environ["LAUNCH_PID"]))
    if os.environ.get("LAUNCH_CPU_AFFINITY") == "1":
        pin_to_share(int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                     gpu=torch.cuda.is_available())
    sys.path.insert(0, os.getcwd())  # the user's job modules (our packages are imported already)
    stop = StopRequest().install()
    _latch.replay()  # a stop signal that came while this process started
    code, failure = EXIT_FAILURE, None
    try:
        code = main(argv, stop)
    except KeyboardInterrupt:  # a second Ctrl-C
        code = EXIT_INTERRUPTED
    except Exception as err:
        failure = f"{type(err).__name__}: {err}"
    ignore_stop_signals()
    if failure is not None and "TORCHELASTIC_ERROR_FILE" not in os.environ:
        # Under torch's agent, @record has handed the error to `launch`, which prints the root cause
        # once; elsewhere (SLURM, plain torchrun) one line here.
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "?"))
        print(f"[rank {rank}] error: {failure} (traceback in {Path(argv[-1]).parent / 'logs'})", file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    os._exit(run(sys.argv[1:]))
