"""Benchmark 10: what grows with the world size, at 2, 8, 16 and 32 CPU ranks on this machine (1 thread each).

Two parts, for each world size W:

* the collectives that are O(W) in our design, in W spawned gloo ranks and nothing else:
  process-group init (the TCP store rendezvous), the preflight (every rank's
  fingerprint gathered and compared), one stop vote (``StopVote`` with
  ``every_s=0``: a vote every step, the worst case) and the gather of every
  rank's random state that each checkpoint does;
* whole commands: ``launch local --cpu --nproc W`` on the benchmark MLP, 12 steps
  with a checkpoint at step 6, then ``launch resume`` of the run for 6 more steps.
  From rank 0's metrics.jsonl (a record per step): command to first step, the
  median step, the checkpoint step's extra time, and command to the first resumed
  step; from the checkpoint: its size and the bytes of one rank's random state.

On 2 cores, W processes share 2 cores: every figure past W=2 includes waiting for
a core, so read the growth, not the absolute times, as what a cluster would see.

    python -m bench.scale            # W = 2, 8, 16, 32
    BENCH_SCALE_WORLDS=2,8 python -m bench.scale
"""

from __future__ import annotations

import json
import os
import pickle
import statistics
import tempfile
import time
from pathlib import Path

from bench.harness import Scratch, launch_command, report, run_in_terminal

WORLDS = tuple(int(w) for w in os.environ.get("BENCH_SCALE_WORLDS", "2,8,16,32").split(","))
VOTES = 50
GATHERS = 5
STEPS, CHECKPOINT_AT, MORE = 12, 6, 6


def collectives_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from bench.workload import make_model
    from ddp import distributed, rng
    from ddp.config import Config
    from ddp.consistency import check_ranks_agree
    from ddp.signals import StopRequest, StopVote

    torch.set_num_threads(1)
    began = time.perf_counter()
    dist.init_process_group("gloo")
    dist.barrier()
    timings = {"init_ms": (time.perf_counter() - began) * 1000}
    model = make_model("mlp")
    dist.barrier()
    began = time.perf_counter()
    check_ranks_agree(Config(), model)
    timings["preflight_ms"] = (time.perf_counter() - began) * 1000
    vote = StopVote(StopRequest(), every_s=0.0)
    dist.barrier()
    began = time.perf_counter()
    for _ in range(VOTES):
        vote.agreed()
    vote.close()
    timings["vote_ms"] = (time.perf_counter() - began) * 1000 / VOTES
    dist.barrier()
    began = time.perf_counter()
    for _ in range(GATHERS):
        distributed.all_gather_object(rng.capture())
    timings["rng_gather_ms"] = (time.perf_counter() - began) * 1000 / GATHERS
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(timings))


def collectives(world: int) -> dict:
    import torch.multiprocessing as mp

    from launcher.ports import free_port

    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "timings.json")
        mp.start_processes(collectives_rank, args=(world, free_port(), out), nprocs=world, start_method="spawn")
        return json.loads(Path(out).read_text())


def step_records(run_dir: Path) -> dict[int, float]:
    """Rank 0's time of each logged step (``train.log_every=1``: every step), the latest launch's last."""
    times = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            times[record["step"]] = record["time"]
    return times


def whole_command(scratch: Scratch, world: int) -> dict:
    name = f"w{world}"
    config = scratch.write_config(name, {
        "job": {"name": "bench.workload_job:Workload", "kind": "mlp", "size": world * 8 * (STEPS + MORE)},
        "run": {"name": name, "dir": str(scratch.path / "runs"), "seed": 0},
        "data": {"batch_size": 8, "num_workers": 0},
        "optim": {"name": "sgd", "lr": 0.05},
        "schedule": {"name": "constant"},
        "train": {"epochs": 1, "max_steps": STEPS, "log_every": 1, "progress_bar": False, "stop_check_s": 0},
        "checkpoint": {"every_steps": CHECKPOINT_AT},
    })
    run_dir = scratch.path / "runs" / name
    first = run_in_terminal(launch_command("local", "--cpu", "--nproc", str(world), str(config)), timeout=900)
    times = step_records(run_dir)
    gaps = {step: times[step] - times[step - 1] for step in range(3, STEPS + 1)}
    steady = statistics.median(gap for step, gap in gaps.items() if step != CHECKPOINT_AT + 1)
    saved = run_dir / "checkpoints" / "last.pt"
    size = saved.stat().st_size
    import torch

    rank_state = len(pickle.dumps(torch.load(saved, weights_only=False)["rng"][0]))
    resumed = run_in_terminal(launch_command("resume", str(run_dir), f"train.max_steps={STEPS + MORE}"),
                              timeout=900)
    times = step_records(run_dir)
    return {"first_step_s": times[1] - first.started, "step_ms": steady * 1000,
            "checkpoint_ms": (gaps[CHECKPOINT_AT + 1] - steady) * 1000, "checkpoint_kb": size / 1024,
            "rank_state_b": rank_state, "resume_s": times[STEPS + 1] - resumed.started,
            "command_s": first.seconds}


def main() -> None:
    rows = []
    with Scratch("scale") as scratch:
        for world in WORLDS:
            row = {"world": world, **collectives(world), **whole_command(scratch, world)}
            rows.append(row)
            print(f"  W={world}: " + ", ".join(f"{key} {value:.4g}" for key, value in row.items() if key != "world"),
                  flush=True)
    header = ("| ranks | pg init ms | preflight ms | stop vote ms | rng gather ms | command to step 1 s | step ms "
              "| checkpoint extra ms | checkpoint KiB | rng B/rank | command to resumed step s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        lines.append(f"| {row['world']} | {row['init_ms']:.0f} | {row['preflight_ms']:.1f} | {row['vote_ms']:.2f} "
                     f"| {row['rng_gather_ms']:.1f} | {row['first_step_s']:.1f} | {row['step_ms']:.1f} "
                     f"| {row['checkpoint_ms']:.0f} | {row['checkpoint_kb']:.0f} | {row['rank_state_b']} "
                     f"| {row['resume_s']:.1f} |")
    report("10. against world size (2 cores shared by every rank)", "\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
