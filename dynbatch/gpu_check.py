"""``dynbatch bench --gpu-check``: everything that needs a GPU, as one command that fits a few minutes on a bare CUDA
machine without network (an H100/H200 lent for ~15 minutes, its start included).

The check is a list of parts, each a subprocess run from the clone with a planned time on one H100/H200-class GPU.
The plan is also the check's clock: every part runs under a timeout that leaves the later parts their planned time
before the deadline (``--budget-s``, default 480 s), a part that overruns is stopped and reported, and the next one
runs; parts that no longer fit are skipped and said so, the benchmark grid shrinks first. Nothing stops at the
first failure. The report (``report.md``) and the raw record (``check.json``, the benchmarks' own JSON beside) go to
``--out`` (default ``bench/results/gpu``).

No part reaches the network: the data must be local (``--data npz:PATH``; the default is
``bench/data/cifar10_subset.npz``, an ignored folder to copy the shared subset into and carry to the machine), the
tests and benchmarks read nothing remote, and the peers (Opacus, BackPACK) are measured only where installed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dynbatch.errors import UserError

BUDGET_S = 480  # the bound: 8 minutes on one H100/H200, leaving the machine's lease room for a rerun
DEFAULT_DATA = "npz:bench/data/cifar10_subset.npz"
PYTEST = ("-m", "pytest", "-q", "-p", "no:cacheprovider")
# the full grid, then the trimmed one; the host overhead (overhead) is measured on the CPU, the LM head (lm-head)
# needs the GPU for its peers (Liger-Kernel, Cut Cross-Entropy)
BENCH_SUITES = ("selection,step,precision,lm-head", "selection,step")


@dataclass(frozen=True)
class Part:
    """One step of the check: ``args`` after the interpreter, with ``{out}`` and ``{data}`` filled in; its planned
    seconds on one H100/H200 (Triton compiles dominate the tests; the benchmarks' quick grid; a compiled 2-epoch
    run on 5,000 images)."""

    name: str
    title: str
    args: tuple[str, ...]
    planned_s: int


def parts(suites: str = BENCH_SUITES[0]) -> list[Part]:
    """The check's parts in order, with the benchmark suites ``suites``."""
    bench_s = 150 if suites == BENCH_SUITES[0] else 70
    return [
        Part("triton", "Triton kernels, compiled (not interpreted)",
             (*PYTEST, "tests/test_kernels_triton.py", "tests/test_selection_ops.py", "tests/test_sample_scores.py"),
             120),
        Part("lm-head", "the LM head's Triton kernels against float64 oracles, compiled",
             (*PYTEST, "tests/test_lm_head.py", "-m", "interpreter"), 30),
        Part("streams", "split candidates on CUDA streams",
             (*PYTEST, "tests/test_policy_split.py", "-k", "stream"), 20),
        Part("syncs", "no host sync inside steps (CUDA sync debug mode)", (*PYTEST, "tests/test_syncs.py"), 60),
        Part("estimate", "selection measured beside the paper estimate",
             ("-m", "dynbatch_bench.gpu_estimate", "--out", "{out}/estimate.md", "--json", "{out}/estimate.json"), 20),
        Part("bench", f"benchmarks ({suites})", ("-m", "dynbatch", "bench", "--suite", suites, "--out", "{out}/bench"),
             bench_s),
        Part("selection", "proxy and InfoBatch steps beside fixed's (the proxy's side stream)",
             ("-m", "dynbatch_bench.selection_gpu", "--data", "{data}", "--out", "{out}/selection.md"), 20),
        Part("train", "`dynbatch train --compile` on the CIFAR subset (2 epochs, 5,000 images)",
             ("-m", "dynbatch", "train", "--data", "{data}", "--epochs", "2", "--train-samples", "5000", "--compile",
              "--no-progress", "--out", "{out}/compile-run", "--overwrite"), 60),
    ]


def plan(budget_s: float) -> list[Part]:
    """The parts that fit ``budget_s`` by their planned time: the full benchmark grid if everything fits, else the
    trimmed grid, then whole parts dropped from the end."""
    for suites in BENCH_SUITES:
        chosen = parts(suites)
        if sum(p.planned_s for p in chosen) <= budget_s:
            return chosen
    kept, total = [], 0
    for p in chosen:
        if total + p.planned_s <= budget_s:
            kept.append(p)
            total += p.planned_s
    return kept


def local_data(spec: str, repo: Path) -> str:
    """``spec`` when it needs no network (an existing npz file), else a one-line error naming the fix."""
    if not spec.startswith("npz:"):
        raise UserError(f"--gpu-check runs where there is no network; give --data npz:PATH instead of {spec!r} "
                        f"(copy ../shared/data/cifar10-subset/cifar10_subset.npz to {DEFAULT_DATA[4:]})")
    path = Path(spec[4:])
    path = path if path.is_absolute() else repo / path
    if not path.is_file():
        raise UserError(f"--gpu-check: no data file at {path}; copy ../shared/data/cifar10-subset/cifar10_subset.npz "
                        f"there (and name its folder in the device tool's carry) or give --data npz:PATH")
    return f"npz:{path}"


def describe_plan(chosen: list[Part], budget_s: float) -> list[str]:
    """The plan as report lines: each part and its planned seconds, the total against the budget."""
    skipped = [p.title for p in parts() if p.name not in {c.name for c in chosen}]
    lines = [f"Plan for a {budget_s:.0f} s budget (planned seconds on one H100/H200; each part's timeout keeps the "
             f"later parts their planned time):", ""]
    lines += [f"- {p.planned_s:>4} s  {p.title}" for p in chosen]
    lines.append(f"- {sum(p.planned_s for p in chosen):>4} s  in all")
    lines += [f"- skipped (budget): {t}" for t in skipped]
    return lines


def _summary(p: subprocess.CompletedProcess) -> str:
    text = (p.stdout or "").strip().splitlines() or (p.stderr or "").strip().splitlines() or ["(no output)"]
    return text[-1][:300]


def run_part(part: Part, index: int, repo: Path, env: dict, out: Path, data: str, timeout_s: float) -> dict:
    """Run one part under ``timeout_s``, its output kept in ``logs/<index>-<name>.log``; its record (status PASS, FAIL
    or TIMEOUT, seconds, last line)."""
    args = [a.format(out=out, data=data) for a in part.args]
    start = time.monotonic()
    try:
        p = subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=timeout_s)
        status, last = ("PASS" if p.returncode == 0 else "FAIL"), _summary(p)
        (out / "logs").mkdir(exist_ok=True)
        (out / "logs" / f"{index}-{part.name}.log").write_text((p.stdout or "") + (p.stderr or ""))
    except subprocess.TimeoutExpired:
        status, last = "TIMEOUT", f"stopped after {timeout_s:.0f} s"
    except OSError as e:
        status, last = "FAIL", f"could not start: {e}"
    return {"part": part.title, "planned_s": part.planned_s, "took_s": round(time.monotonic() - start, 1),
            "status": status, "last_line": last}


def run_check(out: Path, data_spec: str, budget_s: float, repo: Path, dry_run: bool = False) -> int:
    """The check (see the module docstring); with ``dry_run`` only the plan, printed, on any machine."""
    chosen = plan(budget_s)
    if dry_run:
        print("\n".join(describe_plan(chosen, budget_s)))
        return 0
    import torch

    if not torch.cuda.is_available():
        raise UserError("--gpu-check needs a CUDA GPU (torch.cuda.is_available() is False here); run it on a GPU "
                        "machine, --dry-run to see its plan, or --gpu-aot to compile the kernels for sm_80/sm_90")
    if not (repo / "tests" / "test_kernels_triton.py").is_file():
        raise UserError(f"--gpu-check runs the test suite, which is not installed with the wheel ({repo}); run it "
                        "from a clone of dynbatch")
    data = local_data(data_spec, repo)
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not the interpreter
    deadline = time.monotonic() + budget_s
    records = []
    for i, part in enumerate(chosen):
        later = sum(p.planned_s for p in chosen[i + 1:])
        timeout_s = min(2 * part.planned_s, deadline - time.monotonic() - later)
        if timeout_s < 5:
            records.append({"part": part.title, "planned_s": part.planned_s, "took_s": 0, "status": "SKIPPED",
                            "last_line": "no time left in the budget"})
        else:
            records.append(run_part(part, i, repo, env, out, data, timeout_s))
        print(f"- {records[-1]['status']}: {part.title} ({records[-1]['took_s']} s) {records[-1]['last_line']}",
              flush=True)
    write_report(out, records, chosen, budget_s, torch)
    failed = sum(r["status"] != "PASS" for r in records)
    print(f"wrote {out / 'report.md'}: {'all passed' if not failed else f'{failed} part(s) did not pass'}")
    return 1 if failed else 0


def write_report(out: Path, records: list[dict], chosen: list[Part], budget_s: float, torch) -> None:
    """``report.md`` (the plan, each part's outcome, the training run's accuracy and speed) and ``check.json``."""
    gpu = torch.cuda.get_device_name()
    lines = ["# GPU check", "", f"- GPU: {gpu}; torch {torch.__version__}; CUDA {torch.version.cuda}", "",
             *describe_plan(chosen, budget_s), "", "| part | planned s | took s | outcome | last line |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['part']} | {r['planned_s']} | {r['took_s']} | {r['status']} | {r['last_line']} |"
              for r in records]
    run = out / "compile-run" / "metrics.jsonl"
    if run.is_file():
        try:
            from dynbatch.train.run_folder import read_metrics

            ep = [r for r in read_metrics(run.parent) if r["kind"] == "epoch"]
            lines += ["", f"Compiled training: test accuracy {ep[-1]['test_acc']:.3f} after {len(ep)} epochs, "
                          f"{ep[-1]['samples_per_s']:,.0f} images/s in the last epoch."]
        except Exception as e:  # the report is written whatever the run left
            lines += ["", f"Compiled training: its metrics could not be read ({type(e).__name__}: {e})."]
    for name, title in (("estimate.md", "Selection: paper estimate and measurement"), ("bench/report.md",
                                                                                        "Benchmarks")):
        if (out / name).is_file():
            lines += ["", f"## {title}", "", f"[{name}]({name})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "check.json").write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "budget_s": budget_s,
                                                "plan": [asdict(p) for p in chosen], "parts": records}, indent=1))
