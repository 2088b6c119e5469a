"""Before the first step, every rank checks that it trains the same thing as every other rank.

Ranks that disagree do not fail cleanly on their own: a different model shape
hangs or crashes inside DDP's constructor with a message about bucket sizes,
different code or config trains garbage with averaged gradients, and a
different dataset length makes the samplers disagree on the number of
batches, so one rank waits forever in a collective. Here each rank describes
what it is about to train in a small dict (a fingerprint), the fingerprints are
gathered, and any difference is one error naming the ranks and the first thing
that differs.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from typing import Any

from torch import nn

from ddp import distributed
from ddp.config import Config, differences
from ddp.model import parameter_signature

log = logging.getLogger(__name__)


class RankMismatchError(RuntimeError):
    """Ranks are about to train different things (config, code or model)."""


def code_revision() -> str:
    """The git revision of the user's checkout (with a digest of uncommitted changes), else the package version."""
    from ddp.reporting import code_revision as git_revision

    revision = git_revision()
    if revision:
        return revision + _uncommitted_digest()
    try:
        from importlib.metadata import version

        return f"ddp-launcher {version('ddp-launcher')}"
    except Exception:
        return "unknown"


def _uncommitted_digest() -> str:
    """``+dirty:HASH`` when tracked files differ from HEAD, so two nodes with different edits disagree."""
    import subprocess

    try:
        diff = subprocess.run(["git", "diff", "HEAD", "--no-ext-diff"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    if diff.returncode != 0 or not diff.stdout:
        return ""
    return "+dirty:" + hashlib.sha256(diff.stdout).hexdigest()[:12]


def _source_digest(obj: Any) -> str | None:
    """A digest of the file that defines ``obj`` (the job's own code may live outside any checkout)."""
    try:
        with open(inspect.getsourcefile(type(obj)), "rb") as handle:
            return "sha256:" + hashlib.sha256(handle.read()).hexdigest()[:12]
    except (OSError, TypeError):
        return None


def fingerprint(config: Config, model: nn.Module, job: Any = None, train_size: int | None = None,
                revision: str | None = None) -> dict:
    """What this rank is about to train, in the order the differences are reported."""
    import torch

    return {
        "config": config.to_dict(),
        "code revision": revision if revision is not None else code_revision(),
        "job source": _source_digest(job) if job is not None else None,
        "torch version": torch.__version__,
        "model parameters": parameter_signature(model),
        "training set size": train_size,
    }


def first_difference(key: str, mine: Any, theirs: Any) -> str:
    """One sentence on the first thing that differs between two values of a fingerprint's ``key``."""
    if key == "config":
        for path, a, b in differences(mine, theirs):
            return f"config key {path} is {a!r} there and {b!r} on rank 0"
    if key == "model parameters":
        names_a, names_b = dict(mine), dict(theirs)
        for (name_a, shape_a), (name_b, shape_b) in zip(mine, theirs):
            if name_a != name_b:
                return f"the model has parameter {name_a} where rank 0 has {name_b}"
            if shape_a != shape_b:
                return (f"the model's parameter {name_a} has shape {tuple(shape_a)} there and "
                        f"{tuple(shape_b)} on rank 0")
        extra = [name for name in names_a if name not in names_b]
        missing = [name for name in names_b if name not in names_a]
        if extra:
            return f"the model has a parameter rank 0 lacks: {extra[0]} ({len(names_a)} against {len(names_b)})"
        if missing:
            return f"the model lacks rank 0's parameter {missing[0]} ({len(names_a)} against {len(names_b)})"
    return f"{key} is {mine!r} there and {theirs!r} on rank 0"


def compare(fingerprints: list[dict]) -> str | None:
    """None if every rank agrees with rank 0, else the message: which ranks, what differs first."""
    reference = fingerprints[0]
    for key in reference:
        differing = [rank for rank, theirs in enumerate(fingerprints) if theirs.get(key) != reference[key]]
        if not differing:
            continue
        first = differing[0]
        ranks = ", ".join(map(str, differing))
        return (f"ranks disagree before the first step: rank{'s' if len(differing) > 1 else ''} {ranks} "
                f"differ{'s' if len(differing) == 1 else ''} from rank 0 in the {key}: on rank {first}, "
                f"{first_difference(key, fingerprints[first][key], reference[key])}. Every rank must run "
                "the same code, config and model: check that all nodes see the same files, and that the "
                "job's build_model and build_datasets do not depend on the rank")
    return None


def check_ranks_agree(config: Config, model: nn.Module, job: Any = None, train_size: int | None = None) -> None:
    """Raise RankMismatchError on every rank if any rank differs from rank 0; a no-op for one process."""
    if distributed.world_size() == 1:
        return
    problem = compare(distributed.all_gather_object(fingerprint(config, model, job, train_size)))
    if problem:
        raise RankMismatchError(problem)
    log.info("all %d ranks agree on the config, the code and the model", distributed.world_size())
