"""``dynbatch bench``: run the benchmark suites in ``bench/`` and write JSON, a markdown report and a plot."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dynbatch.errors import UserError

SUITES = ("selection", "scores", "step", "overhead", "precision", "pipeline", "lm-head")


def _bench_dir() -> Path:
    """The benchmark suites: a clone's ``bench/`` or a wheel's ``dynbatch_bench``."""
    try:
        import dynbatch_bench
    except ImportError:
        raise UserError("the benchmark suites (dynbatch_bench) are not installed; reinstall dynbatch") from None
    return Path(dynbatch_bench.__file__).resolve().parent


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suites (quick by default)")
    p.add_argument("--full", action="store_true", help="the full grids (N up to 16384, preresnet56)")
    p.add_argument("--suite", default=",".join(SUITES), help=f"comma-separated subset of {', '.join(SUITES)}")
    p.add_argument("--out", help="folder for the results (default: bench/results/latest, or bench/results/gpu-aot "
                                 "with --gpu-aot)")
    p.add_argument("-k", dest="select", help="pytest -k expression to narrow the cases")
    p.add_argument("--data", help="with --gpu-check: the local data of its training run (default "
                                  "npz:bench/data/cifar10_subset.npz)")
    p.add_argument("--gpu-check", action="store_true",
                   help="on a CUDA machine without network, from a clone: the Triton kernel tests compiled, the "
                        "CUDA-only tests (split streams, sync debug mode), the selection beside its paper estimate, "
                        "the benchmarks and a short CIFAR training with --compile, within --budget-s; writes "
                        "bench/results/gpu/report.md and check.json")
    p.add_argument("--budget-s", type=float, help="with --gpu-check: its time budget in seconds (default 480); a "
                                                  "smaller one trims the benchmark grid, then skips parts")
    p.add_argument("--dry-run", action="store_true", help="with --gpu-check: print its plan, run nothing")
    p.add_argument("--gpu-aot", action="store_true",
                   help="compile every Triton kernel for sm_80 and sm_90 over the full shape sweep (no GPU needed) "
                        "and estimate selection times on A100/H100; writes bench/results/gpu-aot/")


def cmd_gpu_aot(out: Path) -> int:
    """The full AOT sweep (compile table) and the paper estimate, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile, not the interpreter
    rc = subprocess.call([sys.executable, "-m", "dynbatch_kernels.aot", "--sweep", "full", "--json",
                          str(out / "compile.json"), "--markdown", str(out / "compile.md")], env=env)
    rc_est = subprocess.call([sys.executable, "-m", "dynbatch_bench.gpu_estimate", "--out", str(out / "estimate.md")],
                             env=env)
    return rc or rc_est


def cmd_bench(args) -> int:
    import importlib.util

    bench = _bench_dir()
    if args.gpu_check:
        from dynbatch import gpu_check

        budget = gpu_check.BUDGET_S if args.budget_s is None else args.budget_s
        if not budget > 0:
            raise UserError(f"--budget-s must be positive (got {args.budget_s}); e.g. 300")
        return gpu_check.run_check(Path(args.out or "bench/results/gpu").resolve(), args.data or
                                   gpu_check.DEFAULT_DATA, budget, bench.parent, dry_run=args.dry_run)
    if args.gpu_aot:
        return cmd_gpu_aot(Path(args.out or "bench/results/gpu-aot").resolve())
    if importlib.util.find_spec("pytest_benchmark") is None:
        raise UserError("dynbatch bench needs pytest-benchmark; pip install 'dynbatch[bench]'")
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        raise UserError(f"unknown suite {', '.join(bad) or '(none)'}; choose from {', '.join(SUITES)}")
    out = Path(args.out or "bench/results/latest").resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    cmd = [sys.executable, "-m", "pytest", *[str(bench / f"test_{s.replace('-', '_')}.py") for s in suites], "-q", "-p",
           "no:cacheprovider", f"--benchmark-json={results}", "--benchmark-columns=median,rounds",
           "--benchmark-sort=fullname", "--rootdir", str(bench.parent)]
    if args.select:
        cmd += ["-k", args.select]
    env = {**os.environ, "DYNBATCH_BENCH": "full" if args.full else "quick"}
    rc = subprocess.call(cmd, cwd=bench.parent, env=env)
    if rc not in (0, 5) or not results.is_file():
        print(f"dynbatch: benchmarks failed (pytest exit {rc})", file=sys.stderr)
        return 1
    shown = "dynbatch bench" + (" --full" if args.full else "") + (f" --suite {args.suite}" if args.suite !=
                                                                  ",".join(SUITES) else "")
    return subprocess.call([sys.executable, str(bench / "report.py"), str(results), "--out", str(out),
                            "--command", shown], cwd=bench.parent)
