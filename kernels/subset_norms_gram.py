"""Squared norms of subset-sum gradients, Gram route: m^T K m with K = (E E^T) o (A A^T).

Matches ``dynbatch_kernels.reference.subset_sq_sums(route="gram")``. K (B x B) costs two small matmuls; the kernel then
computes rowsum((M K) o M) with the mask tiles drawn in-kernel, never storing M. Work: N * B^2 multiply-adds,
cheaper than the direct route whenever B < C(D+1).
"""
import torch
import triton
import triton.language as tl

from .reference import subset_sq_sums as REFERENCE  # noqa: F401  (the op this file must match)
from .configs import on_device, split_launch_options, subset_config
from .subset_rng import dot_dtype_args, low_precision_dot as _dot, mask_tile


@triton.jit(do_not_specialize=["seed", "thr"])
def _gram_kernel(k_ptr, masks_ptr, sq_ptr, cnt_ptr, N, B, seed, thr, MODE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                 ROUND_ONLY: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
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
    tl.store(sq_ptr + rows, q, mask=rows < N)
    tl.store(cnt_ptr + rows, cnt, mask=rows < N)


@triton.jit
def _row_products(x_ptr, ri, rj, B, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """<x_i, x_j> for rows ``ri`` x ``rj`` of a row-major (B, K) fp32 matrix, in IEEE fp32 (as torch.mm)."""
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xi = tl.load(x_ptr + ri[:, None] * K + ks[None, :], mask=(ri[:, None] < B) & (ks[None, :] < K), other=0.0)
        xj = tl.load(x_ptr + rj[None, :] * K + ks[:, None], mask=(rj[None, :] < B) & (ks[:, None] < K), other=0.0)
        acc = tl.dot(xi, xj, acc, input_precision="ieee")
    return acc


@triton.jit
def _gram_matrix_kernel(e_ptr, a_ptr, k_ptr, B, C, DA, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """K[i, j] = <e_i, e_j> <a_i, a_j> for a BLOCK x BLOCK tile."""
    ri = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rj = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    k = _row_products(e_ptr, ri, rj, B, C, BLOCK, BLOCK_C) * _row_products(a_ptr, ri, rj, B, DA, BLOCK, BLOCK_D)
    tl.store(k_ptr + ri[:, None] * B + rj[None, :], k, mask=(ri[:, None] < B) & (rj[None, :] < B))


def gram_matrix(e: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """K = (E E^T) o (A A^T), fp32 (B, B), in one launch (``reference.gram_matrix`` is three operators)."""
    b = e.shape[0]
    k = torch.empty((b, b), dtype=torch.float32, device=e.device)
    if b == 0:
        return k
    block = 32
    with on_device(e):
        _gram_matrix_kernel[(triton.cdiv(b, block), triton.cdiv(b, block))](
            e, a, k, b, e.shape[1], a.shape[1], BLOCK=block, BLOCK_C=16, BLOCK_D=32)
    return k


def subset_sq_sums_gram(e: torch.Tensor, a: torch.Tensor, num_subsets: int, *, masks: torch.Tensor | None,
                        seed: int, mode: int, thr: int, dot_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(||sum_S g_i||^2, |S|), fp32 (N,) each; arguments as in ``subset_sq_sums_direct``.

    K stays fp32 whatever ``dot_dtype``: K_ii = ||e_i||^2 ||a_i||^2 overflows fp16 (65,504) for inputs that fp16
    holds (features of 120 over D = 512 give 4.8e5), so 16-bit inputs multiply K as tf32 on tensor cores instead:
    fp32's range, fp16's 10-bit mantissa, fp32 accumulation.
    """
    b = e.shape[0]
    n = num_subsets
    k = gram_matrix(e, a)  # fp32 (B, B)
    sq = torch.empty((n,), dtype=torch.float32, device=e.device)
    cnt = torch.empty((n,), dtype=torch.float32, device=e.device)
    if n == 0:
        return sq, cnt
    low = dot_dtype != torch.float32
    tiles, opts = split_launch_options(subset_config("gram", "tf32" if low else "fp32", e.device))
    with on_device(e):
        _gram_kernel[(triton.cdiv(n, tiles["BLOCK_N"]),)](
            k, masks if masks is not None else k, sq, cnt, n, b, seed, thr, MODE=mode, **tiles, **opts,
            **dot_dtype_args(torch.float32, tf32=low),
        )
    return sq, cnt
