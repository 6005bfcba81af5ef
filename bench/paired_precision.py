"""Paired runs: does a precision or layout setting change what training learns? Same seeds, same data, same
model; only ``--amp`` / ``--channels-last`` differ. A setting agrees with the reference when the mean of the
paired differences of final test accuracy is within 2 standard errors of zero or within 1 point — the check
behind a change of the CPU defaults.

    python -m dynbatch_bench.paired_precision [--epochs 30] [--seeds 0 1 2] [--settings none,off none,on ...]
        [--out bench/results/cpu/paired_precision.md]

The first setting is the reference. Runs go to a temporary folder; only the table is kept.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def train(setting: str, seed: int, epochs: int, folder: Path) -> list[float]:
    """Test accuracy after every epoch of the README's command (digits, PreResNet-20) under ``setting``."""
    amp, cl = setting.split(",")
    out = folder / f"{amp}-{cl}-s{seed}"
    subprocess.run([sys.executable, "-m", "dynbatch", "train", "--no-progress", "--epochs", str(epochs), "--seed",
                    str(seed), "--amp", amp, "--channels-last", cl, "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["test_acc"] for r in rows if r["kind"] == "epoch"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=["none,off", "none,on"], help="amp,channels-last pairs")
    ap.add_argument("--out", default="bench/results/cpu/paired_precision.md")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        curves = {s: [train(s, seed, a.epochs, Path(tmp)) for seed in a.seeds] for s in a.settings}
    ref = a.settings[0]
    final = {s: [c[-1] for c in cs] for s, cs in curves.items()}
    lines = [f"# Paired runs: precision and layout against `--amp {ref.split(',')[0]} --channels-last "
             f"{ref.split(',')[1]}`", "",
             f"`dynbatch train` (digits, PreResNet-20), {a.epochs} epochs, seeds {a.seeds}; command: "
             f"`python -m dynbatch_bench.paired_precision --epochs {a.epochs} --seeds {' '.join(map(str, a.seeds))} "
             f"--settings {' '.join(a.settings)}`.", "",
             "| --amp, --channels-last | final test acc (mean ± std) | paired difference (mean ± s.e.) | "
             "largest per-epoch gap, mean over seeds | verdict |", "|---|---|---|---|---|"]
    for s in a.settings:
        accs = final[s]
        diffs = [x - y for x, y in zip(accs, final[ref])]
        mean_d = statistics.fmean(diffs)
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        gap = statistics.fmean(max(abs(x - y) for x, y in zip(c, r)) for c, r in zip(curves[s], curves[ref]))
        ok = abs(mean_d) <= 0.01 or abs(mean_d) <= 2 * se
        verdict = "reference" if s == ref else ("agrees within seed noise" if ok else "differs")
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {s} | {100 * statistics.fmean(accs):.2f} ± {100 * std:.2f} | "
                     f"{100 * mean_d:+.2f} ± {100 * se:.2f} | {100 * gap:.2f} | {verdict} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
