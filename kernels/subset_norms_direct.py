"""Squared norms of subset-sum gradients, direct route: row norms of M G, G = per-sample gradients.

Matches ``dynbatch_kernels.reference.subset_sq_sums(route="direct")``. G (B x C(D+1)) is never stored: each program forms
G tile by tile from E (B x C) and A (B x (D+1)) in registers, G[i, j] = E[i, j // (D+1)] * A[i, j % (D+1)], and
multiplies it with a mask tile drawn in-kernel. Work: N * B * C(D+1) multiply-adds.

Grid: (subset blocks, SPLIT_J); each program owns a strided share of the G columns and writes a partial sum per
subset, so few subsets still fill the GPU. Partials are summed by one small torch reduction (no host sync); in the
selection, by the row block's last program, which goes on to pick the subset (``select_epilogue``): a selection on
this route is two launches, the residuals and this kernel.
"""
import torch
import triton
import triton.language as tl

from .configs import arch_of, on_device, split_launch_options, subset_config
from .reference import subset_sq_sums as REFERENCE  # noqa: F401  (the op this file must match)
from .select_epilogue import arrival_counter, block_choice, epilogue_constants, outputs, publish_and_finish, workspace
from .subset_rng import dot_dtype_args, low_precision_dot as _dot, mask_tile

FILL_PROGRAMS = 264


@triton.jit
def _direct_partial(e_ptr, a_ptr, masks_ptr, rows, pid_j, N, B, C, DA, J, seed, thr, MODE: tl.constexpr,
                    SPLIT_J: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ROUND_ONLY: tl.constexpr):
    """This program's share (columns ``pid_j``, ``pid_j + SPLIT_J``, ... of G) of ||M G||^2 for subsets ``rows``."""
    sq = tl.zeros((BLOCK_N,), tl.float32)
    for j0 in range(pid_j * BLOCK_J, J, SPLIT_J * BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        c_j = js // DA
        d_j = js % DA
        jm = js < J
        acc = tl.zeros((BLOCK_N, BLOCK_J), tl.float32)
        for b0 in range(0, B, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            ok = (bs[:, None] < B) & jm[None, :]
            ev = tl.load(e_ptr + bs[:, None] * C + c_j[None, :], mask=ok, other=0.0)
            av = tl.load(a_ptr + bs[:, None] * DA + d_j[None, :], mask=ok, other=0.0)
            m = mask_tile(masks_ptr, seed, thr, rows, bs, N, B, MODE)
            acc = _dot(m, ev * av, acc, DOT_DTYPE, PRECISION, ROUND_ONLY)
        sq += tl.sum(acc * acc, axis=1)
    return sq


@triton.jit
def _counts(masks_ptr, seed, thr, rows, N, B, MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    cnt = tl.zeros((BLOCK_N,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        cnt += tl.sum(mask_tile(masks_ptr, seed, thr, rows, bs, N, B, MODE).to(tl.float32), axis=1)
    return cnt


@triton.jit(do_not_specialize=["seed", "thr"])
def _direct_kernel(e_ptr, a_ptr, masks_ptr, sq_ptr, cnt_ptr, N, B, C, DA, J, seed, thr,
                   MODE: tl.constexpr, SPLIT_J: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_J: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                   ROUND_ONLY: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_j = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    sq = _direct_partial(e_ptr, a_ptr, masks_ptr, rows, pid_j, N, B, C, DA, J, seed, thr, MODE, SPLIT_J, BLOCK_N,
                         BLOCK_B, BLOCK_J, DOT_DTYPE, PRECISION, ROUND_ONLY)
    tl.store(sq_ptr + pid_j * N + rows, sq, mask=rows < N)
    if pid_j == 0:
        tl.store(cnt_ptr + rows, _counts(masks_ptr, seed, thr, rows, N, B, MODE, BLOCK_N, BLOCK_B), mask=rows < N)


@triton.jit(do_not_specialize=["seed", "thr"])
def _direct_select_kernel(e_ptr, a_ptr, sq_ptr, N, B, C, DA, J, seed, thr, trend_ptr, eps,
                          part_ptr, pidx_ptr, counter_ptr, stats_ptr, mask_ptr, MODE: tl.constexpr,
                          SUM_METRIC: tl.constexpr, SPLIT_J: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                          ROUND_ONLY: tl.constexpr):
    """The subset sums and the selection epilogue in one launch. With SPLIT_J > 1 the last of a row block's
    programs to arrive (counted in ``counter_ptr[1 + block]``) adds the partials in a fixed order and scores the
    block; the block scores then meet in ``publish_and_finish`` as in the Gram kernel."""
    tl.static_assert(MODE != 0, "the selection draws its subsets")
    pid_n = tl.program_id(0)
    pid_j = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    sq = _direct_partial(e_ptr, a_ptr, e_ptr, rows, pid_j, N, B, C, DA, J, seed, thr, MODE, SPLIT_J, BLOCK_N,
                         BLOCK_B, BLOCK_J, DOT_DTYPE, PRECISION, ROUND_ONLY)
    if SPLIT_J == 1:
        _score_block(sq, rows, pid_n, N, B, seed, thr, trend_ptr, eps, part_ptr, pidx_ptr,
                     counter_ptr, stats_ptr, mask_ptr, MODE, SUM_METRIC, BLOCK_N, BLOCK_B, BLOCK_P,
                     BLOCK_MASK)
    else:
        tl.store(sq_ptr + pid_j * N + rows, sq, mask=rows < N)
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + 1 + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_J - 1:
            q = tl.zeros((BLOCK_N,), tl.float32)
            for j in range(0, SPLIT_J):  # a fixed order, whichever program arrived last
                q += tl.load(sq_ptr + j * N + rows, mask=rows < N, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter_ptr + 1 + pid_n, 0, sem="relaxed", scope="gpu")
            _score_block(q, rows, pid_n, N, B, seed, thr, trend_ptr, eps, part_ptr, pidx_ptr,
                         counter_ptr, stats_ptr, mask_ptr, MODE, SUM_METRIC, BLOCK_N, BLOCK_B, BLOCK_P,
                         BLOCK_MASK)


@triton.jit
def _score_block(q, rows, block, N, B, seed, thr, trend_ptr, eps, part_ptr, pidx_ptr, counter_ptr,
                 stats_ptr, mask_ptr, MODE: tl.constexpr, SUM_METRIC: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_MASK: tl.constexpr):
    cnt = _counts(part_ptr, seed, thr, rows, N, B, MODE, BLOCK_N, BLOCK_B)  # drawn masks: no mask pointer read
    key, index, norm, maxc = block_choice(q, cnt, rows, N, trend_ptr, eps, SUM_METRIC)
    publish_and_finish(block, tl.num_programs(0), key, index, norm, maxc, part_ptr, pidx_ptr, counter_ptr, trend_ptr,
                       seed, thr, B, stats_ptr, mask_ptr, MODE, BLOCK_P, BLOCK_MASK)


def _launch(e: torch.Tensor, a: torch.Tensor, n: int, dot_dtype: torch.dtype):
    """(tiles, launch options, row blocks, SPLIT_J, J) of the direct kernels for (B, C) residuals and (B, D')
    features."""
    j = e.shape[1] * a.shape[1]
    tiles, opts = split_launch_options(subset_config("direct", "fp32" if dot_dtype == torch.float32 else "16",
                                                     e.device))
    n_blocks = triton.cdiv(n, tiles["BLOCK_N"])
    on_gpu = arch_of(e.device) is not None
    # Enough programs to fill the largest GPUs (264 = 2 x 132 SMs of an H100) when the subsets alone do not. A
    # constant, not the device's SM count: the partial sums then add up in the same order on every GPU model,
    # so ranks of a mixed cluster compute bit-identical norms and choose the same subset.
    split_j = max(1, min(triton.cdiv(j, tiles["BLOCK_J"]), triton.cdiv(FILL_PROGRAMS, n_blocks))) if on_gpu else 1
    return tiles, opts, n_blocks, split_j, j


def subset_sq_sums_direct(e: torch.Tensor, a: torch.Tensor, args,
                          dot_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(||sum_S g_i||^2, |S|), fp32 (N,) each, for ``args``, the ``subset_sq_sums`` op's argument tuple (its
    ``masks`` uint8 (N, B) when ``mode`` is 0, else drawn from ``seed``). e: fp32 (B, C); a: fp32 (B, D').

    ``dot_dtype``: fp32 multiplies in IEEE fp32; bf16/fp16 feed G to the tensor cores in that type (masks are
    exact in it), accumulating in fp32.
    """
    b, c = e.shape
    n, masks = args.num_subsets, args.masks
    tiles, opts, n_blocks, split_j, j = _launch(e, a, n, dot_dtype)
    sq = torch.empty((split_j, n), dtype=torch.float32, device=e.device)
    cnt = torch.empty((n,), dtype=torch.float32, device=e.device)
    if n == 0:
        return sq.sum(0), cnt
    with on_device(e):
        _direct_kernel[(n_blocks, split_j)](
            e, a, masks if masks is not None else e, sq, cnt, n, b, c, a.shape[1], j, args.seed, args.threshold,
            MODE=args.mode, SPLIT_J=split_j, **tiles, **opts, **dot_dtype_args(dot_dtype),
        )
    return sq.sum(0), cnt


def select_direct(e: torch.Tensor, a: torch.Tensor, args, dot_dtype: torch.dtype):
    """The subset sums and the choice in one launch (after the residuals launch that wrote ``e`` and ``a``):
    ``reference.select``'s (stats float64 (5,), mask bool (B,)) for ``args``, the ``select_subset`` op's argument
    tuple (``num_subsets >= 1`` subsets from its ``seed``)."""
    b, c = e.shape
    num_subsets = args.num_subsets
    dev = e.device
    tiles, opts, n_blocks, split_j, j = _launch(e, a, num_subsets, dot_dtype)
    partials = torch.empty((split_j, num_subsets) if split_j > 1 else (1,), dtype=torch.float32, device=dev)
    part, pidx = workspace(dev, n_blocks)
    stats, mask = outputs(dev, b)
    epi = epilogue_constants(n_blocks, b, mode_id=args.mode)
    with on_device(e):
        _direct_select_kernel[(n_blocks, split_j)](
            e, a, partials, num_subsets, b, c, a.shape[1], j, args.seed, args.threshold, args.trend,
            float(args.eps), part, pidx, arrival_counter(dev, 1 + n_blocks), stats, mask, SUM_METRIC=args.sum_metric,
            SPLIT_J=split_j, **epi, **tiles, **opts, **dot_dtype_args(dot_dtype))
    return stats, mask.view(torch.bool)
