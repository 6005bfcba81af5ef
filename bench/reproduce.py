"""Reproduce the published experiments on the real CIFAR-10 subset, then write tables and figures.

    python bench/reproduce.py edba|split|adabatch|noisy|fast|all [--out bench/results/repro] [--budget full|smoke]
        [--only GLOB] [--throughput] [--cost]

Resumable: a finished run is skipped, an interrupted one resumed (``dynbatch train --resume``), so the same
command picks up where it stopped. ``--budget smoke`` runs a tiny version of every run to check the pipeline.
Each experiment writes ``<out>/<name>/table.md`` and figures beside its runs.
``--throughput`` (adabatch) and ``--cost`` (noisy) first take the experiment's quiet-machine measurement.
"""
from __future__ import annotations

import argparse
import json
import fnmatch
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: bench.* (the noisy study's report) imports from the checkout
    sys.path.insert(0, str(REPO))

from bench.noisy_study import (EDBA_OPT, NOISES, NOISY_OPT, STEPS_PER_EPOCH, noisy_methods,  # noqa: E402
                               noisy_runs)
from bench.fast_study import (FAST_EPOCHS, FAST_METHODS, fast_runs, frontier_runs,  # noqa: E402
                              measure_frontier_cost, report_frontier, report_tune, tune_runs)
from bench import verdicts  # noqa: E402
from bench.verdicts import sd_cell  # noqa: E402
from bench.run_folders import (DATA, best_acc, by_seed, cost_run, final_acc, finished,  # noqa: E402
                               machine_of, pyplot, rows_of, thin, train_scoring, wall, write_cost)


PUBLISHED_EDBA = {100: (23.8, 90.7), 500: (40.5, 91.5), 5085: (71.7, 91.6)}  # CIFAR-10 test acc, baseline vs EDBA


@dataclass(frozen=True)
class Row:
    """One row of the EDBA table: the same budget for its methods; run folders are ``<key>-<method>-s<seed>``."""

    key: str
    label: str
    n: int
    epochs: int
    every: int
    seeds: tuple[int, ...]
    methods: tuple[str, ...] = ("fixed", "edba")
    extra: tuple[str, ...] = ()  # arguments for the row's EDBA runs (and, with extra_fixed, its baseline's)
    extra_fixed: tuple[str, ...] = ()
    reading: bool = False  # a reading of the papers (compared with the 100-sample baseline), not a main row


# Budgets where the fixed baseline has plateaued at the paper's lr 0.001 (by the tables' plateau rule): PreResNet-20
# on 100 images reaches the published baseline's ~23 % near epoch 1,500 and is flat by 2,000; on 500 images a pilot
# seed is flat from about epoch 400 (33.5 % there, 33.0 % at 600); on 5,085 images a pilot seed's last tenth of 300
# epochs averages 0.6 points above the tenth before (60.7 % at 300): slow enough for the rule, though not flat (see
# edba.png). PreResNet-20, not the paper's PreResNet-56: three times cheaper per step, which is what makes these
# budgets affordable on 2 CPU cores.
SEEDS5, SEEDS3 = tuple(range(5)), tuple(range(3))
TUNED = ("--lr", "0.05", "--schedule", "cosine")
EDBA_ROWS = [
    Row("n100", "100 samples", 100, 2000, 50, SEEDS5),
    Row("n500", "500 samples (1 %)", 500, 600, 20, SEEDS5),
    Row("n5085", "5,085 samples (10 %)", 5085, 300, 4, SEEDS5),
    # The readings that could change the answer, each at the 100-sample budget.
    Row("n100-sum", "gradient metric: norm of the subset's summed gradient", 100, 2000, 50, SEEDS3, ("edba",),
        ("--grad-metric", "sum"), reading=True),
    Row("n100-uniform", "subsets: uniform_size instead of bernoulli", 100, 2000, 50, SEEDS3, ("edba",),
        ("--subset-mode", "uniform_size"), reading=True),
    Row("n100-reuse", "--reuse-forward (one forward per step)", 100, 2000, 50, SEEDS3, ("edba",),
        ("--reuse-forward",), reading=True),
    Row("n100-lr05", "tuned optimizer: lr 0.05, cosine", 100, 2000, 50, SEEDS3, ("fixed", "edba"), TUNED, TUNED,
        reading=True),
    Row("n100-share", "batch-size rule: chosen subset's share (moves under the paper's optimizer)", 100, 2000, 50,
        SEEDS3, ("edba",), ("--bs-rule", "share"), reading=True),
    # Protocol readings: the training subset redrawn from the whole pool (5,085 images), as the authors' template
    # would (dynbatch.train.redraw). Not features.
    Row("n100-redraw-resize", "PROTOCOL: subset redrawn where the batch size changed (share rule)", 100, 2000, 50,
        SEEDS3, ("edba",), ("--bs-rule", "share", "--redraw-subset", "on-resize"), reading=True),
    Row("n100-redraw-epoch", "PROTOCOL: subset redrawn every epoch (upper bound)", 100, 2000, 50, SEEDS3,
        ("fixed", "edba"), ("--redraw-subset", "every-epoch"), ("--redraw-subset", "every-epoch"), reading=True),
]


def edba_runs(budget: str):
    smoke = budget == "smoke"
    # Seeds outermost within a row so that a partial session finishes whole (baseline, EDBA) pairs first.
    for row in EDBA_ROWS:
        epochs, every, seeds = (2, 1, (0,)) if smoke else (row.epochs, row.every, row.seeds)
        for seed in seeds:
            for method in row.methods:
                extra = row.extra if method == "edba" else row.extra_fixed
                args = ["--policy", method, "--model", "preresnet20", "--train-samples", str(row.n), "--epochs",
                        str(epochs), "--eval-every", str(every), "--seed", str(seed), *EDBA_OPT, *extra]
                yield f"{row.key}-{method}-s{seed}", args, {"row": row, "method": method, "seed": seed,
                                                            "epochs": epochs}


# Split and AdaBatch: PreResNet-20 on all 5,085 images, where the fixed baseline clearly learns (the AlexNet rows of
# the first reproduction stayed at the class prior), 3 seeds each. fp32, contiguous, as the EDBA rows.
SPLIT_EPOCHS, ADABATCH_EPOCHS, ADABATCH_EVERY = 30, 30, 5
PINNED = ["--amp", "none", "--channels-last", "off", "--eval-every", "2"]


def split_runs(budget: str):
    smoke = budget == "smoke"
    epochs = 1 if smoke else SPLIT_EPOCHS
    common = ["--model", "preresnet20", "--epochs", str(epochs), "--lr", "0.05", "--momentum", "0.9",
              "--weight-decay", "5e-4", "--schedule", "cosine", *PINNED]
    for seed in range(1 if smoke else 3):
        meta = {"epochs": epochs, "seed": seed}
        yield f"fixed-s{seed}", ["--policy", "fixed", "--batch-size", "256", "--seed", str(seed), *common], \
            {**meta, "method": "fixed"}
        for crit in ("min", "max", "random"):
            yield f"{crit}-s{seed}", ["--policy", "split", "--base-batch", "256", "--criterion", crit, "--seed",
                                      str(seed), *common], {**meta, "method": crit}


def adabatch_runs(budget: str):
    """Batch 64 doubled every 5 epochs (five resizes: 64 -> 2048) with the lr x0.75 each time, against a fixed batch
    of 64 whose step schedule cuts the lr at the same epochs by the same 0.375 (AdaBatch's 2 x 0.75 = 1.5 in the
    lr/batch ratio: the paper's comparison)."""
    smoke = budget == "smoke"
    epochs, every = (2, 1) if smoke else (ADABATCH_EPOCHS, ADABATCH_EVERY)
    common = ["--model", "preresnet20", "--epochs", str(epochs), "--lr", "0.05", "--batch-size", "64", *PINNED]
    for seed in range(1 if smoke else 3):
        meta = {"epochs": epochs, "seed": seed}
        yield f"adabatch-s{seed}", ["--policy", "adabatch", "--resize-every", str(every), "--seed", str(seed),
                                    *common], {**meta, "method": "adabatch"}
        ms = ",".join(str(every * k) for k in range(1, epochs // every))
        yield f"fixed-s{seed}", ["--policy", "fixed", "--schedule", "step", "--milestones", ms, "--gamma", "0.375",
                                 "--seed", str(seed), *common], {**meta, "method": "fixed"}


def measure_noisy_cost(out: Path, epochs: int = 2) -> None:
    """Question 4 of the noisy study, apart from its crowded runs: each method's training seconds per epoch and its
    selection's share of them (the scoring forward, the op and its read: the steps' ``selection_s`` over their
    ``step_s``) at 40 % symmetric noise and the study's settings, with all the machine's threads, written to
    ``cost.json``. The last of ``epochs`` is measured (the first loads extensions and warms the allocator); a random
    control runs its method's selection, so it costs what its method does. Run it on a quiet machine:
    ``python bench/reproduce.py noisy --only none --cost`` (about 10 minutes on 2 cores)."""
    import tempfile

    methods = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, margs in noisy_methods(NOISES["sym40"]).items():
            if method.endswith("-control"):
                continue
            run = Path(tmp) / method
            args = [*NOISY_OPT, *margs, "--label-noise", NOISES["sym40"], "--epochs", str(epochs),
                    "--eval-every", str(epochs)]
            last = cost_run(run, args, method)[-1]
            steps = [r for r in rows_of(run, "step") if r["epoch"] == last["epoch"]]
            methods[method] = {"epoch_s": last["epoch_s"], "step_s": sum(r["step_s"] for r in steps),
                               "selection_s": sum(r.get("selection_s", 0.0) for r in steps), "steps": len(steps)}
            print(f"[noisy] cost of {method}: {last['epoch_s']:.1f} s an epoch", flush=True)
    write_cost(out / "cost.json", epochs, methods)


EXPERIMENTS = {"edba": edba_runs, "split": split_runs, "adabatch": adabatch_runs, "noisy": noisy_runs,
               "fast": fast_runs, "frontier": frontier_runs, "tune": tune_runs}


def execute(name: str, out: Path, budget: str, only: str) -> list[tuple[Path, dict]]:
    runs = []
    for run_name, args, meta in EXPERIMENTS[name](budget):
        run = out / run_name
        epochs = int(args[args.index("--epochs") + 1])
        if not fnmatch.fnmatch(run_name, only):
            if finished(run, epochs):
                thin(run)
            runs.append((run, meta))
            continue
        if finished(run, epochs):
            print(f"[{name}] {run_name}: done")
            thin(run)
        else:
            print(f"[{name}] {run_name}: {'resuming' if (run / 'checkpoint.pt').is_file() else 'starting'}",
                  flush=True)
            rc = train_scoring(run, args, meta.get("score_at", ()), STEPS_PER_EPOCH)
            if rc:  # e.g. another invocation is training this run (its lock): go on with the others
                print(f"[{name}] {run_name}: not finished (dynbatch exit {rc}); rerun to continue it", flush=True)
            elif finished(run, epochs):
                thin(run)
        runs.append((run, meta))
    return runs


VERDICT_RULE = ("Verdict rule (stated once, used for every claim): the 95 % interval of the difference in final test "
                "accuracy, the two methods paired by seed. " + verdicts.RULE + " A claimed gain is "
                "**reproduced** when the interval lies above 0 and reaches half the published gain, **refuted** "
                "when the whole interval lies below half the published gain, and **inconclusive** otherwise; "
                "rows with unfinished runs get no verdict.")


def _save_accuracy_plot(plt, fig, ax, xlabel: str, title: str, path: Path) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.legend()
    ax.set_title(title)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def difference(rs: list[Path], base: list[Path]) -> tuple[verdicts.Interval, tuple[float, float]]:
    """The paired 95 % interval of final accuracy of ``rs`` minus ``base`` (points), and the old rule's interval on
    the same runs (for the list of what changed)."""
    a, b = by_seed(rs, final_acc), by_seed(base, final_acc)
    return verdicts.compare(a, b, scale=100), verdicts.old_interval(a, b, scale=100)


def verdict(lo: float, hi: float, published_gain: float) -> str:
    half = published_gain / 2
    if lo > 0 and hi >= half:
        return "reproduced"
    if hi < half:
        return "refuted"
    return "inconclusive"


PLATEAU_RULE = ("Plateau check (why a budget suffices): the baseline's mean test accuracy over the last tenth of its "
                "evaluated epochs minus that over the tenth before, averaged over seeds; a baseline has plateaued "
                "when this change is within 1 point either way, and a verdict on a row whose baseline has not "
                "says so.")

# Split (cosine) and AdaBatch (step cuts) anneal the lr, which flattens any run's end whatever its budget.
ANNEALED = (" This schedule anneals the lr to near 0 by the last epoch, so a flat end shows that the schedule has run "
            "out, not that a longer budget could not score higher; the claim compares methods at one budget.")


def plateau_gain(runs: list[Path]) -> float:
    """Points of test accuracy gained from the second-last to the last tenth of the evaluated epochs (seed mean)."""
    gains = []
    for run in runs:
        acc = [r["test_acc"] for r in rows_of(run, "epoch") if r.get("test_acc") is not None]
        k = max(1, len(acc) // 10)
        gains.append(100 * (statistics.fmean(acc[-k:]) - statistics.fmean(acc[-2 * k:-k])))
    return statistics.fmean(gains)


def plateaued(runs: list[Path]) -> bool:
    return abs(plateau_gain(runs)) < 1


def plateau_note(who: str, runs: list[Path]) -> str:
    g = plateau_gain(runs)
    state = "plateaued" if abs(g) < 1 else "still climbing" if g > 0 else "falling"
    return f"- Plateau, {who}: last-tenth gain {g:+.1f} points ({state}; {len(runs)} seed(s))."


def qualified(verdict_txt: str, base: list[Path]) -> str:
    """A verdict whose baseline has not plateaued says so (the budget may still move the answer)."""
    return verdict_txt + ("" if not verdict_txt or plateaued(base) else " (baseline not plateaued)")


def done_runs(group) -> list[Path]:
    return [run for run, m in group if finished(run, m["epochs"])]


def epochs_to(run: Path, level: float) -> int | None:
    """First evaluated epoch (1-based) whose test accuracy reaches ``level`` (a fraction); None if none does."""
    return next((r["epoch"] + 1 for r in rows_of(run, "epoch") if (r.get("test_acc") or 0) >= level), None)


CONVERGENCE_RULE = ("EDBA's convergence claim (fewer epochs to converge) is judged on the 5,085-sample row: each run's "
                    "epochs to reach 95 % of the baseline's mean final accuracy (at the row's evaluation interval; a "
                    "run that never reaches it counts as its budget + 1, a lower bound), and the paired 95 % "
                    "interval of EDBA − baseline. **Reproduced** when the whole "
                    "interval is below 0, **refuted** when it is at or above 0, **inconclusive** otherwise.")


def convergence(base: list[Path], edba: list[Path], epochs: int, changes: verdicts.Changes) -> tuple[str, str]:
    """(finding, verdict) of the convergence claim; epochs are counted on the baseline's mean final accuracy."""
    level = 0.95 * statistics.fmean(final_acc(r) for r in base)
    reached = {who: by_seed(rs, lambda r: epochs_to(r, level)) for who, rs in (("baseline", base), ("EDBA", edba))}
    counted = {who: {s: e if e is not None else epochs + 1 for s, e in es.items()} for who, es in reached.items()}
    iv = verdicts.compare(counted["EDBA"], counted["baseline"])
    shown = {who: ", ".join(str(e) if e is not None else f">{epochs}" for e in es.values())
             for who, es in reached.items()}
    finding = (f"epochs to {100 * level:.1f} % (95 % of the baseline's final): baseline {shown['baseline']}; "
               f"EDBA {shown['EDBA']}; EDBA − baseline {iv.cell(0)} epochs ({iv.how})")
    rule = lambda lo, hi: "reproduced" if hi < 0 else "refuted" if lo >= 0 else "inconclusive"  # noqa: E731
    return finding, changes.judge("n5085: EDBA − baseline, epochs to converge", iv,
                                  verdicts.old_interval(counted["EDBA"], counted["baseline"]), rule)


def report_edba(runs, out: Path) -> list[str]:
    groups = defaultdict(list)
    for run, m in runs:
        groups[(m["row"].key, m["method"])].append((run, m))
    base100 = done_runs(groups[("n100", "fixed")])
    changes = verdicts.Changes()
    lines = ["Precision: fp32, contiguous (pinned). Model: PreResNet-20. Optimizer: SGD lr 0.001, Nesterov 0.9, "
             "weight decay 1e-5, batch 100, constant lr (the paper's), unless the row says otherwise. Test set: the "
             "subset's 1,017 real CIFAR-10 test images. Final = after the last epoch; best = the best evaluated "
             "epoch (selection on the test split, as the authors' template reports).", "", VERDICT_RULE, "",
             PLATEAU_RULE, "",
             "| row | method | seeds finished | final test acc | best test acc | "
             "EDBA − baseline (final), paired 95 % CI | "
             "published baseline → EDBA | verdict |", "|" + "---|" * 8]
    for row in EDBA_ROWS:
        planned = {meth: len(row.seeds) for meth in row.methods}
        done = {meth: done_runs(groups[(row.key, meth)]) for meth in row.methods}
        complete = all(len(done[mm]) == planned[mm] for mm in row.methods)
        base = done.get("fixed", base100 if row.reading else [])
        for meth in row.methods:
            rs = done[meth]
            diff = verdict_txt = pub = ""
            if meth == "edba":
                pub_pair = PUBLISHED_EDBA.get(row.n) if not row.reading else None
                pub = f"{pub_pair[0]} → {pub_pair[1]}" if pub_pair else ""
                if len(rs) >= 2 and len(base) >= 2:
                    iv, old = difference(rs, base)
                    diff = iv.cell() + ("" if "fixed" in row.methods else " (vs the 100-sample baseline)")
                    if pub_pair and complete:
                        gain = pub_pair[1] - pub_pair[0]
                        verdict_txt = qualified(changes.judge(f"{row.key}: EDBA − baseline", iv, old,
                                                              lambda lo, hi: verdict(lo, hi, gain)), base)
            label = f"{row.key}: {row.label}" if meth == row.methods[0] else ""
            lines.append(f"| {label} | {'baseline' if meth == 'fixed' else 'EDBA'} | {_status(rs, planned[meth])} | "
                         f"{sd_cell([final_acc(r) for r in rs])} | {sd_cell([best_acc(r) for r in rs])} | {diff} | "
                         f"{pub} | {verdict_txt or ('–' if not complete else '')} |")
    notes = ["", "Per-row notes (finished runs only):"]
    for row in EDBA_ROWS:
        for meth in row.methods:
            rs = done_runs(groups[(row.key, meth)])
            if not rs:
                continue
            if meth == "fixed":
                notes.append(plateau_note(f"{row.key} baseline", rs))
            if meth == "edba":
                st = [r for run in rs for r in rows_of(run, "step")]
                asked = sorted({r["policy_batch_size"] for r in st})
                got = sorted({r["batch_size"] for r in st})
                share = statistics.fmean(r["chosen_size"] / r["batch_size"] for r in st)
                first = [next((r["step"] for r in rows_of(run, "step") if r["policy_batch_size"] != 100), None)
                         for run in rs]
                notes.append(f"- {row.key} EDBA: batch sizes asked by the rule {asked[0]}..{asked[-1]} "
                             f"({len(asked)} distinct; first move at step {first} per run), trained "
                             f"{got[0]}..{got[-1]}"
                             + (f" (an epoch of {row.n} images caps it)" if asked[-1] > row.n else "") +
                             "; chosen subset "
                             f"{share:.2f} of the batch on average.")
            distinct = [rows_of(run, "epoch")[-1].get("distinct_train_images") for run in rs]
            if any(distinct):
                notes.append(f"- {row.key} {meth}: distinct training images used: "
                             f"{', '.join(str(d) for d in distinct)} (of a 5,085-image pool).")
    big = next(r for r in EDBA_ROWS if r.key == "n5085")
    b, e = done_runs(groups[(big.key, "fixed")]), done_runs(groups[(big.key, "edba")])
    planned = len(big.seeds)
    if len(b) == len(e) == planned:
        finding, claim = convergence(b, e, big.epochs, changes)
        finding += f" → **{claim}**"
    else:
        finding = f"no verdict yet ({len(b)} of {planned} baseline and {len(e)} of {planned} EDBA runs finished)"
    notes += ["", CONVERGENCE_RULE, f"- Convergence (5,085 samples): {finding}."]
    _edba_figure(groups, out)
    return lines + notes + [""] + changes.lines()


def _edba_figure(groups, out: Path) -> None:
    plt = pyplot()
    keys = [row for row in EDBA_ROWS if any(done_runs(groups[(row.key, m)]) for m in row.methods)]
    if not keys:
        return
    fig, axes = plt.subplots(2, len(keys), figsize=(4.5 * len(keys), 7.5), constrained_layout=True, squeeze=False)
    for col, row in enumerate(keys):
        ax = axes[0, col]
        for meth, colour in (("fixed", "tab:blue"), ("edba", "tab:red")):
            for i, run in enumerate(done_runs(groups[(row.key, meth)])):
                pts = [(r["epoch"] + 1, r["test_acc"]) for r in rows_of(run, "epoch") if r.get("test_acc") is not None]
                ax.plot(*zip(*pts), color=colour, alpha=0.6,
                        label=("baseline" if meth == "fixed" else "EDBA") if i == 0 else None)
        ax.set_title(f"{row.key}: test accuracy", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=8)
        ax = axes[1, col]
        for i, run in enumerate(done_runs(groups[(row.key, "edba")])):
            st = rows_of(run, "step")
            ax.plot([r["step"] for r in st], [r["policy_batch_size"] for r in st], color="tab:red", alpha=0.6,
                    label="asked by the batch-size rule" if i == 0 else None)
        ax.set_title(f"{row.key}: EDBA batch size (an epoch of {row.n} caps the trained batch)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("samples")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.savefig(out / "edba.png", dpi=70)
    plt.close(fig)


def interval_verdict(lo: float, hi: float, low: float, high: float) -> str:
    """A claim that the difference lies in [low, high] (points): reproduced when the 95 % interval does, refuted
    when it lies wholly outside, inconclusive otherwise."""
    if low <= lo and hi <= high:
        return "reproduced"
    if hi < low or lo > high:
        return "refuted"
    return "inconclusive"


def _status(done: list, planned: int) -> str:
    return f"{len(done)} of {planned}" + ("" if len(done) == planned else " (unfinished)")


def median_epoch(runs: list[Path]) -> float:
    """Seconds of the median epoch over all of ``runs`` (a paused or crowded epoch does not move it)."""
    return statistics.median(r["epoch_s"] for run in runs for r in rows_of(run, "epoch"))


def report_split(runs, out: Path) -> list[str]:
    changes = verdicts.Changes()
    groups = defaultdict(list)
    for run, m in runs:
        groups[m["method"]].append((run, m))
    done = {k: done_runs(v) for k, v in groups.items()}
    lines = ["Published finding under test: selection is equal to or slightly worse than a fixed batch, for both "
             "criteria; a selection epoch costs about 1.7x a fixed one. PreResNet-20 on all 5,085 images, lr 0.05 "
             f"cosine, base batch 256, {SPLIT_EPOCHS} epochs, fp32. " + VERDICT_RULE.split(" A claimed")[0] +
             " The claim holds (**reproduced**) when the interval of (criterion − fixed) lies within [−5, +1] "
             "points, is **refuted** when it lies wholly outside, and is **inconclusive** otherwise (a row gets a "
             "verdict when its runs and the fixed runs have all finished). Epoch time: the median epoch of the "
             "finished runs, "
             "which a paused or crowded epoch does not move.", "",
             "| criterion | seeds finished | final test acc | best test acc | − fixed (final), paired 95 % CI | "
             "epoch time / fixed | chosen 1 / 2 / 4 | verdict |", "|" + "---|" * 8]
    fixed = done.get("fixed", [])
    fixed_epoch = median_epoch(fixed) if fixed else None
    for method in ("fixed", "min", "max", "random"):
        rs = done.get(method, [])
        ratio = diff = verdict_txt = ""
        if rs and fixed_epoch:
            ratio = f"{median_epoch(rs) / fixed_epoch:.2f}×"
        if method != "fixed" and len(rs) >= 2 and len(fixed) >= 2:
            iv, old = difference(rs, fixed)
            diff = iv.cell()
            if len(rs) == len(groups[method]) and len(fixed) == len(groups["fixed"]) and method != "random":
                verdict_txt = qualified(changes.judge(f"split {method} − fixed", iv, old,
                                                      lambda lo, hi: interval_verdict(lo, hi, -5.0, 1.0)), fixed)
        picks = defaultdict(int)
        for run in rs:
            for r in rows_of(run, "step"):
                if r.get("chosen_split"):
                    picks[r["chosen_split"]] += 1
        total = sum(picks.values())
        share = " / ".join(f"{picks[k] / total:.2f}" for k in (1, 2, 4)) if total else "–"
        lines.append(f"| {method} | {_status(rs, len(groups[method]))} | {sd_cell([final_acc(r) for r in rs])} | "
                     f"{sd_cell([best_acc(r) for r in rs])} | {diff} | {ratio} | {share} | "
                     f"{verdict_txt or '–'} |")
    if fixed:
        lines += ["", PLATEAU_RULE + ANNEALED, plateau_note("fixed", fixed)]
    if any(done.values()):
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
        for method, colour in (("fixed", "k"), ("min", "tab:blue"), ("max", "tab:red"), ("random", "tab:gray")):
            for i, run in enumerate(done.get(method, [])):
                pts = [(r["epoch"] + 1, r["test_acc"]) for r in rows_of(run, "epoch") if r.get("test_acc") is not None]
                ax.plot(*zip(*pts), color=colour, alpha=0.7, label=method if i == 0 else None)
        _save_accuracy_plot(plt, fig, ax, "epoch", "Online batch-size selection, PreResNet-20, CIFAR-10 subset",
                            out / "split.png")
    return lines + [""] + changes.lines()


def report_adabatch(runs, out: Path) -> list[str]:
    changes = verdicts.Changes()
    groups = defaultdict(list)
    for run, m in runs:
        groups[m["method"]].append((run, m))
    done = {k: done_runs(v) for k, v in groups.items()}
    complete = all(len(done[k]) == len(groups[k]) for k in groups)
    lines = ["Published claim under test: AdaBatch's accuracy is within 1 % of fixed-batch training at the same "
             f"epochs. PreResNet-20 on all 5,085 images, {ADABATCH_EPOCHS} epochs, batch 64 doubled every "
             f"{ADABATCH_EVERY} epochs (five resizes) against a fixed batch of 64 with the same lr cuts, fp32. "
             + VERDICT_RULE.split(" A claimed")[0] + " The claim is **reproduced** when the interval of "
             "(AdaBatch − fixed) lies within [−1, +1] points, **refuted** when it lies wholly outside, "
             "**inconclusive** otherwise.", "",
             "| method | seeds finished | final test acc | best test acc | − fixed (final), paired 95 % CI | "
             "wall time | "
             "verdict |", "|" + "---|" * 7]
    fixed = done.get("fixed", [])
    for method in ("fixed", "adabatch"):
        rs = done.get(method, [])
        diff = verdict_txt = ""
        if method == "adabatch" and len(rs) >= 2 and len(fixed) >= 2:
            iv, old = difference(rs, fixed)
            diff = iv.cell()
            if complete:
                verdict_txt = qualified(changes.judge("AdaBatch − fixed", iv, old,
                                                      lambda lo, hi: interval_verdict(lo, hi, -1.0, 1.0)), fixed)
        wall_s = f"{statistics.fmean(wall(r) for r in rs):.0f} s" if rs else "–"
        lines.append(f"| {method} | {_status(rs, len(groups[method]))} | {sd_cell([final_acc(r) for r in rs])} | "
                     f"{sd_cell([best_acc(r) for r in rs])} | {diff} | {wall_s} | {verdict_txt or '–'} |")
    if fixed:
        lines += ["", PLATEAU_RULE + ANNEALED, plateau_note("fixed", fixed)]
    # The source of AdaBatch's speed-up: throughput at each batch size, measured on its own (measure_throughput),
    # since the runs' own timings include whatever shared the cores with them.
    tp = out / "throughput.json"
    if tp.is_file():
        t = json.loads(tp.read_text())
        rates = {int(b): v for b, v in t["samples_per_s"].items()}
        lines += ["", f"Training samples/s of PreResNet-20 by batch size (fp32, {t['threads']} threads, quiet "
                  "machine, `--throughput`): " + ", ".join(f"{b}: {v:,.0f} ({v / rates[64]:.2f}× batch 64)"
                                                           for b, v in sorted(rates.items())) + "."]
    if any(done.values()):
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
        for method, colour in (("fixed", "tab:blue"), ("adabatch", "tab:red")):
            for i, run in enumerate(done.get(method, [])):
                ep = [r for r in rows_of(run, "epoch") if r.get("test_acc") is not None]
                axes[0].plot([r["epoch"] + 1 for r in ep], [r["test_acc"] for r in ep], color=colour,
                             label=method if i == 0 else None)
                axes[1].plot([r["wall_s"] for r in ep], [r["test_acc"] for r in ep], color=colour,
                             label=method if i == 0 else None)
        axes[0].set_xlabel("epoch")
        axes[1].set_xlabel("wall time (s)")
        for ax in axes:
            ax.set_ylabel("test accuracy")
            ax.legend()
        fig.savefig(out / "adabatch.png", dpi=80)
        plt.close(fig)
    return lines + [""] + changes.lines()


THROUGHPUT_BATCHES = (64, 128, 256, 512, 1024, 2048)  # AdaBatch's batch sizes: 64 doubled five times


def measure_throughput(out: Path, steps: int = 3) -> None:
    """Training samples/s of PreResNet-20 (fp32, contiguous, SGD with momentum, random 32x32 images) at each of
    AdaBatch's batch sizes, with all of the machine's threads: the source of AdaBatch's speed-up, measured apart
    from the runs (which shared the cores with each other) and written to ``throughput.json``. Run it on a quiet
    machine: ``python bench/reproduce.py adabatch --only none --throughput``."""
    import torch
    import torch.nn.functional as F

    from dynbatch.models import build_model

    model = build_model("preresnet20", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rates = {}
    for batch in THROUGHPUT_BATCHES:
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        times = []
        for _ in range(steps + 1):  # the first step warms up
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        rates[batch] = batch / statistics.median(times[1:])
    (out / "throughput.json").write_text(json.dumps({"threads": torch.get_num_threads(), "samples_per_s": rates}))


def report_noisy(runs, out: Path) -> list[str]:
    """The noisy-label study's tables (filled in as its runs finish)."""
    from bench.noisy_report import report

    return report(runs, out)


FAST_RULE = ("Rules, stated before the runs. Accuracy: the claim \"the method raises the fast recipe's final test "
             "accuracy (plain, no TTA) by at least 1 point at equal epochs\" is **reproduced** when the paired 95 % "
             "interval of (method − fixed) lies above 0 and reaches +1, **refuted** when it lies wholly "
             "below +1, **inconclusive** otherwise. Time: each run's training seconds (evaluation excluded) to its "
             "first epoch at 95 % of the fixed runs' mean final accuracy; **faster** when the interval of (method − "
             "fixed) lies below 0, **slower** when above 0 or when a seed never gets there, **inconclusive** "
             "otherwise. Verdicts only for methods whose 3 seeds and fixed's have all finished. The runs' seconds "
             "were taken with up to two runs on the two cores, one thread each: a ranking, not a benchmark.")


def training_curve(run: Path) -> list[tuple[float, float | None]]:
    """(training seconds so far, the epochs' own with evaluation excluded; test accuracy) after each epoch."""
    t, curve = 0.0, []
    for r in rows_of(run, "epoch"):
        t += r["epoch_s"]
        curve.append((t, r.get("test_acc")))
    return curve


def time_to(run: Path, level: float) -> float | None:
    """Training seconds to the first epoch whose test accuracy reaches ``level``; None if none does."""
    return next((t for t, acc in training_curve(run) if (acc or 0) >= level), None)


def time_verdict(times: dict[int, float | None], base: dict[int, float | None],
                 changes: verdicts.Changes | None = None, method: str = "") -> tuple[str, str]:
    """(interval cell, verdict) of FAST_RULE's time claim from each seed's seconds to the level (None: never),
    paired by seed; the verdict is noted in ``changes`` when given."""
    if None in times.values():
        return "", "slower"
    if None in base.values():
        return "", "inconclusive"
    iv = verdicts.compare(times, base)
    rule = lambda lo, hi: "faster" if hi < 0 else "slower" if lo > 0 else "inconclusive"  # noqa: E731
    word = changes.judge(f"{method} − fixed, seconds to the level", iv, verdicts.old_interval(times, base), rule) \
        if changes is not None else rule(iv.lo, iv.hi)
    return iv.cell(0), word


def trained_share(runs: list[Path]) -> str:
    """Samples trained on over samples the loader drew, over all epochs of ``runs``."""
    eps = [rows_of(run, "epoch") for run in runs]
    seen = sum(ep[-1]["samples_seen"] for ep in eps)
    return f"{sum(r['trained_samples'] for ep in eps for r in ep) / seen:.2f}" if seen else "–"


def report_fast(runs, out: Path) -> list[str]:
    changes = verdicts.Changes()
    groups = defaultdict(list)
    for run, m in runs:
        groups[m["method"]].append((run, m))
    done = {k: done_runs(v) for k, v in groups.items()}
    fixed = done.get("fixed", [])
    level = 0.95 * statistics.fmean(final_acc(r) for r in fixed) if fixed else None
    lines = [f"The dynamic-batch methods on the fast recipe: `--recipe airbench94 --batch-size 128`, {FAST_EPOCHS} "
             "epochs, all 5,085 images, fp32, one thread a run. " + VERDICT_RULE.split(" A claimed")[0], "",
             FAST_RULE, "",
             "| method | seeds finished | final test acc | with TTA | − fixed (final), paired 95 % CI | verdict | "
             f"s to {100 * level:.1f} % | − fixed (s), paired 95 % CI | verdict | trained / loader samples |"
             if level else "| method | seeds finished | final test acc |", "|" + "---|" * (10 if level else 3)]
    for method in FAST_METHODS:
        rs, planned = done.get(method, []), len(groups[method])
        row = [method, _status(rs, planned), sd_cell([final_acc(r) for r in rs])]
        if level:
            tta = [rows_of(r, "epoch")[-1].get("test_acc_tta") for r in rs]
            row.append(sd_cell(tta) if rs and None not in tta else "–")
            complete = len(rs) == planned and len(fixed) == len(groups["fixed"])
            diff = acc_v = t_diff = t_v = ""
            times = by_seed(rs, lambda r: time_to(r, level))
            shown = ", ".join("never" if t is None else f"{t:.0f}" for t in times.values()) or "–"
            if method != "fixed" and len(rs) >= 2 and len(fixed) >= 2:
                iv, old = difference(rs, fixed)
                diff = iv.cell()
                t_diff, t_v = time_verdict(times, by_seed(fixed, lambda r: time_to(r, level)),
                                           changes if complete else None, method)
                acc_v = changes.judge(f"{method} − fixed, accuracy", iv, old,
                                      lambda lo, hi: verdict(lo, hi, 2.0)) if complete else ""
                t_v = t_v if complete else ""
            row += [diff, acc_v or "–", shown, t_diff, t_v or "–", trained_share(rs)]
        lines.append("| " + " | ".join(row) + " |")
    if any(done.values()):
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
        for i, method in enumerate(FAST_METHODS):
            for j, run in enumerate(done.get(method, [])):
                ax.plot(*zip(*training_curve(run)), color=f"C{i}", alpha=0.7, label=method if j == 0 else None)
        _save_accuracy_plot(plt, fig, ax, "training seconds (evaluation excluded; crowded runs)",
                            "Dynamic-batch methods on the airbench94 recipe, CIFAR-10 subset", out / "fast.png")
    return lines + [""] + changes.lines()


def machines_line(runs) -> str:
    """Which machines the runs name in their config.json, with how many runs each (pairing by machine is only
    possible where they name one)."""
    from collections import Counter

    named = Counter(machine_of(run) for run, _ in runs if (run / "config.json").is_file())
    shown = ", ".join(f"{name} ({count} runs)" for name, count in sorted(named.items()))
    note = (" `x86_64` is what runs recorded before they named their CPU model (2026-12-06): those runs' machine "
            "is not known, so their arms cannot be paired by machine." if "x86_64" in named else "")
    return f"Machines (`device.name` in each run's config.json): {shown or 'none yet'}." + note


REPORTS = {"edba": report_edba, "split": report_split, "adabatch": report_adabatch, "noisy": report_noisy,
           "fast": report_fast, "frontier": report_frontier, "tune": report_tune}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "repro"))
    ap.add_argument("--budget", choices=("full", "smoke"), default="full")
    ap.add_argument("--only", default="*", help="run only the runs whose name matches this glob (e.g. 'n100-*')")
    ap.add_argument("--throughput", action="store_true",
                    help="adabatch: first measure training samples/s at each batch size (quiet machine, ~1 min)")
    ap.add_argument("--cost", action="store_true",
                    help="noisy, frontier: first measure each method's seconds per epoch (and the noisy study's "
                         "selection share; quiet machine, ~10 min)")
    a = ap.parse_args(argv)
    if not DATA.is_file():
        print(f"reproduce: {DATA} not found; these experiments need the shared CIFAR-10 subset", file=sys.stderr)
        return 2
    for name in (EXPERIMENTS if a.experiment == "all" else [a.experiment]):
        out = Path(a.out) / name
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        if a.throughput and name == "adabatch":
            measure_throughput(out)
        if a.cost and name == "noisy":
            measure_noisy_cost(out)
        if a.cost and name == "frontier":
            measure_frontier_cost(out)
        runs = execute(name, out, a.budget, a.only)
        lines = [f"# {name}: reproduction on the CIFAR-10 subset", "",
                 f"Command: `python bench/reproduce.py {name}" + (" --budget smoke" if a.budget == "smoke" else "")
                 + "`; " + ("1,000 training images held out for validation (the test set unread)." if name == "tune"
                            else "1,017 real test images."), "", machines_line(runs), ""] + REPORTS[name](runs, out)
        (out / "table.md").write_text("\n".join(lines) + "\n")
        print(f"[{name}] wrote {out / 'table.md'} ({time.time() - t0:.0f} s this invocation)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
