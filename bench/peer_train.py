"""The hand-written loop of ``raw_train.py``, written as each peer documents it (Lightning, Fabric, Accelerate)
and with our core as a library (``--peer library``: ``ddp.init``, ``run.prepare``, ``run.loader``, the
stop vote each step, as ``examples/library_script.py``).

    python bench/peer_train.py --peer fabric --workload mlp ...
    torchrun --standalone --nproc-per-node 2 bench/peer_train.py --peer lightning --workload cnn ...

Each trains the same model on the same data in the same order as the raw loop:
the same seed before the model is built, the same ``DistributedSampler`` (each
peer is told to keep it: Lightning's ``use_distributed_sampler=False``, Fabric's
``setup_dataloaders(..., use_distributed_sampler=False)``, and Accelerate
prepares the model and optimizer only), SGD with momentum, a constant learning
rate. Everything else stays at the peer's defaults, as a user would leave it
(Lightning: its progress bar, its logger, its end-of-run checkpoint). The probe
sits right after the forward pass, as in the raw loop and in our job.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from raw_train import parse_args
from workload import Probe, make_dataset, make_model


def make_loader(args, dataset, rank: int, world_size: int) -> DataLoader:
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    workers = args.num_workers
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0, prefetch_factor=args.prefetch_factor if workers else None)


def train(args, probe, model, optimizer, loader, backward, say) -> None:
    """The raw loop's steps, with the peer's own ``backward`` and rank-0 ``print`` (Fabric, Accelerate)."""
    step, epoch = 0, 0
    while step < args.steps:
        loader.sampler.set_epoch(epoch)
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            if probe:
                probe(loss)
            backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % args.log_every == 0:
                say(f"epoch {epoch} step {step} loss {loss.item():.4f}")
            if step >= args.steps:
                break
        epoch += 1


def run_fabric(args, probe, rank: int, world_size: int) -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=world_size, strategy="ddp" if world_size > 1 else "auto")
    fabric.launch()
    torch.manual_seed(args.seed)
    model = make_model(args.workload)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    loader = make_loader(args, make_dataset(args.workload, args.size), rank, world_size)
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)
    train(args, probe, model, optimizer, loader, fabric.backward, fabric.print)


def run_accelerate(args, probe, rank: int, world_size: int) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(args.seed)
    model = make_model(args.workload)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    loader = make_loader(args, make_dataset(args.workload, args.size), rank, world_size)
    train(args, probe, model, optimizer, loader, accelerator.backward, accelerator.print)


def run_lightning(args, probe, rank: int, world_size: int) -> None:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_model(args.workload)

        def training_step(self, batch, batch_idx):
            images, labels = batch
            loss = F.cross_entropy(self.model(images), labels)
            if probe:
                probe(loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=args.lr, momentum=0.9)

    torch.manual_seed(args.seed)
    module = Module()
    loader = make_loader(args, make_dataset(args.workload, args.size), rank, world_size)
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy="ddp" if world_size > 1 else "auto",
                        max_steps=args.steps, log_every_n_steps=args.log_every, use_distributed_sampler=False,
                        default_root_dir=os.environ.get("BENCH_PEER_ROOT", "."))
    trainer.fit(module, loader)


def run_library(args, probe, rank: int, world_size: int) -> None:
    """Our core as a library: its resumable loader draws the same batches as DistributedSampler's with the
    same seed, so the losses are comparable bitwise too."""
    import ddp

    with ddp.init(seed=args.seed) as run:
        model = run.prepare(make_model(args.workload))
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        loader = run.loader(make_dataset(args.workload, args.size), batch_size=args.batch_size,
                            num_workers=args.num_workers, prefetch_factor=args.prefetch_factor)
        step = 0
        while step < args.steps:
            for images, labels in loader:
                loss = F.cross_entropy(model(images), labels)
                if probe:
                    probe(loss)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if run.stop_requested():
                    raise SystemExit(ddp.EXIT_RESUMABLE)
                if step % args.log_every == 0 and run.is_main:
                    print(f"epoch {loader.epoch} step {step} loss {loss.item():.4f}", flush=True)
                if step >= args.steps:
                    break


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    peer = argv[argv.index("--peer") + 1]
    del argv[argv.index("--peer"):argv.index("--peer") + 2]
    args = parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    steps = [int(s) for s in args.probe_steps.split(",") if s]
    probe = Probe(args.probe_file, steps) if args.probe_file and rank == 0 else None
    {"lightning": run_lightning, "fabric": run_fabric, "accelerate": run_accelerate, "library": run_library}[peer](
        args, probe, rank, world_size)


if __name__ == "__main__":
    main()
