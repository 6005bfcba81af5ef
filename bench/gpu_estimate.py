"""What one EDBA selection should cost on an A100 and an H100: an estimate on paper, beside this CPU's measurement.

No GPU ran any of this. From each kernel's work (multiply-adds, integer operations of the in-kernel subset
generator, unique DRAM bytes) and the targets' published dense peak rates, the estimate is

    time = max(multiply-adds / MAC rate, DRAM bytes / bandwidth) + generator integer ops / INT32 rate + 2 launches

assuming operands re-read by every program (K, or the E and A tiles) stay in L2, which they do at these sizes
(K is 4 MB at B = 1000). Real kernels reach some fraction of peak; read the figures as lower bounds.

    python -m dynbatch_bench.gpu_estimate [--out bench/results/gpu-aot/estimate.md] [--json FILE]

On a CUDA machine the last column is that GPU's measurement (the GPU check runs it there).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

# Published dense peak rates: (fp32 FMA, tf32 tensor, bf16 tensor) in multiply-adds/s (half the FLOP/s figure),
# INT32 ops/s, HBM bytes/s. A100 SXM4 80 GB and H100 SXM5 80 GB (NVIDIA data sheets).
GPUS = {
    "A100": {"fp32": 19.5e12 / 2, "tf32": 156e12 / 2, "bf16": 312e12 / 2, "int32": 19.5e12, "hbm": 2.039e12},
    "H100": {"fp32": 66.9e12 / 2, "tf32": 494.7e12 / 2, "bf16": 989.4e12 / 2, "int32": 33.5e12, "hbm": 3.35e12},
}
LAUNCH_S = 5e-6  # per kernel launch, typical
LAUNCHES = 2  # a Triton selection: K (or the residuals), then the subset kernel with the epilogue
GEN_OPS = 12  # integer operations per generated mask element: one lowbias32 (7) + index mixing and compare (5)
C, D = 10, 64  # EDBA's CIFAR-10 default: 10 classes, PreResNet-56's 64 last-layer features
TILES = {"gram": 64, "direct": 64}  # BLOCK_I (gram) / BLOCK_J (direct) of configs.GPU


def work(b: int, n: int) -> dict:
    """Route the dispatcher picks, multiply-adds, generated mask elements and unique DRAM bytes of one selection."""
    j = C * (D + 1)
    if b < j:  # the dispatcher's rule: Gram when B < C(D+1)
        route = "gram"
        macs = n * b * b + b * b * (C + D + 1)
        masks = n * b * (math.ceil(b / 32) + 1) * math.ceil(b / TILES["gram"])  # mk per (i, k) tile, mi per i
        dram = 4 * (b * b + b * (C + D + 1))  # K and the inputs; no N-sized array leaves the subset kernel
    else:
        route = "direct"
        macs = n * b * j
        masks = n * b * (math.ceil(j / TILES["direct"]) + 1)
        dram = 4 * (b * (C + D + 1))
    return {"route": route, "macs": macs, "masks": masks, "dram": dram}


def estimate(gpu: str, w: dict, precision: str) -> float:
    r = GPUS[gpu]
    return max(w["macs"] / r[precision], w["dram"] / r["hbm"]) + w["masks"] * GEN_OPS / r["int32"] + LAUNCHES * LAUNCH_S


def measured_ms(b: int, n: int, rounds: int, device: str) -> float:
    """Median wall time of ``select_subset`` on ``device`` (auto backend: the native extension on CPU, Triton on
    CUDA), fp32 inputs, ms; each call ends with the read of its choice, as EDBA's step does."""
    import torch

    from dynbatch.ops import SubsetSpec, select_subset

    g = torch.Generator().manual_seed(0)
    logits, feats = torch.randn(b, C, generator=g).to(device), torch.randn(b, D, generator=g).to(device)
    y = torch.randint(0, C, (b,), generator=g).to(device)
    kw = dict(seed=1, loss=1.0, loss_ema=1.1, grad_ema=0.5)
    spec = SubsetSpec(n)
    select_subset(logits, y, feats, spec, **kw).index.item()  # compiles / loads the extension
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        select_subset(logits, y, feats, spec, **kw).index.item()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/gpu-aot/estimate.md")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    import torch

    from dynbatch_bench.common import machine

    m = machine()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    here = m.get("gpu", "this GPU") if device == "cuda" else "this CPU"
    how = (f"`select_subset` measured on {m['gpu']} (Triton backend, fp32 inputs)" if device == "cuda" else
           f"`select_subset` measured here ({m['cpu']}, {m['threads']} threads, native backend)")
    lines = [
        "#### Expected cost of one selection on A100 and H100" + (f", beside {here}" if device == "cuda" else
                                                                   " (an estimate; no GPU ran it)"), "",
        f"C = {C}, D = {D} (EDBA on CIFAR-10 with PreResNet-56). Estimate = max(multiply-adds / peak MAC rate, "
        "unique DRAM bytes / bandwidth) + subset-generator integer ops / INT32 rate + 2 launches of 5 µs; operands "
        "re-read by every program are assumed to stay in L2. fp32: IEEE on CUDA cores (what EDBA runs: it selects "
        "in fp32 on every rank); 16-bit: tf32 tensor cores on the Gram route, bf16 tensor cores on the direct route "
        "(the functional API with bf16 inputs). Peak rates are the data sheets' dense figures; a real kernel "
        "reaches a fraction of them, so these are lower bounds.", "",
        f"Last column: {how}, median of {a.rounds}, each call ending with the read of its choice.", "",
        "| B | N | route | multiply-adds | generated mask elements | A100 fp32 | A100 16-bit | H100 fp32 | "
        f"H100 16-bit | {here} (measured) |", "|" + "---|" * 10]
    rows = []
    for b in (100, 1000):
        for n in (4096, 65536):
            w = work(b, n)
            low = "tf32" if w["route"] == "gram" else "bf16"
            est = [estimate(g, w, p) for g in GPUS for p in ("fp32", low)]
            ms = measured_ms(b, n, a.rounds, device)
            rows.append({"B": b, "N": n, **w, "estimate_s": dict(zip(("A100_fp32", "A100_16bit", "H100_fp32",
                                                                        "H100_16bit"), est)),
                         "measured_ms": ms, "measured_on": here})
            lines.append(f"| {b} | {n} | {w['route']} | {w['macs']:.3g} | {w['masks']:.3g} | "
                         + " | ".join(f"{1e6 * t:,.0f} µs" for t in est) + f" | {ms:,.3g} ms |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"machine": m, "rows": rows}, indent=1))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
