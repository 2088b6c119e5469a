"""``launch status RUN_DIR --plot``: the training and validation curves of metrics.jsonl as a PNG.

For a cluster's login node, where TensorBoard (the main viewer) cannot be
opened: matplotlib without a display.
"""

from __future__ import annotations

from pathlib import Path

from ddp.layout import RunDir
from ddp.reporting import read_jsonl
from launcher.errors import LaunchError


def plot_curves(run_dir: RunDir, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(run_dir.metrics)
    series: dict[str, tuple[list, list]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(("train/loss", "val/")) and isinstance(value, (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record.get("step", 0))
                values.append(value)
    if not series:
        raise LaunchError(f"{run_dir.metrics} holds no training or validation metrics yet; nothing to plot")
    validation = sorted(key for key in series if key.startswith("val/"))
    figure, axes = plt.subplots(1, 1 + bool(validation), figsize=(11 if validation else 6, 4), squeeze=False)
    loss_axis = axes[0][0]
    if "train/loss" in series:
        loss_axis.plot(*series["train/loss"], label="train/loss")
    if "val/loss" in series:
        loss_axis.plot(*series["val/loss"], marker="o", label="val/loss")
    loss_axis.set(xlabel="step", ylabel="loss", title=run_dir.name)
    loss_axis.legend()
    if validation:
        other = axes[0][1]
        for key in validation:
            if key != "val/loss":
                other.plot(*series[key], marker="o", label=key)
        other.set(xlabel="step", title="validation")
        other.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
