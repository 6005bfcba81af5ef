"""Does the engine's fixed arm train worse than a plain loop? (issue #46) ``dynbatch train --policy fixed`` with the
noisy study's settings at 40 % symmetric noise against ``bench/plain_noisy.py`` (no dynbatch code in its training
path), paired by seed, on the same noise draws, on one machine, in fp32, and again with both arms under bf16
autocast (``enginebf16``, ``plainbf16``; on a bf16-native CPU, ``--only '*bf16-s*'``). Then the cause: ``replica`` is
the plain loop drawing, preparing and stepping as the engine does (``--as-engine --fused``), and seeds 5–9 replicate
engine − plain on new seeds. Each rule is written below as it was stated before its runs.

    python bench/baseline_question.py [--only GLOB[,GLOB...]] [--seeds 10] [--out bench/results/baseline-question]

The noise draw of seed S is the study's own (``dynbatch.data.noise.corrupt_labels``, exported here before training
as ``labels-sS.npy``); the engine arm reads it back with ``--label-noise file:labels-sS.npy``, so both arms train on
identical labels. The engine arm stops at the ends of epochs 2, 5, 10 and 20 to score its training samples
(``dynbatch score``: question 1 of the study, with the feature norm's AUROC), which exact resume leaves unchanged.
Runs alternate engine, plain within a seed and go one seed at a time, so that two invocations with
``--only '*-s[024]'`` and ``--only '*-s[13]'`` finish whole pairs first; an engine run resumes, a plain run that was
stopped starts again. ``table.md`` is written from whatever has finished.
"""
from __future__ import annotations

import argparse
import fcntl
import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.noisy_study import NOISES, NOISY_EPOCHS, NOISY_OPT, SCORE_AT, STEPS_PER_EPOCH  # noqa: E402
from bench.run_folders import (DATA, aurocs, final_acc, finished, machine_of, rows_of,  # noqa: E402
                               thin, train_run, train_scoring)

OUT = REPO / "bench" / "results" / "baseline-question"
STUDY = REPO / "bench" / "results" / "repro" / "noisy"
NOISE = NOISES["sym40"]
# The plain arms: bench/plain_noisy.py's arguments. "plain" pads the normalised images with zeros (the mean colour);
# "plainblack" pads the raw images with zeros (black), as dynbatch's --pad-mode zero and torchvision's RandomCrop do;
# "plainbf16" is "plain" under bf16 autocast; "replica" draws, prepares and steps as the engine does; "replicaforeach"
# is the replica stepping with torch's default for-each SGD, which rounds apart from the engine's fused one.
PLAIN_ARMS = {"plain": [], "plainblack": ["--pad", "black"], "plainbf16": ["--bf16"],
              "replica": ["--as-engine", "--fused"], "replicaforeach": ["--as-engine"]}
# The engine arms: their --amp (the noisy study's is none: fp32).
ENGINE_ARMS = {"engine": "none", "enginebf16": "bf16"}
RULE = ("Rule, stated before the runs: per seed, engine − plain final test accuracy (fp32, one thread each, one "
        "machine, the same noise draw); the engine trains **worse** (\"lower\") when the 95 % interval of the mean "
        "difference lies below 0, **better** (\"higher\") when above, and **no difference found** otherwise (the "
        "interval's width says how small a difference that rules out).")
BF16_RULE = ("The bf16 pair, stated before its runs: the same question under bf16 autocast in both arms (the engine's "
             "`--amp bf16`, the plain loop's `--bf16`) on this bf16-native CPU (AMX-bf16), the same seeds, noise draws, "
             "rule and intervals; enginebf16 − engine says what bf16 itself changes in the engine.")
PADDING_RULE = ("The padding hypothesis, stated after the first five pairs and before the plainblack runs: the "
                "engine pads its crops with black (zeros of the raw images), the plain loop with the mean colour "
                "(zeros of the normalised images). The padding explains the gap when plainblack − plain lies below 0 "
                "and engine − plainblack holds 0; the same rule and intervals as above.")
REPLICA_RULE = ("The replica, stated before its runs: `bench/plain_noisy.py --as-engine --fused` is the plain loop "
                "drawing from the engine's streams (initial weights after `torch.manual_seed(seed)`, each epoch's "
                "order from a generator of seed + 1 alone, crops and flips from one of seed + 2), padding with black, "
                "normalising each batch after cropping, setting the cosine by the epoch's fraction of samples and "
                "stepping with torch's fused SGD, as the engine does. If its test accuracy after every epoch equals "
                "the engine arm's on every seed, the engine's fixed arm *is* that plain loop, and engine − plain is "
                "a difference between two plain loops: their random streams, the padding colour, the schedule's "
                "clock (at most 0.007 epoch apart) and the SGD kernel's rounding, nothing in the engine's step. "
                "(Amended before its runs: its first runs, without `--fused`, are kept as replicaforeach. They left "
                "the engine's weights at step 5 of seed 0 by one unit in the last place of `fc.bias` — torch's "
                "fused and for-each SGD round apart now and then — and followed their own trajectories from there.)")
REPLICATION_RULE = ("The replication, stated before its runs: new seeds 5–9 (their own noise draws), engine and plain "
                    "only, this machine model, the question's rule on those five alone. The fp32 finding (engine "
                    "lower) replicates when their interval lies below 0 again. When it does not, the first five "
                    "seeds' finding stands unreplicated and the question is answered by the ten seeds' paired "
                    "interval, reported beside: lower, higher or no difference found, by the same rule.")
QUESTION_SEEDS, REPLICATION_SEEDS = range(5), range(5, 10)


def export_labels(out: Path, seed: int) -> Path:
    """The study's noisy training labels of ``seed`` as ``labels-s<seed>.npy`` (written once)."""
    import numpy as np

    from dynbatch.data.noise import corrupt_labels, parse_label_noise

    path = out / f"labels-s{seed}.npy"
    if not path.is_file():
        with np.load(DATA) as z:
            y = z["y_train"].astype(np.int64)
        np.save(path, corrupt_labels(y, parse_label_noise(NOISE), 10, seed).astype(np.uint8))
    return path


def runs(out: Path, seeds: int):
    """(name, kind, seed) in the order they run, seed by seed: every arm on the question's seeds, engine and plain
    on the replication's."""
    every = ("engine", "plain", "plainblack", "enginebf16", "plainbf16", "replica", "replicaforeach")
    for seed in range(seeds):
        for kind in every if seed in QUESTION_SEEDS else ("engine", "plain"):
            yield f"{kind}-s{seed}", kind, seed


def run_one(out: Path, name: str, kind: str, seed: int) -> None:
    labels = export_labels(out, seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kind in ENGINE_ARMS:
        run = out / name
        if finished(run, NOISY_EPOCHS):
            return
        opt = [ENGINE_ARMS[kind] if prev == "--amp" else a for prev, a in zip([None, *NOISY_OPT], NOISY_OPT)]
        args = [*opt, "--policy", "fixed", "--epochs", str(NOISY_EPOCHS), "--seed", str(seed),
                "--label-noise", f"file:{labels}"]
        # the fp32 engine stops to score its samples (the noise signal below); the bf16 one only trains
        rc = (train_scoring(run, args, SCORE_AT, STEPS_PER_EPOCH, env) if kind == "engine"
              else train_run(run, args, env=env))
        if rc == 0 and finished(run, NOISY_EPOCHS):
            thin(run)
        return
    result = out / f"{name}.json"
    if result.is_file():
        return
    with open(out / f".{name}.lock", "w") as lock:
        try:  # another invocation running the same plain run: leave it to that one (the kernel frees a dead one's)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[baseline] {name}: running in another invocation", flush=True)
            return
        plain(out, name, seed, labels, env, PLAIN_ARMS[kind])


def plain(out: Path, name: str, seed: int, labels: Path, env: dict, options: list[str]) -> None:
    """``bench/plain_noisy.py`` for ``seed``, its result written as ``<name>.json`` with the machine's CPU."""
    result = out / f"{name}.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "plain_noisy.py"), "--data", str(DATA), "--labels",
                    str(labels), "--seed", str(seed), "--epochs", str(NOISY_EPOCHS), "--json", str(result) + ".part",
                    *options], env=env, stdout=subprocess.DEVNULL, check=True)
    from dynbatch.info import cpu_name

    done = json.loads(Path(str(result) + ".part").read_text())
    result.write_text(json.dumps({**done, "cpu": cpu_name()}, indent=1))
    Path(str(result) + ".part").unlink()


def pairs(out: Path, seeds: int) -> dict[str, dict[int, float]]:
    """Final test accuracy (fractions) by arm and seed, of the finished runs; the study's own fixed arm beside."""
    arms = {kind: {} for kind in (*ENGINE_ARMS, *PLAIN_ARMS, "study")}
    for seed in range(seeds):
        for kind in ENGINE_ARMS:
            if finished(out / f"{kind}-s{seed}", NOISY_EPOCHS):
                arms[kind][seed] = final_acc(out / f"{kind}-s{seed}")
        for kind in PLAIN_ARMS:
            if (out / f"{kind}-s{seed}.json").is_file():
                arms[kind][seed] = json.loads((out / f"{kind}-s{seed}.json").read_text())["final_acc"]
        if finished(STUDY / f"sym40-fixed-s{seed}", NOISY_EPOCHS):
            arms["study"][seed] = final_acc(STUDY / f"sym40-fixed-s{seed}")
    return arms


def machines(out: Path, seeds: int) -> str:
    names = {machine_of(out / f"{k}-s{s}") for k in ENGINE_ARMS for s in range(seeds) if (out / f"{k}-s{s}").is_dir()}
    names |= {json.loads(p.read_text()).get("cpu", "unknown") for p in out.glob("plain*-s*.json")}
    return ", ".join(sorted(names)) or "–"


COMPARISONS = [("engine", "plain", "engine − plain (the question)"),
               ("engine", "study", "engine here − the study's fixed arm (same seed and draw, its machine)"),
               ("plainblack", "plain", "plainblack − plain (the padding, in the plain loop)"),
               ("engine", "plainblack", "engine − plainblack (what is left)"),
               ("enginebf16", "plainbf16", "engine − plain, both in bf16 autocast"),
               ("enginebf16", "engine", "enginebf16 − engine (bf16 itself, in the engine)")]


def verdict_rows(arms: dict, comparisons, seeds) -> list[str]:
    """Rows of the verdict table: each comparison over the seeds of ``seeds`` the two arms share."""
    from bench import verdicts

    lines = []
    for a, b, what in comparisons:
        c = verdicts.compare(*({s: v for s, v in arms[k].items() if s in seeds} for k in (a, b)), scale=100)
        if c is None:
            lines.append(f"| {what} | – | – | – | not enough seeds yet |")
            continue
        word = {"below": "lower", "above": "higher", "straddles": "no difference found"}[c.side(0.0)]
        lines.append(f"| {what} | {c.cell()} | {c.how} | {c.n} | {word} |")
    return lines


def against_engine(out: Path, name: str, seed: int) -> str | None:
    """Whether plain run ``name``'s test accuracy equals the engine arm's after every epoch of ``seed``, else the
    first epoch where it differs; None while either run is missing."""
    result, run = out / f"{name}-s{seed}.json", out / f"engine-s{seed}"
    if not (result.is_file() and finished(run, NOISY_EPOCHS)):
        return None
    pairs = zip(json.loads(result.read_text())["epochs"], rows_of(run, "epoch"))
    differ = [r["epoch"] for r, e in pairs if r["test_acc"] != e["test_acc"]]
    return f"equal after all {NOISY_EPOCHS} epochs" if not differ else f"first differs after epoch {differ[0] + 1}"


def replica_rows(out: Path, arms: dict, seeds: int) -> list[str]:
    """The replica section: each seed's replica and for-each replica against the engine, and what the for-each
    kernel's rounding alone does to the final accuracy."""
    from bench import verdicts

    lines = []
    for seed in range(seeds):
        cells = [against_engine(out, name, seed) for name in ("replica", "replicaforeach")]
        if any(cells):
            lines.append(f"| {seed} | " + " | ".join(c or "–" for c in cells) + " |")
    if not lines:
        return []
    return ["## The replica: the engine's fixed arm as a plain loop", "", REPLICA_RULE, "",
            "| seed | replica's test accuracy against the engine's | replicaforeach's |", "|---|---|---|", *lines,
            "", verdicts.TABLE_HEADER, verdicts.TABLE_RULE,
            *verdict_rows(arms, [("engine", "replicaforeach", "engine − replicaforeach (the SGD kernel's rounding "
                                 "alone)")], range(seeds)), ""]


def table(out: Path, seeds: int) -> list[str]:
    from bench import verdicts

    arms = pairs(out, seeds)
    shown = ("engine", "plain", "plainblack", "study", "enginebf16", "plainbf16", "replica")
    lines = ["# Does the engine's fixed arm train worse than a plain loop?", "",
             "Command: `python bench/baseline_question.py`; PreResNet-20 on the 5,085 real CIFAR-10 images, the "
             "noisy study's fixed arm at 40 % symmetric noise (SGD 0.05 / 0.9 / 5e-4, cosine per step, batch 128, "
             f"crop + flip, {NOISY_EPOCHS} epochs, fp32 but in the bf16 arms), 1,017 clean test images. Machine: "
             f"{machines(out, seeds)}. Arms: engine (`dynbatch train --policy fixed`), plain (`bench/plain_noisy.py`, "
             "crops padded with the mean colour), plainblack (the same loop, padded with black as the engine pads), "
             "study (the noisy study's committed fixed arm: the same seed and noise draw, run on the machine it ran "
             "on), enginebf16 and plainbf16 (engine and plain under bf16 autocast), replica (`bench/plain_noisy.py "
             "--as-engine`).", "", RULE, "", PADDING_RULE, "", BF16_RULE, "",
             "| seed | " + " | ".join(f"{k} final %" for k in shown) + " |", "|---|" + "---|" * len(shown)]
    for seed in range(seeds):
        if any(seed in arms[k] for k in shown):
            cells = [f"{100 * arms[k][seed]:.1f}" if seed in arms[k] else "–" for k in shown]
            lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += ["", "Seeds 0–4, as the rules above were stated:", "", verdicts.TABLE_HEADER, verdicts.TABLE_RULE,
              *verdict_rows(arms, COMPARISONS, QUESTION_SEEDS), "", verdicts.RULE, ""]
    lines += replica_rows(out, arms, seeds)
    if all(s in arms["engine"] and s in arms["plain"] for s in REPLICATION_SEEDS):
        lines += ["## The replication on new seeds", "", REPLICATION_RULE, "", verdicts.TABLE_HEADER,
                  verdicts.TABLE_RULE,
                  *verdict_rows(arms, [("engine", "plain", "engine − plain, seeds 5–9 (the replication)")],
                                REPLICATION_SEEDS),
                  *verdict_rows(arms, [("engine", "plain", "engine − plain, seeds 0–9 (the ten)")], range(seeds)), ""]
    elif any(s in arms["engine"] or s in arms["plain"] for s in REPLICATION_SEEDS):
        lines += ["## The replication on new seeds", "", REPLICATION_RULE, "",
                  "Not every run of seeds 5–9 has finished: no verdict yet.", ""]
    return lines + signal(out, seeds)


def signal(out: Path, seeds: int) -> list[str]:
    """Question 1 of the noisy study again, on the engine arm's scores: each score's AUROC for the mislabeled
    samples at each scored epoch, with the feature norm ‖a‖ = ‖g‖ / ‖e‖ that the study's own scores lack."""
    from bench import verdicts

    table = {}  # (epoch, score) -> {seed: AUROC}
    for seed in range(seeds):
        for key, value in aurocs(out / f"engine-s{seed}", SCORE_AT, STEPS_PER_EPOCH).items():
            table.setdefault(key, {})[seed] = value
    if not table:
        return []
    scores = ["loss", "residual_norm", "grad_norm", "feature_norm"]
    lines = ["## The noise signal of each score, with the feature norm", "",
             "The engine arm's training samples scored at the ends of epochs 2, 5, 10 and 20 (`dynbatch score`): "
             "each score's AUROC for the mislabeled samples, mean over seeds [95 % t-interval] (seeds). Below 0.5 a "
             "score ranks the mislabeled samples *lower*. ‖g‖ = ‖e‖ ‖a‖, so the feature norm ‖a‖ (with the bias "
             "column) is the factor ‖g‖ adds to ‖e‖.", "",
             "| epoch | " + " | ".join(scores) + " |", "|---|" + "---|" * len(scores)]
    for epoch in SCORE_AT:
        cells = []
        for score in scores:
            by_seed = table.get((epoch, score), {})
            if len(by_seed) >= 2:
                iv = verdicts.mean_interval(list(by_seed.values()))
                cells.append(f"{iv.mean:.3f} [{iv.lo:.3f}, {iv.hi:.3f}] ({iv.n})")
            else:
                cells.append(", ".join(f"{v:.3f}" for v in by_seed.values()) or "–")
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="*", help="run only these runs (globs, comma separated, over engine-sN, "
                                                 "plain-sN, plainblack-sN, enginebf16-sN, plainbf16-sN, replica-sN, "
                                                 "replicaforeach-sN; 'none': none)")
    ap.add_argument("--seeds", type=int, default=10, help="seeds 0-4: the question; 5-9: its replication")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, kind, seed in runs(out, a.seeds):
        if any(fnmatch.fnmatch(name, glob) for glob in a.only.split(",")):
            print(f"[baseline] {name}", flush=True)
            run_one(out, name, kind, seed)
    (out / "table.md").write_text("\n".join(table(out, a.seeds)) + "\n")
    print(f"[baseline] wrote {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
