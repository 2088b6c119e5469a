"""A per-worker watchdog: when the training loop stops making progress, say where, dump stacks, exit.

One rank stuck in user code (a deadlock, a hung file system, an endless
loop) leaves every other rank waiting in a collective until the process
group's timeout, 30 minutes by default, with nothing in the logs. Here:

* The loop calls ``beat(step, phase)`` at a few points of every step. A beat
  only stores a small record; it does no I/O and no synchronisation.
* A thread wakes every few seconds and writes this rank's position to
  ``RUN_DIR/logs/heartbeat_rank_N.json``, so every rank can see how far
  every other rank got.
* When this rank has not beaten for longer than its limit, or another
  rank's watchdog has already fired, the thread writes the verdict and the
  Python stack of every thread to this rank's log, leaves the verdict where
  torch's elastic agent reports it (``TORCHELASTIC_ERROR_FILE``), and ends the
  process with ``EXIT_STALLED`` so that elastic restarts or a requeue can take over.

Which rank stalled: every rank goes through the same sequence of beats, so a
rank stuck in its own code sits at an earlier position than the ranks that
went on and are now waiting for it in a collective. Positions are
``(step, n-th phase change within the step, index within the phase)``;
among equal positions, a rank whose main thread is inside ``torch.distributed``
is waiting, not stalled.

If a rank's own code holds the GIL forever this thread cannot run; a
``faulthandler`` timer (a C thread) then dumps the stacks and exits instead.

The limit. ``watchdog.timeout_s: auto`` (the default) calibrates it from what
the loop has done: until a phase (a step, an evaluation batch, a checkpoint
write) has been seen to complete, the generous ``watchdog.startup_s``; after,
ten times the longest that phase has taken, and never under
``watchdog.floor_s``. A number is a fixed limit; null turns the watchdog off.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ddp import storage
from ddp.codes import EXIT_STALLED
from ddp.config import WatchdogConfig
from ddp.env import DistEnv
from ddp.layout import RunDir

log = logging.getLogger(__name__)

COLLECTIVE_MARGIN_S = 60.0  # the process group outlasts the watchdog by this much
AUTO_FACTOR = 10.0  # auto: a phase may take this many times its longest time so far

# What each phase of the loop is doing, for the message. "step" phases work on
# step N+1 after N completed steps; the others come after step N.
PHASES = {
    "data": ("step", "waiting for its data loader"),
    "forward": ("step", "in the job's training_step (forward)"),
    "backward": ("step", "in backward, where DDP all-reduces the gradients"),
    "optimizer": ("step", "in the optimizer step"),
    "log": ("after", "reducing the logged metrics over ranks"),
    "evaluate": ("after", "in evaluation"),
    "checkpoint": ("after", "saving a checkpoint"),
    "checkpoint-agree": ("after", "waiting for the checkpoint write to finish"),
}
# A main thread whose innermost Python frame is in torch.distributed (but not in its
# elastic launcher, which wraps every worker) is waiting for the other ranks.
_COLLECTIVE_DIR = os.path.join("torch", "distributed", "")
_LAUNCHER_DIR = os.path.join("torch", "distributed", "elastic", "")
# DDP's own module calls its collectives from there (the buffer broadcast at the start of each
# forward of a model with BatchNorm): a main thread whose innermost frame is in it waits too.
_DDP_FILE = os.path.join("torch", "nn", "parallel", "distributed.py")


def longest_limit(config: WatchdogConfig) -> float | None:
    """The longest the watchdog may wait (None: off)."""
    if config.timeout_s is None:
        return None
    return config.startup_s if config.timeout_s == "auto" else float(config.timeout_s)


def collective_timeout(ddp_timeout_s: float, config: WatchdogConfig) -> float:
    """The process group's timeout: never shorter than the watchdog's, so the watchdog reports first.

    A collective that times out says only that it timed out, on every rank; the
    watchdog names the rank that stalled. The process group keeps its own
    (longer) timeout for the set-up, where rank 0 may download a dataset while the
    others wait, and as the backstop if the watchdog itself cannot run.
    """
    limit = longest_limit(config)
    if limit is None:
        return ddp_timeout_s
    return max(ddp_timeout_s, limit + COLLECTIVE_MARGIN_S)


def describe_position(record: dict) -> str:
    """``at step 5, in the job's training_step (forward)`` from a heartbeat record."""
    kind, text = PHASES.get(record.get("phase"), ("after", record.get("phase") or "starting"))
    step = record.get("step", 0)
    if record.get("phase") == "evaluate":
        text = f"in evaluation, batch {record.get('sub', 0)}"
    where = f"at step {step + 1}" if kind == "step" else f"after step {step}"
    return f"{where}, {text}"


def _position(record: dict) -> tuple:
    return tuple(record.get("position") or (0, 0, 0))


def verdict(records: dict[int, dict | None], world_size: int, waited_s: float,
            hosts: list[str] | None = None) -> str:
    """Who stalled and who waited, from every rank's heartbeat record (None: no recent heartbeat).

    ``hosts``: each rank's host, to name the node of a rank that sent nothing (a lost node).
    """

    def on(rank: int) -> str:
        host = (records.get(rank) or {}).get("host") or (hosts[rank] if hosts and rank < len(hosts) else None)
        return f" (on {host})" if host else ""

    live = {rank: rec for rank, rec in records.items() if rec is not None}
    silent = sorted(rank for rank in range(world_size) if records.get(rank) is None)
    candidates = {rank: rec for rank, rec in live.items() if not rec.get("in_collective")} or live
    stalled: list[int] = []
    if candidates:
        lowest = min(_position(rec) for rec in candidates.values())
        stalled = sorted(rank for rank, rec in candidates.items() if _position(rec) == lowest)
    waiting = sorted(rank for rank in live if rank not in stalled)
    parts = []
    if stalled and not waiting and not silent and len(stalled) > 1:
        parts.append(f"every rank stopped at the same point, {describe_position(live[stalled[0]])}: a collective "
                     "that never completed (network, NCCL) or code that hangs on every rank")
    else:
        for rank in stalled:
            parts.append(f"rank {rank}{on(rank)} stalled {describe_position(live[rank])}")
        for rank in silent:
            parts.append(f"rank {rank}{on(rank)} sent no heartbeat (its process or its node is gone, or it is "
                         "stuck without releasing the GIL)")
        if waiting:
            where = sorted({describe_position(live[rank]) for rank in waiting})
            ranks = ", ".join(map(str, waiting))
            parts.append(f"rank{'s' if len(waiting) > 1 else ''} {ranks} waited for "
                         f"{'it' if len(stalled) + len(silent) == 1 else 'them'} {' / '.join(where)}")
    return f"watchdog: no training progress for {waited_s:.0f} s; " + "; ".join(parts)


def _main_thread_in_collective() -> bool:
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return False
    filename = frame.f_code.co_filename
    return (_COLLECTIVE_DIR in filename and _LAUNCHER_DIR not in filename) or filename.endswith(_DDP_FILE)


@dataclass
class _Beat:
    step: int
    seq: int
    phase: str
    sub: int
    at: float  # time.time() of the beat


class Watchdog:
    """``with Watchdog(...) as dog: ... dog.beat(step, "forward") ...``; does nothing when it is off."""

    def __init__(self, run_dir: RunDir | Path, env: DistEnv, config: WatchdogConfig = WatchdogConfig(),
                 interval_s: float | None = None, hostnames: list[str] | None = None):
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.hostnames = hostnames
        self.env, self.config = env, config
        self.log_file = self.run_dir.rank_log(env.rank)
        longest = longest_limit(config)
        self.enabled = longest is not None
        # Often enough that a verdict sees fresh positions; rarely enough to cost nothing.
        floor = config.floor_s if config.timeout_s == "auto" else (longest or 5.0)
        self.interval_s = interval_s or min(5.0, max(0.2, floor / 5))
        self._beat = _Beat(0, 0, "starting", 0, time.time())
        self._longest: dict[str, float] = {}  # auto: the longest each phase has taken
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stack_file: IO | None = None
        self._host = socket.gethostname()

    def beat(self, step: int, phase: str, sub: int = 0) -> None:
        """The loop is alive at ``phase`` of ``step``. Cheap: one object, no I/O."""
        last = self._beat
        now = time.time()
        if phase != last.phase or step != last.step or sub != last.sub:
            taken = now - last.at
            if taken > self._longest.get(last.phase, 0.0) and last.phase != "starting":
                self._longest[last.phase] = taken
        if step != last.step:
            seq = 0
        elif phase != last.phase:
            seq = last.seq + 1
        else:
            seq = last.seq
        self._beat = _Beat(step, seq, phase, sub, now)  # one assignment: atomic for the reader

    def limit_s(self, phase: str) -> float:
        """How long ``phase`` may go without a beat before this rank counts as stalled."""
        c = self.config
        if c.timeout_s != "auto":
            return float(c.timeout_s)
        seen = self._longest.get(phase)
        if seen is None:
            return c.startup_s
        return max(c.floor_s, AUTO_FACTOR * seen)

    # -- the thread -------------------------------------------------------------------------------

    def start(self) -> Watchdog:
        if not self.enabled or self._thread is not None:
            return self
        self.beat(self._beat.step, "starting")
        self._stack_file = open(self.log_file, "a")
        self._arm_backstop(self.limit_s(self._beat.phase))
        self._write_heartbeat()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        faulthandler.cancel_dump_traceback_later()
        self._stack_file.close()
        self.run_dir.heartbeat(self.env.rank).unlink(missing_ok=True)

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            beat = self._beat
            silent_for = time.time() - beat.at
            limit = self.limit_s(beat.phase)
            self._arm_backstop(limit - silent_for)
            self._write_heartbeat()
            if silent_for > limit:
                self._fire(verdict(self._read_heartbeats(), self.env.world_size, silent_for, self.hostnames))
            # Only a rank that is itself blocked looks at the others' files (thousands of ranks
            # reading each other's files every few seconds would load a shared file system).
            fired = self._fired_elsewhere() if silent_for > 2 * self.interval_s else None
            if fired is not None:
                self._fire(fired)

    def _arm_backstop(self, remaining_s: float) -> None:
        """Re-armed while this thread runs: if it stops running (the GIL held forever), a C
        thread still dumps the stacks and ends the process (exit code 1) a little later."""
        faulthandler.dump_traceback_later(max(1.0, remaining_s + 2 * self.interval_s + 5),
                                          exit=True, file=self._stack_file)

    def _record(self, **extra) -> dict:
        beat = self._beat
        return {"rank": self.env.rank, "pid": os.getpid(), "host": self._host, "step": beat.step,
                "phase": beat.phase, "sub": beat.sub, "position": [beat.step, beat.seq, beat.sub],
                "beat_time": beat.at, "written": time.time(), "restart": self.env.restart_count,
                "in_collective": _main_thread_in_collective(), **extra}

    def _write_heartbeat(self, **extra) -> None:
        path = self.run_dir.heartbeat(self.env.rank)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self._record(**extra)))
            os.replace(tmp, path)
        except OSError as err:  # a full disk: the training loop raises it at its next log step
            tmp.unlink(missing_ok=True)
            storage.record_failure(path, err)

    def _read_heartbeats(self) -> dict[int, dict | None]:
        """Every rank's record, or None where it is missing, stale or from another attempt."""
        fresh_after = time.time() - (3 * self.interval_s + 5)
        records: dict[int, dict | None] = {}
        for rank in range(self.env.world_size):
            try:
                record = json.loads(self.run_dir.heartbeat(rank).read_text())
            except (OSError, ValueError):
                record = None
            if record is not None and (record.get("written", 0) < fresh_after
                                       or record.get("restart") != self.env.restart_count):
                record = None
            records[rank] = record
        return records

    def _fired_elsewhere(self) -> str | None:
        for rank, record in self._read_heartbeats().items():
            if rank != self.env.rank and record is not None and record.get("verdict"):
                return record["verdict"]
        return None

    def _fire(self, message: str) -> None:
        log_hint = f"; Python stacks of every thread in {self.run_dir.logs}/rank_N.log"
        log.error("%s%s", message, log_hint)
        handle = self._stack_file
        handle.write(f"\n--- watchdog: stacks of every thread of rank {self.env.rank} (pid {os.getpid()}) ---\n")
        handle.flush()
        faulthandler.dump_traceback(handle, all_threads=True)
        handle.flush()
        self._write_heartbeat(verdict=message)
        _write_elastic_error(message + log_hint)
        self._wait_for_other_ranks()
        logging.shutdown()
        os._exit(EXIT_STALLED)

    def _wait_for_other_ranks(self) -> None:
        """Give the other ranks' watchdogs time to dump their stacks before the agent kills them."""
        deadline = time.time() + 2 * self.interval_s + 2
        while time.time() < deadline:
            records = self._read_heartbeats()
            if all(record is None or record.get("verdict") for record in records.values()):
                return
            time.sleep(min(0.2, self.interval_s))


def _write_elastic_error(message: str) -> None:
    """Where torch's elastic agent looks for a worker's error (as ``@record`` would write it)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return
    data = {"message": {"message": f"WatchdogTimeout: {message}",
                        "extraInfo": {"py_callstack": "", "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as handle:
            json.dump(data, handle)
    except OSError:
        print(f"error: {message}", file=sys.stderr, flush=True)
