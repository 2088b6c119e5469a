"""Stop signals, one object at a time: a worker's stop request, ``launch``'s agent passing a stop on, the report."""

from __future__ import annotations

import os
import signal

import pytest
from torch.distributed.elastic.agent.server.api import WorkerSpec
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs

from ddp.checkpoint import write_atomic
from ddp.layout import RunDir, step_path
from ddp.signals import StopRequest
from launcher.local import agent as agent_module
from launcher.local.agent import HANDLED, Interrupted, LaunchAgent
from launcher.local.plan import Entry, Machine, Request, plan_local
from launcher.stops import report_stop


def test_a_stop_request_keeps_the_first_signal():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal, e.g. during the save: changes nothing
        assert stop.signal_name == "SIGUSR2"
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


class _Workers:
    """What the agent sees of its workers' process context: their pids."""

    def __init__(self, pids: dict[int, int]):
        self._pids = pids

    def pids(self) -> dict[int, int]:
        return self._pids


@pytest.fixture
def agent(tmp_path, monkeypatch):
    """``launch``'s agent for 2 CPU workers (not started), its signal handlers put back afterwards."""
    plan = plan_local(Request(cpu=True, nproc=2), Machine(visible_gpus=0, cores=2), run_dir=tmp_path,
                      entry=Entry("config", str(tmp_path)), port=29999)
    spec = WorkerSpec(role="worker", local_world_size=2, entrypoint="python", rdzv_handler=object())
    agent = LaunchAgent(spec=spec, logs_specs=DefaultLogsSpecs(), plan=plan)
    agent._pcontext = _Workers({0: 1001, 1: 1002})
    sent = []
    monkeypatch.setattr(agent_module.os, "kill", lambda pid, signum: sent.append((pid, signum)))
    agent.sent = sent
    before = {signum: signal.getsignal(signum) for signum in HANDLED}
    yield agent
    for signum, handler in before.items():
        signal.signal(signum, handler)


def test_launch_passes_the_first_stop_signal_on_once_and_ignores_repeats(agent, capsys):
    agent.install_signal_handlers()
    signal.raise_signal(signal.SIGUSR2)
    signal.raise_signal(signal.SIGTERM)  # while the workers save: changes nothing
    signal.raise_signal(signal.SIGUSR2)
    assert agent.stop_signal == signal.SIGUSR2
    assert agent.sent == [(1001, signal.SIGTERM), (1002, signal.SIGTERM)]  # once, as SIGTERM, to each worker
    err = capsys.readouterr().err
    assert "launch: SIGUSR2: the workers save a checkpoint at their next step, then stop" in err
    assert err.count("launch: already stopping on SIGUSR2; waiting for the workers to save") == 2


def test_a_second_ctrl_c_stops_at_once(agent, capsys):
    agent.install_signal_handlers()
    signal.raise_signal(signal.SIGINT)
    assert "Ctrl-C again stops at once, without a checkpoint" in capsys.readouterr().err
    with pytest.raises(Interrupted):
        signal.raise_signal(signal.SIGINT)
    assert agent.sent == [(1001, signal.SIGTERM), (1002, signal.SIGTERM)]


def test_the_agents_handlers_win_over_torchs_at_every_start_of_the_workers(agent, monkeypatch):
    def torchs_start(self, worker_group):  # torch's process context installs its own handlers
        for signum in HANDLED:
            signal.signal(signum, signal.SIG_DFL)
        return {}

    monkeypatch.setattr(LocalElasticAgent, "_start_workers", torchs_start)
    agent._start_workers(None)
    for signum in HANDLED:
        assert signal.getsignal(signum) == agent._on_signal, signum.name
    assert agent.sent == []  # no stop yet: nothing sent
    agent.stop_signal = signal.SIGTERM  # a stop that came while the workers were (re)starting
    agent._start_workers(None)
    assert agent.sent == [(1001, signal.SIGTERM), (1002, signal.SIGTERM)]


def test_the_stop_report_names_the_latest_complete_checkpoint(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.checkpoints.mkdir()
    write_atomic({"model": {}}, step_path(run_dir.checkpoints, 40))
    step_path(run_dir.checkpoints, 50).write_bytes(b"half a checkpoint")  # no .done: not counted
    assert report_stop(run_dir, signal.SIGTERM) == (
        f"stopped by SIGTERM: latest checkpoint step_00000040.pt (step 40). Continue with "
        f"`launch resume {tmp_path}` (or the same launch command)")
    assert report_stop(RunDir(tmp_path / "new"), signal.SIGUSR2).startswith("stopped by SIGUSR2: no checkpoint yet.")
