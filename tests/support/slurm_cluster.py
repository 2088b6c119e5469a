"""Pytest plugin: a real two-node SLURM cluster (nodes n1, n2) for the test session.

Load it from the top-level conftest.py with ``pytest_plugins = ["tests.support.slurm_cluster"]``.

It provides:

* the session fixture ``slurm_cluster``: runs ``scripts/slurm_cluster.sh start`` once per
  session, sets ``os.environ["SLURM_CONF"]``, yields a :class:`SlurmCluster`, and at the end
  stops the cluster if this session started it and no other live session still uses it;
* the marker ``slurm`` for tests that need the cluster (select or deselect them with
  ``-m slurm`` / ``-m "not slurm"``).

When the cluster cannot be started the fixture skips with the exact reason: not root, apt
failed, or the tail of the failing daemon's log. Environment:

* ``LAUNCHER_SKIP_SLURM=1``: skip every test that uses the fixture, without touching SLURM;
* ``LAUNCHER_REQUIRE_SLURM=1``: fail instead of skipping when the cluster cannot start (CI);
* ``LAUNCHER_SLURM_KEEP=1``: leave the cluster running at the end of the session;
* ``LAUNCHER_SLURM_RUNDIR`` and the other ``LAUNCHER_SLURM_*`` variables of the script.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "slurm_cluster.sh"
DEFAULT_RUNDIR = Path("/tmp/launcher-slurm")

# A first start may install slurm-wlm and munge with apt (~15 s, more on a slow mirror).
START_TIMEOUT_S = 900
STOP_TIMEOUT_S = 120

# Exit codes of scripts/slurm_cluster.sh.
_EXIT_REASONS = {
    2: "usage error",
    3: "not running as root",
    4: "installing slurm-wlm/munge with apt-get failed",
    5: "the SLURM daemons did not start",
}


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    """The running cluster, as the tests see it."""

    conf: Path  # slurm.conf; also in os.environ["SLURM_CONF"] during the session
    rundir: Path  # logs (slurmctld.log, slurmd-n1.log, ...), state, jobcomp.log
    started: bool  # True if this session started it (rather than finding it running)
    nodes: tuple[str, ...] = ("n1", "n2", "n3", "n4")  # partition debug (the default): n1, n2; four: all
    cpus_per_node: int = 2

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ with SLURM_CONF set, for subprocesses (sbatch, srun, launch slurm)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def logs(self, lines: int = 30) -> str:
        """The last lines of the daemons' logs, for assertion messages."""
        parts = []
        for name in ("slurmctld.log", *(f"slurmd-{node}.log" for node in self.nodes)):
            path = self.rundir / name
            try:
                text = path.read_text(errors="replace").splitlines()
            except OSError as exc:
                parts.append(f"----- {path}: {exc}")
                continue
            parts.append(f"----- {path} (last {lines} lines)")
            parts.extend(text[-lines:])
        return "\n".join(parts)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _not_available(reason: str) -> None:
    """Skip, or fail if the environment says the cluster is required."""
    if _flag("LAUNCHER_REQUIRE_SLURM"):
        pytest.fail(f"SLURM cluster required (LAUNCHER_REQUIRE_SLURM=1) but: {reason}", pytrace=False)
    pytest.skip(reason)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@contextlib.contextmanager
def _sessions_lock(rundir: Path) -> Iterator[Path]:
    """Serialise start/register and unregister/stop between concurrent pytest sessions
    (xdist workers, two developers' runs) that share one RUNDIR."""
    rundir.mkdir(parents=True, exist_ok=True)
    with open(rundir / "pytest-sessions.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield rundir / "pytest-sessions"
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_sessions(path: Path) -> set[int]:
    try:
        pids = {int(x) for x in path.read_text().split()}
    except (OSError, ValueError):
        return set()
    return {p for p in pids if _pid_alive(p)}


def _write_sessions(path: Path, pids: set[int]) -> None:
    path.write_text("".join(f"{p}\n" for p in sorted(pids)))


def _run_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running two-node SLURM cluster, with SLURM_CONF set for the whole session."""
    if _flag("LAUNCHER_SKIP_SLURM"):
        pytest.skip("LAUNCHER_SKIP_SLURM is set: SLURM cluster tests skipped")
    if not SCRIPT.is_file():
        _not_available(f"{SCRIPT} not found")
    rundir = Path(os.environ.get("LAUNCHER_SLURM_RUNDIR") or DEFAULT_RUNDIR).resolve()
    me = os.getpid()

    try:
        with _sessions_lock(rundir) as sessions_file:
            try:
                proc = _run_script("start", str(rundir), timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired as exc:
                err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
                _not_available(
                    f"scripts/slurm_cluster.sh start timed out after {START_TIMEOUT_S} s:\n"
                    f"{_tail(err or '')}"
                )
            if proc.returncode != 0:
                what = _EXIT_REASONS.get(proc.returncode, f"exit code {proc.returncode}")
                _not_available(
                    f"SLURM cluster unavailable ({what}); scripts/slurm_cluster.sh start said:\n"
                    f"{_tail(proc.stderr)}"
                )
            conf = rundir / "slurm.conf"
            started = "# launcher-slurm: started" in proc.stdout
            users = _read_sessions(sessions_file)  # live sessions only
            if started:
                # The script removes this marker whenever it starts a cluster, so a cluster
                # started by hand is never stopped by a test session.
                (rundir / "pytest-owned").touch()
            users.add(me)
            _write_sessions(sessions_file, users)
    except OSError as exc:  # e.g. RUNDIR not writable for this user
        _not_available(f"cannot use SLURM run folder {rundir}: {exc}")

    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield SlurmCluster(conf=conf, rundir=rundir, started=started)
    finally:
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        _release(rundir, me)


def _release(rundir: Path, me: int) -> None:
    """Unregister this session; the last session out stops a cluster that pytest started
    (a cluster started by hand stays up)."""
    with _sessions_lock(rundir) as sessions_file:
        users = _read_sessions(sessions_file) - {me}
        _write_sessions(sessions_file, users)
        owned = rundir / "pytest-owned"
        if users or not owned.exists() or _flag("LAUNCHER_SLURM_KEEP"):
            return
        owned.unlink()
        try:
            proc = _run_script("stop", str(rundir), timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            warnings.warn(f"scripts/slurm_cluster.sh stop timed out after {STOP_TIMEOUT_S} s", stacklevel=2)
            return
        if proc.returncode != 0:
            warnings.warn(f"scripts/slurm_cluster.sh stop failed:\n{_tail(proc.stderr)}", stacklevel=2)
