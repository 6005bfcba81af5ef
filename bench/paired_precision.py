"""Paired runs: does a precision or layout setting change what training learns? Same seeds, same data, same
model; only ``--amp`` / ``--channels-last`` differ. A setting **agrees** with the reference when the 95 % interval
of the paired differences of final test accuracy (``bench/verdicts.py``: Student's t over the seeds) lies within
±1 point, **differs** when it lies wholly outside, and is **undecided** otherwise — the check behind a change of
the CPU defaults.

    python -m dynbatch_bench.paired_precision [--epochs 30] [--seeds 0 1 2] [--settings none,off none,on ...]
        [--out bench/results/cpu/paired_precision.md]

The first setting is the reference. Runs go to a temporary folder; only the table is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import verdicts
else:
    from . import verdicts
from dynbatch.info import cpu_name  # noqa: E402

BAND = 1.0  # points of final test accuracy within which a setting agrees with the reference


def train(setting: str, seed: int, epochs: int, folder: Path) -> list[float]:
    """Test accuracy after every epoch of the README's command (digits, PreResNet-20) under ``setting``."""
    amp, cl = setting.split(",")
    out = folder / f"{amp}-{cl}-s{seed}"
    subprocess.run([sys.executable, "-m", "dynbatch", "train", "--no-progress", "--epochs", str(epochs), "--seed",
                    str(seed), "--amp", amp, "--channels-last", cl, "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["test_acc"] for r in rows if r["kind"] == "epoch"]


def band_verdict(iv: verdicts.Interval | None, reference: bool) -> str:
    if reference:
        return "reference"
    if iv is None:
        return "undecided (one seed)"
    if -BAND <= iv.lo and iv.hi <= BAND:
        return "agrees"
    return "differs" if iv.hi < -BAND or iv.lo > BAND else "undecided"


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
             f"--settings {' '.join(a.settings)}`. Machine: {cpu_name()}, {os.cpu_count()} cores.", "",
             f"A setting agrees when the paired 95 % interval lies within ±{BAND:g} point, differs when it lies "
             "wholly outside, and is undecided otherwise. " + verdicts.RULE, "",
             "| --amp, --channels-last | final test acc (mean ± sd) | − reference, paired 95 % interval | "
             "largest per-epoch gap, mean over seeds | verdict |", "|---|---|---|---|---|"]
    for s in a.settings:
        iv = verdicts.compare(dict(enumerate(final[s])), dict(enumerate(final[ref])), scale=100)
        gap = statistics.fmean(max(abs(x - y) for x, y in zip(c, r)) for c, r in zip(curves[s], curves[ref]))
        lines.append(f"| {s} | {verdicts.sd_cell(final[s], digits=2, mark=False)} | "
                     f"{iv.cell(2) if s != ref and iv else '–'} | {100 * gap:.2f} | {band_verdict(iv, s == ref)} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
