"""Tables and figures of the noisy-label study (``python bench/reproduce.py noisy``), from its run folders."""
from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from . import verdicts
from .noisy_study import NOISES, SCORE_AT, STEPS_PER_EPOCH
from .run_folders import all_epochs_in, aurocs, pyplot, rows_of

# The rules, stated before the runs (issue #30).
GAIN = 2.0  # points of clean test accuracy that count as a gain (at 40 % symmetric noise Co-teaching-style methods
#             report far more on full CIFAR-10); a loss is any interval entirely below 0
MOST_SEEDS = 5  # the seed rule's ceiling: 3 per cell, 5 where an interval straddles a bound
KEEPS_ALL = 0.999  # a method that trains on this share of what it draws selects nothing: d is 0 by construction

RULES = f"""## Rules (stated before the runs)

- **Budget**: equal loader samples for every method (the same epochs); the epoch count is the pilot's, where the
  noisy baseline has peaked and its last tenth of epochs moves less than 1 point (the reproduction report's rule).
  Verdicts use the **final** epoch's accuracy; the best over epochs is reported beside it (it selects on the test
  split).
- **Question 2 (filtering)**: per seed, d = the run's mislabeled share among the samples trained on minus that among
  the samples drawn, over all its epochs. A method **filters** noisy labels when the 95 % interval of the mean d
  over seeds (one-sample t) lies entirely below 0; **does not filter** when it lies at or above 0; inconclusive
  otherwise. EDBA's paper's hypothesis ("EDBA filters noisy samples") is reproduced or refuted by this rule.
- **Question 3 (accuracy)**: the 95 % interval of (method − fixed) and of (method − its random control) in final
  accuracy, paired by seed (the arms of a seed share the initialisation, the data order and the noise draw).
  **Gain** when the interval lies entirely at or above +{GAIN:g} points; **loss** when it lies entirely below 0;
  **no gain** when it lies below +{GAIN:g} but reaches 0 or above; inconclusive when it straddles
  +{GAIN:g}.
- Seeds: 3 per cell, 5 where an interval straddles a bound. A cell without all its seeds gets no verdict.
- Intervals (re-derived under #46; the runs had used a percentile bootstrap of unpaired seed means, whose coverage
  at 3 seeds is about 80 %): {verdicts.RULE}
"""


@dataclass
class Run:
    """One run folder of the study with its epoch rows, read once, and the numbers the tables take from them
    (accuracies and shares are fractions)."""

    folder: Path
    seed: int
    epochs: list[dict]

    @classmethod
    def read(cls, folder: Path, seed: int = 0) -> Run:
        return cls(folder, seed, rows_of(folder, "epoch"))

    @cached_property
    def evaluated(self) -> list[dict]:
        """The epoch rows with a clean test accuracy."""
        return [r for r in self.epochs if r.get("test_acc") is not None]

    @property
    def final(self) -> float:
        return self.evaluated[-1]["test_acc"]

    @property
    def best(self) -> float:
        return max(r["test_acc"] for r in self.evaluated)

    @cached_property
    def filtering(self) -> float | None:
        """Mislabeled share trained on minus drawn, over the run's epochs (weighted by the samples of each); None
        without label noise."""
        ep = [r for r in self.epochs if "mislabeled_batch" in r]
        if not ep:
            return None
        trained = (sum(r["mislabeled_trained"] * r["trained_samples"] for r in ep)
                   / sum(r["trained_samples"] for r in ep))
        return trained - statistics.fmean(r["mislabeled_batch"] for r in ep)  # an epoch draws the whole split

    @property
    def kept_share(self) -> float:
        """Samples trained on over samples drawn, over the whole run."""
        return sum(r["trained_samples"] for r in self.epochs) / self.epochs[-1]["samples_seen"]


def pilot_lines(groups: dict) -> list[str]:
    """The noisy baselines' curves: where they peak, where they end, and the plateau of the last tenths."""
    lines = ["## Pilot: the baseline's curve under noise", "",
             "| noise | seed | epochs | best test acc (epoch) | final test acc | last tenth minus the tenth before |",
             "|---|---|---|---|---|---|"]
    for (noise, method), runs in sorted(groups.items()):
        if method != "fixed":
            continue
        for run in runs:
            ev = run.evaluated
            if not ev:
                continue
            best = max(ev, key=lambda r: r["test_acc"])
            tenth = max(1, len(ev) // 10)
            last = statistics.fmean(r["test_acc"] for r in ev[-tenth:])
            before = statistics.fmean(r["test_acc"] for r in ev[-2 * tenth:-tenth]) if len(ev) >= 2 * tenth else last
            lines.append(f"| {noise} | {run.seed} | {len(ev)} | {100 * best['test_acc']:.1f} ({best['epoch'] + 1}) "
                         f"| {100 * ev[-1]['test_acc']:.1f} | {100 * (last - before):+.1f} |")
    return lines + [""]


def signal_lines(groups: dict) -> list[str]:
    """Question 1: each score's AUROC for mislabeled samples under the noisy baseline, by epoch."""
    table = defaultdict(list)  # (noise, epoch, score) -> AUROCs over seeds
    for (noise, method), runs in groups.items():
        if method != "fixed":
            continue
        for run in runs:
            for (epoch, score), value in aurocs(run.folder, SCORE_AT, STEPS_PER_EPOCH).items():
                table[(noise, epoch, score)].append(value)
    if not table:
        return []
    scores = sorted({k[2] for k in table}, key=["loss", "residual_norm", "grad_norm", "feature_norm", "agreement",
                                                 "consensus", "class_agreement", "class_consensus"].index)
    lines = ["## Question 1: which score detects mislabeled samples (AUROC, noisy baseline)", "",
             "Each cell: the mean AUROC over seeds ± its standard deviation (not an interval), and the number of "
             "seeds. 0.5 is chance; below 0.5 the score ranks mislabeled samples *lower* (see `SIGN` in "
             "`dynbatch/train/checkpoint_scores.py`: the agreement scores are negated). `feature_norm` is ‖a‖ (with the bias "
             "column), ‖g‖ / ‖e‖.", "",
             "| noise | epoch | " + " | ".join(scores) + " |", "|---|---|" + "---|" * len(scores)]
    for noise in NOISES:
        for epoch in SCORE_AT:
            cells = []
            for score in scores:
                v = table.get((noise, epoch, score), [])
                cells.append("–" if not v else verdicts.sd_cell(v, scale=1.0, digits=3, mark=False) + f" ({len(v)})")
            if any(c != "–" for c in cells):
                lines.append(f"| {noise} | {epoch} | " + " | ".join(cells) + " |")
    return lines + [""]


def _seeds(have: int, planned: int) -> str:
    """A cell's seed count, with its plan while it falls short."""
    return f"{have}" if have >= planned else f"{have} of {planned}"


def filtering_verdict(lo: float, hi: float) -> str:
    """Question 2's rule on the 95 % interval of the mean (trained − drawn) mislabeled share."""
    return "filters" if hi < 0 else "does not filter" if lo >= 0 else "inconclusive"


def accuracy_verdict(lo: float, hi: float) -> str:
    """Question 3's rule on the 95 % interval (fractions) of a difference in mean final accuracy."""
    lo, hi = 100 * lo, 100 * hi
    if lo >= GAIN:
        return "gain"
    if hi < 0:
        return "loss"
    return "no gain" if hi < GAIN else "inconclusive"


def to_extend(planned: Counter, *cells) -> set:
    """The cells of an inconclusive comparison that the seed rule gives seeds 3 and 4 (those not at 5 already)."""
    return {c for c in cells if planned[c] < MOST_SEEDS}


def filtering_lines(done: dict, planned: Counter, changes: verdicts.Changes) -> tuple[list[str], set]:
    """Question 2's table, and the cells whose inconclusive verdicts the seed rule extends."""
    lines = ["## Question 2: does the method train on fewer mislabeled samples than it draws?", "",
             "| noise | method | seeds | trained − drawn (points) | 95 % interval | verdict |", "|---|---|---|---|---|---|"]
    extend = set()
    for (noise, method), runs in sorted(done.items()):
        d = [r.filtering for r in runs if r.filtering is not None]
        if noise == "clean" or not d:
            continue
        want = planned[(noise, method)]
        if len(d) < want:
            lines.append(f"| {noise} | {method} | {_seeds(len(d), want)} | – | – | not enough seeds yet |")
            continue
        iv = verdicts.mean_interval(d, scale=100)  # points
        if min(r.kept_share for r in runs) >= KEEPS_ALL:
            verdict = "keeps all it draws (no verdict)"
        else:
            verdict = changes.judge(f"{noise} {method}: trained − drawn noise", iv, verdicts.old_interval(d, scale=100),
                                    filtering_verdict)
            if verdict == "inconclusive":
                extend |= to_extend(planned, (noise, method))
        lines.append(f"| {noise} | {method} | {len(d)} | {100 * statistics.fmean(d):+.1f} | "
                     f"{iv.bounds()} | {verdict} |")
    return lines + ["", f"A method that trains on at least {100 * KEEPS_ALL:g} % of what it draws (fixed: all of it) "
                    "gets no verdict: its difference is 0 up to the few samples it left out, by construction. Nor "
                    "does it get extra seeds.", ""], extend


@dataclass(frozen=True)
class Comparison:
    """One comparison of question 3: the final accuracies (fractions) of ``cell``'s seeds and of ``other``'s, by
    seed, the rule's 95 % interval of the difference (points, paired by seed) and the old rule's on the same runs."""
    acc: dict
    base: dict
    interval: verdicts.Interval
    old: tuple

    @property
    def verdict(self) -> str:
        return accuracy_verdict(self.interval.lo / 100, self.interval.hi / 100)


def comparisons(done: dict, planned: Counter) -> dict[tuple, Comparison]:
    """Question 3's comparisons keyed by (cell, other): each cell against fixed and against its control, where the
    comparison exists (not a cell with itself, not a control it lacks) and both cells have all their planned seeds.
    The intervals are computed here once, for the table and the list of what changed alike."""
    compared = {}
    for cell in sorted(done):
        noise, method = cell
        for other in ((noise, "fixed"), (noise, f"{method}-control")):
            acc, base = {r.seed: r.final for r in done[cell]}, {r.seed: r.final for r in done.get(other, [])}
            if cell != other and planned[other] and len(base) >= planned[other] and len(acc) >= planned[cell]:
                compared[(cell, other)] = Comparison(acc, base, verdicts.compare(acc, base, scale=100),
                                                     verdicts.old_interval(acc, base, scale=100))
    return compared


def accuracy_lines(done: dict, planned: Counter, compared: dict[tuple, Comparison]) -> tuple[list[str], set]:
    """Question 3's table from ``comparisons(done, planned)``, and the cells whose inconclusive verdicts the seed
    rule extends."""
    lines = ["## Question 3: clean test accuracy against fixed and against the random control", "",
             "| noise | method | seeds | final acc % | best acc % | − fixed: paired 95 % interval | verdict | "
             "− control: "
             "paired 95 % interval | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    extend = set()
    for (noise, method), runs in sorted(done.items()):
        cells = []
        for other in ((noise, "fixed"), (noise, f"{method}-control")):
            c = compared.get(((noise, method), other))
            if c is None:
                cells += ["–", "–"]
                continue
            if c.verdict == "inconclusive":
                extend |= to_extend(planned, (noise, method), other)
            cells += [c.interval.cell() + ("" if c.interval.how == "paired t" else f" ({c.interval.how})"),
                      c.verdict]
        lines.append(f"| {noise} | {method} | {_seeds(len(runs), planned[(noise, method)])} | "
                     f"{100 * statistics.fmean(r.final for r in runs):.1f} | "
                     f"{100 * statistics.fmean(r.best for r in runs):.1f} | " + " | ".join(cells) + " |")
    return lines + [""], extend


def judged(compared: dict[tuple, Comparison]) -> verdicts.Changes:
    """Question 3's verdicts beside the old rule's, for the list of what changed."""
    changes = verdicts.Changes()
    for ((noise, method), (_, other)), c in sorted(compared.items()):
        changes.judge(f"{noise} {method} − {other}", c.interval, c.old,
                      lambda lo, hi: accuracy_verdict(lo / 100, hi / 100))
    return changes


def extend_lines(extend: set) -> list[str]:
    """The cells whose 3-seed intervals leave a verdict inconclusive: the seed rule gives them seeds 3 and 4."""
    if not extend:
        return []
    cells = ", ".join(f"`{noise}-{method}`" for noise, method in sorted(extend))
    return ["## Seeds the rule adds", "",
            f"An interval over 3 seeds leaves its verdict inconclusive for {cells}: by the seed rule each gets seeds "
            "3 and 4. Add them to `FIVE_SEEDS` in `bench/noisy_study.py` and run `python bench/reproduce.py noisy "
            "--only '<noise>-<method>-s[34]'`; until then their verdicts stand as inconclusive.", ""]


def cost_lines(out: Path) -> list[str]:
    """Question 4, from ``cost.json`` (``reproduce.py noisy --cost``, on a quiet machine)."""
    f = out / "cost.json"
    lines = ["## Question 4: what each method costs", ""]
    if not f.is_file():
        return lines + ["Not measured yet: `python bench/reproduce.py noisy --only none --cost` on a quiet machine.", ""]
    c = json.loads(f.read_text())
    fixed = c["methods"]["fixed"]["epoch_s"]
    lines += [f"Training seconds of epoch {c['epoch']} of a run at 40 % symmetric noise, the study's settings, on a "
              f"quiet machine ({c['cpu']}, {c['threads']} threads; `python bench/reproduce.py noisy --only none "
              "--cost`). The selection is the method's scoring forward, its op and the step's one read; a random "
              "control costs what its method does (it runs the same selection).", "",
              "| method | s per epoch | × fixed | selection's share of the step |", "|---|---|---|---|"]
    for method, m in c["methods"].items():
        share = f"{100 * m['selection_s'] / m['step_s']:.0f} %" if m["selection_s"] else "–"
        lines.append(f"| {method} | {m['epoch_s']:.1f} | {m['epoch_s'] / fixed:.2f}× | {share} |")
    return lines + [""]


def _mean_curve(runs, field: str) -> tuple[list[int], list[float]]:
    """Epochs (from 1) and the mean over ``runs`` of ``field`` in their epoch rows, at the epochs all of them have."""
    rows = [{r["epoch"]: r[field] for r in run.epochs if r.get(field) is not None} for run in runs]
    epochs = sorted(set.intersection(*(set(r) for r in rows)))
    return [e + 1 for e in epochs], [statistics.fmean(r[e] for r in rows) for e in epochs]


def figure(done: dict, out: Path) -> None:
    """``noisy.png``: a row per noise; clean test accuracy (left) and the mislabeled share of the samples trained on
    (right) over epochs, each the mean of a cell's finished seeds; a method's random control dashed in its colour."""
    noises = [n for n in NOISES if any(noise == n for noise, _ in done)]
    if not noises:
        return
    methods = sorted({m.removesuffix("-control") for _, m in done}, key=lambda m: (m != "fixed", m))
    plt = pyplot()
    fig, axes = plt.subplots(len(noises), 2, figsize=(12, 4 * len(noises)), squeeze=False, constrained_layout=True)
    for (acc_ax, noise_ax), noise in zip(axes, noises):
        for i, method in enumerate(methods):
            for cell, style in ((method, "-"), (f"{method}-control", "--")):
                runs = done.get((noise, cell))
                if runs:
                    acc_ax.plot(*_mean_curve(runs, "test_acc"), style, color=f"C{i}", label=f"{cell} ({len(runs)})")
                    if noise != "clean":
                        noise_ax.plot(*_mean_curve(runs, "mislabeled_trained"), style, color=f"C{i}")
        acc_ax.set(title=f"{noise}: clean test accuracy (seeds in brackets)", xlabel="epoch", ylabel="test accuracy")
        acc_ax.legend(fontsize=7, ncol=2)
        if noise == "clean":
            noise_ax.set_axis_off()
            noise_ax.text(0.5, 0.5, "clean labels: no mislabeled samples to filter", ha="center", va="center")
        else:
            noise_ax.set(title=f"{noise}: mislabeled share of what was trained on", xlabel="epoch",
                         ylabel="mislabeled share (fixed: of what was drawn)")
    fig.savefig(out / "noisy.png", dpi=70)
    plt.close(fig)


def report(runs, out: Path) -> list[str]:
    groups, done = defaultdict(list), defaultdict(list)
    for folder, meta in runs:
        run = Run.read(folder, meta["seed"])
        if run.epochs:
            groups[(meta["noise"], meta["method"])].append(run)
            if all_epochs_in(run.epochs, meta["epochs"]):
                done[(meta["noise"], meta["method"])].append(run)
    seeds = Counter((meta["noise"], meta["method"]) for _, meta in runs)  # planned seeds per cell
    n_finished = sum(len(v) for v in done.values())
    unfinished = " (the others have no verdict yet)" if n_finished < len(runs) else ""
    status = [f"Runs finished: {n_finished} of {len(runs)} planned{unfinished}.", ""]
    figure(done, out)
    compared = comparisons(done, seeds)
    changes = judged(compared)
    (filtering, extend_f), (accuracy, extend_a) = (filtering_lines(done, seeds, changes),
                                                   accuracy_lines(done, seeds, compared))
    return ([RULES, ""] + status + ["Figure: [accuracy and trained-on noise over epochs](noisy.png).", ""]
            + pilot_lines(groups) + signal_lines(groups) + filtering + accuracy + changes.lines()
            + extend_lines(extend_f | extend_a) + cost_lines(out))
