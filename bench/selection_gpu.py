"""The GPU check's measurement of the two selection policies (#47): on one GPU, the airbench94 recipe at batch 1024,
median step seconds (CUDA events, the rows' ``step_s``) of fixed, of the proxy policy (loader batch 2048, the main
network on the proxy's 1024 highest-loss samples) on the batches where the proxy only scores and on those where it
also takes its step (on a side stream, beside the main step), and of InfoBatch.

    python -m dynbatch_bench.selection_gpu --data npz:bench/data/cifar10_subset.npz --out bench/results/gpu/selection.md

The proxy's cost is the ratio of its step to fixed's; how much of its backward the side stream hides is the
difference between its learning and scoring batches (0: all of it). The first epoch (allocator, cuDNN autotuning) is
left out. A CPU runs it too (the streams are then sequential), which is how it is tested.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

RUNS = {  # name: policy arguments; every run has 2 epochs of 5,000 images
    "fixed": ["--policy", "fixed", "--batch-size", "1024"],
    "proxy": ["--policy", "proxy", "--batch-size", "2048", "--proxy-keep", "0.5"],
    "infobatch": ["--policy", "infobatch", "--batch-size", "1024", "--ib-delta", "0"],
}


def measure(data: str, tmp: Path, extra: list[str]) -> dict[str, dict[str, float]]:
    """{run: {what: median step seconds}} over the second epoch's steps."""
    from dynbatch.cli import main
    from dynbatch.train.run_folder import read_metrics

    out = {}
    for name, args in RUNS.items():
        run = tmp / name
        rc = main(["train", "--data", data, "--recipe", "airbench94", "--epochs", "2", "--train-samples", "5000",
                   "--no-progress", "--util-interval", "5", "--out", str(run), *args, *extra])
        if rc:
            raise SystemExit(f"selection_gpu: the {name} run failed (dynbatch exit {rc})")
        steps = [r for r in read_metrics(run) if r["kind"] == "step" and r["epoch"] == 1]
        if name == "proxy":
            learning = [r["step_s"] for r in steps if r["step"] % 4 == 3]
            out[name] = {"scoring batches": statistics.median([r["step_s"] for r in steps if r["step"] % 4 != 3]),
                         "learning batches": statistics.median(learning) if learning else float("nan")}
        else:
            out[name] = {"steps": statistics.median(r["step_s"] for r in steps)}
    return out


def report(times: dict[str, dict[str, float]], device: str) -> list[str]:
    fixed = times["fixed"]["steps"]
    lines = [f"# The selection policies' steps on {device}", "",
             "airbench94 recipe, 5,000 CIFAR-10 images, second epoch; median step seconds (CUDA events).", "",
             "| run | batches | median step (ms) | / fixed's step |", "|---|---|---|---|"]
    for name, whats in times.items():
        for what, t in whats.items():
            lines.append(f"| {name} | {what} | {1e3 * t:.2f} | {t / fixed:.2f} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `dynbatch train` flags (tests)")
    a = ap.parse_args(argv)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "this CPU (no GPU: sequential streams)"
    with tempfile.TemporaryDirectory() as tmp:
        times = measure(a.data, Path(tmp), a.extra)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(report(times, device)) + "\n")
    print("\n".join(report(times, device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
