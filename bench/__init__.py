"""Benchmarks: ours against a plain hand-written PyTorch loop doing the same work.

``python -m bench`` (``make bench``) runs them all; ``python -m bench NAME``
one of them. Each alternates ours and the baseline several times and prints
the median ratio ours/baseline with its min and max, against its target.
They print; they never fail on a slow machine. See docs/performance.md for
the figures and how to run them on GPUs.

* ``step_time``: steady-state step time, one CPU process (MLP, small CNN)
* ``ddp_step_time``: the same with 2 processes on gloo, against torchrun
* ``startup``: command to first optimizer step (``launch local``, ``launch debug``), and
  whole commands of a short run (``launch local`` against ``torchrun``)
* ``input_pipeline``: imagefolder throughput, per-sample seeding, the demo's data wait
* ``memory``: peak resident memory, and its growth over 2,000 steps
* ``gpu_scaling``: samples/s and scaling efficiency from 1 to N GPUs (skipped without CUDA)
* ``checkpoint_stall``, ``resume_latency``: checkpointing's cost (see their docstrings)
* ``exact_resume``: the cost of one summation order past two ranks
* ``tuning``: what the process tuning buys, each part alone
* ``peers``: ours beside Lightning, Fabric and Accelerate (``pip install -e '.[bench]'``)
* ``scale``: 2 to 32 ranks: collectives, start-up, checkpoints

``BENCH_DEVICE=cuda`` runs ``step_time``, ``ddp_step_time`` (on ``BENCH_GPUS``
GPUs) and ``startup`` on GPUs; ``BENCH_ROUNDS=N`` sets the rounds;
``OMP_NUM_THREADS`` (default 1) the threads of every process on both sides.
"""
