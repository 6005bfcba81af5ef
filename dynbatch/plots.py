"""Curves of one or more runs, overlaid: the comparison figure of a paper."""
from __future__ import annotations

import json
from pathlib import Path

from dynbatch.errors import UserError
from dynbatch.train.records import read_metrics


def run_label(run: Path) -> str:
    """``<folder> (<policy>)``, the legend entry of a run."""
    try:
        cfg = json.loads((run / "config.json").read_text())["config"]
        return f"{run.name} ({cfg['policy']}, {cfg['model']})"
    except (OSError, KeyError, json.JSONDecodeError):
        return run.name


def plot_runs(runs: list[Path], out: Path) -> Path:
    """Six panels: train loss and test accuracy against epochs and against samples seen, batch size and learning
    rate over steps. Writes a PNG to ``out`` (written to a temporary name first, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must end in .png")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    panels = [
        (axes[0, 0], "epoch", "epoch", "train_loss", "train loss"),
        (axes[0, 1], "epoch", "epoch", "test_acc", "test accuracy"),
        (axes[0, 2], "step", "step", "policy_batch_size", "batch size (policy)"),
        (axes[1, 0], "epoch", "samples_seen", "train_loss", "train loss"),
        (axes[1, 1], "epoch", "samples_seen", "test_acc", "test accuracy"),
        (axes[1, 2], "step", "step", "lr", "learning rate"),
    ]
    for run in runs:
        run = Path(run)
        rows = read_metrics(run)
        label = run_label(run)
        for ax, kind, xk, yk, _ in panels:
            pts = [(r[xk], r[yk]) for r in rows if r.get("kind") == kind and r.get(xk) is not None
                   and r.get(yk) is not None]
            if kind == "epoch" and xk == "epoch":
                pts = [(x + 1, y) for x, y in pts]  # epoch rows are written at the end of epoch x (0-based)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=label, marker="o" if kind == "epoch" and len(xs) < 30 else None, ms=3)
    for ax, kind, xk, yk, title in panels:
        ax.set_xlabel({"samples_seen": "samples seen"}.get(xk, xk))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if yk == "lr":
            ax.set_yscale("log")
    if axes[0, 0].get_legend_handles_labels()[0]:  # a run stopped before its first epoch has no epoch points
        axes[0, 0].legend(fontsize=8)
    tmp = out.with_name(f".{out.name}.tmp.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out)
    return out
