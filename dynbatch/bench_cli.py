"""``dynbatch bench``: run the benchmark suites in ``bench/`` and write JSON, a markdown report and a plot."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dynbatch.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SUITES = ("selection", "step", "pipeline")


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suites (quick by default)")
    p.add_argument("--full", action="store_true", help="the full grids (N up to 16384, preresnet56)")
    p.add_argument("--suite", default=",".join(SUITES), help=f"comma-separated subset of {', '.join(SUITES)}")
    p.add_argument("--out", default="bench/results/latest", help="folder for results.json, report.md, bench.png")
    p.add_argument("-k", dest="select", help="pytest -k expression to narrow the cases")


def cmd_bench(args) -> int:
    bench = REPO / "bench"
    if not (bench / "report.py").is_file():
        raise UserError(f"benchmarks not found at {bench}; run dynbatch bench from a clone (pip install -e .)")
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        raise UserError(f"unknown suite {', '.join(bad) or '(none)'}; choose from {', '.join(SUITES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    cmd = [sys.executable, "-m", "pytest", *[str(bench / f"test_{s}.py") for s in suites], "-q", "-p",
           "no:cacheprovider", f"--benchmark-json={results}", "--benchmark-columns=median,rounds",
           "--benchmark-sort=fullname"]
    if args.select:
        cmd += ["-k", args.select]
    env = {**os.environ, "DYNBATCH_BENCH": "full" if args.full else "quick"}
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    if rc not in (0, 5) or not results.is_file():
        print(f"dynbatch: benchmarks failed (pytest exit {rc})", file=sys.stderr)
        return 1
    shown = "dynbatch bench" + (" --full" if args.full else "") + (f" --suite {args.suite}" if args.suite !=
                                                                  ",".join(SUITES) else "")
    return subprocess.call([sys.executable, str(bench / "report.py"), str(results), "--out", str(out),
                            "--command", shown], cwd=REPO)
