"""Tables and figures of the noisy-label study (``python bench/reproduce.py noisy``), from its run folders."""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from .reproduce import NOISES, SCORE_AT, STEPS_PER_EPOCH, rows_of


def _evaluated(run: Path) -> list[dict]:
    return [r for r in rows_of(run, "epoch") if r.get("test_acc") is not None]


def pilot_lines(groups: dict) -> list[str]:
    """The noisy baselines' curves: where they peak, where they end, and the plateau of the last tenths."""
    lines = ["## Pilot: the baseline's curve under noise", "",
             "| noise | seed | epochs | best test acc (epoch) | final test acc | last tenth minus the tenth before |",
             "|---|---|---|---|---|---|"]
    for (noise, method), runs in sorted(groups.items()):
        if method != "fixed":
            continue
        for run, meta in runs:
            ev = _evaluated(run)
            if not ev:
                continue
            best = max(ev, key=lambda r: r["test_acc"])
            tenth = max(1, len(ev) // 10)
            last = statistics.fmean(r["test_acc"] for r in ev[-tenth:])
            before = statistics.fmean(r["test_acc"] for r in ev[-2 * tenth:-tenth]) if len(ev) >= 2 * tenth else last
            lines.append(f"| {noise} | {meta['seed']} | {len(ev)} | {100 * best['test_acc']:.1f} ({best['epoch'] + 1}) "
                         f"| {100 * ev[-1]['test_acc']:.1f} | {100 * (last - before):+.1f} |")
    return lines + [""]


def signal_lines(groups: dict) -> list[str]:
    """Question 1: each score's AUROC for mislabeled samples under the noisy baseline, by epoch."""
    table = defaultdict(list)  # (noise, epoch, score) -> AUROCs over seeds
    for (noise, method), runs in groups.items():
        if method != "fixed":
            continue
        for run, _ in runs:
            for epoch in SCORE_AT:
                f = run / "scores" / f"step-{epoch * STEPS_PER_EPOCH}.json"
                if f.is_file():
                    for score, value in json.loads(f.read_text()).get("auroc", {}).items():
                        if value is not None:
                            table[(noise, epoch, score)].append(value)
    if not table:
        return []
    scores = sorted({k[2] for k in table}, key=["loss", "residual_norm", "grad_norm", "agreement", "consensus",
                                                 "class_agreement", "class_consensus"].index)
    lines = ["## Question 1: which score detects mislabeled samples (AUROC, noisy baseline)", "",
             "| noise | epoch | " + " | ".join(scores) + " |", "|---|---|" + "---|" * len(scores)]
    for noise in NOISES:
        for epoch in SCORE_AT:
            cells = []
            for score in scores:
                v = table.get((noise, epoch, score), [])
                cells.append("–" if not v else f"{statistics.fmean(v):.3f}" + (
                    f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "") + f" (n={len(v)})")
            if any(c != "–" for c in cells):
                lines.append(f"| {noise} | {epoch} | " + " | ".join(cells) + " |")
    return lines + [""]


def report(runs, out: Path) -> list[str]:
    groups = defaultdict(list)
    for run, meta in runs:
        if rows_of(run, "epoch"):
            groups[(meta["noise"], meta["method"])].append((run, meta))
    return pilot_lines(groups) + signal_lines(groups)
