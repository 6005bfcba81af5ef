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
    p.add_argument("--gpu-aot", action="store_true",
                   help="compile every Triton kernel for sm_80 and sm_90 over the full shape sweep (no GPU needed) "
                        "and estimate selection times on A100/H100; writes bench/results/gpu-aot/")


def cmd_gpu_aot(bench: Path) -> int:
    """The full AOT sweep (compile table) and the paper estimate, into ``bench/results/gpu-aot/``."""
    out = bench / "results" / "gpu-aot"
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile, not the interpreter
    rc = subprocess.call([sys.executable, "-m", "dynbatch_kernels.aot", "--sweep", "full", "--json",
                          str(out / "compile.json"), "--markdown", str(out / "compile.md")], cwd=REPO, env=env)
    rc_est = subprocess.call([sys.executable, str(bench / "gpu_estimate.py"), "--out", str(out / "estimate.md")],
                             cwd=REPO, env=env)
    return rc or rc_est


def cmd_bench(args) -> int:
    bench = REPO / "bench"
    if not (bench / "report.py").is_file():
        raise UserError(f"benchmarks not found at {bench}; run dynbatch bench from a clone (pip install -e .)")
    if args.gpu_aot:
        return cmd_gpu_aot(bench)
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
