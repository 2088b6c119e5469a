"""The baseline: the plain training loop a user would write by hand instead of using ``launch``.

    python bench/raw_train.py --workload mlp --steps 1100                            # one process
    torchrun --standalone --nproc-per-node 2 bench/raw_train.py --workload mlp ...   # DDP on gloo
    torchrun --standalone --nproc-per-node 4 bench/raw_train.py --device cuda ...    # DDP on NCCL

DDP and ``DistributedSampler`` when torchrun starts it (with ``--device cuda``:
one GPU per process, NCCL, pinned memory), SGD with momentum, a
constant learning rate, the loss printed every ``--log-every`` steps. It
imports nothing of the library, only the shared workload definitions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import WORKLOADS, Probe, make_dataset, make_model


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=WORKLOADS, default="mlp")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", type=int, default=4096, help="samples in the dataset")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--prefetch-factor", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--probe-file", help="JSON lines: clock, loss and memory at --probe-steps")
    parser.add_argument("--probe-steps", default="", help="comma-separated steps to probe")
    parser.add_argument("--first-step-file", help="write time.time() here after the first optimizer step")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    torch.manual_seed(args.seed)
    model = make_model(args.workload).to(device)
    dataset = make_dataset(args.workload, args.size)
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    workers = args.num_workers
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=args.prefetch_factor if workers else None,
                        pin_memory=device.type == "cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    steps = [int(s) for s in args.probe_steps.split(",") if s]
    probe = Probe(args.probe_file, steps) if args.probe_file and rank == 0 else None

    model.train()
    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = F.cross_entropy(model(images), labels)
            if probe:
                probe(loss)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == 1 and args.first_step_file and rank == 0:
                Path(args.first_step_file).write_text(repr(time.time()))
            if step % args.log_every == 0 and rank == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.4f}", flush=True)
            if step >= args.steps:
                break
        epoch += 1
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
