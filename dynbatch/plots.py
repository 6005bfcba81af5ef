"""Curves of one or more runs, overlaid: the comparison figure of a paper."""
from __future__ import annotations

import json
from itertools import accumulate
from pathlib import Path

from dynbatch.errors import UserError
from dynbatch.train.run_folder import read_metrics

X_AXES = {"epochs": "epoch", "samples": "samples trained on"}


def _config(run: Path) -> dict:
    try:
        cfg = json.loads((run / "config.json").read_text())
        return cfg if isinstance(cfg, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def run_label(run: Path) -> str:
    """``<folder> (<policy>, <model>)``, the legend entry of a run."""
    c = _config(run).get("config")
    if isinstance(c, dict) and isinstance(c.get("policy"), str) and isinstance(c.get("model"), str):
        return f"{run.name} ({c['policy']}, {c['model']})"
    return run.name


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _series(rows: list[dict], kind: str, key: str, x_axis: str) -> tuple[list[float], list[float]]:
    """(x, y) of ``key`` over the rows of ``kind``; epoch rows sit at the end of their epoch (epoch + 1), or at the
    cumulative number of samples trained on; values that are not numbers (null after a divergence) are left out."""
    rs = [r for r in rows if r.get("kind") == kind]
    if kind == "step":
        xs = [r.get("step") for r in rs]
    elif x_axis == "samples":
        xs = list(accumulate(r["trained_samples"] if _num(r.get("trained_samples")) else 0 for r in rs))
    else:
        xs = [r["epoch"] + 1 if _num(r.get("epoch")) else None for r in rs]
    pts = [(x, r.get(key)) for x, r in zip(xs, rs) if _num(x) and _num(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _check_out(out: Path, x_axis: str) -> None:
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must end in .png; e.g. --out compare.png")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name ending in .png")
    if x_axis not in X_AXES:
        raise UserError(f"the x axis must be one of {', '.join(X_AXES)} (got {x_axis!r}); epochs is the default")


def _draw_run(axes, panels, rows, x_axis: str, colour: str, label: str) -> None:
    for ax, kind, key, _ in panels:
        xs, ys = _series(rows, kind, key, x_axis)
        if xs:
            ax.plot(xs, ys, color=colour, label=label if ax is axes[0, 0] else None,
                    marker="o" if kind == "epoch" and len(xs) < 30 else None, ms=3)
    # Batch sizes: what the loader drew (solid) and what the update trained on (dashed; EDBA's chosen subset).
    for key, style in (("batch_size", "-"), ("trained_samples", "--")):
        xs, ys = _series(rows, "step", key, x_axis)
        if xs:
            axes[0, 2].plot(xs, ys, style, color=colour, lw=1)


def _label_axes(axes, panels, xlabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax, kind, key, ylabel in [*panels, (axes[0, 2], "step", None, "samples per step")]:
        ax.set_xlabel("step" if kind == "step" else xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key == "lr" and any(line.get_ydata().size for line in ax.get_lines()):
            ax.set_yscale("log")
    axes[0, 2].set_title("batch size: loader (solid), trained on (dashed)", fontsize=9)


def _save(fig, out: Path) -> None:
    """A temporary name first, then renamed: a failed write never leaves half a figure under ``out``."""
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=90)
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {out} ({e.strerror or type(e).__name__}); choose a writable --out") from None


def plot_runs(runs: list[Path], out: Path, x_axis: str = "epochs") -> Path:
    """Six panels: train loss, test accuracy, batch sizes per step; train accuracy, test loss, learning rate per
    step. ``x_axis`` is ``epochs`` or ``samples`` (samples trained on: EDBA trains on a subset of each loader batch,
    so this axis compares policies on compute). Writes a PNG to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    _check_out(out, x_axis)
    loaded = [(Path(r), read_metrics(Path(r))) for r in runs]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    panels = [  # (axis, row kind, key, y label)
        (axes[0, 0], "epoch", "train_loss", "train loss"),
        (axes[0, 1], "epoch", "test_acc", "test accuracy"),
        (axes[1, 0], "epoch", "train_acc", "train accuracy"),
        (axes[1, 1], "epoch", "test_loss", "test loss"),
        (axes[1, 2], "step", "lr", "learning rate"),
    ]
    datasets = set()
    for i, (run, rows) in enumerate(loaded):
        data = _config(run).get("data")
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            datasets.add(data["name"].rsplit("/", 1)[-1])
        _draw_run(axes, panels, rows, x_axis, f"C{i % 10}", run_label(run))
    _label_axes(axes, panels, X_AXES[x_axis])
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:  # one legend for the figure: every panel uses the same colour per run
        fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)), fontsize=8)
    if datasets:
        fig.suptitle(f"data: {', '.join(sorted(datasets))}")
    try:
        _save(fig, out)
    finally:
        plt.close(fig)
    return out
