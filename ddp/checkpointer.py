"""Save and restore a training state so that a resumed run continues bitwise where it stopped.

A state is a dict: objects with ``state_dict``/``load_state_dict`` (a model,
DDP-wrapped or not, an optimizer, a scheduler, a gradient scaler, a
``ResumableLoader``) and plain values (counters, a best metric). ``save``
adds every rank's random generators (Python, NumPy, torch, CUDA); ``restore``
puts it all back in place. The file is a plain dict of tensors and values
(``torch.load(path, weights_only=True)`` reads it; ``state["model"]`` is the
bare model's ``state_dict``), written atomically and vouched for by its
``.done`` marker (``ddp.checkpoint``).

``save`` is collective: every rank calls it at the same step; rank 0 writes;
a failed write raises on every rank at once. ``restore`` takes the newest
checkpoint that is complete and loads; an unusable newer one (truncated,
corrupted, or failing to load) is set aside with a warning and the one before
it is used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ddp import distributed, rng
from ddp.checkpoint import CheckpointError, CheckpointWriter, load, set_aside, strip_module_prefix
from ddp.env import DistEnv
from ddp.layout import Found, list_step_checkpoints, step_path, verify
from ddp.model import unwrap

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
RESERVED = ("format", "rng", "world_size", "saved_at", "step")


class Checkpointer:
    def __init__(self, directory: Path, *, env: DistEnv, device: torch.device | str = "cpu", keep_last: int = 2,
                 async_save: bool = False, resume: bool = True):
        self.directory = Path(directory)
        self.env, self.device, self.resume = env, torch.device(device), resume
        self.writer = CheckpointWriter(self.directory, keep_last, async_save) if env.is_main else None
        self.last: Path | None = None  # the newest checkpoint saved or restored

    # -- restoring ---------------------------------------------------------------------------------

    def restore(self, state: dict, *, validate: Callable[[dict], None] | None = None) -> Found | None:
        """Load the newest usable checkpoint into ``state`` (in place) and every generator; None if there is none.

        ``validate(saved)`` may raise before anything is loaded (a checkpoint of another model).
        With ``resume=False`` an earlier run's checkpoints are moved aside instead.
        """
        _check_names(state)
        chosen = None
        if self.env.is_main:
            chosen = self._choose() if self.resume else self._abandon_earlier_run()
        chosen = distributed.broadcast_object(chosen)
        if isinstance(chosen, str):
            raise CheckpointError(chosen)
        if chosen is None:
            return None
        saved = self._loaded if self.env.is_main else load(chosen.path, map_location=self.device)
        self._loaded = None
        if validate is not None:
            validate(saved)
        self._apply(saved, state)
        if self.writer is not None:
            self.writer.note_valid(chosen.step)
        self.last = chosen.path
        return chosen

    def _choose(self) -> Found | str | None:
        """Rank 0: the newest checkpoint that is complete and loads, setting aside the newer ones that are not."""
        self._loaded = None
        candidates = list_step_checkpoints(self.directory)
        problems = []
        for candidate in reversed(candidates):
            problem = verify(candidate.path)
            if problem is None:
                try:
                    self._loaded = load(candidate.path, map_location=self.device)
                    return candidate
                except CheckpointError as err:
                    problem = str(err)
            problems.append(f"{candidate.path.name}: {problem}")
            set_aside(candidate.path, problem)
        if problems:
            return (f"no valid checkpoint in {self.directory}; found {'; '.join(problems)} (each kept as "
                    "NAME.unusable). Start afresh with checkpoint.resume=false or a new run.name")
        return None

    def _abandon_earlier_run(self) -> None:
        """``resume=False`` over a directory with checkpoints: move them aside, not mix them with the new ones."""
        if not list_step_checkpoints(self.directory):
            return None
        self.writer.wait()
        target = self.directory.with_name(f"{self.directory.name}.abandoned-{time.strftime('%Y%m%d-%H%M%S')}")
        self.directory.rename(target)
        self.directory.mkdir()
        log.warning("starting over (checkpoint.resume=false): the earlier checkpoints were moved to %s", target)
        return None

    def _apply(self, saved: dict, state: dict) -> None:
        missing = [name for name in state if name not in saved]
        if missing:
            raise CheckpointError(f"the checkpoint has no entry {', '.join(missing)} (it holds "
                                  f"{', '.join(k for k in saved if k not in RESERVED)}); was it saved by "
                                  "other code?")
        for name, value in state.items():
            if hasattr(value, "load_state_dict"):
                if isinstance(value, torch.nn.Module):
                    unwrap(value).load_state_dict(strip_module_prefix(saved[name]))
                else:
                    value.load_state_dict(saved[name])
            else:
                state[name] = saved[name]
        states = saved["rng"]
        if len(states) != self.env.world_size:
            log.warning("resuming a %d-process checkpoint with %d processes: the epoch continues with every "
                        "remaining sample seen once; random streams map rank r -> saved rank r %% %d",
                        len(states), self.env.world_size, len(states))
        rng.restore(rng.state_for_rank(states, self.env.rank))

    # -- saving ------------------------------------------------------------------------------------

    def save(self, state: dict, step: int | None = None, *, best: bool = False, kind: str = "step",
             deferrable: frozenset[int] = frozenset()) -> Path:
        """Write ``state`` and every rank's generators as the checkpoint of ``step``. Collective.

        ``step`` defaults to ``state["step"]``. ``kind`` ("step", "epoch", "stop") is recorded
        with the file; ``best`` also makes it ``best.pt``.
        """
        _check_names(state)
        if step is None:
            if not isinstance(state.get("step"), int):
                raise ValueError("give save() the step, or keep an int under state['step']")
            step = state["step"]
        rng_states = distributed.all_gather_object(rng.capture())

        def write() -> Path:
            payload = {"format": FORMAT_VERSION, "world_size": self.env.world_size, "rng": rng_states,
                       "saved_at": time.time(), "step": step}
            for name, value in state.items():
                if isinstance(value, torch.nn.Module):
                    payload[name] = unwrap(value).state_dict()
                elif hasattr(value, "state_dict"):
                    payload[name] = value.state_dict()
                else:
                    payload[name] = value
            return self.writer.save(payload, step, is_best=best, kind=kind, deferrable=deferrable)

        self.last = distributed.on_main_then_agree(write, self.env.is_main, _wrap_error)
        return self.last

    def before_update(self) -> None:
        """With deferred copies (``deferrable``): wait until the parameters are copied, before the optimizer step."""
        if self.writer is not None:
            self.writer.before_update()

    def wait(self) -> None:
        """Wait for a background write; its failure raises on every rank. Collective."""
        distributed.on_main_then_agree(lambda: self.writer.wait(), self.env.is_main, _wrap_error)

    def close(self) -> None:
        """Wait for a background write (rank 0 only; errors are not re-raised elsewhere)."""
        if self.writer is not None:
            self.writer.wait()

    def path_of(self, step: int) -> Path:
        return step_path(self.directory, step)


def _check_names(state: dict) -> None:
    clash = [name for name in state if name in RESERVED and name != "step"]
    if clash:
        raise ValueError(f"state keys {', '.join(clash)} are reserved for the checkpoint's own records")


def _wrap_error(name: str, message: str) -> CheckpointError:
    """Another rank's view of rank 0's failed write: the same message, as a CheckpointError."""
    return CheckpointError(message if name == "CheckpointError" else f"rank 0 failed to save a checkpoint: "
                                                                      f"{name}: {message}")
