"""``launch slurm``: options (one table), plan (pure), render (the sbatch template), submit (through
submitit), task (what each task runs), query (SLURM's view of a job), status (and cancel)."""
