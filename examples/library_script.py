"""The same training as torchrun_script.py, with the core's pieces: it resumes exactly after any stop.

    launch local --cpu --nproc 2 examples/library_script.py --epochs 3
    launch local --cpu --nproc 2 --max-restarts 3 examples/library_script.py   # survives kill -9
    launch slurm --nodes 2 --cpu examples/library_script.py                    # requeued on preemption

``ddp.init`` sets up the process group, the device, the seeds and the stop signals; ``run.loader``
is a sampler and loader that know where they are in the epoch; ``ddp.Checkpointer`` saves the
model, the optimizer, the loader's position and every rank's random state atomically. Killed at
any moment (``kill -9``, a preemption, a time limit) and started again, it ends with bitwise the
same weights as a run that was never interrupted. It also runs under plain torchrun, where the
checkpoints go to --checkpoints.
"""

import argparse

import torch
from torch.utils.data import TensorDataset

import ddp

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--checkpoints", default=None, help="default: the run directory's, under launch")
parser.add_argument("--out", default=None, help="also save the final weights here (rank 0)")
args = parser.parse_args()

with ddp.init(seed=0) as run:  # torchrun's, SLURM's or a single process's variables say where
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(1))
    data = TensorDataset(x, x.sum(1, keepdim=True))
    model = run.prepare(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    loader = run.loader(data, batch_size=16)
    checkpointer = run.checkpointer(args.checkpoints)
    state = {"model": model, "optimizer": optimizer, "loader": loader, "step": 0}
    if checkpointer.restore(state):
        print(f"resumed at step {state['step']}, epoch {loader.epoch}", flush=True)

    while loader.epoch < args.epochs:
        for xb, yb in loader:
            loss = torch.nn.functional.mse_loss(model(xb.to(run.device)), yb.to(run.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state["step"] += 1
            if run.stop_requested():  # SIGTERM, SIGUSR2 (SLURM's warning), Ctrl-C: agreed by every rank
                checkpointer.save(state, kind="stop")
                raise SystemExit(ddp.EXIT_RESUMABLE)  # 75: launch reports a stop, SLURM requeues
            if state["step"] % 10 == 0:
                checkpointer.save(state)
        if run.is_main:
            print(f"epoch {loader.epoch - 1} loss {loss.item():.4f}", flush=True)
        checkpointer.save(state, kind="epoch")

    checkpointer.wait()
    if run.is_main and args.out:
        torch.save(ddp.unwrap(model).state_dict(), args.out)
