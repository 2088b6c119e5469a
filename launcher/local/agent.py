"""``launch local``, carried out: torch's elastic agent (torchrun's engine) with what a launcher owes its workers.

On top of ``LocalElasticAgent``:

* **Stops are stops.** The first SIGTERM, SIGUSR2, SIGINT or SIGHUP to ``launch``
  is passed on once, as SIGTERM, to every worker, which saves a checkpoint at its
  next step and exits ``EXIT_RESUMABLE``; the agent waits for all of them (however
  long the checkpoint takes) instead of killing the slower ones, and neither
  restarts them nor reports a failure. A stop signal sent to one worker alone ends
  the same way. A second Ctrl-C ends the workers at once (exit 130); further
  SIGTERMs change nothing.
* **Restarts are recorded.** Each restart or membership change of the workers is
  one line in ``restarts.jsonl``: why (each worker's error, the root cause first),
  the world size before and after, and the checkpoint the workers resume from.
* **The rendezvous store listens where it must** (loopback on one node, the
  endpoint's interface on several), not on every interface.
* **Script runs** get per-rank log files (``logs/rank_N.log``), rank 0's also on
  the console.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.agent.server.api import RunResult, WorkerSpec, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, LogsDest, Std
from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousInfo, RendezvousParameters
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

from ddp.codes import EXIT_INTERRUPTED, EXIT_OK, EXIT_RESUMABLE, STOP_SIGNALS
from ddp.failure_text import is_consequence, split_error
from ddp.layout import RunDir, latest_complete
from launcher.failures import describe_failure, failure_text, root_cause
from launcher.local.plan import LocalPlan
from launcher.ports import parse_endpoint
from launcher.restarts import record_restart
from launcher.stops import report_stop

log = logging.getLogger(__name__)

HANDLED = (*STOP_SIGNALS, signal.SIGHUP)
# Errors that a restart cannot cure: the agent ends the run instead of retrying them --max-restarts times.
NOT_RETRIED = {"ResumeError", "ConfigError", "RankMismatchError", "JobError", "DatasetError", "ModelError",
               "NonFiniteLossError", "StorageError", "CheckpointError"}
SHUTDOWN_TIMEOUT_S = 300  # a worker told to stop (a membership change) may take this long to save
RENDEZVOUS = {"join_timeout": "600", "last_call_timeout": "5", "close_timeout": "30",
              "keep_alive_interval": "2", "keep_alive_max_attempt": "3"}


class Interrupted(Exception):
    """A second Ctrl-C: stop at once."""


class LaunchAgent(LocalElasticAgent):
    def __init__(self, *args, plan: LocalPlan, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = plan
        self.run_dir = RunDir(plan.run_dir)
        self.stopped = False  # every worker ended with EXIT_RESUMABLE: a stop, not a failure
        self.stop_signal: signal.Signals | None = None
        self.last_result: RunResult | None = None
        self._world_size = 0
        self._changes = 0  # restarts and membership changes so far (torch counts only the restarts)

    # -- signals -------------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        for signum in HANDLED:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        signum = signal.Signals(signum)
        if self.stop_signal is None:
            self.stop_signal = signum
            again = " (Ctrl-C again stops at once, without a checkpoint)" if signum == signal.SIGINT else ""
            print(f"launch: {signum.name}: the workers save a checkpoint at their next step, then stop{again}",
                  file=sys.stderr, flush=True)
            self._signal_workers(signal.SIGTERM)
        elif signum == signal.SIGINT:
            raise Interrupted()
        else:
            print(f"launch: already stopping on {self.stop_signal.name}; waiting for the workers to save",
                  file=sys.stderr, flush=True)

    def _signal_workers(self, signum: signal.Signals) -> None:
        """The worker processes only: their loader processes ignore stop signals, and are ended by them."""
        if self._pcontext is None:
            return
        for pid in self._pcontext.pids().values():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def kill_workers(self) -> None:
        if self._pcontext is not None:
            self._pcontext.close(signal.SIGKILL, timeout=5)

    # -- the torch agent's hooks ---------------------------------------------------------------------

    def _start_workers(self, worker_group):
        pids = super()._start_workers(worker_group)
        self.install_signal_handlers()  # torch's process context installs its own at every start
        if self.stop_signal is not None:  # a stop that came while they were (re)starting
            self._signal_workers(signal.SIGTERM)
        return pids

    def _monitor_workers(self, worker_group) -> RunResult:
        handlers = getattr(self._pcontext, "subprocess_handlers", {})
        codes = [handler.proc.poll() for handler in handlers.values()]
        if any(code == EXIT_RESUMABLE for code in codes) and any(code is None for code in codes) \
                and all(code in (None, EXIT_RESUMABLE) for code in codes):
            return RunResult(state=WorkerState.HEALTHY)  # a stop: wait for every worker to save and end
        result = super()._monitor_workers(worker_group)
        self.last_result = result
        if result.state == WorkerState.FAILED and result.failures and self._remaining_restarts > 0:
            _, first = root_cause(result.failures)
            name, _ = split_error(failure_text(first) or "")
            if name in NOT_RETRIED:
                print(f"launch: not restarting the workers: {name} is not cured by a restart", file=sys.stderr,
                      flush=True)
                self._remaining_restarts = 0
        if result.state == WorkerState.FAILED and result.failures and \
                all(failure.exitcode == EXIT_RESUMABLE for failure in result.failures.values()):
            self.stopped = True
            return RunResult(state=WorkerState.SUCCEEDED, return_values={rank: None for rank in result.failures})
        if result.state == WorkerState.FAILED and self.stop_signal is not None and _stopped_with_help(result):
            self.stopped = True  # some saved and exited 75; the rest were ended by the stop's own signal
            return RunResult(state=WorkerState.SUCCEEDED, return_values={})
        return result

    def _rendezvous(self, worker_group) -> None:
        super()._rendezvous(worker_group)
        self._world_size = worker_group.workers[0].world_size if worker_group.workers else 0

    def _restart_workers(self, worker_group) -> None:
        before, result = self._world_size, self.last_result
        super()._restart_workers(worker_group)
        self._changes += 1
        if worker_group.group_rank == 0:
            failed = result is not None and result.state == WorkerState.FAILED
            after = self._world_size
            why = ("scale-down: a node left" if after < before else "scale-up: a node joined" if after > before
                   else "failure" if failed else "membership change")
            checkpoint = latest_complete(self.run_dir.checkpoints)
            record_restart(self.run_dir, restart=self._changes, old_world_size=before, new_world_size=after,
                           why=why, failures=_failures(result) if failed else [],
                           resumed_from=str(checkpoint.path) if checkpoint else None,
                           step=checkpoint.step if checkpoint else 0)


def _stopped_with_help(result: RunResult) -> bool:
    """After launch passed a stop on: some workers saved and exited 75, the others ended by that signal."""
    codes = [failure.exitcode for failure in result.failures.values()]
    return EXIT_RESUMABLE in codes and all(code in (EXIT_RESUMABLE, -signal.SIGTERM, -signal.SIGKILL)
                                           for code in codes)


def _ended_by_stop(result: RunResult) -> bool:
    return all(failure.exitcode in (-signal.SIGTERM, -signal.SIGKILL) for failure in result.failures.values())


def _failures(result: RunResult) -> list[dict]:
    """Each failed worker's error in a line, the root cause first, knock-on errors of lost peers last."""
    items = []
    for rank, failure in sorted((result.failures if result else {}).items()):
        items.append({"rank": rank, "exit_code": failure.exitcode, "error": failure_text(failure)})
    return sorted(items, key=lambda item: (is_consequence(item["error"], item["exit_code"]),
                                           item["error"] is not None, item["rank"]))


class RunLogs(DefaultLogsSpecs):
    """A script run's output: each worker's stdout (and stderr, which the worker sends there too) to
    ``logs/rank_N.log``, rank 0's also to the console. The previous attempt's file is kept as
    ``rank_N.log.1`` (then .2, ... up to 5)."""

    KEEP = 5

    def __init__(self, run_dir: RunDir):
        super().__init__(log_dir=None, redirects=Std.NONE, tee=Std.NONE)
        self.run_dir = run_dir

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        dest = super().reify(envs)  # the error files, where the workers' errors are reported
        self.run_dir.logs.mkdir(parents=True, exist_ok=True)
        for local_rank, env in envs.items():
            path = self.run_dir.rank_log(int(env["RANK"]))
            _rotate(path, self.KEEP)
            dest.stdouts[local_rank] = str(path)  # stderr joins it in the worker (launcher.script_worker)
            if local_rank == 0:
                dest.tee_stdouts[local_rank] = str(path)
        return dest


def _rotate(path: Path, keep: int) -> None:
    for index in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{index + 1}"))
    if path.exists() and path.stat().st_size:
        path.replace(path.with_name(f"{path.name}.1"))


def listening_store(host: str, bind: str, port: int, timeout_s: float = 60) -> tuple[dist.TCPStore, socket.socket]:
    """A TCPStore server on ``bind:port`` only (torch's own listens on every interface)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((bind, port))
        listener.listen(4096)
        store = dist.TCPStore(host, port, is_master=True, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False, master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    return store, listener


class RoundStores(RendezvousHandler):
    """torch's c10d rendezvous, with each round's process-group store hosted by the agent of node 0.

    The workers of a round connect to it (``TORCHELASTIC_USE_AGENT_STORE``) instead of rank 0
    hosting one: it outlives every worker (a worker's store going away while its peers still
    shut down aborts them), listens on ``bind_host`` only, and is new for every round, so
    restarted workers never meet their predecessors' keys (pytorch/pytorch#135712).
    """

    def __init__(self, inner: RendezvousHandler, bind_host: str, keep: list):
        self.inner, self.bind_host, self._keep = inner, bind_host, keep
        self._round: tuple | None = None

    def next_rendezvous(self) -> RendezvousInfo:
        info = self.inner.next_rendezvous()
        self._round = None  # the previous round's store closes
        if info.rank == 0:
            bootstrap = info.bootstrap_store_info
            self._round = listening_store(bootstrap.master_addr, self.bind_host, bootstrap.master_port)
        return info

    @property
    def use_agent_store(self) -> bool:
        return True

    def get_backend(self) -> str:
        return self.inner.get_backend()

    def is_closed(self) -> bool:
        return self.inner.is_closed()

    def set_closed(self):
        return self.inner.set_closed()

    def num_nodes_waiting(self) -> int:
        return self.inner.num_nodes_waiting()

    def get_run_id(self) -> str:
        return self.inner.get_run_id()

    def shutdown(self) -> bool:
        return self.inner.shutdown()


def rendezvous_handler(plan: LocalPlan) -> RoundStores:
    """torch's c10d rendezvous, its store listening on ``plan.bind_host`` only. The first agent to bind the
    endpoint hosts the store; the others connect to it."""
    host, port = parse_endpoint(plan.rdzv_endpoint)
    params = RendezvousParameters(backend="c10d", endpoint=plan.rdzv_endpoint, run_id=plan.rdzv_id,
                                  min_nodes=plan.min_nodes, max_nodes=plan.max_nodes, local_addr=plan.bind_host,
                                  **RENDEZVOUS)
    keep: list = []
    try:
        bind = plan.bind_host if plan.single_node else socket.gethostbyname(host)
        store, listener = listening_store(host, bind, port)
        keep.append(listener)
    except OSError:  # another agent hosts it (or the endpoint is another machine's)
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=60))
    return RoundStores(create_handler(store, C10dRendezvousBackend(store, plan.rdzv_id), params), plan.bind_host,
                       keep + [store])


@contextmanager
def _environment(variables: dict[str, str]):
    """``variables`` in ``os.environ`` while the agent starts workers (which inherit it), then as before."""
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_local(plan: LocalPlan) -> int:
    """Start the workers, wait for them, and say how it ended. Returns the exit code for the command line."""
    run_dir = RunDir(plan.run_dir)
    variables = {
        **plan.environment,
        "LAUNCH_PID": str(os.getpid()),  # the workers end with this process (no orphans)
        # torch's own shared store is off: RoundStores hosts a new one for each round (see there).
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        # torch's process context handles only these itself; launch handles the stop signals.
        "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGQUIT",
    }
    if plan.entry.kind != "config":
        variables["LAUNCH_JOIN_STDERR"] = "1"  # a script's stderr joins its stdout in logs/rank_N.log
    spec = WorkerSpec(role="worker", local_world_size=plan.nproc_per_node, entrypoint=plan.entry.argv()[0],
                      args=tuple(plan.entry.argv()[1:]), rdzv_handler=rendezvous_handler(plan),
                      max_restarts=plan.max_restarts, monitor_interval=0.1, local_addr=plan.bind_host)
    logs = RunLogs(run_dir) if plan.entry.kind != "config" else DefaultLogsSpecs()
    agent = LaunchAgent(spec=spec, logs_specs=logs, start_method="spawn", exit_barrier_timeout=300,
                        shutdown_timeout=SHUTDOWN_TIMEOUT_S, plan=plan)
    previous = {signum: signal.getsignal(signum) for signum in HANDLED}
    agent.install_signal_handlers()
    # torch's agent logs each worker's end ("failed (exitcode: 75)", "Sending process ... SIGTERM") at
    # warning and error level: launch says what happened itself, once.
    torch_logs = logging.getLogger("torch.distributed.elastic")
    torch_level = torch_logs.level
    torch_logs.setLevel(logging.CRITICAL)
    try:
        with _environment(variables):
            result = agent.run()
    except Interrupted:
        agent.kill_workers()
        print(f"launch: interrupted: the workers were stopped at once, without a checkpoint. "
              f"{report_stop(run_dir, None, saved_only=True)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        torch_logs.setLevel(torch_level)
        spec.rdzv_handler.shutdown()
    if agent.stopped:
        print(report_stop(run_dir, agent.stop_signal), file=sys.stderr)
        return EXIT_RESUMABLE
    if result.is_failed() and agent.stop_signal is not None and _ended_by_stop(result):
        # A script that saves nothing on a stop signal: ended by it, as a plain torchrun script is.
        print(f"stopped by {agent.stop_signal.name}: the workers were ended by it before they saved a checkpoint "
              f"(a script that does not stop on SIGTERM ends so: see docs/your-code.md). "
              f"{report_stop(run_dir, None, saved_only=True)}", file=sys.stderr)
        return 128 + signal.SIGTERM
    if result.is_failed():
        _, first = root_cause(result.failures)
        print(describe_failure(result.failures, run_dir), file=sys.stderr)
        return first.exitcode if first.exitcode > 0 else 1
    return EXIT_OK
