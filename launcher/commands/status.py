"""``launch status``, ``launch cancel`` and ``launch ls``: a run (or a sweep) from its directory, local or SLURM."""

from __future__ import annotations

import json
from pathlib import Path

from ddp.codes import EXIT_OK
from ddp.layout import RunDir, SweepDir
from launcher.listing import find_runs, summarize, table
from launcher.runs import RunDirError


def _run_or_sweep(path: Path) -> tuple[RunDir | None, SweepDir | None]:
    path = path.expanduser().resolve()
    sweep = SweepDir(path)
    if sweep.exists():
        return None, sweep
    run_dir = RunDir(path)
    if not (run_dir.exists() or run_dir.launch_record.is_file() or run_dir.state.is_file()):
        raise RunDirError(f"{path} is neither a run directory nor a sweep's; give a folder under runs/ "
                          "(`launch ls` lists them)")
    return run_dir, None


def sweep_runs(sweep: SweepDir) -> list[RunDir]:
    return [RunDir(path) for path in json.loads(sweep.record.read_text()).get("runs", [])]


def local_status(run_dir: RunDir) -> str:
    s = summarize(run_dir)
    lines = [f"run directory  {run_dir.path}",
             f"state          {s.state}" + (f" ({s.where})" if s.where else "") + (f": {s.detail}" if s.detail else ""),
             "progress       " + (f"step {s.step}, epoch {s.epoch}" if s.step is not None else "no step recorded yet")
             + f"; last checkpoint {s.checkpoint or 'none yet'}"]
    if s.loss is not None or s.metric:
        metric = f", {s.metric[0]} {s.metric[1]:.4g}" if s.metric else ""
        best = f" (best {s.best:.4g})" if s.best is not None else ""
        lines.append(f"metrics        train/loss {s.loss:.4g}{metric}{best}" if s.loss is not None
                     else f"metrics        {metric.lstrip(', ')}{best}")
    restarts = run_dir.restarts.read_text().splitlines() if run_dir.restarts.is_file() else []
    if restarts:
        try:
            last = json.loads(restarts[-1])
            lines.append(f"restarts       {len(restarts)} (last: {last.get('cause')})")
        except ValueError:
            lines.append(f"restarts       {len(restarts)}")
    lines.append(f"logs           {run_dir.logs}/rank_N.log")
    return "\n".join(lines)


def command_status(options, target) -> int:
    run_dir, sweep = _run_or_sweep(options.run_dir)
    runs = sweep_runs(sweep) if sweep else [run_dir]
    texts = []
    for run in runs:
        if run.slurm_record.is_file():
            from launcher.slurm.status import status_text

            texts.append(status_text(run))
        else:
            texts.append(local_status(run))
    print("\n\n".join(texts))
    if options.plot is not None:
        from launcher.plot import plot_curves

        for run in runs:
            path = Path(options.plot) if options.plot and len(runs) == 1 else run.path / "curves.png"
            print(f"curves         {plot_curves(run, path)}")
    return EXIT_OK


def command_cancel(options, target) -> int:
    from launcher.slurm.status import cancel

    run_dir, sweep = _run_or_sweep(options.run_dir)
    runs = sweep_runs(sweep) if sweep else [run_dir]
    for run in runs:
        if not run.slurm_record.is_file():
            from ddp.lock import read_owner

            owner = read_owner(run.lock)
            hint = f"; {owner.how_to_stop(run.path)}" if owner else ""
            raise RunDirError(f"{run.path} is not a SLURM run (no slurm.json){hint}")
        print(cancel(run))
    return EXIT_OK


def command_ls(options, target) -> int:
    runs = find_runs(options.dir.expanduser())
    if not runs:
        print(f"no runs under {options.dir}")
        return EXIT_OK
    print(table([summarize(run) for run in runs]))
    return EXIT_OK
