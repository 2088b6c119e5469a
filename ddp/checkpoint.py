"""Checkpoints that are never half-written and never unsafe to load.

Writing: the state goes to ``NAME.tmp``, is flushed and fsynced, renamed into
place, and only then is ``NAME.done`` written, holding the file's size and
SHA-256. A checkpoint without a matching ``.done`` (a crash mid-write, a
truncated copy, bit rot) is never taken as the latest; the previous valid one is.

Layout of ``RUN_DIR/checkpoints``::

    step_00000120.pt  step_00000120.pt.done   the last ``keep_last`` of these
    last.pt -> newest step file               (hard links: no extra space)
    best.pt -> step file with the best metric

Loading uses ``torch.load(weights_only=True)``: a checkpoint can only hold
tensors and plain Python values, so loading one cannot run code.

Asynchronous writing (``CheckpointWriter(async_save=True)``): the state is
copied into host buffers kept from the previous save, the parameters and
optimizer state while the next step's forward and backward run, and a
background thread writes it as above. The training loop waits only for what
it is about to change.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from ddp.layout import BEST, LAST, list_step_checkpoints, marker_path, sha256_of, step_path
from ddp.storage import advice_for

log = logging.getLogger(__name__)



class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that cannot be written; the message lists what was found."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(path: Path, err: OSError) -> CheckpointError:
    advice = advice_for(err)
    return CheckpointError(f"could not write checkpoint {path}: {err.strerror or err}; {advice}, then continue "
                           "the run with `launch resume RUN_DIR`. The previous checkpoint is unchanged and no "
                           "partial file is left")


class _WriteErrors:
    """A file for ``torch.save`` that keeps the OSError of a failed write.

    torch.save reports a failed write as a RuntimeError about zip positions
    ("unexpected pos 768 vs 662"); the OSError says what happened (disk full).
    """

    def __init__(self, handle):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.handle.flush()


def write_atomic(state: dict, path: Path, kind: str = "step") -> None:
    """Write ``state`` to ``path`` so that ``path`` is either absent, the old file, or complete.

    ``kind`` ("step", "epoch", "stop", ...) is recorded in the completion marker.
    """
    tmp = path.with_name(path.name + ".tmp")
    done = marker_path(path)
    done_tmp = done.with_name(done.name + ".tmp")
    renamed = False
    try:
        with open(tmp, "wb") as handle:
            recorder = _WriteErrors(handle)
            try:
                torch.save(state, recorder)
            except RuntimeError:
                if recorder.error is None:
                    raise
                raise recorder.error from None
            handle.flush()
            os.fsync(handle.fileno())
        size, digest = tmp.stat().st_size, sha256_of(tmp)
        done.unlink(missing_ok=True)  # the old marker must not vouch for the new file
        os.replace(tmp, path)
        renamed = True
        done_tmp.write_text(json.dumps({"size": size, "sha256": digest, "kind": kind}))
        os.replace(done_tmp, done)
        _fsync_dir(path.parent)
    except BaseException as err:
        # Nothing half-written stays: a step file without its marker would only be skipped later.
        leftovers = [tmp, done_tmp] + ([path] if renamed and not done.exists() else [])
        for leftover in leftovers:
            try:
                leftover.unlink(missing_ok=True)
            except OSError:
                pass
        if isinstance(err, OSError):
            raise storage_error(path, err) from None
        raise


def set_aside(path: Path, why: str) -> Path:
    """Rename an unusable step file (and its marker) out of the way, so it is neither resumed from nor
    mistaken for the newest, but kept for a look. Returns the new name."""
    target = path.with_name(path.name + ".unusable")
    os.replace(path, target)
    marker_path(path).unlink(missing_ok=True)
    log.warning("set aside unusable checkpoint %s as %s: %s", path.name, target.name, why)
    return target


def load(path: Path, map_location: torch.device | str = "cpu") -> dict:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {first_line}. Only checkpoints holding "
                              "tensors and plain values are loaded (weights_only=True)") from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path} is not a checkpoint written by this launcher (no 'format' entry)")
    return state


def strip_module_prefix(state_dict: dict) -> dict:
    """Accept state dicts saved from a DDP-wrapped (or compiled) model."""
    prefixes = ("module.", "_orig_mod.")
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _link(source: Path, name: str) -> None:
    """Point ``name`` at ``source`` atomically (hard link, else a copy of the bytes)."""
    target = source.with_name(name)
    tmp = source.with_name(name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        tmp.write_bytes(source.read_bytes())
    os.replace(tmp, target)


class CheckpointWriter:
    """Rank 0's checkpoint writer: sync or in a background thread, keeping the newest valid ones.

    Pruning keeps the newest ``keep_last`` checkpoints this writer knows to be valid
    (written by it, or resumed from) and deletes only older ones: a newer file whose
    validity is unknown is never the reason a valid one goes, and the newest valid
    checkpoint is never deleted.
    """

    def __init__(self, directory: Path, keep_last: int = 2, async_save: bool = False):
        self.directory = Path(directory)
        self.keep_last = max(1, keep_last)
        self.async_save = async_save
        self._valid: set[int] = set()  # steps whose files are known complete
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._staged: Any = None  # the host copy of the last async save, reused by the next one
        self._copied: threading.Event | None = None  # set once the background copy is complete
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob("*.tmp"):
            stale.unlink(missing_ok=True)  # left by a crash mid-write

    def note_valid(self, step: int) -> None:
        """A checkpoint verified elsewhere (the one a run resumed from) counts as valid for pruning."""
        self._valid.add(step)

    def save(self, state: dict, step: int, is_best: bool = False, *, kind: str = "step",
             deferrable: frozenset[int] = frozenset()) -> Path:
        """Write ``state`` as the checkpoint of ``step``; with ``async_save``, in a background thread.

        Asynchronously, the caller waits only for the copy of its tensors to host memory, and
        not even for all of that: tensors whose storage (``untyped_storage().data_ptr()``) is in
        ``deferrable``, those only the next optimizer step changes (the parameters and the
        optimizer's state), are copied by the background thread while the next forward and
        backward run; ``before_update()`` waits for that copy before the optimizer step.
        """
        self.wait()  # one write at a time; also surfaces a failed background write
        path = step_path(self.directory, step)
        if not self.async_save:
            self._write(state, path, step, is_best, kind)
            return path
        # The previous write has finished (wait() above), so its host buffers can take this copy:
        # no allocation, no page faults, just the copy.
        partial = _stage(state, self._staged, defer=deferrable)
        self._copied = threading.Event()
        self._thread = threading.Thread(target=self._write_in_background, args=(partial, path, step, is_best, kind),
                                        name="checkpoint-writer", daemon=False)
        self._thread.start()
        return path

    @property
    def writing(self) -> bool:
        """True while a background write is under way."""
        return self._thread is not None and self._thread.is_alive()

    def before_update(self) -> None:
        """Block until an asynchronous save has copied what the coming optimizer step will change."""
        if self._copied is not None:
            self._copied.wait()

    def _write_in_background(self, partial: dict, path: Path, step: int, is_best: bool, kind: str) -> None:
        try:
            try:
                self._staged = state = _stage(partial, self._staged)
            finally:
                self._copied.set()  # on failure too: the error surfaces in wait()
            self._write(state, path, step, is_best, kind)
        except BaseException as err:
            self._error = err

    def _write(self, state: dict, path: Path, step: int, is_best: bool, kind: str) -> None:
        write_atomic(state, path, kind)
        self._valid.add(step)
        try:
            _link(path, LAST)
            if is_best:
                _link(path, BEST)
            self._prune()
        except OSError as err:
            for leftover in (LAST + ".tmp", BEST + ".tmp"):
                (self.directory / leftover).unlink(missing_ok=True)
            raise CheckpointError(f"checkpoint {path} was written, but updating {LAST}/{BEST} failed: "
                                  f"{err.strerror or err}; {advice_for(err)}"
                                  ) from None

    def _prune(self) -> None:
        present = {found.step: found.path for found in list_step_checkpoints(self.directory)}
        kept = sorted(step for step in self._valid if step in present)[-self.keep_last:]
        if not kept:
            return
        for step, path in present.items():
            if step < kept[0]:
                path.unlink(missing_ok=True)
                marker_path(path).unlink(missing_ok=True)
        self._valid = set(kept)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _stage(value: Any, staged: Any, defer: frozenset[int] = frozenset()) -> Any:
    """A deep copy of ``value`` with every tensor in host memory, so training may go on changing the originals.

    Tensors are copied into ``staged`` (an earlier result) wherever shape and type match.
    Tensors whose storage is in ``defer`` are left as they are, for a later call to copy.
    A CUDA tensor goes to pinned memory without blocking, then one synchronisation
    waits for all of them: the copy runs at the bus's speed, not page by page.
    """
    copied = _stage_into(value, staged, defer)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return copied


def _stage_into(value: Any, staged: Any, defer: frozenset[int] = frozenset()) -> Any:
    if isinstance(value, torch.Tensor):
        if value is staged:  # copied by an earlier pass
            return value
        if defer and value.untyped_storage().data_ptr() in defer:
            return value
        value = value.detach()
        if (isinstance(staged, torch.Tensor) and staged.shape == value.shape and staged.dtype == value.dtype
                and value.layout == torch.strided and staged.is_contiguous()):
            return staged.copy_(value, non_blocking=value.is_cuda)
        if value.is_cuda:
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            return host.copy_(value, non_blocking=True)
        return value.to("cpu", copy=True)
    if isinstance(value, dict):
        staged = staged if isinstance(staged, dict) else {}
        return {key: _stage_into(item, staged.get(key), defer) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        staged = staged if isinstance(staged, (list, tuple)) and len(staged) == len(value) else [None] * len(value)
        return type(value)(_stage_into(item, old, defer) for item, old in zip(value, staged))
    return value
