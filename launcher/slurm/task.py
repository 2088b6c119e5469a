"""What each SLURM task runs: ``python -u -P -m launcher.slurm.task FOLDER``.

The task runs submitit's own job processing (``process_job``: load the pickled
``SlurmTask``, call it, write the result where submitit's job objects read it),
then ends with ``os._exit`` and the right code, so SLURM records COMPLETED or
FAILED within seconds: at a normal exit, multiprocessing would wait for the
persistent loader processes, which ignore stop signals while their parent is
alive, and a failed task would never end.

``SlurmTask`` gives the workers torchrun's contract, built from SLURM's
variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ``TORCHELASTIC_RESTART_COUNT``,
``TORCHELASTIC_RUN_ID``, ...), so a config run and an unmodified torchrun
script run the same as under ``launch local``. Rank 0 picks the rendezvous
port (outside the ephemeral range, free on its node, unique per job) and
publishes it in the run directory for the other tasks.

Stopping and requeueing. SIGUSR2 (``--signal=USR2@N`` before the time limit)
and SIGTERM (preemption, ``scontrol requeue``, ``scancel``) ask for an agreed
stop: the workers save a checkpoint and stop (a config run's trainer does it;
a script gets ``--script-signal``, by default USR2, and exits 75 after
saving). Rank 0 then asks SLURM what is happening to the job. Still RUNNING:
nobody else is ending it, so this was the warning; rank 0 requeues it if it has
been requeued fewer than ``slurm.max_requeues`` times. Anything else
(CANCELLED, being requeued by SLURM, TIMEOUT): SLURM has decided, and the
checkpoint is what the next run resumes from. After training has returned or
raised, later stop signals are ignored: a warning that comes while a finished
task exits must not turn COMPLETED into FAILED.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ddp.codes import STOP_SIGNALS
from ddp.layout import RunDir  # torch-free, like everything imported before the task has its handlers
from launcher.latch import SignalLatch
from launcher.slurm.status import TASK_FAILED

EVENTS_LOG = logging.getLogger(__name__)


_latch = SignalLatch()


class RequeueError(RuntimeError):
    """The job stopped and will not run again by itself: requeued too often, or ``scontrol requeue`` failed."""


def job_id_of(environ) -> str:
    """The id ``scontrol`` knows this job by (an array element is ``ARRAYID_INDEX``)."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID", "")


def torchrun_environment(environ, port: int, max_requeues: int) -> dict[str, str]:
    """torchrun's variables for this task, from SLURM's (one task per worker)."""
    from ddp.env import expand_nodelist

    world = int(environ["SLURM_NTASKS"])
    nodes = int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
    local_world = int(environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or max(1, world // nodes))
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "127.0.0.1"
    return {
        "RANK": environ["SLURM_PROCID"], "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"), "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(local_world), "GROUP_RANK": environ.get("SLURM_NODEID", "0"),
        "GROUP_WORLD_SIZE": str(nodes), "ROLE_RANK": environ["SLURM_PROCID"], "ROLE_WORLD_SIZE": str(world),
        "ROLE_NAME": "default", "MASTER_ADDR": expand_nodelist(nodelist)[0], "MASTER_PORT": str(port),
        "TORCHELASTIC_RESTART_COUNT": environ.get("SLURM_RESTART_COUNT", "0") or "0",
        "TORCHELASTIC_MAX_RESTARTS": str(max_requeues), "TORCHELASTIC_RUN_ID": job_id_of(environ),
    }


def rendezvous_port(run_dir, job_id: str, restart: int, is_main: bool, timeout_s: float = 600) -> int:
    """Rank 0: a free port of its node, from the job's own starting point; the others: the port it published."""
    from ddp.env import JOB_PORTS, port_for_job

    path = run_dir.slurm_rendezvous(job_id, restart)
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob("rendezvous_*.json"):
            stale.unlink(missing_ok=True)
        start = port_for_job(job_id)
        for offset in range(len(JOB_PORTS)):
            port = JOB_PORTS.start + (start - JOB_PORTS.start + offset) % len(JOB_PORTS)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind(("", port))
                except OSError:
                    continue
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({"port": port, "host": socket.gethostname()}))
            os.replace(tmp, path)
            return port
        raise RuntimeError(f"no free port in {JOB_PORTS.start}..{JOB_PORTS.stop - 1} on {socket.gethostname()}")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            return int(json.loads(path.read_text())["port"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    raise RuntimeError(f"rank 0 did not publish the rendezvous port in {path} within {timeout_s:.0f} s")


def job_state(job_id: str) -> str:
    """SLURM's state of the job (RUNNING, CANCELLED, ...), or UNKNOWN when scontrol cannot say."""
    from launcher.slurm.query import scheduler_view

    return scheduler_view(job_id).get("JobState", "UNKNOWN")


class SlurmTask:
    """The submitit callable: run this task's worker of the run in ``run_dir``."""

    def __init__(self, run_dir: str, max_requeues: int, script_signal: str = "SIGUSR2", index: int = 0):
        self.run_dir = run_dir
        self.max_requeues = max_requeues
        self.script_signal = script_signal
        self.index = index

    def __call__(self) -> dict:
        from ddp.lock import Owner, RunLock
        from launcher.runs import read_record

        _latch.install()  # submitit installed its own handlers meanwhile; ours again, at once
        run_dir = RunDir(self.run_dir)
        environ = dict(os.environ)
        job_id = job_id_of(environ)
        restart = int(environ.get("SLURM_RESTART_COUNT", "0") or 0)
        is_main = environ.get("SLURM_PROCID") == "0"
        if restart > self.max_requeues:
            self._event(is_main, job_id, restart, "refused", reason=f"requeued {restart} times")
            raise RequeueError(
                f"job {job_id} was requeued {restart} times, more than slurm.max_requeues={self.max_requeues}; "
                f"not starting again. Continue with `{RunDir(self.run_dir).command('resume')}` "
                "from the last checkpoint")
        os.environ.update(torchrun_environment(environ, rendezvous_port(run_dir, job_id, restart, is_main),
                                               self.max_requeues))
        os.environ["LAUNCH_RUN_DIR"] = str(run_dir.path)
        os.environ["LAUNCH_LAUNCHED_BY"] = "slurm"  # env.jsonl: torchrun's variables, but SLURM started the run
        self._host_store()
        lock = None
        if is_main:
            lock = RunLock(run_dir.lock, Owner.of_this_process("slurm", job_id=job_id,
                                                               command=f"SLURM job {job_id}"))
            note = lock.acquire(run_dir.path)
            lock.start_refreshing()
            if note:
                print(f"launch: {note}", file=sys.stderr, flush=True)
            if restart:
                self._record_requeue(run_dir, restart)
        self._event(is_main, job_id, restart, "started")
        record = read_record(run_dir)
        try:
            if record.get("kind") == "script":
                status = self._run_script(run_dir, record)
                summary = {"status": status}
            else:
                summary = self._run_config(run_dir)
        except BaseException as err:
            self._event(is_main, job_id, restart, "failed", error=f"{type(err).__name__}: {err}")
            raise
        finally:
            signal_ignore_stops()
            self._all_done()
            if lock is not None:
                lock.release()
        if summary["status"] != "stopped":
            self._event(is_main, job_id, restart, summary["status"], step=summary.get("step"),
                        epoch=summary.get("epoch"))
            return summary
        return self._after_stop(is_main, job_id, restart, summary)

    # -- the process group's store ------------------------------------------------------------------

    def _host_store(self) -> None:
        """Rank 0's task hosts the store the workers connect to, on its node's address only; it outlives
        them all (``_all_done``), so no worker loses it while its peers are still shutting down."""
        from ddp.distributed import host_store
        from ddp.env import read_env

        host_store(read_env(), timeout_s=1800, for_workers=True)
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"  # the workers connect to it, as to torchrun's agent

    def _all_done(self, timeout_s: float = 60) -> None:
        """Every task says it is done; rank 0's waits for all of them before it ends (and its store with it)."""
        import datetime

        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world < 2:
            return
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=datetime.timedelta(seconds=timeout_s))
            done = store.add("launch/tasks_done", 1)
            deadline = time.time() + timeout_s
            while os.environ.get("RANK") == "0" and done < world and time.time() < deadline:
                time.sleep(0.2)
                done = store.add("launch/tasks_done", 0)
        except Exception as err:
            print(f"launch: not waiting for the other tasks: {err}", file=sys.stderr, flush=True)

    # -- running the worker --------------------------------------------------------------------------

    def _run_config(self, run_dir) -> dict:
        from ddp.config import load_config
        from ddp.env import read_env
        from ddp.signals import StopRequest
        from ddp.trainer import run_training
        from jobs.registry import make_job

        self._stop = StopRequest().install()
        _latch.replay()
        env = read_env()
        config = load_config(run_dir.config)
        outcome = run_training(config, run_dir, env, make_job(config.job, env), stop=self._stop)
        return {"status": "stopped" if outcome.status == "stopped" else outcome.status, "step": outcome.step,
                "epoch": outcome.epoch, "metrics": outcome.metrics, "signal": self._stop.signal_name}

    def _run_script(self, run_dir, record: dict) -> str:
        """The script in a process of its own (its own interpreter and ``__main__``, as under torchrun),
        its output to the task's log and ``logs/rank_N.log``; stop signals passed on."""
        from launcher.local.plan import Entry

        target = record["target"]
        entry = Entry("module", target["module"], tuple(target.get("args", []))) if "module" in target else \
            Entry("script", target["script"], tuple(target.get("args", [])))
        log_path = run_dir.rank_log(int(os.environ["RANK"]))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        child = subprocess.Popen(entry.argv(), env={**os.environ, "LAUNCH_PID": str(os.getpid())},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=record.get("cwd") or None)
        self._signal_name = None
        passed = getattr(signal, self.script_signal)

        def forward(signum, frame):
            self._signal_name = self._signal_name or signal.Signals(signum).name
            child.send_signal(passed if signum == signal.SIGUSR2 else signum)

        for signum in STOP_SIGNALS:
            signal.signal(signum, forward)
        for signum in _latch.received:
            forward(signum, None)
        relay = threading.Thread(target=_relay, args=(child.stdout, log_path), daemon=True)
        relay.start()
        code = child.wait()
        relay.join(timeout=10)
        if code == 75:
            return "stopped"
        if code != 0:
            raise RuntimeError(f"the script exited with code {code}; its output is in {log_path}")
        return "finished"

    # -- after a stop --------------------------------------------------------------------------------

    def _after_stop(self, is_main: bool, job_id: str, restart: int, summary: dict) -> dict:
        """The workers saved a checkpoint and stopped: requeue the job, or leave it to SLURM."""
        if not is_main:
            return summary  # rank 0 decides for the job
        signal_name = summary.get("signal") or getattr(self, "_signal_name", None)
        details = {"step": summary.get("step"), "epoch": summary.get("epoch"), "signal": signal_name}
        state = job_state(job_id)
        if state != "RUNNING":
            # Cancelled, timed out, or already being requeued by SLURM (preemption, scontrol requeue).
            self._event(is_main, job_id, restart, "stopped", state=state, **details)
            return {**summary, "state": state}
        if restart >= self.max_requeues:
            self._event(is_main, job_id, restart, "stopped", state=state, reason="requeue limit", **details)
            raise RequeueError(
                f"stopped by {signal_name} after {restart} requeue(s), the most slurm.max_requeues="
                f"{self.max_requeues} allows; the checkpoint is saved. Continue with "
                f"`{RunDir(self.run_dir).command('resume')}`, "
                "or raise slurm.max_requeues or --time")
        self._event(is_main, job_id, restart, "requeued", **details)
        try:
            subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as err:
            said = (getattr(err, "stderr", "") or str(err)).strip()
            self._event(is_main, job_id, restart, "requeue-failed", error=said, **details)
            raise RequeueError(f"`scontrol requeue {job_id}` failed: {said}; the checkpoint is saved, continue "
                               f"with `{RunDir(self.run_dir).command('resume')}`") from None
        print(f"launch: requeued job {job_id} after the checkpoint ({signal_name})", file=sys.stderr, flush=True)
        return {**summary, "status": "requeued"}

    def _record_requeue(self, run_dir, restart: int) -> None:
        from ddp.layout import latest_complete
        from ddp.reporting import read_jsonl
        from launcher.restarts import record_restart

        before = read_jsonl(run_dir.env_log)
        checkpoint = latest_complete(run_dir.checkpoints)
        record_restart(run_dir, restart=restart, old_world_size=before[-1].get("world_size", 0) if before else 0,
                       new_world_size=int(os.environ["WORLD_SIZE"]), launched_by="slurm",
                       why="requeued by SLURM (a time-limit warning, preemption or a node failure)", failures=[],
                       resumed_from=str(checkpoint.path) if checkpoint else None,
                       step=checkpoint.step if checkpoint else 0)

    def _event(self, is_main: bool, job_id: str, restart: int, event: str, **details) -> None:
        if not is_main:
            return
        record = {"time": round(time.time(), 3), "job_id": job_id, "restart": restart, "event": event,
                  **{key: value for key, value in details.items() if value is not None}}
        try:
            with open(RunDir(self.run_dir).slurm_events, "a") as handle:
                handle.write(json.dumps(record, default=str) + "\n")
        except OSError as err:  # the record is for `launch status`; training does not depend on it
            print(f"launch: cannot write slurm_events.jsonl: {err}", file=sys.stderr, flush=True)


def signal_ignore_stops() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _relay(stream, log_path: Path) -> None:
    """The script's output, line by line, to this task's stdout (submitit's log) and the rank's log file."""
    with open(log_path, "ab") as log_file:
        for line in iter(stream.readline, b""):
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            log_file.write(line)
            log_file.flush()


def main(argv: list[str] | None = None) -> None:
    _latch.install()  # before anything heavy is imported: a warning then is kept, not lost
    argv = sys.argv[1:] if argv is None else argv
    from submitit.core.submission import process_job

    code = 1
    try:
        process_job(argv[0])
        code = 0
    except BaseException as err:
        print(f"{TASK_FAILED}{type(err).__name__}: {err}", file=sys.stderr)
    finally:
        signal_ignore_stops()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    # Through the module's own name: the unpickled SlurmTask must share this module (its signal latch).
    from launcher.slurm.task import main as task_main

    task_main()
