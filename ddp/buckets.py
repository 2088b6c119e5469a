"""Every step sums gradients in one order, so a resume with more than 2 ranks is bitwise exact.

DDP starts with one bucket holding every gradient and, after the first backward
pass, regroups them into buckets in the order the gradients became ready
(torch's ``Reducer::rebuild_buckets``). An all-reduce over more than two ranks
adds up each element in an order set by its place in its bucket (the ring starts
each chunk on another rank), so a run's first step adds in another order than
the steps after it. Every fresh run does the same, but after a resume the first
step is step N + 1, which the uninterrupted run took with regrouped buckets: its
last bits differ, and the difference grows. (With two ranks each sum is a + b
either way, and bitwise equal.)

``keep_one_summation_order`` installs a comm hook that, while DDP still has its
first layout, reduces the gradients in the groups DDP is about to build (torch's
own assignment function, fed the same ready order) and afterwards each bucket as
it is. The hook checks the regrouped buckets against its prediction once and
warns if a torch version regrouped otherwise. Its cost after the first step is
a Python call per bucket.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


class ReadyOrder:
    """The order in which the last backward pass accumulated each parameter's gradient."""

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.order: dict[int, int] = {}  # id(parameter) -> its index, in ready order
        self.handles = [parameter.register_post_accumulate_grad_hook(self._recorder(index))
                        for index, parameter in enumerate(parameters)]

    def _recorder(self, index: int):
        def record(parameter: torch.Tensor) -> None:
            if id(parameter) in self.order:  # a parameter seen twice: a new backward pass began
                self.order.clear()
            self.order[id(parameter)] = index
        return record

    def indices(self, count: int) -> list[int]:
        """Parameter indices in ready order; any not yet recorded (the one whose gradient is being
        reduced right now may fire after DDP's hook) come last, in index order."""
        seen = list(self.order.values())
        return seen + sorted(set(range(count)) - set(seen))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class OneSummationOrder:
    """A DDP comm hook: the regrouped layout's sums from the first step on."""

    def __init__(self, ddp: DistributedDataParallel):
        self.ddp = ddp
        self.parameters, self.sparse = ddp._build_params_for_reducer()  # the Reducer's own parameter list
        self.ready = ReadyOrder(self.parameters)
        self.predicted: list[list[int]] | None = None
        self.checked = False

    def regrouped(self) -> list[list[int]]:
        """The buckets DDP builds after the first backward pass, as lists of parameter indices."""
        indices = self.ready.indices(len(self.parameters))
        config = self.ddp._bucket_config
        groups, _ = dist._compute_bucket_assignment_by_size(
            [self.parameters[i] for i in indices], [config.first_bucket_bytes_cap, config.bucket_bytes_cap],
            [self.sparse[i] for i in indices], indices)
        return groups

    def __call__(self, group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if not self.ddp._has_rebuilt_buckets:
            return self.reduce_as_regrouped(group, bucket)
        if not self.checked:
            self.check(bucket)
        buffer = bucket.buffer().div_(group.size())
        return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda done: done.value()[0])

    def reduce_as_regrouped(self, group: dist.ProcessGroup, bucket: dist.GradBucket):
        """One all-reduce per predicted bucket, over its gradients laid out as DDP will lay them out."""
        self.predicted = self.regrouped()
        index_of = {id(parameter): index for index, parameter in enumerate(self.parameters)}
        views = {index_of[id(parameter)]: gradient
                 for parameter, gradient in zip(bucket.parameters(), bucket.gradients())}
        flats, works = [], []
        for indices in self.predicted:
            present = [views[i] for i in indices if i in views]
            if not present:
                continue
            flat = torch.cat([view.reshape(-1) for view in present]).div_(group.size())
            flats.append((present, flat))
            works.append(dist.all_reduce(flat, group=group, async_op=True).get_future())

        def scatter_back(_) -> torch.Tensor:
            for present, flat in flats:
                offset = 0
                for view in present:
                    view.copy_(flat[offset:offset + view.numel()].view_as(view))
                    offset += view.numel()
            return bucket.buffer()

        return torch.futures.collect_all(works).then(scatter_back)

    def check(self, bucket: dist.GradBucket) -> None:
        """Once, on the first regrouped bucket: does DDP's layout start as predicted?"""
        self.checked = True
        self.ready.remove()
        index_of = {id(parameter): index for index, parameter in enumerate(self.parameters)}
        actual = [index_of[id(parameter)] for parameter in bucket.parameters()]
        if self.predicted is not None and actual not in self.predicted:
            log.warning("DDP regrouped its gradient buckets otherwise than this torch version was expected to; "
                        "a resume with more than 2 ranks may end close to, not bitwise equal to, an "
                        "uninterrupted run")


def keep_one_summation_order(ddp: DistributedDataParallel) -> None:
    """Install the hook on ``ddp`` (a DDP that will regroup its buckets, i.e. without
    ``find_unused_parameters`` or with ``static_graph``)."""
    hook = OneSummationOrder(ddp)
    ddp.register_comm_hook(None, lambda _, bucket: hook(ddp.process_group, bucket))
