"""Squared norms of subset-sum gradients, direct route: row norms of M G, G = per-sample gradients.

Matches ``dynbatch_kernels.reference.subset_sq_sums(route="direct")``. G (B x C(D+1)) is never stored: each program forms
G tile by tile from E (B x C) and A (B x (D+1)) in registers, G[i, j] = E[i, j // (D+1)] * A[i, j % (D+1)], and
multiplies it with a mask tile drawn in-kernel. Work: N * B * C(D+1) multiply-adds.

Grid: (subset blocks, SPLIT_J); each program owns a strided share of the G columns and writes a partial sum per
subset, so few subsets still fill the GPU. Partials are summed by one small torch reduction (no host sync).
"""
import torch
import triton
import triton.language as tl

from .configs import arch_of, on_device, split_launch_options, subset_config
from .reference import subset_sq_sums as REFERENCE  # noqa: F401  (the op this file must match)
from .subset_rng import dot_dtype_args, low_precision_dot as _dot, mask_tile

FILL_PROGRAMS = 264


@triton.jit(do_not_specialize=["seed", "thr"])
def _direct_kernel(e_ptr, a_ptr, masks_ptr, sq_ptr, cnt_ptr, N, B, C, DA, J, seed, thr,
                   MODE: tl.constexpr, SPLIT_J: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_J: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                   ROUND_ONLY: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_j = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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
    tl.store(sq_ptr + pid_j * N + rows, sq, mask=rows < N)
    if pid_j == 0:
        cnt = tl.zeros((BLOCK_N,), tl.float32)
        for b0 in range(0, B, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            cnt += tl.sum(mask_tile(masks_ptr, seed, thr, rows, bs, N, B, MODE).to(tl.float32), axis=1)
        tl.store(cnt_ptr + rows, cnt, mask=rows < N)


def subset_sq_sums_direct(e: torch.Tensor, a: torch.Tensor, num_subsets: int, *, masks: torch.Tensor | None,
                          seed: int, mode: int, thr: int, dot_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(||sum_S g_i||^2, |S|), fp32 (N,) each. e: fp32 (B, C); a: fp32 (B, D'); masks: uint8 (N, B) when mode 0.

    ``dot_dtype``: fp32 multiplies in IEEE fp32; bf16/fp16 feed G to the tensor cores in that type (masks are
    exact in it), accumulating in fp32.
    """
    b, c = e.shape
    da = a.shape[1]
    j = c * da
    n = num_subsets
    tiles, opts = split_launch_options(subset_config("direct", "fp32" if dot_dtype == torch.float32 else "16",
                                                     e.device))
    n_blocks = triton.cdiv(n, tiles["BLOCK_N"])
    on_gpu = arch_of(e.device) is not None
    # Enough programs to fill the largest GPUs (264 = 2 x 132 SMs of an H100) when the subsets alone do not. A
    # constant, not the device's SM count: the partial sums then add up in the same order on every GPU model,
    # so ranks of a mixed cluster compute bit-identical norms and choose the same subset.
    split_j = max(1, min(triton.cdiv(j, tiles["BLOCK_J"]), triton.cdiv(FILL_PROGRAMS, n_blocks))) if on_gpu else 1
    sq = torch.empty((split_j, n), dtype=torch.float32, device=e.device)
    cnt = torch.empty((n,), dtype=torch.float32, device=e.device)
    if n == 0:
        return sq.sum(0), cnt
    with on_device(e):
        _direct_kernel[(n_blocks, split_j)](
            e, a, masks if masks is not None else e, sq, cnt, n, b, c, da, j, seed, thr,
            MODE=mode, SPLIT_J=split_j, **tiles, **opts, **dot_dtype_args(dot_dtype),
        )
    return sq.sum(0), cnt
