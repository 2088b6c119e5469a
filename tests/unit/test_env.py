"""Where a process sits in the job, read from torchrun's, SLURM's or no variables."""

import pytest

from ddp.env import JOB_PORTS, DistEnv, expand_nodelist, port_for_job, read_env


def test_single_process_defaults():
    env = read_env({})
    assert env == DistEnv()
    assert env.is_main and not env.distributed


def test_torchrun_variables():
    env = read_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                    "GROUP_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29511",
                    "TORCHELASTIC_RESTART_COUNT": "2"})
    assert (env.rank, env.local_rank, env.world_size, env.node_rank, env.nnodes) == (3, 1, 4, 1, 2)
    assert (env.master_addr, env.master_port, env.restart_count, env.source) == ("node7", 29511, 2, "torchrun")
    assert not env.is_main and env.distributed


def test_slurm_variables_one_task_per_worker():
    env = read_env({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NODEID": "2",
                    "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu[3-5,9]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.local_rank, env.world_size, env.node_rank, env.nnodes) == (5, 1, 8, 2, 4)
    assert env.local_world_size == 2
    assert env.master_addr == "gpu3"
    assert env.master_port == port_for_job("4242")
    assert env.source == "slurm"


def test_torchrun_wins_over_slurm_when_both_are_set():
    # torchrun started inside an allocation: its variables describe the worker.
    env = read_env({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert env.source == "torchrun" and env.rank == 1


@pytest.mark.parametrize("nodelist, hosts", [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("gpu[1-3,5]", ["gpu1", "gpu2", "gpu3", "gpu5"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
    ("rack[1-2]-node[1-2]", ["rack1-node1", "rack1-node2", "rack2-node1", "rack2-node2"]),
    ("host-01.example.org", ["host-01.example.org"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_ports_differ_between_jobs_and_stay_in_range():
    ports = {port_for_job(str(job)) for job in range(1000, 1100)}
    assert len(ports) == 100
    # Below Linux's ephemeral range (32768-60999), where the kernel hands out client ports.
    assert all(20000 <= port < 32768 for port in ports) and all(port in JOB_PORTS for port in ports)
    assert port_for_job("123_4") == port_for_job("1234")  # array ids are digits only
