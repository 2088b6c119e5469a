"""Benchmark 11: ours beside the peers a user weighs us against: Lightning, Fabric and Accelerate.

One table: steady-state time per step of each, and its ratio to the
hand-written loop (``raw_train.py``), for 1 and 2 CPU processes, on the MLP
(where a loop's own overhead shows) and the small CNN (where compute
dominates). Every side trains the same model on the same data in the same
order (``peer_train.py``), started as its documentation says: ``launch local``
for ours, ``python`` or ``torchrun`` for the others. "library" is our core in a
hand-written loop (``ddp.init``, ``run.prepare``, ``run.loader``, the stop vote),
under ``python``/``torchrun`` too. The sides take turns in
an order rotated every round, and a side's figure is the median over rounds of
its fastest window (as benchmark 1). The losses at the last probe are compared
with the raw loop's: "bitwise", or "bitwise but" the sides that differ.

A peer that is not installed is a cell that says so (``pip install -e '.[bench]'``); a run that
fails or hangs (3 minutes) is counted and said in its cell, and the others go on.

    python -m bench.peers
    BENCH_ROUNDS=5 python -m bench.peers
    BENCH_PEER_CASES=cnn:2,mlp:1 python -m bench.peers     # some workloads and process counts
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys

from bench import step_time
from bench.harness import (
    ROOT,
    BenchError,
    Scratch,
    raw_args,
    report,
    rounds_from_env,
    run_in_terminal,
    torchrun_command,
)
from bench.workload import fastest_step_s, read_probes

PEER_TRAIN = ROOT / "bench" / "peer_train.py"
PEERS = ("lightning", "fabric", "accelerate")
SIDES = ("raw", "ours", "library", *PEERS)  # library: our core in a hand-written loop (peer_train.py)
# (workload, first probed step, last probed step, steps per window, loader workers): as benchmark 1, shorter.
CASES = (("mlp", 200, 1400, 100, 0), ("cnn", 10, 130, 10, 1))
PROCESSES = (1, 2)
HANG_S = 180  # a peer's run takes under a minute here: past this it hangs
SELECTED = os.environ.get("BENCH_PEER_CASES")  # "kind:processes,...", default every case
SIDES_WANTED = os.environ.get("BENCH_PEER_SIDES")  # "raw,library,...", default every side


def installed(peer: str) -> bool:
    if peer in ("raw", "ours", "library"):
        return True
    return importlib.util.find_spec("lightning" if peer == "fabric" else peer) is not None


def measure_peer(scratch: Scratch, peer: str, kind: str, first: int, last: int, window: int, workers: int,
                 nproc: int) -> tuple[float, float]:
    """Seconds per step in the fastest window, and the loss at the last probe (as ``step_time.measure``)."""
    name = scratch.fresh(f"{kind}-{peer}")
    probe_file = scratch.path / f"{name}.probe.jsonl"
    args = raw_args(kind=kind, size=(last + 10) * step_time.BATCH * nproc, steps=last + 1,
                    batch_size=step_time.BATCH, num_workers=workers, probe_file=probe_file,
                    probe_steps=list(range(first, last + 1, window)))
    args = [str(PEER_TRAIN), "--peer", peer, *args[1:]]
    env = {"BENCH_PEER_ROOT": str(scratch.path / name)}
    if nproc == 1:
        run_in_terminal([sys.executable, *args], env=env, timeout=HANG_S)
    else:
        run_in_terminal(torchrun_command("--standalone", f"--nproc-per-node={nproc}", *args), env=env,
                        timeout=HANG_S)
    probes = read_probes(probe_file)
    return fastest_step_s(probes, first, last, window), probes[last]["loss"]


def run_case(kind: str, first: int, last: int, window: int, workers: int, nproc: int, rounds: int) -> dict:
    sides = [side for side in SIDES if (side in ("raw", "ours") or installed(side))
             and (not SIDES_WANTED or side == "raw" or side in SIDES_WANTED.split(","))]
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    losses: dict[str, set] = {side: set() for side in sides}
    failed: dict[str, int] = {side: 0 for side in sides}
    with Scratch(f"peers-{kind}-{nproc}") as scratch:
        for round_ in range(rounds):
            order = sides[round_ % len(sides):] + sides[:round_ % len(sides)]
            for side in order:
                try:
                    if side in ("raw", "ours"):
                        per_step, _, loss = step_time.measure(scratch, kind, first, last, window, workers, nproc,
                                                              "ours" if side == "ours" else "baseline")
                    else:
                        per_step, loss = measure_peer(scratch, side, kind, first, last, window, workers, nproc)
                except BenchError as err:  # a hang (the timeout) or a crash: counted, and said in the table
                    print(f"  {side} failed: {str(err).splitlines()[0]}", flush=True)
                    failed[side] += 1
                    continue
                seconds[side].append(per_step * 1000)
                losses[side].add(round(loss, 6))
            print(f"  {kind}, {nproc} process(es), round {round_ + 1}/{rounds}: "
                  + ", ".join(f"{side} {seconds[side][-1]:.3f}" if seconds[side] else f"{side} -" for side in sides)
                  + " ms/step", flush=True)
    return {"seconds": {side: statistics.median(values) for side, values in seconds.items() if values},
            "failed": failed, "rounds": rounds,
            "differ": [side for side, values in losses.items()
                       if side != "raw" and values and (values != losses["raw"] or len(values) != 1)]}


def cell(case: dict, side: str) -> str:
    if side not in case["failed"]:
        return "not run" if installed(side) else "not installed"
    text = f"{case['seconds']['raw'] / case['seconds'][side]:.2f}" if side in case["seconds"] else "-"
    if case["failed"][side]:
        text += f" ({case['failed'][side]} of {case['rounds']} runs failed or hung)"
    return text


def main() -> None:
    rounds = rounds_from_env(3)
    header = "| workload | processes | raw ms/step | " + " | ".join(SIDES[1:]) + " | same losses |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for nproc in PROCESSES:
        for kind, first, last, window, workers in CASES:
            if SELECTED and f"{kind}:{nproc}" not in SELECTED.split(","):
                continue
            case = run_case(kind, first, last, window, workers, nproc, rounds)
            lines.append(f"| {kind} | {nproc} | {case['seconds']['raw']:.3f} | "
                         + " | ".join(cell(case, side) for side in SIDES[1:])
                         + f" | {'bitwise' + (' but ' + ', '.join(case['differ']) if case['differ'] else '')} |")
    report(f"11. steps/s relative to the hand-written loop (higher is faster; median of {rounds} rounds)",
           "\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
