"""A plain torchrun script, as in the PyTorch tutorials: its own process group, sampler and DDP.

It runs unchanged under every launcher:

    torchrun --standalone --nproc-per-node 2 examples/torchrun_script.py --epochs 3
    launch local --cpu --nproc 2 examples/torchrun_script.py --epochs 3
    launch slurm --nodes 2 --cpu examples/torchrun_script.py --epochs 3
    launch debug examples/torchrun_script.py --epochs 3       # one process, pdb works

Under ``launch`` it gets a run directory (``runs/torchrun_script/``) with each rank's log,
no orphans, a root-cause report when a rank fails, and SLURM. What it does not get is a
resume: it saves nothing on SIGTERM. See library_script.py for that.
"""

import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--out", default="weights.pt", help="where rank 0 saves the final weights")
args = parser.parse_args()

dist.init_process_group("gloo")  # torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) say where
torch.manual_seed(0)
x = torch.randn(512, 8, generator=torch.Generator().manual_seed(1))
data = TensorDataset(x, x.sum(1, keepdim=True))
model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)))
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
sampler = DistributedSampler(data, seed=0)
loader = DataLoader(data, batch_size=16, sampler=sampler)

for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    for xb, yb in loader:
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if dist.get_rank() == 0:
        print(f"epoch {epoch} loss {loss.item():.4f}", flush=True)

if dist.get_rank() == 0:
    torch.save(model.module.state_dict(), args.out)
dist.destroy_process_group()
