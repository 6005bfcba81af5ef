"""EDBA's selection epilogue on the GPU: from every subset's (||sum||^2, |S|) to the chosen subset, its numbers and
its mask, in two launches and without a host read.

Matches ``dynbatch_kernels.reference.choose``: the reference's fp32 sequence with correctly rounded division and
square root (as torch's on CUDA; torch's CPU float32 sqrt is not correctly rounded, so the CPU interpreter tests
compare the stats with rtol 1e-4 and the choice exactly). ``_score_kernel``: one program per ``BLOCK``
subsets computes norms and margins and keeps its first minimum (key, index, norm) and its largest count.
``_finish_kernel``: one program takes the first minimum over the programs (programs cover increasing indices, so
ties still go to the lowest subset index), regenerates the winner's mask from its index and writes the stats.
"""
import torch
import triton
import triton.language as tl

from .configs import on_device
from .reference import choose as REFERENCE  # noqa: F401  (the op this file must match)
from .subset_rng import member, subset_key, subset_limit

SCORE_BLOCK = 1024
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # a compile-time constant inside the kernels


@triton.jit
def _score_kernel(q_ptr, cnt_ptr, loss_ptr, N, loss_ema, grad_ema, eps, key_ptr, idx_ptr, norm_ptr, maxc_ptr,
                  HAS_EMA: tl.constexpr, SUM_METRIC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    q = tl.load(q_ptr + rows, mask=ok, other=0.0)
    c = tl.load(cnt_ptr + rows, mask=ok, other=0.0)
    root = tl.math.sqrt_rn(tl.maximum(q, 0.0, propagate_nan=tl.PropagateNan.ALL))
    if SUM_METRIC:
        g = root
    else:
        g = tl.math.div_rn(root, tl.maximum(c, 1.0))
    g = tl.where(c > 0, g, 0.0)
    if HAS_EMA:
        num = tl.load(loss_ptr).to(tl.float32) - loss_ema
        den = g - grad_ema
        sign = tl.where(den < 0, -1.0, 1.0)
        den = tl.where(tl.abs(den) < eps, sign * eps, den)
        m = tl.abs(tl.math.div_rn(num + tl.zeros_like(den), den) - 1.0)
        m = tl.where((m != m) | (m == float("inf")), FLT_MAX, m)  # NaN and +inf rank last among non-empty
        key = tl.where(c > 0, m, float("inf"))
    else:
        key = -c  # the first largest subset
    key = tl.where(ok, key, float("inf"))
    best = tl.argmin(key, axis=0, tie_break_left=True)
    hit = tl.arange(0, BLOCK) == best
    tl.store(key_ptr + pid, tl.min(key, axis=0))
    tl.store(idx_ptr + pid, pid * BLOCK + best)
    tl.store(norm_ptr + pid, tl.sum(tl.where(hit, g, 0.0), axis=0))
    tl.store(maxc_ptr + pid, tl.max(c, axis=0))


@triton.jit(do_not_specialize=["seed", "thr"])
def _finish_kernel(key_ptr, idx_ptr, norm_ptr, maxc_ptr, P, loss_ptr, seed, thr, B, stats_ptr, mask_ptr,
                   HAS_EMA: tl.constexpr, MODE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    ps = tl.arange(0, BLOCK_P)
    okp = ps < P
    keys = tl.load(key_ptr + ps, mask=okp, other=float("inf"))
    best = tl.argmin(keys, axis=0, tie_break_left=True)
    hit = ps == best
    index = tl.sum(tl.where(hit, tl.load(idx_ptr + ps, mask=okp, other=0), 0), axis=0)
    norm = tl.sum(tl.where(hit, tl.load(norm_ptr + ps, mask=okp, other=0.0), 0.0), axis=0)
    any_member = tl.max(tl.load(maxc_ptr + ps, mask=okp, other=0.0), axis=0) > 0
    key = subset_key(seed, index)
    limit = subset_limit(key, thr, MODE)
    size = tl.zeros((), tl.int32)
    for b0 in range(0, B, BLOCK_B):
        cols = b0 + tl.arange(0, BLOCK_B)
        inside = cols < B
        m = tl.where(any_member, member(key, cols, limit), inside) & inside  # every subset empty: the whole batch
        tl.store(mask_ptr + cols, m.to(tl.uint8), mask=inside)
        size += tl.sum(m.to(tl.int32), axis=0)
    tl.store(stats_ptr + 0, tl.load(loss_ptr).to(tl.float64))
    tl.store(stats_ptr + 1, norm.to(tl.float64))
    if HAS_EMA:
        tl.store(stats_ptr + 2, tl.min(keys, axis=0).to(tl.float64))
    else:
        tl.store(stats_ptr + 2, float("nan"))
    tl.store(stats_ptr + 3, size.to(tl.float64))
    tl.store(stats_ptr + 4, index.to(tl.float64))


def choose(sq_sums: torch.Tensor, counts: torch.Tensor, loss: torch.Tensor, *, seed: int, mode_id: int, thr: int,
           batch_size: int, loss_ema: float, grad_ema: float, has_ema: bool, eps: float, metric: str = "mean"):
    """``reference.choose`` in two kernels: (stats float64 (5,) = [loss, grad_norm, margin, size, index],
    mask bool (B,)). sq_sums, counts: fp32 (N,) on the GPU; loss: 0-d, any float dtype."""
    n = sq_sums.shape[0]
    dev = sq_sums.device
    programs = triton.cdiv(n, SCORE_BLOCK)
    keys = torch.empty(programs, dtype=torch.float32, device=dev)
    idx = torch.empty(programs, dtype=torch.int32, device=dev)
    norms = torch.empty(programs, dtype=torch.float32, device=dev)
    maxc = torch.empty(programs, dtype=torch.float32, device=dev)
    stats = torch.empty(5, dtype=torch.float64, device=dev)
    mask = torch.empty(batch_size, dtype=torch.uint8, device=dev)
    with on_device(sq_sums):
        _score_kernel[(programs,)](sq_sums, counts, loss, n, float(loss_ema), float(grad_ema), float(eps), keys, idx,
                                   norms, maxc, HAS_EMA=has_ema, SUM_METRIC=metric == "sum", BLOCK=SCORE_BLOCK)
        _finish_kernel[(1,)](keys, idx, norms, maxc, programs, loss, seed, thr, batch_size, stats, mask,
                             HAS_EMA=has_ema, MODE=mode_id, BLOCK_P=triton.next_power_of_2(max(programs, 1)),
                             BLOCK_B=min(triton.next_power_of_2(max(batch_size, 1)), 1024))
    return stats, mask.view(torch.bool)
