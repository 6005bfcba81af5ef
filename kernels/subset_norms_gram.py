"""Squared norms of subset-sum gradients, Gram route: m^T K m with K = (E E^T) o (A A^T).

Matches ``dynbatch_kernels.reference.subset_sq_sums(route="gram")``. K (B x B) is one launch from the logits and
features (residuals formed in registers); the subset kernel then computes rowsum((M K) o M) with the mask tiles
drawn in-kernel, never storing M, and in the selection also picks the subset (``select_epilogue``): a selection on
this route is two launches. Work: N * B^2 multiply-adds, cheaper than the direct route whenever B < C(D+1).
"""
import torch
import triton
import triton.language as tl

from .reference import subset_sq_sums as REFERENCE  # noqa: F401  (the op this file must match)
from .configs import on_device, split_launch_options, subset_config
from .residuals import softmax_residual
from .select_epilogue import arrival_counter, block_choice, epilogue_constants, outputs, publish_and_finish, workspace
from .subset_rng import dot_dtype_args, low_precision_dot as _dot, mask_tile


@triton.jit
def _gram_sums(k_ptr, masks_ptr, seed, thr, rows, N, B, MODE: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
               ROUND_ONLY: tl.constexpr):
    """(m^T K m, |m|) fp32 (BLOCK_N,) for subsets ``rows``, their mask tiles drawn (or read) in registers."""
    q = tl.zeros((BLOCK_N,), tl.float32)
    cnt = tl.zeros((BLOCK_N,), tl.float32)
    for i0 in range(0, B, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I)
        acc = tl.zeros((BLOCK_N, BLOCK_I), tl.float32)
        for k0 in range(0, B, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kt = tl.load(k_ptr + ks[:, None] * B + cols[None, :], mask=(ks[:, None] < B) & (cols[None, :] < B),
                         other=0.0)
            mk = mask_tile(masks_ptr, seed, thr, rows, ks, N, B, MODE)
            acc = _dot(mk, kt, acc, DOT_DTYPE, PRECISION, ROUND_ONLY)
        mi = mask_tile(masks_ptr, seed, thr, rows, cols, N, B, MODE).to(tl.float32)
        q += tl.sum(acc * mi, axis=1)
        cnt += tl.sum(mi, axis=1)
    return q, cnt


@triton.jit(do_not_specialize=["seed", "thr"])
def _gram_kernel(k_ptr, masks_ptr, sq_ptr, cnt_ptr, N, B, seed, thr, MODE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                 ROUND_ONLY: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    q, cnt = _gram_sums(k_ptr, masks_ptr, seed, thr, rows, N, B, MODE, BLOCK_N, BLOCK_I, BLOCK_K, DOT_DTYPE,
                        PRECISION, ROUND_ONLY)
    tl.store(sq_ptr + rows, q, mask=rows < N)
    tl.store(cnt_ptr + rows, cnt, mask=rows < N)


@triton.jit(do_not_specialize=["seed", "thr"])
def _gram_select_kernel(k_ptr, N, B, seed, thr, trend_ptr, eps, part_ptr, pidx_ptr, counter_ptr,
                        stats_ptr, mask_ptr, MODE: tl.constexpr, SUM_METRIC: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                        ROUND_ONLY: tl.constexpr):
    """The subset sums and the selection epilogue in one launch: no N-sized tensor leaves the registers."""
    tl.static_assert(MODE != 0, "the selection draws its subsets")
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    q, cnt = _gram_sums(k_ptr, k_ptr, seed, thr, rows, N, B, MODE, BLOCK_N, BLOCK_I, BLOCK_K, DOT_DTYPE, PRECISION,
                        ROUND_ONLY)
    key, index, norm, maxc = block_choice(q, cnt, rows, N, trend_ptr, eps, SUM_METRIC)
    publish_and_finish(pid, tl.num_programs(0), key, index, norm, maxc, part_ptr, pidx_ptr, counter_ptr, trend_ptr,
                       seed, thr, B, stats_ptr, mask_ptr, MODE, BLOCK_P, BLOCK_MASK)


@triton.jit
def softmax_stats(logits_ptr, rows, B, C, stride, BLOCK_C: tl.constexpr):
    """Row maximum and sum of exp(z - max) of the logits rows ``rows`` (fp32, shape of ``rows``); (0, 1) past B."""
    mx = tl.zeros_like(rows.to(tl.float32)) - float("inf")
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        z = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride + cs[None, :],
                    mask=(rows[:, None] < B) & (cs[None, :] < C), other=float("-inf")).to(tl.float32)
        mx = tl.maximum(mx, tl.max(z, axis=1))
    mx = tl.where(rows < B, mx, 0.0)  # rows past B: no -inf - -inf
    s = tl.zeros_like(mx)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        ok = (rows[:, None] < B) & (cs[None, :] < C)
        z = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride + cs[None, :], mask=ok,
                    other=float("-inf")).to(tl.float32)
        s += tl.sum(tl.where(ok, tl.exp(z - mx[:, None]), 0.0), axis=1)
    return mx, tl.where(rows < B, s, 1.0)


@triton.jit
def residual_tile(logits_ptr, targets, rows, cs, mx, s, B, C, stride, smoothing):
    """e = softmax(z) - t for rows ``rows`` x classes ``cs``, fp32 (len(rows), len(cs)); 0 outside B x C."""
    ok = (rows[:, None] < B) & (cs[None, :] < C)
    z = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride + cs[None, :], mask=ok,
                other=float("-inf")).to(tl.float32)
    return softmax_residual(z, mx[:, None], s[:, None], cs[None, :] == targets[:, None], ok, C, smoothing)


@triton.jit
def _gram_matrix_kernel(logits_ptr, targets_ptr, feat_ptr, k_ptr, B, C, D, stride_l, stride_f, smoothing,
                        BIAS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """K[i, j] = <e_i, e_j> <a_i, a_j> for a BLOCK x BLOCK tile, from the logits and features themselves: the
    residuals are formed in registers (each program recomputes its rows' softmax, O(B C) work against the tile's
    O(B^2 (C + D))), so no residual launch precedes this one."""
    ri = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rj = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mi, si = softmax_stats(logits_ptr, ri, B, C, stride_l, BLOCK_C)
    mj, sj = softmax_stats(logits_ptr, rj, B, C, stride_l, BLOCK_C)
    ti = tl.load(targets_ptr + ri, mask=ri < B, other=0).to(tl.int32)
    tj = tl.load(targets_ptr + rj, mask=rj < B, other=0).to(tl.int32)
    ee = tl.zeros((BLOCK, BLOCK), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        ei = residual_tile(logits_ptr, ti, ri, cs, mi, si, B, C, stride_l, smoothing)
        ej = residual_tile(logits_ptr, tj, rj, cs, mj, sj, B, C, stride_l, smoothing)
        ee = tl.dot(ei, tl.trans(ej), ee, input_precision="ieee")
    hh = tl.zeros((BLOCK, BLOCK), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        hi = tl.load(feat_ptr + ri[:, None].to(tl.int64) * stride_f + ds[None, :],
                     mask=(ri[:, None] < B) & (ds[None, :] < D), other=0.0).to(tl.float32)
        hj = tl.load(feat_ptr + rj[:, None].to(tl.int64) * stride_f + ds[None, :],
                     mask=(rj[:, None] < B) & (ds[None, :] < D), other=0.0).to(tl.float32)
        hh = tl.dot(hi, tl.trans(hj), hh, input_precision="ieee")
    if BIAS:
        hh += 1.0  # the bias column of A = [h, 1]
    tl.store(k_ptr + ri[:, None] * B + rj[None, :], ee * hh, mask=(ri[:, None] < B) & (rj[None, :] < B))


def gram_matrix(head) -> torch.Tensor:
    """K = (E E^T) o (A A^T), fp32 (B, B), in one launch straight from the op's head (its logits (B, C) and
    features (B, D) of any float dtype; ``reference.gram_matrix`` of the reference residuals and augmented
    features)."""
    logits, targets, features = head.logits, head.targets, head.features
    b, c = logits.shape
    d = features.shape[1]
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    features = features if features.stride(1) == 1 else features.contiguous()
    k = torch.empty((b, b), dtype=torch.float32, device=logits.device)
    if b == 0:
        return k
    block = 32
    with on_device(logits):
        _gram_matrix_kernel[(triton.cdiv(b, block), triton.cdiv(b, block))](
            logits, targets, features, k, b, c, d, logits.stride(0), features.stride(0), float(head.label_smoothing),
            BIAS=head.bias, BLOCK=block, BLOCK_C=16, BLOCK_D=32)
    return k


def subset_sq_sums_gram(args, dot_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(||sum_S g_i||^2, |S|), fp32 (N,) each, in two launches (K, then the subsets), for ``args``, the
    ``subset_sq_sums`` op's argument tuple: logits (B, C), features (B, D); masks uint8 (N, B) when ``mode`` is
    0, else drawn from ``seed``.

    K stays fp32 whatever ``dot_dtype``: K_ii = ||e_i||^2 ||a_i||^2 overflows fp16 (65,504) for inputs that fp16
    holds (features of 120 over D = 512 give 4.8e5), so 16-bit inputs multiply K as tf32 on tensor cores instead:
    fp32's range, fp16's 10-bit mantissa, fp32 accumulation.
    """
    b, n, masks = args.logits.shape[0], args.num_subsets, args.masks
    dev = args.logits.device
    k = gram_matrix(args)  # fp32 (B, B)
    sq = torch.empty((n,), dtype=torch.float32, device=dev)
    cnt = torch.empty((n,), dtype=torch.float32, device=dev)
    if n == 0:
        return sq, cnt
    tiles, opts, dot = _subset_launch(dot_dtype, dev)
    with on_device(k):
        _gram_kernel[(triton.cdiv(n, tiles["BLOCK_N"]),)](
            k, masks if masks is not None else k, sq, cnt, n, b, args.seed, args.threshold, MODE=args.mode, **tiles,
            **opts, **dot)
    return sq, cnt


def select_gram(args, dot_dtype: torch.dtype):
    """The whole selection in two launches (K; subset sums with the epilogue): ``reference.select``'s
    (stats float64 (5,), mask bool (B,)) for ``args``, the ``select_subset`` op's argument tuple
    (``num_subsets >= 1`` subsets drawn from its ``seed``)."""
    b, n = args.logits.shape[0], args.num_subsets
    dev = args.logits.device
    k = gram_matrix(args)
    tiles, opts, dot = _subset_launch(dot_dtype, dev)
    programs = triton.cdiv(n, tiles["BLOCK_N"])
    part, pidx = workspace(dev, programs)
    stats, mask = outputs(dev, b)
    with on_device(k):
        _gram_select_kernel[(programs,)](
            k, n, b, args.seed, args.threshold, args.trend, float(args.eps), part, pidx,
            arrival_counter(dev), stats, mask, SUM_METRIC=args.sum_metric, **tiles, **opts, **dot,
            **epilogue_constants(programs, b, mode_id=args.mode))
    return stats, mask.view(torch.bool)


def _subset_launch(dot_dtype: torch.dtype, device: torch.device) -> tuple[dict, dict, dict]:
    """(tiles, launch options, dot constants) of the Gram subset kernels; K multiplies as tf32 for 16-bit inputs."""
    low = dot_dtype != torch.float32
    tiles, opts = split_launch_options(subset_config("gram", "tf32" if low else "fp32", device))
    return tiles, opts, dot_dtype_args(torch.float32, tf32=low)
