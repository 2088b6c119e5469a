pytest_plugins = ["tests.slurm_fixtures"]
