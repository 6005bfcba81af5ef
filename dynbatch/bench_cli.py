"""``dynbatch bench``: run the benchmark suites in ``bench/`` and write JSON, a markdown report and a plot."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dynbatch.errors import UserError

SUITES = ("selection", "scores", "step", "overhead", "precision", "pipeline")


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
    p.add_argument("--data", help="with --gpu-check: the data set of its training run (default cifar10)")
    p.add_argument("--gpu-check", action="store_true",
                   help="on a CUDA machine, from a clone: the Triton kernel tests compiled, the CUDA-only tests "
                        "(split streams, sync debug mode), the selection and step benchmarks and a short CIFAR "
                        "training with --compile; writes bench/results/gpu/report.md")
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


# What --gpu-check runs, in order: (title, pytest arguments relative to the clone). Every one of them passes on
# CPU already (where the CUDA-only ones skip); on a GPU they run compiled.
GPU_TESTS = (
    ("Triton kernels, compiled", ["tests/test_kernels_triton.py", "tests/test_selection_ops.py"]),
    ("split candidates on CUDA streams", ["tests/test_policy_split.py", "-k", "stream"]),
    ("no host sync inside steps (sync debug mode)", ["tests/test_syncs.py"]),
)


def cmd_gpu_check(out: Path, data: str) -> int:
    """The one-command check for the first machine with a GPU; refuses in one line without CUDA."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("--gpu-check needs a CUDA GPU (torch.cuda.is_available() is False here); run it on a GPU "
                        "machine, or use --gpu-aot, which compiles the kernels for sm_80/sm_90 without one")
    repo = _bench_dir().parent
    if not (repo / "tests" / "test_kernels_triton.py").is_file():
        raise UserError(f"--gpu-check runs the test suite, which is not installed with the wheel ({repo}); run it "
                        "from a clone of dynbatch")
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not the interpreter
    lines = ["# GPU check", "", f"- GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}", ""]
    failed = 0
    for title, args in GPU_TESTS:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=repo, env=env,
                           capture_output=True, text=True)
        summary = (p.stdout.strip().splitlines() or ["(no output)"])[-1]
        failed += p.returncode != 0
        lines.append(f"- {title}: {'PASS' if p.returncode == 0 else 'FAIL'} ({summary})")
        print(lines[-1], flush=True)
    rc = subprocess.call([sys.executable, "-m", "dynbatch", "bench", "--suite", "selection,step,overhead,precision",
                          "--out", str(out / "bench")], cwd=repo, env=env)
    failed += rc != 0
    lines.append(f"- benchmarks: {'PASS' if rc == 0 else 'FAIL'}, report in [bench/report.md](bench/report.md)")
    run = out / "compile-run"
    rc = subprocess.call([sys.executable, "-m", "dynbatch", "train", "--data", data, "--epochs", "2",
                          "--train-samples", "5000", "--compile", "--no-progress", "--out", str(run), "--overwrite"],
                         cwd=repo, env=env)
    failed += rc != 0
    last = ""
    if rc == 0:
        from dynbatch.train.records import read_metrics

        ep = [r for r in read_metrics(run) if r["kind"] == "epoch"]
        last = f": test accuracy {ep[-1]['test_acc']:.3f}, {ep[-1]['samples_per_s']:,.0f} img/s in the last epoch"
    lines.append(f"- `dynbatch train --data {data} --compile` (2 epochs, 5,000 images): "
                 f"{'PASS' if rc == 0 else 'FAIL'}{last}")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'report.md'}: {'all passed' if not failed else f'{failed} part(s) failed'}")
    return 1 if failed else 0


def cmd_bench(args) -> int:
    import importlib.util

    bench = _bench_dir()
    if args.gpu_check:
        return cmd_gpu_check(Path(args.out or "bench/results/gpu").resolve(), args.data or "cifar10")
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
    cmd = [sys.executable, "-m", "pytest", *[str(bench / f"test_{s}.py") for s in suites], "-q", "-p",
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
