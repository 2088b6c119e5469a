"""The ``launch`` command line: local, debug, resume and SLURM launches of a ``ddp`` job."""
