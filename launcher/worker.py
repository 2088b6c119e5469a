"""What each worker process runs: ``python -m launcher.worker RUN_DIR``.

torchrun's agent (or SLURM, or ``launch debug`` in-process) sets the
environment; the config is the run directory's ``config.yaml``, so every
worker trains exactly what the launcher validated and saved.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from ddp.config import load_config
from ddp.env import read_env
from ddp.signals import EXIT_RESUMABLE
from ddp.trainer import run_training


@record  # writes the traceback where torchrun's agent finds it, to name the root cause
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir = Path(argv[0])
    config = load_config(run_dir / "config.yaml")
    outcome = run_training(config, run_dir, read_env())
    return EXIT_RESUMABLE if outcome.status == "stopped" else 0


if __name__ == "__main__":
    code, failure = 1, None
    try:
        code = main()
    except Exception as err:  # noqa: BLE001 - already in the rank's log, with its traceback
        failure = f"{type(err).__name__}: {err}"
    if failure is None:
        sys.exit(code)
    # Under torch's elastic agent, @record has handed the error to `launch`, which prints
    # the root cause once; a traceback per rank on the terminal would bury it.
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        print(f"[rank {os.environ.get('RANK', os.environ.get('SLURM_PROCID', '?'))}] error: {failure} "
              f"(traceback in {Path(sys.argv[1]) / 'logs'})", file=sys.stderr)
    # Not sys.exit: at exit, multiprocessing joins the DataLoader's worker processes, which an
    # error can leave waiting for work (they ignore SIGTERM), so the worker would never end.
    # Loader workers notice that their parent is gone and end by themselves.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
