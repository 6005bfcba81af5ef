"""The fast-recipe studies: the dynamic-batch methods on airbench94's recipe (#31) and fixed's compute frontier with
the selection policies judged against it (#47). Their runs' settings, methods, seeds and order, defined once for the
runner (``bench/reproduce.py fast|frontier``) and the reports."""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# airbench94's recipe at batch 128 (bench/fast_recipe.py's setting), all 5,085 images, fp32 pinned. In its decoupled
# hyperparameters a step on part of the batch (the selection methods, EDBA) takes its share of the rate; split's 1/k
# and AdaBatch's factors are on the step.
FAST_EPOCHS = 10
FAST_OPT = ["--recipe", "airbench94", "--batch-size", "128", "--amp", "none", "--eval-every", "1"]
FAST_METHODS = {
    "fixed": ["--policy", "fixed"],
    "adabatch": ["--policy", "adabatch", "--resize-every", "3"],  # 128 -> 1024 by epoch 9: the end grows
    "split": ["--policy", "split", "--base-batch", "128"],  # 1 x 128, 2 x 64, 4 x 32, by min loss
    "edba": ["--policy", "edba"],  # the recipe's optimizer (the tuned reading), from batch 128
    "importance": ["--policy", "importance"],
    "selective-backprop": ["--policy", "selective-backprop"],
    "small-loss": ["--policy", "small-loss"],
    "consensus": ["--policy", "consensus"],
}


def fast_runs(budget: str):
    smoke = budget == "smoke"
    epochs = 1 if smoke else FAST_EPOCHS
    for seed in range(1 if smoke else 3):  # seeds outermost: a partial session finishes whole seeds first
        for method, margs in FAST_METHODS.items():
            args = [*FAST_OPT, *margs, "--epochs", str(epochs), "--seed", str(seed)]
            yield f"{method}-s{seed}", args, {"method": method, "seed": seed, "epochs": epochs}


# Fixed's compute frontier (#47): the recipe at E epochs, each E its own fully annealed schedule (the triangle is
# stated in fractions of the run), 5 seeds paired with every method's seeds.
FRONTIER_EPOCHS = (4, 5, 6, 7, 8, 10)
FRONTIER_SEEDS = range(5)


# The two selection policies at the settings their validation tuning chose by TUNE_RULE (`tune/table.md`): the most
# accurate arm within 0.80x fixed's seconds, InfoBatch's r = 0.7 (0.78x) and the proxy's 50 % at 10 epochs with the
# 64/128/128 proxy (0.73x). "proxy-narrow" is the first round's choice (the 32/64/64 proxy, 0.65x), run on the test
# set before the second round added the proxy's width to the tuning; kept, as every run is.
SELECTION_METHODS = {
    "infobatch": ["--policy", "infobatch", "--ib-ratio", "0.7"],
    "proxy": ["--policy", "proxy", "--batch-size", "256", "--proxy-keep", "0.5", "--proxy-model",
              "airbench-proxy-wide"],
    "proxy-narrow": ["--policy", "proxy", "--batch-size", "256", "--proxy-keep", "0.5"],
}


# Seeds added where a verdict needs them: split and small-loss were inconclusive on the fast study's 3 seeds.
FRONTIER_ADDED_SEEDS = {"split": (3, 4), "small-loss": (3, 4)}


def frontier_runs(budget: str):
    smoke = budget == "smoke"
    for seed in range(1) if smoke else FRONTIER_SEEDS:
        for epochs in (1, 2) if smoke else FRONTIER_EPOCHS:
            args = [*FAST_OPT, "--policy", "fixed", "--epochs", str(epochs), "--seed", str(seed)]
            yield f"fixed-e{epochs}-s{seed}", args, {"method": "fixed", "seed": seed, "epochs": epochs}
        for method, margs in SELECTION_METHODS.items():
            epochs = 1 if smoke else FAST_EPOCHS
            args = [*FAST_OPT, *margs, "--epochs", str(epochs), "--seed", str(seed)]
            yield f"{method}-s{seed}", args, {"method": method, "seed": seed, "epochs": epochs}
    for method, seeds in {} if smoke else FRONTIER_ADDED_SEEDS.items():
        for seed in seeds:
            args = [*FAST_OPT, *FAST_METHODS[method], "--epochs", str(FAST_EPOCHS), "--seed", str(seed)]
            yield f"{method}-s{seed}", args, {"method": method, "seed": seed, "epochs": FAST_EPOCHS}


FRONTIER_RULE = (
    "Rule (stated before the selection runs): fixed's frontier is, seed by seed, its final test accuracy against its "
    "training seconds at E = 4, 5, 6, 7, 8 and 10 epochs, each E its own fully annealed schedule, linear between "
    "the points. A method's seconds are its runs' loader samples times its quiet-machine seconds per loader sample "
    "(`cost.json`). It **pays** when its accuracy minus the frontier's at its own seconds (paired by seed, Student's "
    "t, 95 %) lies above 0 *and* its mean accuracy reaches fixed's 10-epoch mean in fewer seconds than fixed's 10 "
    "epochs; it **costs** when that interval lies below 0; **inconclusive** otherwise. Past the frontier's last "
    "point the comparison is with fixed's 10 epochs (a longer fixed run could only score higher, so there a method "
    "can cost or be inconclusive, never pay); before its first point (4 epochs' seconds) no verdict. The target: "
    "fixed's 10-epoch accuracy in at most 0.80x its seconds.")


# Options that change what a run trains on, not what a loader sample costs: one cost measurement serves them all.
_COST_FREE = ("--epochs", "--ib-ratio", "--ib-delta")


def cost_key(margs: list[str]) -> str:
    """The settings a method's seconds per loader sample depend on, as one string (``cost.json``'s keys)."""
    kept = [a for i, a in enumerate(margs) if a not in _COST_FREE and (i == 0 or margs[i - 1] not in _COST_FREE)]
    return " ".join(kept)


def costed_settings() -> dict[str, list[str]]:
    """Every setting whose cost a verdict or the tuning's choice reads, by its cost key."""
    arms = [*FAST_METHODS.values(), *SELECTION_METHODS.values(), *TUNE_ARMS.values()]
    return {cost_key(a): a for a in arms}


def s_per_sample(out: Path) -> tuple[Callable[[list[str]], float | None], dict] | None:
    """(seconds per loader sample of a setting, or None if unmeasured; cost.json) from ``out / "cost.json"``."""
    path = out / "cost.json"
    if not path.is_file():
        return None
    cost = json.loads(path.read_text())
    return (lambda margs: cost["methods"].get(cost_key(margs), {}).get("s_per_sample")), cost


def measure_frontier_cost(out: Path, epochs: int = 2) -> None:
    """Each method's seconds per loader sample on a quiet machine (all its threads), the last of ``epochs`` epochs
    of its own settings measured (the first warms the allocator), written to ``cost.json``; settings it already
    holds are kept (delete it to measure everything again). Run it with nothing else running:
    ``python bench/reproduce.py frontier --only none --cost`` (about 10 minutes on 2 cores for all settings)."""
    import tempfile
    import time

    from bench.common import machine
    from bench.run_folders import cost_run, write_cost

    old = json.loads((out / "cost.json").read_text()) if (out / "cost.json").is_file() else {}
    if old and old["cpu"] != machine()["cpu"]:
        raise SystemExit(f"reproduce: cost.json was measured on {old['cpu']}; delete it to measure all here")
    methods = old.get("methods", {})
    with tempfile.TemporaryDirectory() as tmp:
        for i, (key, margs) in enumerate(costed_settings().items()):
            if key in methods:
                continue
            args = [*FAST_OPT, *margs, "--epochs", str(epochs), "--eval-every", str(epochs)]  # the last --epochs
            first, last = cost_run(Path(tmp) / str(i), args, f"`{key}`")[-2:]
            drawn = last["samples_seen"] - first["samples_seen"]
            methods[key] = {"epoch_s": last["epoch_s"], "loader_samples": drawn,
                            "s_per_sample": last["epoch_s"] / drawn, "measured": time.strftime("%Y-%m-%d %H:%M")}
            print(f"[frontier] cost of `{key}`: {1e3 * last['epoch_s'] / drawn:.2f} ms a loader sample", flush=True)
    write_cost(out / "cost.json", epochs, methods)


@dataclass
class Frontier:
    """Fixed's frontier, by seed: ``points[seed]`` = [(seconds, final accuracy), ...] in increasing seconds."""

    points: dict[int, list[tuple[float, float]]]

    def at(self, seed: int, seconds: float) -> tuple[float, str] | None:
        """(accuracy, where) of seed ``seed``'s frontier at ``seconds``: "on" it (interpolated), "beyond" (its last
        point's accuracy), or None before its first point."""
        pts = self.points.get(seed)
        if not pts or seconds < pts[0][0]:
            return None
        if seconds >= pts[-1][0]:
            return pts[-1][1], "beyond" if seconds > pts[-1][0] else "on"
        (t0, a0), (t1, a1) = next((p, q) for p, q in zip(pts, pts[1:]) if p[0] <= seconds <= q[0])
        return a0 + (a1 - a0) * (seconds - t0) / (t1 - t0), "on"


def _run_seconds(run: Path, s_per_sample: float) -> float:
    from bench.run_folders import rows_of

    return rows_of(run, "epoch")[-1]["samples_seen"] * s_per_sample


def judge_on_frontier(runs: list[Path], s_per_sample: float, frontier: Frontier, fixed10: dict[int, float],
                      t10: float) -> dict:
    """The frontier verdict of one method's finished ``runs`` (see FRONTIER_RULE): a dict of the table's cells."""
    from bench import verdicts
    from bench.run_folders import by_seed, final_acc, seed_of

    acc, secs = by_seed(runs, final_acc), {seed_of(r): _run_seconds(r, s_per_sample) for r in runs}
    there = {s: frontier.at(s, t) for s, t in secs.items()}
    diffs = {s: acc[s] - there[s][0] for s in acc if there[s] is not None}
    t_mean, a_mean = statistics.fmean(secs.values()), statistics.fmean(acc.values())
    cells = {"seconds": t_mean, "ratio": t_mean / t10, "acc": a_mean, "interval": None, "verdict": "–",
             "acc_sd": statistics.stdev(acc.values()) if len(acc) > 1 else 0.0,
             "reaches": a_mean >= statistics.fmean(fixed10.values())}
    if len(diffs) < 2:
        cells["verdict"] = "no verdict (fewer than 2 seeds at or past the frontier's first point)"
        return cells
    iv = verdicts.mean_interval(list(diffs.values()), 100, how="paired t")
    beyond = any(w == "beyond" for _, w in filter(None, there.values()))
    cells["interval"], cells["beyond"] = iv, beyond
    if iv.hi < 0:
        cells["verdict"] = "costs"
    elif iv.lo > 0 and cells["reaches"] and t_mean < t10 and not beyond:
        cells["verdict"] = "pays"
    else:
        cells["verdict"] = "inconclusive"
    return cells


def report_frontier(runs, out) -> list[str]:
    """Fixed's frontier and every method judged against it (FRONTIER_RULE), with the chart ``selection.png``."""
    from bench.run_folders import final_acc, finished, seed_of
    from bench.verdicts import RULE, sd_cell

    lines = ["Fixed's compute frontier: `--recipe airbench94 --batch-size 128`, fp32, all 5,085 images, one thread "
             "a run, two runs at a time on the 2 cores.", "",
             "| epochs | seeds finished | final test acc |", "|---|---|---|"]
    fixed = {e: [r for r, m in runs if m["method"] == "fixed" and m["epochs"] == e and finished(r, e)]
             for e in sorted({m["epochs"] for _, m in runs if m["method"] == "fixed"})}
    for epochs, rs in fixed.items():
        planned = sum(m["method"] == "fixed" and m["epochs"] == epochs for _, m in runs)
        lines.append(f"| {epochs} | {len(rs)} of {planned} | {sd_cell([final_acc(r) for r in rs]) if rs else '–'} |")
    measured = s_per_sample(out)
    if measured is None or FAST_EPOCHS not in fixed:
        return lines + ["", "No verdicts yet: they need `cost.json` (`python bench/reproduce.py frontier --only none "
                        "--cost`, on a quiet machine) and fixed's 10-epoch runs."]
    cost_of, cost = measured
    per = {m: cost_of(margs) for m, margs in {**FAST_METHODS, **SELECTION_METHODS}.items()}
    frontier = Frontier({})
    for epochs, rs in fixed.items():
        for r in rs:
            frontier.points.setdefault(seed_of(r), []).append((_run_seconds(r, per["fixed"]), final_acc(r)))
    fixed10 = {seed_of(r): final_acc(r) for r in fixed[FAST_EPOCHS]}
    t10 = _run_seconds(fixed[FAST_EPOCHS][0], per["fixed"])
    lines += ["", f"Seconds: quiet-machine cost ({cost['cpu']}, {cost['threads']} threads, `cost.json`): fixed "
              f"{1e3 * per['fixed']:.2f} ms a loader sample, so its 10 epochs take {t10:.0f} s.", "",
              FRONTIER_RULE + " " + RULE, "",
              "The seven methods' runs in `fast/` (3 seeds, their settings unchanged) were recorded before runs named "
              "their CPU model, so they pair with the frontier by seed but not by machine (fixed's own 10-epoch runs "
              "there and here differ by -0.3, -1.3 and +0.1 points on seeds 0-2); the seeds added here, the frontier "
              "and the two new policies ran on this machine, and every method's seconds were measured here. AdaBatch's "
              "and EDBA's cost per sample is measured on their first epochs (batch 128, and EDBA's first sizes); both "
              "change batch size later.", "",
              "| method | runs | seeds | seconds (x fixed-10) | final test acc | − frontier at its seconds, "
              "paired 95 % CI | reaches fixed-10's acc | verdict |", "|---|---|---|---|---|---|---|---|"]
    judged = {}
    for method, rs, where in _judged_arms(runs, out):
        if per.get(method) is None or not rs:
            lines.append(f"| {method} | {where} | 0 | – | – | – | – | no runs or no cost yet |")
            continue
        c = judged[method] = judge_on_frontier(rs, per[method], frontier, fixed10, t10)
        iv = c["interval"].cell() + (" (beyond)" if c.get("beyond") else "") if c["interval"] else "–"
        lines.append(f"| {method} | {where} | {len(rs)} | {c['seconds']:.0f} ({c['ratio']:.2f}x) | "
                     f"{sd_cell([final_acc(r) for r in rs])} | {iv} | {'yes' if c['reaches'] else 'no'} | "
                     f"{c['verdict']} |")
    _frontier_chart(frontier, judged, (0.8 * t10, statistics.fmean(fixed10.values())), out / "selection.png")
    return lines


def _judged_arms(runs, out: Path):
    """(method, its finished runs, where they are) for every method on the chart: the seven of the fast study from
    its runs (settings unchanged), the two selection policies from this experiment's."""
    from bench.run_folders import finished

    fast = out.parent / "fast"
    for method in FAST_METHODS:
        if method == "fixed":
            continue
        rs = [r for r in (fast / f"{method}-s{seed}" for seed in range(3)) if finished(r, FAST_EPOCHS)]
        added = [r for r, m in runs if m["method"] == method and finished(r, m["epochs"])]
        yield method, rs + added, "`fast/`" + (f" + {len(added)} here" if added else "")
    for method in SELECTION_METHODS:
        yield method, [r for r, m in runs if m["method"] == method and finished(r, m["epochs"])], "here"


def _frontier_chart(frontier: Frontier, judged: dict, target: tuple[float, float], path: Path) -> None:
    """The frontier shaded, each method a point (mean seconds, mean accuracy ± sd), the target's corner dotted:
    ``target`` = (0.80x fixed-10's seconds, fixed-10's mean accuracy)."""
    from bench.run_folders import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    by_t = defaultdict(list)
    for pts in frontier.points.values():
        for i, (t, a) in enumerate(pts):
            by_t[i].append((t, 100 * a))
    ts = [statistics.fmean(t for t, _ in v) for v in by_t.values()]
    mean = [statistics.fmean(a for _, a in v) for v in by_t.values()]
    sd = [statistics.stdev(a for _, a in v) if len(v) > 1 else 0 for v in by_t.values()]
    ax.fill_between(ts, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color="0.85",
                    label="fixed's frontier (mean ± sd over seeds)")
    ax.plot(ts, mean, "k.-")
    for i, (method, c) in enumerate(judged.items()):
        ax.errorbar(c["seconds"], 100 * c["acc"], yerr=100 * c["acc_sd"], fmt="o", color=f"C{i}", capsize=3,
                    label=f"{method}: {c['verdict']}")
    ax.axvline(target[0], color="0.4", ls=":")
    ax.axhline(100 * target[1], color="0.4", ls=":", label="target: fixed-10's accuracy in ≤ 0.80x its seconds")
    ax.set_xlabel("training seconds (quiet-machine cost x loader samples)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("Every method against fixed's compute frontier, airbench94 recipe, CIFAR-10 subset")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# Tuning of the new policies (#47), on a validation split of 1,000 training images (--validation: one fixed draw,
# the test set never read), 2 seeds, the recipe's 10 epochs: each arm's validation accuracy and its seconds.
TUNE_VALIDATION = 1000
TUNE_SEEDS = range(2)
TUNE_ARMS = {
    "fixed": ["--policy", "fixed"],
    "infobatch-r0.3": ["--policy", "infobatch", "--ib-ratio", "0.3"],
    "infobatch-r0.5": ["--policy", "infobatch", "--ib-ratio", "0.5"],  # the paper's setting
    "infobatch-r0.7": ["--policy", "infobatch", "--ib-ratio", "0.7"],
    # The proxy's loader batch is 128 / keep, so that the main network steps on 128 as fixed does (the recipe's rate
    # for 128 samples), fewer times an epoch; more epochs buy back the steps.
    "proxy-k0.5": ["--policy", "proxy", "--batch-size", "256", "--proxy-keep", "0.5"],
    "proxy-k0.5-e14": ["--policy", "proxy", "--batch-size", "256", "--proxy-keep", "0.5", "--epochs", "14"],
    "proxy-k0.7": ["--policy", "proxy", "--batch-size", "183", "--proxy-keep", "0.7"],
    # Added after the first round (the choice rule unchanged): the annealing share and the proxy's width.
    "infobatch-r0.7-d0.25": ["--policy", "infobatch", "--ib-ratio", "0.7", "--ib-delta", "0.25"],
    "proxy-k0.5-wide": ["--policy", "proxy", "--batch-size", "256", "--proxy-keep", "0.5", "--proxy-model",
                        "airbench-proxy-wide"],
}


TUNE_RULE = ("Choice (written while the tuning ran: after the fixed and r = 0.3 arms had finished, before any other "
             "arm and before any run on the test set): for each policy, the arm with the highest mean validation "
             "accuracy among those whose training seconds are at most 0.80x fixed's (the target), else the most "
             "accurate; "
             "seconds are the runs' loader samples times the quiet-machine cost per loader sample of the arm's "
             "settings (`frontier/cost.json`).")


def tune_runs(budget: str):
    smoke = budget == "smoke"
    epochs = 1 if smoke else FAST_EPOCHS
    for seed in range(1) if smoke else TUNE_SEEDS:
        for arm, margs in TUNE_ARMS.items():
            e = epochs if smoke or "--epochs" not in margs else int(margs[margs.index("--epochs") + 1])
            args = [*FAST_OPT, *margs, "--validation", str(TUNE_VALIDATION), "--epochs", str(e), "--seed", str(seed)]
            yield f"{arm}-s{seed}", args, {"method": arm, "seed": seed, "epochs": e}


def report_tune(runs, out) -> list[str]:
    """Validation accuracy and training seconds per arm (the test set is not read by these runs)."""
    from bench.run_folders import final_acc, finished
    from bench.verdicts import sd_cell

    lines = [f"Validation: {TUNE_VALIDATION} training images held out (`--validation`); accuracy on them, not on "
             "the test set. " + TUNE_RULE + " The last two arms are a second round, added after the first round's "
             "choices had run on the test set, to tune the two settings the first left at the papers' values "
             "(InfoBatch's annealing share, the proxy's width); the rule was not changed, and it moved the proxy's "
             "choice to the wider proxy.", "",
             "| arm | seeds | final validation acc | training seconds / fixed's (quiet-machine cost) |",
             "|---|---|---|---|"]
    measured = s_per_sample(out.parent / "frontier")
    cost_of = measured[0] if measured else (lambda margs: None)
    done = {arm: [r for r, m in runs if m["method"] == arm and finished(r, m["epochs"])] for arm in TUNE_ARMS}

    def seconds(arm: str) -> float | None:
        each = cost_of(TUNE_ARMS[arm])
        return statistics.fmean(_run_seconds(r, each) for r in done[arm]) if done[arm] and each else None

    t_fixed = seconds("fixed")
    for arm, rs in done.items():
        t = seconds(arm)
        lines.append(f"| {arm} | {len(rs)} | {sd_cell([final_acc(r) for r in rs])} | "
                     f"{f'{t / t_fixed:.2f}' if t and t_fixed else '–'} |")
    return lines
