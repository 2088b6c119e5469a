"""The built-in trainer: the one code path for ``launch debug``, ``launch local`` and ``launch slurm``.

``run_training`` is what every worker of a config run calls. With one process
the process group, DDP and all collectives are no-ops, so the debugger sees
exactly the code that runs on a cluster. It is built from the core's public
pieces (``ddp.init``, ``Session.prepare``, ``Session.loader``,
``ddp.Checkpointer``), as a loop of your own can be.
"""

from __future__ import annotations

import logging
import traceback
from contextlib import contextmanager
from pathlib import Path

from ddp.config import Config
from ddp.env import DistEnv
from ddp.failure_text import real_error
from ddp.fork_server import start_fork_server
from ddp.job import Job
from ddp.layout import RunDir
from ddp.reporting import setup_logging, write_run_state
from ddp.session import init
from ddp.signals import StopRequest
from ddp.trainer.assembly import assemble
from ddp.trainer.loop import NonFiniteLossError, Outcome, Trainer
from ddp.watchdog import Watchdog, collective_timeout

__all__ = ["run_training", "Outcome", "NonFiniteLossError"]

log = logging.getLogger(__name__)

END_STATES = {"finished": "finished", "early_stopped": "early-stopped", "stopped": "stopped"}


def run_training(config: Config, run_dir: str | Path | RunDir, env: DistEnv, job: Job, *,
                 num_workers: int | None = None, stop: StopRequest | None = None) -> Outcome:
    """Train ``job`` as configured, in this process, as one of ``env.world_size`` workers.

    ``stop``: a caller that must see stop signals from before training starts (a SLURM task)
    passes its own, already installed; installing and uninstalling it stays the caller's.
    """
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    log_file = setup_logging(run_dir, env)
    workers = config.data.num_workers if num_workers is None else num_workers
    if workers > 0 and config.data.start_method == "forkserver":
        start_fork_server()  # before the process group's threads: it can then be forked from here
    with failure_recorded(run_dir, env, log_file):
        timeout_s = collective_timeout(config.ddp.timeout_s, config.watchdog)
        with init(seed=config.run.seed, device=config.train.device, backend=config.ddp.backend,
                  timeout_s=timeout_s, deterministic=config.run.deterministic,
                  stop_check_s=config.train.stop_check_s, env=env, stop=stop) as session:
            parts = assemble(config, job, session, run_dir, num_workers)
            try:
                watchdog = Watchdog(run_dir, env, config.watchdog, hostnames=parts.hostnames)
                trainer = Trainer(config, run_dir, session, parts, watchdog)
                outcome = trainer.fit()
            finally:
                parts.close()
            if env.is_main and outcome.status in END_STATES:
                write_run_state(run_dir, END_STATES[outcome.status], step=outcome.step, epoch=outcome.epoch,
                                checkpoint=str(outcome.checkpoint) if outcome.checkpoint else None,
                                metrics=outcome.metrics, best=trainer.state.best,
                                early_stop=trainer.state.stopped_early,
                                signal=session.stop.signal_name if outcome.status == "stopped" else None)
            return outcome


@contextmanager
def failure_recorded(run_dir: RunDir, env: DistEnv, log_file: Path):
    """A failure's message to the log (and so rank 0's console) and state.json; its traceback to the log file."""
    try:
        yield
    except Exception as err:
        text = real_error(f"{type(err).__name__}: {err}")
        log.error("%s", text)
        try:
            with open(log_file, "a") as handle:
                traceback.print_exc(file=handle)
            if env.is_main:
                write_run_state(run_dir, "failed", error=text)
        except Exception:
            pass
        raise
