"""The engine's ``--recipe airbench94`` against the plain reference script (``bench/airbench_plain.py``: the same
recipe, no engine code), side by side on one machine: same data, seeds, epochs, batch size and thread count, runs
alternating so that both see the same load. Reports final test accuracy (and with test-time augmentation),
training wall time (evaluation excluded) and the time to reach fixed accuracies, and compares the two paired by
seed: the ratio of training times (its interval from the per-seed log ratios) and the accuracy difference. Every run
names its CPU model; a seed whose two runs ran on different models is refused, so one table is one machine. The
engine runs in fp32 (``--amp none``), as the plain script does, so that a CPU with native bf16 does not change the
engine's precision alone; its other defaults (channels-last on CPU) are the engine's.

    python bench/fast_recipe.py [--seeds 0,1,2,3,4] [--epochs 10] [--batch-size 128] [--out bench/results/fast-recipe]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import verdicts  # noqa: E402
from bench.run_folders import DATA  # noqa: E402
from dynbatch.info import cpu_name  # noqa: E402
LEVELS = (0.65, 0.70, 0.75)


def engine_run(out: Path, seed: int, epochs: int, batch: int, env: dict) -> dict:
    run = out / f"engine-s{seed}"
    if not (run / "metrics.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "dynbatch", "train", "--recipe", "airbench94", "--data", f"npz:{DATA}",
                        "--batch-size", str(batch), "--epochs", str(epochs), "--seed", str(seed), "--out", str(run),
                        "--overwrite", "--no-progress", "--util-interval", "5", "--amp", "none"], cwd=REPO, env=env,
                       check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs_rows = [r for r in rows if r["kind"] == "epoch"]
    t, log = 0.0, []
    for r in epochs_rows:
        t += r["epoch_s"]
        log.append({"epoch": r["epoch"] + 1, "train_s": t, "test_acc": r["test_acc"]})
    cpu = json.loads((run / "config.json").read_text())["device"]["name"]
    return {"epochs": log, "test_acc_tta": epochs_rows[-1].get("test_acc_tta"), "cpu": cpu}


def plain_run(out: Path, seed: int, epochs: int, batch: int, env: dict) -> dict:
    path = out / f"plain-s{seed}.json"
    if not path.is_file():
        subprocess.run([sys.executable, str(REPO / "bench" / "airbench_plain.py"), "--data", str(DATA),
                        "--batch-size", str(batch), "--epochs", str(epochs), "--seed", str(seed), "--json", str(path)],
                       cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        path.write_text(json.dumps({**json.loads(path.read_text()), "cpu": cpu_name()}))
    return json.loads(path.read_text())


def time_to(log: list[dict], level: float) -> float | None:
    return next((r["train_s"] for r in log if r["test_acc"] >= level), None)


def summary(results: dict[str, list[dict]]) -> list[str]:
    def cell(values, digits=1):
        return verdicts.sd_cell([v for v in values if v is not None], scale=1.0, digits=digits)

    lines = ["| run | seeds | final test acc % | with TTA % | training s | "
             + " | ".join(f"s to {int(100 * v)} %" for v in LEVELS) + " |", "|---|---|---|---|---|" + "---|" * len(LEVELS)]
    for name, runs in ((k, results[k]) for k in ("engine", "plain")):
        lines.append(f"| {name} | {len(runs)} | {cell([100 * r['epochs'][-1]['test_acc'] for r in runs])} | "
                     f"{cell([100 * r['test_acc_tta'] for r in runs if r['test_acc_tta'] is not None])} | "
                     f"{cell([r['epochs'][-1]['train_s'] for r in runs], 0)} | "
                     + " | ".join(cell([time_to(r["epochs"], v) for r in runs], 0) for v in LEVELS) + " |")
    return lines + [""] + paired(results)


def paired(results: dict[str, list[dict]]) -> list[str]:
    """The engine against the plain script, seed by seed: the training-time ratio (the geometric mean of the
    per-seed ratios, its interval from the t-interval of their logs) and the accuracy difference."""
    e, p = results["engine"], results["plain"]
    seconds = [(a["epochs"][-1]["train_s"], b["epochs"][-1]["train_s"]) for a, b in zip(e, p)]
    lines = ["| seed | engine s | plain s | engine / plain | engine − plain acc (points) |", "|---|---|---|---|---|"]
    for seed, (a, b), (x, y) in zip(results["seeds"], zip(e, p), seconds):
        lines.append(f"| {seed} | {x:.0f} | {y:.0f} | {x / y:.2f}× | "
                     f"{100 * (a['epochs'][-1]['test_acc'] - b['epochs'][-1]['test_acc']):+.1f} |")
    if len(seconds) < 2:
        return lines
    logs = verdicts.mean_interval([math.log(x / y) for x, y in seconds])
    acc = verdicts.compare({s: r["epochs"][-1]["test_acc"] for s, r in zip(results["seeds"], e)},
                           {s: r["epochs"][-1]["test_acc"] for s, r in zip(results["seeds"], p)}, scale=100)
    return lines + ["", f"Engine / plain training time, paired by seed: **{math.exp(logs.mean):.2f}×** "
                    f"[{math.exp(logs.lo):.2f}, {math.exp(logs.hi):.2f}] (geometric mean of the per-seed ratios, "
                    f"95 % t-interval of their logs, {logs.n} seeds); final accuracy, engine − plain: "
                    f"**{acc.cell()} points** ({acc.how}). " + verdicts.RULE]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "fast-recipe"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONUNBUFFERED": "1"}
    results = {"engine": [], "plain": [], "seeds": [int(s) for s in a.seeds.split(",")]}
    t0 = time.time()
    for seed in results["seeds"]:  # alternating: both see the same machine load
        results["plain"].append(plain_run(out, seed, a.epochs, a.batch_size, env))
        results["engine"].append(engine_run(out, seed, a.epochs, a.batch_size, env))
    cpus = {r.get("cpu", "unknown") for r in results["plain"] + results["engine"]}
    if len(cpus) > 1:
        print(f"fast_recipe: the runs in {out} were measured on {', '.join(sorted(cpus))}; one table is one "
              "machine: move the other machine's runs away and rerun", file=sys.stderr)
        return 2
    cpu = cpus.pop()
    lines = ["# The fast recipe: the engine against a plain script of the same recipe", "",
             f"Machine: {cpu}, {a.threads} threads, no GPU. Data: the CIFAR-10 subset (5,085 train / 1,017 test). "
             f"`--recipe airbench94 --batch-size {a.batch_size} --epochs {a.epochs} --amp none` (fp32, as the plain "
             "script); "
             f"command: `python bench/fast_recipe.py --seeds {a.seeds}` ({time.time() - t0:.0f} s).", ""]
    lines += summary(results)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
