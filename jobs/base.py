"""``from jobs.base import Job``: the job contract, which the core defines (``ddp.job``), under its old name."""

from ddp.job import Job, JobError, Metrics

__all__ = ["Job", "JobError", "Metrics"]
