pytest_plugins = ["tests.support.slurm_cluster"]
