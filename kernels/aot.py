"""Ahead-of-time compilation of the Triton kernels for GPU targets, on a machine without a GPU.

The Triton interpreter forgives what a real compile does not (dot shapes, register pressure, dtype rules), so the
kernels are also compiled for real: :func:`capture` runs a launcher on CPU tensors and records each kernel launch
(the kernel, its bound arguments and launch options) instead of running it; :func:`compile_launch` compiles a
recorded launch for ``GPUTarget("cuda", arch, 32)`` down to PTX and cubin with the ptxas that Triton's wheel ships,
and reports registers, spill bytes, shared memory and the class of the multiply instructions.

Must run without ``TRITON_INTERPRET=1`` (under the interpreter ``triton.jit`` gives interpreted functions, which
cannot be compiled): ``python -m dynbatch_kernels.aot`` is the command-line entry that tests and benchmarks call in
a subprocess.

    python -m dynbatch_kernels.aot [--sweep ci|full] [--json OUT.json] [--markdown OUT.md]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import torch

# Shared memory a block may use (bytes): the per-block opt-in maximum of A100 (sm_80) and H100 (sm_90).
SHARED_LIMIT = {80: 166912, 90: 232448}
TARGETS = (80, 90)
_DTYPE_CODE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
               torch.int64: "i64", torch.int32: "i32", torch.bool: "i1", torch.float64: "fp64"}


@dataclass
class Launch:
    """One recorded kernel launch: the JIT kernel, its arguments by name, and launch options."""

    kernel: Any
    args: dict[str, Any]
    options: dict[str, Any]
    grid: tuple

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@dataclass
class CompileReport:
    kernel: str
    arch: int
    dtype: str
    shape: str
    config: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    instructions: str  # "wgmma" (sm_90 tensor cores), "mma" (sm_80 tensor cores), or "fma" (CUDA cores)
    seconds: float

    @property
    def ok(self) -> bool:
        return self.spill_stores == 0 and self.spill_loads == 0 and self.shared <= SHARED_LIMIT[self.arch]


@contextlib.contextmanager
def capture():
    """Within the block, Triton kernel launches are recorded in the yielded list instead of running."""
    from triton.runtime.jit import JITFunction

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("AOT compilation needs compiled Triton; unset TRITON_INTERPRET")
    launches: list[Launch] = []
    real = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        launches.append(Launch(self, bound, options, grid if isinstance(grid, tuple) else tuple(grid)))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = real


def _signature(launch: Launch) -> tuple[dict[str, str], dict[str, Any]]:
    sig, consts = {}, {}
    for p in launch.kernel.params:
        v = launch.args[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _DTYPE_CODE[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2**31 <= v < 2**31 and p.name not in ("seed", "thr") else "i64"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: cannot type argument {p.name}={v!r}")
    return sig, consts


def _ptxas_info(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` with the flags Triton compiles with."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(arch).path, "-v", "-lineinfo", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return regs, int(spills.group(1)), int(spills.group(2))


def _instructions(ptx: str) -> str:
    if "wgmma." in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "fma"


def compile_launch(launch: Launch, arch: int, dtype: str = "", shape: str = "") -> CompileReport:
    """Compile a recorded launch for ``sm_<arch>``; raises ``triton.CompilationError`` for a kernel that is wrong
    for a GPU (a 16-bit ``tl.dot`` with K < 16, for one)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts = _signature(launch)
    t0 = time.perf_counter()
    ck = triton.compile(ASTSource(launch.kernel, sig, consts), target=GPUTarget("cuda", arch, 32),
                        options=dict(launch.options))
    ptx = ck.asm["ptx"]
    regs, stores, loads = _ptxas_info(ptx, arch)
    blocks = {k: v for k, v in consts.items() if k.startswith(("BLOCK", "SPLIT"))}
    config = " ".join(f"{k}={v}" for k, v in blocks.items())
    config += f" warps={ck.metadata.num_warps} stages={ck.metadata.num_stages}"
    return CompileReport(launch.name, arch, dtype, shape, config, regs, stores, loads, ck.metadata.shared,
                         _instructions(ptx), time.perf_counter() - t0)


# ---- the sweep ------------------------------------------------------------------------------------------------------
def _case(b: int, c: int, d: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, c, generator=g).to(dtype)
    feats = torch.randn(b, d, generator=g).to(dtype)
    return logits, torch.randint(0, c, (b,), generator=g), feats


def launches_for(b: int, c: int, d: int, n: int, dtype: torch.dtype, arch: int, mode: str, route: str,
                 masks: bool = False) -> list[Launch]:
    """Every kernel launch of one ``subset_grad_norms``/``select_subset`` call (and of ``sample_scores``), as the
    launchers make it for
    ``sm_<arch>`` (the launch configuration follows the target: see ``configs.py``)."""
    from dynbatch_kernels import configs
    from dynbatch_kernels.residuals import residuals_and_norms
    from dynbatch_kernels.sample_scores import sample_scores
    from dynbatch_kernels.select_epilogue import choose
    from dynbatch_kernels.subset_norms_direct import select_direct, subset_sq_sums_direct
    from dynbatch_kernels.subset_norms_gram import select_gram, subset_sq_sums_gram

    logits, y, feats = _case(b, c, d, dtype)
    # The ops' argument tuples as the launchers read them (by name; the schemas live in dynbatch.ops)
    args = SimpleNamespace(
        logits=logits, targets=y, features=feats, bias=True, label_smoothing=0.0, by_class=True, num_subsets=n,
        masks=torch.zeros((n, b), dtype=torch.uint8) if masks else None, seed=7, threshold=2**23,
        mode={"masks": 0, "bernoulli": 1, "uniform_size": 2}["masks" if masks else mode], gram=route == "gram",
        trend=torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64),  # the first step (NaN EMAs) is no other compile
        sum_metric=False, eps=1e-8)
    with capture() as launches, configs.target(arch):
        for augmented in (False, True):  # per-sample norms alone; the direct route's inputs
            residuals_and_norms(args, augmented=augmented)
        sample_scores(args)  # subsets play no part
        e = torch.randn(b, c)
        a = torch.randn(b, d + 1)
        if route == "gram":
            subset_sq_sums_gram(args, dtype)
        else:
            subset_sq_sums_direct(e, a, args, dtype)
        if not masks:  # select_subset: the subset kernels with the epilogue that picks the subset
            if route == "gram":
                select_gram(args, dtype)
            else:
                select_direct(e, a, args, dtype)
            choose(torch.rand(n), torch.rand(n), args, b)
    return launches


def lm_head_launches(n: int, d: int, v: int, dtype: torch.dtype, arch: int) -> list[Launch]:
    """Every kernel launch of the ``lm_head`` op's Triton path (``lm_head_rows.py``) for ``sm_<arch>``: the fused
    per-token pass, and the row kernels of the chunked path (residuals, agreement)."""
    from dynbatch_kernels import configs
    from dynbatch_kernels.lm_head_rows import agreement_rows, residuals, token_scores

    g = torch.Generator().manual_seed(0)
    h, w, b = (torch.randn(*shape, generator=g).to(dtype) for shape in ((n, d), (v, d), (v,)))
    y = torch.randint(0, v, (n,), generator=g)
    args = SimpleNamespace(features=h, weight=w, bias=b, targets=y, ignore_index=-100, label_smoothing=0.1)
    z, lse = torch.randn(n, v), torch.randn(n)
    with capture() as launches, configs.target(arch):
        token_scores(args)
        residuals(z, y, None, 0.1, ignore_index=-100)
        agreement_rows(z, z, y, None, lse, 0.1, ignore_index=-100)
    return launches


def sweep(kind: str) -> list[tuple[dict, Launch]]:
    """(description, launch) for every distinct compile of the sweep; ``ci`` is small, ``full`` is the issue's."""
    if kind == "ci":
        shapes = [(100, 10, 64, 4096), (1000, 100, 512, 65536)]
        dtypes, modes = (torch.float32, torch.bfloat16, torch.float16), ("bernoulli",)
        lm_shapes = [(256, 64, 1000), (4096, 512, 32768)]
    else:
        shapes = [(b, c, d, n) for b in (10, 100, 256, 1000) for c in (10, 100) for d in (64, 512)
                  for n in (4096, 65536)]
        dtypes, modes = (torch.float32, torch.bfloat16, torch.float16), ("bernoulli", "uniform_size", "masks")
        lm_shapes = [(256, 64, 1000), (4096, 512, 32768), (16384, 768, 50257)]
    out, seen = [], set()

    def add(arch, dtype, shape, launches):
        for launch in launches:
            sig, consts = _signature(launch)
            key = (arch, launch.name, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
                   tuple(sorted(launch.options.items())))
            if key not in seen:
                seen.add(key)
                out.append(({"arch": arch, "dtype": _DTYPE_CODE[dtype], "shape": shape}, launch))

    for arch in TARGETS:
        for dtype in dtypes:
            for b, c, d, n in shapes:
                for mode in modes:
                    for route in ("direct", "gram"):
                        add(arch, dtype, f"B={b} C={c} D={d} N={n} {mode} {route}",
                            launches_for(b, c, d, n, dtype, arch, mode, route, masks=mode == "masks"))
            for n, d, v in lm_shapes:
                add(arch, dtype, f"N={n} D={d} V={v} lm_head", lm_head_launches(n, d, v, dtype, arch))
    return out


def tune(routes=("gram", "direct")) -> dict:
    """For each (arch, operands, route) of ``configs.GPU``, the first candidate configuration, largest tiles first,
    that compiles without spills in every subset mode; prints the table to paste into ``configs.py``."""
    import itertools

    from dynbatch_kernels import configs

    dims = {"gram": ("BLOCK_N", "BLOCK_I", "BLOCK_K"), "direct": ("BLOCK_N", "BLOCK_B", "BLOCK_J")}
    sizes = {"gram": ((64, 32), (64, 32), (32, 16)), "direct": ((64, 32), (32, 16), (64, 32))}
    dtype_of = {"fp32": torch.float32, "tf32": torch.bfloat16, "16": torch.bfloat16}
    chosen = {}
    for key in sorted(configs.GPU):
        arch, operands, route = key
        if route not in routes:
            continue
        found = None
        for tiles in itertools.product(*sizes[route]):
            for warps, stages in ((4, 3), (8, 3), (4, 2), (8, 2), (4, 1), (8, 1)):
                cand = {**dict(zip(dims[route], tiles)), "num_warps": warps, "num_stages": stages}
                old = configs.GPU[key]
                configs.GPU[key] = cand
                try:
                    reports = [compile_launch(launch, arch) for mode in ("masks", "bernoulli", "uniform_size")
                               for launch in launches_for(100, 10, 64, 4096, dtype_of[operands], arch, mode, route,
                                                          masks=mode == "masks")[1:]]
                finally:
                    configs.GPU[key] = old
                if all(r.ok for r in reports):
                    found = cand
                    break
                print(key, cand, "spills", max(r.spill_stores for r in reports), flush=True)
            if found:
                break
        chosen[key] = found
        print(key, "->", found, flush=True)
    return chosen


def summary(reports: list[CompileReport]) -> str:
    """One row per (kernel, target, input dtype): how many configurations compiled, worst registers, spills and
    shared memory, and the multiply instructions (the README's compile summary)."""
    groups: dict[tuple, list[CompileReport]] = {}
    for r in reports:
        groups.setdefault((r.kernel.lstrip("_"), r.arch, r.dtype), []).append(r)
    lines = [f"{len(reports)} distinct compiles, {sum(not r.ok for r in reports)} with spills or too much shared "
             "memory.", "", "| kernel | target | inputs | configurations compiled | registers (max) | spill bytes | "
             "shared KiB (max) | multiply instructions |", "|" + "---|" * 8]
    for (kernel, arch, dtype), rs in sorted(groups.items()):
        spills = sum(r.spill_stores + r.spill_loads for r in rs)
        instr = ", ".join(sorted({r.instructions for r in rs}))
        lines.append(f"| {kernel} | sm_{arch} | {dtype} | {len(rs)} | {max(r.registers for r in rs)} | {spills} | "
                     f"{max(r.shared for r in rs) / 1024:.1f} | {instr} |")
    return "\n".join(lines) + "\n"


def markdown(reports: list[CompileReport]) -> str:
    lines = [summary(reports), "", "| kernel | target | dtype | first shape compiled | launch config | registers | spill bytes "
             "(store/load) | shared KiB | multiply instructions |", "|" + "---|" * 9]
    for r in sorted(reports, key=lambda r: (r.kernel, r.arch, r.dtype, r.config)):
        lines.append(f"| {r.kernel} | sm_{r.arch} | {r.dtype} | {r.shape} | {r.config} | {r.registers} | "
                     f"{r.spill_stores}/{r.spill_loads} | {r.shared / 1024:.1f} | {r.instructions} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", choices=("ci", "full"), default="ci")
    ap.add_argument("--json", help="write every compile report as JSON here")
    ap.add_argument("--markdown", help="write the compile table as markdown here")
    ap.add_argument("--tune", action="store_true", help="search spill-free launch configurations instead")
    a = ap.parse_args(argv)
    if a.tune:
        tune()
        return 0
    reports = []
    for desc, launch in sweep(a.sweep):
        r = compile_launch(launch, desc["arch"], desc["dtype"], desc["shape"])
        reports.append(r)
        print(f"{r.kernel:16s} sm_{r.arch} {r.dtype:4s} {r.config:60s} regs {r.registers:3d} "
              f"spill {r.spill_stores}/{r.spill_loads} shared {r.shared:6d} {r.instructions}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{**asdict(r), "ok": r.ok} for r in reports], f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown(reports))
        with open(os.path.join(os.path.dirname(a.markdown) or ".", "summary.md"), "w") as f:
            f.write(summary(reports))  # what the README splices (GPU-AOT)
    bad = [r for r in reports if not r.ok]
    print(f"{len(reports)} compiles, {len(bad)} with spills or too much shared memory")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
