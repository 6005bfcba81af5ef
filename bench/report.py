"""Turn a pytest-benchmark JSON of the dynbatch suites into ``report.md`` (medians and ratios) and ``bench.png``.

    python bench/report.py RESULTS.json --out DIR
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

PEERS = ("opacus", "backpack")
SEL_IMPLS = ("naive", "functorch", "opacus", "backpack", "torch_direct", "torch_gram", "native", "triton", "auto",
             "select_torch", "select_auto")


def load(path: Path):
    data = json.loads(Path(path).read_text())
    rows = []
    for b in data["benchmarks"]:
        e = dict(b.get("extra_info", {}))
        e["median_s"] = b["stats"]["median"]
        rows.append(e)
    return data, rows


def fmt_ms(s):
    return "–" if s is None else (f"{s * 1e3:,.0f}" if s >= 0.1 else f"{s * 1e3:.2f}")


def ratio(a, b):
    return "–" if a is None or b is None else f"{a / b:.1f}×"


def header(data, rows) -> list[str]:
    m = next((r["machine"] for r in rows if "machine" in r), {})
    lines = [f"- machine: {m.get('cpu', '?')}, {m.get('threads', '?')} torch threads; device **{m.get('device', '?')}**"
             + (f" ({m['gpu']})" if m.get("gpu") else " (no GPU)"),
             f"- torch {m.get('torch')}, triton {m.get('triton')}; run {data.get('datetime', '')[:19]}"]
    return lines


def selection_table(rows) -> list[str]:
    sel = [r for r in rows if r.get("suite") == "selection"]
    mm = {(r["B"], r["C"], r["N"]): r["median_s"] for r in rows if r.get("suite") == "roofline"}
    if not sel:
        return []
    t = defaultdict(dict)
    naive_n = {}
    for r in sel:
        key = (r["B"], r["C"], r["N"])
        t[key][r["impl"]] = r["median_s"]
        t[key]["route"] = r["route"]
        if r["impl"] == "naive":
            naive_n[key] = r["measured_N"]
    present = [i for i in SEL_IMPLS if any(i in v for v in t.values())]
    out = ["### Selection: norms of N subset-mean last-layer gradients (median ms)", "",
           "D = 64. Every implementation is checked against the torch reference before it is timed. `auto` is "
           "`subset_grad_norms(backend='auto')` with the masks given; `select_*` is the full `select_subset` with "
           "masks drawn inside the kernel. `naive` beyond N = 4096 is measured at N = 4096 (marked *).", "",
           "| B | C | N | route | " + " | ".join(present) + " | naive/auto | functorch/auto | opacus/auto | "
           "backpack/auto | torch(route)/auto | select torch/auto | mm rate: auto | mm rate: select |",
           "|" + "---|" * (4 + len(present) + 8)]
    for key in sorted(t):
        v = t[key]
        route = v["route"]
        cells = []
        for i in present:
            s = fmt_ms(v.get(i))
            if i == "naive" and key in naive_n and naive_n[key] != key[2]:
                s += "*"
            cells.append(s)
        naive_ok = naive_n.get(key) == key[2]
        auto = v.get("auto")
        torch_same = v.get(f"torch_{route}")
        mmr = mm.get(key)
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {route} | " + " | ".join(cells) + " | "
                   + " | ".join([ratio(v.get("naive"), auto) if naive_ok else "–", ratio(v.get("functorch"), auto),
                                 ratio(v.get("opacus"), auto), ratio(v.get("backpack"), auto), ratio(torch_same, auto),
                                 ratio(v.get("select_torch"), v.get("select_auto")),
                                 f"{mmr / auto:.2f}" if mmr and auto else "–",
                                 f"{mmr / v['select_auto']:.2f}" if mmr and v.get("select_auto") else "–"]) + " |")
    missing = [p for p in PEERS if p not in present]
    if missing:
        out += ["", f"Missing peers (not installed here; `pip install -e '.[peers]'`): {', '.join(missing)}."]
    out += ["", "mm rate: `torch.mm` time on the product the route is equivalent to ((N×B)@(B×B) for Gram, "
            "(N×B)@(B×C(D+1)) for direct) divided by the implementation's time: the fraction of torch.mm's "
            "multiply-add rate achieved (1.00 = as fast as the equivalent GEMM).", ""]
    return out


def step_table(rows) -> list[str]:
    st = [r for r in rows if r.get("suite") == "step"]
    if not st:
        return []
    t = defaultdict(dict)
    for r in st:
        t[(r["model"], r["batch"])][r["impl"]] = r["median_s"]
    pols = [p for p in ("fixed", "split", "split_reuse", "edba", "adabatch") if any(p in v for v in t.values())]
    out = ["### Training step per policy (median ms per loader batch, and overhead against fixed)", "",
           "| model | loader batch | " + " | ".join(pols) + " | " + " | ".join(f"{p}/fixed" for p in pols[1:]) + " |",
           "|" + "---|" * (2 + 2 * len(pols) - 1)]
    for key in sorted(t):
        v = t[key]
        out.append(f"| {key[0]} | {key[1]} | " + " | ".join(fmt_ms(v.get(p)) for p in pols) + " | "
                   + " | ".join(ratio(v.get(p), v.get("fixed")) for p in pols[1:]) + " |")
    return out + [""]


SCORE_IMPLS = ("naive", "functorch", "opacus", "backpack", "torch", "auto")


def scores_table(rows) -> list[str]:
    sc = [r for r in rows if r.get("suite") == "scores"]
    if not sc:
        return []
    t = defaultdict(dict)
    mem = defaultdict(dict)
    mm = {}
    for r in sc:
        if r["impl"] == "mm":
            mm[(r["B"], r["C"], r["D"])] = r["median_s"]
            continue
        key = (r["B"], r["C"], r["D"], r["by_class"])
        if "missing" not in r:
            t[key][r["impl"]] = r["median_s"]
            mem[key][r["impl"]] = r.get("memory_bytes")
    present = [i for i in SCORE_IMPLS if any(i in v for v in t.values())]
    missing = sorted({r["impl"] for r in sc if "missing" in r})
    out = ["### Scores: per-sample loss, norms, agreement and consensus against the batch (median ms)", "",
           "`auto`/`torch`: `sample_scores` (the registered op / the torch reference), every score in one call; the "
           "others compute the gradient scores from materialised per-sample gradients. `class`: with the "
           "class-conditional scores. Ratios: functorch over `auto` (target ≥ 10× at B = 256, C = 10, D = 64) and "
           "`auto` over one `torch.mm` of the head's shape (target ≤ 3× at B = 1024, C = 100, D = 512). Memory: "
           "peak resident growth of one call (MB)." + (f" Not installed: {', '.join(missing)}." if missing else ""),
           "",
           "| B | C | D | scores | " + " | ".join(present) + " | mm | functorch / auto | auto / mm | MB functorch | "
           "MB auto |", "|" + "---|" * (len(present) + 9)]
    for key in sorted(t):
        v, m = t[key], mem[key]
        floor = mm.get(key[:3])
        mb = lambda x: "–" if x is None else f"{x / 1e6:.1f}"  # noqa: E731
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {'class' if key[3] else 'batch'} | "
                   + " | ".join(fmt_ms(v.get(p)) for p in present) + f" | {fmt_ms(floor)} | "
                   + f"{ratio(v.get('functorch'), v.get('auto'))} | {ratio(v.get('auto'), floor)} | "
                   + f"{mb(m.get('functorch'))} | {mb(m.get('auto'))} |")
    return out + [""]


# what each row's ratio is taken against (the two materialised rows are floors)
LM_BASES = {"fused": "materialised", "fused_reference": "fused", "fused_token_scores": "fused",
            "fused_sequence_norms": "fused", "fused_agreement": "fused", "torch_func": "fused_sequence_norms",
            "opacus_ghost": "fused_sequence_norms", "liger": "materialised", "cut_cross_entropy": "materialised",
            "token_scores": "materialised_scores"}


def lm_head_table(rows) -> list[str]:
    """The LM head: each row's median and peak memory growth, its ratio to the materialised forward and backward
    (and the scores' to the fused loss), with the targets of issue #49."""
    lm = [r for r in rows if r.get("suite") == "lm_head"]
    if not lm:
        return []
    out = ["### Language-model head: loss forward + backward and scores at vocabulary scale", "",
           "Median ms and peak memory growth of one call (MB). Ratios: `fused` over `materialised` (target ≤ 1.2×, "
           "memory ≤ 10 %), the scores over `fused` (per-token ≤ 1.05×, per-sequence norms ≤ 1.5×, agreement ≤ "
           "2×), `torch_func` and `opacus_ghost` over `fused_sequence_norms` (`torch_func`: target ≥ 50×; it "
           "computes the norms alone), `fused_reference` (the chunked torch implementation) over `fused` (the "
           "device's kernels: native on CPU, Triton on CUDA), `token_scores` (the per-token scores alone, no "
           "backward) over `materialised_scores` (the logits and `F.cross_entropy(reduction='none')`).", "",
           "| N | D | V | T | impl | ms | MB | ratio | against |", "|---|---|---|---|---|---|---|---|---|"]
    shapes = sorted({(r["N"], r["D"], r["V"], r["T"]) for r in lm})
    mb = lambda x: "–" if x is None else f"{x / 1e6:,.0f}"  # noqa: E731
    for shape in shapes:
        got = {r["impl"]: r for r in lm if (r["N"], r["D"], r["V"], r["T"]) == shape}
        for impl in got:  # in the suite's order
            r = got[impl]
            if "missing" in r:
                out.append(f"| {' | '.join(map(str, shape))} | {impl} | – | – | – | {r['missing']} |")
                continue
            base = LM_BASES.get(impl)
            rat = ratio(r["median_s"], got.get(base, {}).get("median_s")) if base else "1.0×"
            out.append(f"| {' | '.join(map(str, shape))} | {impl} | {fmt_ms(r['median_s'])} | "
                       f"{mb(r.get('memory_bytes'))} | {rat} | {base or ''} |")
    return out + [""]


def fixed_cost_lines(rows) -> list[str]:
    fc = {r["impl"]: r["median_s"] for r in rows if r.get("suite") == "selection_fixed"}
    if not fc:
        return []
    parts = [f"`{impl}` {1e6 * s:,.0f} µs" for impl, s in sorted(fc.items())]
    return ["Fixed cost of one `select_subset` call where the work is nil (B = 8, N = 16; target ≤ 50 µs for the "
            "native backend, `auto` on CPU): " + ", ".join(parts) + ".", ""]


def overhead_table(rows) -> list[str]:
    ov = {r["impl"]: r for r in rows if r.get("suite") == "overhead" and "compare_median_s" in r}
    if not ov:
        return []
    out = ["### Host overhead per step: dynbatch against minimal hand-written loops", "",
           "Tiny MLP on the device-resident digits, batch 32, one thread, blocks of 50 steps; the dynbatch loop and "
           "its minimal loop (`bench/minimal_loops.py`) alternate block by block in the same run, 40 blocks each. "
           "Target: fixed ≤ 1.1×, EDBA ≤ 1.15×.", "",
           "| loop | µs per step | minimal loop | µs per step | ratio |", "|---|---|---|---|---|"]
    for impl in ("dynbatch_fixed", "dynbatch_adabatch", "dynbatch_edba"):
        r = ov.get(impl)
        if r:
            us, ref_us = 1e6 * r["median_s"] / r["steps"], 1e6 * r["compare_median_s"] / r["steps"]
            out.append(f"| {impl.replace('dynbatch_', '')} | {us:,.0f} | {r['compare'].replace('_', ' ')} | "
                       f"{ref_us:,.0f} | {us / ref_us:.2f}× |")
    return out + [""]


def precision_table(rows) -> list[str]:
    pr = [r for r in rows if r.get("suite") == "precision"]
    if not pr:
        return []
    native = pr[0].get("native_bf16")
    out = ["### Precision and layout: a training step per setting, as `--amp` / `--channels-last` resolve", "",
           f"This device {'computes bf16 natively' if native else 'has no native bf16 (no avx512_bf16 / amx_bf16)'}"
           f"{': `--amp auto` asks the probe' if native else ': `--amp auto` is fp32 without a probe'}. Targets: "
           "default never slower than fp32 beyond noise (≤ 1.05×) on either model; PreResNet-20 default ≥ 1.8× fp32 "
           "contiguous where bf16 is native.", "",
           "| model | setting | resolved | ms per step | speed-up over fp32 contiguous |", "|---|---|---|---|---|"]
    for model in dict.fromkeys(r.get("model", "preresnet20") for r in pr):
        mine = {r["impl"]: r for r in pr if r.get("model", "preresnet20") == model}
        base = mine.get("fp32_contiguous")
        for name in ("fp32_contiguous", "fp32_channels_last", "default", "bf16_channels_last"):
            r = mine.get(name)
            if r and base:
                out.append(f"| {model} | {name.replace('_', ' ')} | {r['resolved']} | {fmt_ms(r['median_s'])} | "
                           f"{base['median_s'] / r['median_s']:.2f}× |")
        v = mine.get("probe", {}).get("verdict")
        if v:
            out.append(f"| {model} | probe verdict | {'bf16' if v['bf16'] else 'fp32'} | fp32 "
                       f"{fmt_ms(v['fp32_ms'] / 1e3)}, bf16 {fmt_ms(v['bf16_ms'] / 1e3)} ({v['steps']} steps each; "
                       f"the probe took {fmt_ms(mine['probe']['median_s'])}) | "
                       f"{v['fp32_ms'] / v['bf16_ms']:.2f}× bf16 |")
    return out + [""]


def pipeline_table(rows) -> list[str]:
    pl = [r for r in rows if r.get("suite") == "pipeline"]
    if not pl:
        return []
    dev = next((r for r in pl if r["impl"] == "device_resident"), None)
    out = ["### Data pipeline (augmented images per second, one epoch, batch 256)", "",
           "| pipeline | images/s | device-resident speed-up |", "|---|---|---|"]
    for r in sorted(pl, key=lambda r: r["median_s"]):
        ips = r["samples"] / r["median_s"]
        out.append(f"| {r['impl']} | {ips:,.0f} | {ratio(r['median_s'], dev['median_s']) if dev else '–'} |")
    return out + [""]


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r.get("suite") == "selection" and r.get("measured_N") == r.get("N")]
    if not sel:
        return
    fig, axes = plt.subplots(2, 2, figsize=(12, 9), constrained_layout=True)
    bs = sorted({r["B"] for r in sel})
    b_mid = 256 if 256 in bs else bs[len(bs) // 2]
    ns = sorted({r["N"] for r in sel})
    n_mid = 4096 if 4096 in ns else ns[-1]
    for col, c in enumerate(sorted({r["C"] for r in sel})[:2]):
        for row, (xk, fixed_k, fixed_v) in enumerate((("N", "B", b_mid), ("B", "N", n_mid))):
            ax = axes[row, col]
            for impl in SEL_IMPLS:
                pts = sorted((r[xk], r["median_s"] * 1e3) for r in sel
                             if r["impl"] == impl and r["C"] == c and r[fixed_k] == fixed_v)
                if len(pts) > 1:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xk)
            ax.set_ylabel("median ms")
            ax.set_title(f"C={c}, {fixed_k}={fixed_v}")
            ax.grid(alpha=0.3, which="both")
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("results")
    ap.add_argument("--out", required=True)
    ap.add_argument("--command", default="")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data, rows = load(Path(a.results))
    lines = ["## Benchmark report", ""] + header(data, rows)
    if a.command:
        lines.append(f"- produced by: `{a.command}`")
    lines.append("")
    lines += (selection_table(rows) + fixed_cost_lines(rows) + scores_table(rows) + step_table(rows) + overhead_table(rows) + precision_table(rows)
              + pipeline_table(rows) + lm_head_table(rows))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "bench.png")
    print(f"wrote {out / 'report.md'} and {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
