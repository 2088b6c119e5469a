"""What the tests share: the one test job, running ``launch``, running N ranks, the SLURM test cluster."""
