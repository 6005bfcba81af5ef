"""A small GPT on the real Shakespeare corpus from the CLI: a fixed batch, two sequence-selection methods and
per-token selection, one seed each, with the validation split's perplexity per epoch. A demonstration that the
path trains and resumes on real text, not a study: one seed, no verdict.

    python bench/lm_shakespeare.py            # runs (resumable: --autoresume), then the table
    python bench/lm_shakespeare.py --table    # the table from the runs there are

Runs in ``bench/results/lm-shakespeare/<arm>``, the table in ``bench/results/lm-shakespeare/table.md``. The
``token-excess`` arm loads the ``fixed`` arm's checkpoint as its reference, which a clone lacks (checkpoints are not
committed): delete ``fixed/`` to train it again before running that arm.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench.run_folders import finished, machine_of, rows_of, thin, train_run  # noqa: E402

CORPUS = REPO.parent / "shared" / "data" / "shakespeare" / "shakespeare.txt"
OUT = REPO / "bench" / "results" / "lm-shakespeare"
EPOCHS = 2
MODEL = ["--model", "gpt", "--context", "64", "--vocab-size", "2048", "--gpt-layers", "2", "--gpt-width", "96",
         "--gpt-heads", "4", "--optimizer", "adamw", "--lr", "2e-3", "--weight-decay", "0.01", "--batch-size", "32",
         "--amp", "none", "--epochs", str(EPOCHS), "--seed", "0"]
ARMS = {
    "fixed": [],
    "small-loss": ["--policy", "small-loss", "--forget-rate", "0.2", "--ramp-epochs", "1"],
    "selective-backprop": ["--policy", "selective-backprop"],
    "token-selection": ["--policy", "token-selection", "--token-share", "0.6"],
}
# Rho-1's rule, the excess loss over a reference: here the fixed arm's model (trained on the same text, so a weak
# reference; Rho-1's is trained on curated data). Runs after the arms.
EXCESS = ("token-excess", ["--policy", "token-selection", "--token-share", "0.6", "--token-rule", "excess",
                           "--token-reference", str(OUT / "fixed")])


def run_arm(name: str) -> int:
    if finished(OUT / name, EPOCHS):  # thinned runs have no checkpoint: --autoresume would start them again
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ARMS[name] if name in ARMS else EXCESS[1]
    return train_run(OUT / name, MODEL + args, env=env, data=f"text:{CORPUS}")


RESUMED = "fixed-resumed"  # fixed again, stopped at step 500 and resumed: its rows must equal fixed's
TIMING = ("wall_s", "step_s", "epoch_s", "samples_per_s")


def resume_check() -> str:
    """Train ``fixed`` again, stopped after 500 steps (a checkpoint), then resumed; whether every row equals the
    uninterrupted run's, timing aside."""
    run = OUT / RESUMED
    if not finished(run, EPOCHS):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if not (run / "metrics.jsonl").is_file():
            train_run(run, MODEL, "--stop-after-steps", "500", env=env, data=f"text:{CORPUS}")
        train_run(run, MODEL, env=env, data=f"text:{CORPUS}")
    return resume_line()


def resume_line() -> str:
    def plain(rows):
        return [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("util_")} for r in rows]

    a, b = OUT / "fixed", OUT / RESUMED
    if not (finished(a, EPOCHS) and finished(b, EPOCHS)):
        return "Exact resume on this corpus: not run yet (`python bench/lm_shakespeare.py --resume-check`)."
    steps = {r["step"] for r in rows_of(a, "step")}  # fixed's rows as committed (thinned): the same steps of both
    pairs = [(plain(rows_of(a, "epoch")), plain(rows_of(b, "epoch"))),
             (plain(rows_of(a, "step")), plain([r for r in rows_of(b, "step") if r["step"] in steps]))]
    same = all(x == y for x, y in pairs)
    return (f"Exact resume on this corpus: `{RESUMED}` is `fixed` stopped after 500 steps and resumed; its epoch "
            f"rows and its step rows at fixed's {len(steps)} committed steps {'equal' if same else 'DIFFER from'} "
            "the uninterrupted run's, timing aside.")


def table() -> list[str]:
    lines = ["# A small GPT on the Shakespeare corpus (one seed each: a demonstration, no verdict)", "",
             f"`{' '.join(MODEL)}`; data `text:../shared/data/shakespeare/shakespeare.txt` (validation: hamlet, "
             "macbeth, tempest, sonnets). Validation perplexity per epoch (`test_ppl`), token accuracy, training "
             "seconds (up to three runs at a time on the 2 cores, one thread each: not a cost comparison).", "",
             "| arm | machine | " + " | ".join(f"ppl ep {e + 1}" for e in range(EPOCHS)) + " | acc | train s |",
             "|---|---|" + "---|" * (EPOCHS + 2)]
    for name in [*ARMS, EXCESS[0]]:
        run = OUT / name
        epochs = rows_of(run, "epoch")
        if not epochs:
            lines.append(f"| {name} | – | " + " | ".join("–" for _ in range(EPOCHS + 2)) + " |")
            continue
        ppl = [f"{r['test_ppl']:.1f}" if r.get("test_ppl") is not None else "–" for r in epochs]
        ppl += ["–"] * (EPOCHS - len(ppl))
        last = epochs[-1]
        lines.append(f"| {name} | {machine_of(run)} | {' | '.join(ppl)} | {last['test_acc']:.3f} | "
                     f"{sum(r['epoch_s'] for r in epochs):.0f} |")
    check = OUT / "resume-check.md"  # written before the runs are thinned: every row compared
    return lines + ["", check.read_text().strip() if check.is_file() else resume_line(), ""]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", action="store_true", help="write the table from the runs there are, run nothing")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--resume-check", action="store_true", help="also train fixed stopped and resumed, and compare")
    a = ap.parse_args(argv)
    if not CORPUS.is_file():
        raise SystemExit(f"lm_shakespeare: no corpus at {CORPUS}; it ships beside the repository in shared/data")
    if not a.table:
        with ThreadPoolExecutor(a.workers) as pool:
            codes = dict(zip(ARMS, pool.map(run_arm, ARMS)))
        codes[EXCESS[0]] = run_arm(EXCESS[0])  # its reference is the fixed arm
        failed = [n for n, c in codes.items() if c]
        if failed:
            print(f"lm_shakespeare: {', '.join(failed)} failed; rerun to resume them", file=sys.stderr)
    if a.resume_check:
        (OUT / "resume-check.md").write_text(resume_check() + "\n")
    if not a.table:
        for name in [*ARMS, EXCESS[0], RESUMED]:
            if finished(OUT / name, EPOCHS):
                thin(OUT / name)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "table.md").write_text("\n".join(table()))
    print((OUT / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
