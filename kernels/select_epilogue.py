"""EDBA's selection epilogue on the GPU: from every subset's (||sum||^2, |S|) to the chosen subset, its numbers and
its mask, inside the launch that computed the sums and without a host read.

Matches ``dynbatch_kernels.reference.choose``: the reference's fp32 sequence with correctly rounded division and
square root (as torch's on CUDA; torch's CPU float32 sqrt is not correctly rounded, so the CPU interpreter tests
compare the stats with rtol 1e-4 and the choice exactly).

Device functions, called at the end of the subset kernels (``subset_norms_gram``, ``subset_norms_direct``):
``block_choice`` scores one program's subsets and keeps its first minimum; ``publish_and_finish`` stores that
partial result and counts the program in with an atomic; the program that arrives last takes the first minimum over
all programs (programs cover increasing indices, so ties still go to the lowest subset index), regenerates the
winner's mask from its index, writes the stats and resets the counter for the next launch. A grid-wide reduction
in the same launch, as in a CUDA "last block" reduction: no second kernel.
"""
import torch
import triton
import triton.language as tl

from .configs import on_device
from .reference import choose as REFERENCE  # noqa: F401  (the op this file must match)
from .subset_rng import member, subset_key, subset_limit

FLT_MAX = tl.constexpr(3.4028234663852886e38)  # a compile-time constant inside the kernels
FINISH_BLOCK = 1024  # partial results the finishing program reads per iteration

_counters: dict[tuple[torch.device, int], torch.Tensor] = {}


def arrival_counter(device: torch.device, size: int = 1) -> torch.Tensor:
    """A zeroed int32 counter buffer (at least ``size``) kept per device and stream: each launch's last program
    resets what it used, so the buffer is zeroed once per process, not per launch. Launches on one stream run in
    order, so they never share a counter while it counts; selections on two streams get two counters."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    buf = _counters.get((device, stream))
    if buf is None or buf.numel() < size:
        buf = _counters[(device, stream)] = torch.zeros(max(size, 64), dtype=torch.int32, device=device)
    return buf


def workspace(device: torch.device, programs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-program partial results: fp32 (3, P) [min key, its norm, max count] and int32 (P,) [its index]."""
    return (torch.empty((3, programs), dtype=torch.float32, device=device),
            torch.empty((programs,), dtype=torch.int32, device=device))


@triton.jit
def block_choice(q, c, rows, N, trend_ptr, eps, SUM_METRIC: tl.constexpr):
    """Scores of subsets ``rows`` from their (||sum||^2, |S|) (fp32 (BLOCK,) each) and the trend [loss, loss EMA,
    gradient-norm EMA] (float (3,)): (least key, its subset index, its gradient norm, the largest count). The key is
    the margin (+inf for empty subsets), or minus the count before any EMA (NaN EMAs: the first largest subset
    wins)."""
    ok = rows < N
    root = tl.math.sqrt_rn(tl.maximum(q, 0.0, propagate_nan=tl.PropagateNan.ALL))
    if SUM_METRIC:
        g = root
    else:
        g = tl.math.div_rn(root, tl.maximum(c, 1.0))
    g = tl.where(c > 0, g, 0.0)
    loss_ema = tl.load(trend_ptr + 1).to(tl.float32)
    grad_ema = tl.load(trend_ptr + 2).to(tl.float32)
    num = tl.load(trend_ptr).to(tl.float32) - loss_ema
    den = g - grad_ema
    sign = tl.where(den < 0, -1.0, 1.0)
    den = tl.where(tl.abs(den) < eps, sign * eps, den)
    m = tl.abs(tl.math.div_rn(num + tl.zeros_like(den), den) - 1.0)
    m = tl.where((m != m) | (m == float("inf")), FLT_MAX, m)  # NaN and +inf rank last among non-empty
    has_ema = (loss_ema == loss_ema) & (grad_ema == grad_ema)
    key = tl.where(has_ema, tl.where(c > 0, m, float("inf")), -c)
    key = tl.where(ok, key, float("inf"))
    best = tl.argmin(key, axis=0, tie_break_left=True)
    hit = rows == tl.min(rows, axis=0) + best
    index = tl.sum(tl.where(hit, rows, 0), axis=0)
    return tl.min(key, axis=0), index, tl.sum(tl.where(hit, g, 0.0), axis=0), tl.max(tl.where(ok, c, 0.0), axis=0)


@triton.jit
def publish_and_finish(pid, P, key, index, norm, maxc, part_ptr, pidx_ptr, counter_ptr, trend_ptr, seed, thr, B,
                       stats_ptr, mask_ptr, MODE: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_MASK: tl.constexpr):
    """Store program ``pid``'s partial result; the last of the ``P`` programs to arrive finishes the selection."""
    tl.store(part_ptr + pid, key)
    tl.store(part_ptr + P + pid, norm)
    tl.store(part_ptr + 2 * P + pid, maxc)
    tl.store(pidx_ptr + pid, index)
    tl.debug_barrier()  # every thread's stores precede the release below
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == P - 1:
        finish(P, part_ptr, pidx_ptr, trend_ptr, seed, thr, B, stats_ptr, mask_ptr, MODE, BLOCK_P,
               BLOCK_MASK)
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def finish(P, part_ptr, pidx_ptr, trend_ptr, seed, thr, B, stats_ptr, mask_ptr,
           MODE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_MASK: tl.constexpr):
    """The first minimum over the programs' partial results, the winner's mask and the stats."""
    best_key = tl.full((), float("inf"), tl.float32)
    index = tl.zeros((), tl.int32)
    norm = tl.zeros((), tl.float32)
    maxc = tl.zeros((), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        okp = ps < P
        keys = tl.load(part_ptr + ps, mask=okp, other=float("inf"), cache_modifier=".cg")
        kmin = tl.min(keys, axis=0)
        hit = ps == p0 + tl.argmin(keys, axis=0, tie_break_left=True)
        better = kmin < best_key  # strict: an earlier block keeps its tie
        index = tl.where(better, tl.sum(tl.where(hit, tl.load(pidx_ptr + ps, mask=okp, other=0,
                                                                cache_modifier=".cg"), 0), axis=0), index)
        norm = tl.where(better, tl.sum(tl.where(hit, tl.load(part_ptr + P + ps, mask=okp, other=0.0,
                                                               cache_modifier=".cg"), 0.0), axis=0), norm)
        best_key = tl.minimum(best_key, kmin)
        maxc = tl.maximum(maxc, tl.max(tl.load(part_ptr + 2 * P + ps, mask=okp, other=0.0, cache_modifier=".cg"),
                                       axis=0))
    key = subset_key(seed, index)
    limit = subset_limit(key, thr, MODE)
    size = tl.zeros((), tl.int32)
    for b0 in range(0, B, BLOCK_MASK):
        cols = b0 + tl.arange(0, BLOCK_MASK)
        inside = cols < B
        m = tl.where(maxc > 0, member(key, cols, limit), inside) & inside  # every subset empty: the whole batch
        tl.store(mask_ptr + cols, m.to(tl.uint8), mask=inside)
        size += tl.sum(m.to(tl.int32), axis=0)
    has_ema = (tl.load(trend_ptr + 1) == tl.load(trend_ptr + 1)) & (tl.load(trend_ptr + 2) == tl.load(trend_ptr + 2))
    tl.store(stats_ptr + 0, tl.load(trend_ptr).to(tl.float64))
    tl.store(stats_ptr + 1, norm.to(tl.float64))
    tl.store(stats_ptr + 2, tl.where(has_ema, best_key.to(tl.float64), float("nan")))
    tl.store(stats_ptr + 3, size.to(tl.float64))
    tl.store(stats_ptr + 4, index.to(tl.float64))


@triton.jit(do_not_specialize=["seed", "thr"])
def _choose_kernel(q_ptr, cnt_ptr, N, trend_ptr, eps, part_ptr, pidx_ptr, counter_ptr, seed, thr,
                   B, stats_ptr, mask_ptr, SUM_METRIC: tl.constexpr, MODE: tl.constexpr,
                   BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_MASK: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    q = tl.load(q_ptr + rows, mask=rows < N, other=0.0)
    c = tl.load(cnt_ptr + rows, mask=rows < N, other=0.0)
    key, index, norm, maxc = block_choice(q, c, rows, N, trend_ptr, eps, SUM_METRIC)
    publish_and_finish(pid, tl.num_programs(0), key, index, norm, maxc, part_ptr, pidx_ptr, counter_ptr, trend_ptr,
                       seed, thr, B, stats_ptr, mask_ptr, MODE, BLOCK_P, BLOCK_MASK)


def outputs(device: torch.device, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection's results: stats float64 (5,) and the winner's mask as uint8 (B,)."""
    return (torch.empty(5, dtype=torch.float64, device=device),
            torch.empty(batch_size, dtype=torch.uint8, device=device))


def epilogue_constants(programs: int, batch_size: int, *, mode_id: int) -> dict:
    """The epilogue's launch constants."""
    return dict(MODE=mode_id, BLOCK_P=min(triton.next_power_of_2(max(programs, 1)), FINISH_BLOCK),
                BLOCK_MASK=min(triton.next_power_of_2(max(batch_size, 1)), 1024))


def choose(sq_sums: torch.Tensor, counts: torch.Tensor, args, batch_size: int, block: int = 1024):
    """``reference.choose`` on given sums in one launch: (stats float64 (5,) = [loss, grad_norm, margin, size,
    index], mask bool (B,)). sq_sums, counts: fp32 (N,); ``args``: the ``select_subset`` op's argument tuple (its
    ``trend``, ``seed``, ``mode``, ``threshold``, ``eps`` and ``sum_metric`` are read). The fused selection runs
    the same device functions at the end of its subset kernel; this entry tests them on sums a test chooses."""
    n = sq_sums.shape[0]
    dev = sq_sums.device
    programs = max(triton.cdiv(n, block), 1)
    part, pidx = workspace(dev, programs)
    stats, mask = outputs(dev, batch_size)
    with on_device(sq_sums):
        _choose_kernel[(programs,)](sq_sums, counts, n, args.trend, float(args.eps), part, pidx,
                                    arrival_counter(dev), args.seed, args.threshold, batch_size, stats, mask,
                                    SUM_METRIC=args.sum_metric, BLOCK=block,
                                    **epilogue_constants(programs, batch_size, mode_id=args.mode))
    return stats, mask.view(torch.bool)
