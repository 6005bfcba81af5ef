"""The ``lm_head`` op's Triton kernels: each token's row over the vocabulary, V a tile at a time.

Matches ``dynbatch_kernels.lm_head.lm_head`` (the chunked torch implementation, math in its docstring):

- ``_token_scores_kernel``: the per-token scores alone (no gradients, no sequence scores: scoring, and the forward
  of ``reduction='none'``) in one pass that forms no logits at all, not even a chunk's: a block of tokens times a
  vocabulary tile by ``tl.dot``, an online log-sum-exp, and beside it the sums that give ||e_t|| without E.
  With m the running maximum, s1 = sum_v exp(z - m), r1 = the same sum without the target's term, r2 = the sum of
  exp(2 (z - m)) without it: 1 - p_y = r1 / s1 and sum_{v != y} p_v^2 = r2 / s1^2, so
  ||e_t||^2 = r2 / s1^2 - 2 eps / V (r1 / s1) + (V - 1) (eps / V)^2 + (eps (1 - 1 / V) - r1 / s1)^2,
  with no cancellation when p_t is nearly one-hot (the form sum p^2 - 2 p_y + 1 would lose ||e_t|| to rounding).
- ``_residual_rows_kernel``: one chunk's logits (cuBLAS) into E in place, with each token's loss, LSE and ||e_t||
  (the gradients and sequence norms then take E to cuBLAS products, as Liger-Kernel's fused linear cross-entropy
  does); ``_agreement_rows_kernel``: the agreement pass's e_t . (G a_t) from the logits and the first pass's LSE.

Dots take the inputs' 16-bit type or IEEE fp32 (tf32 when ``torch.backends.cuda.matmul.allow_tf32``, as the
products of the chunked path), accumulation fp32 throughout.
"""
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from . import lm_head as _impl
from .configs import on_device, split_launch_options
from .lm_head import lm_head as REFERENCE  # noqa: F401  (the op this file must match)
from .subset_rng import dot_dtype_args, low_precision_dot

# Tiles of the fused pass (tokens x vocabulary x features) by operand type, from an AOT search (64 candidates,
# both targets): the largest without spills on sm_80 and sm_90. IEEE fp32 dots hold their operands in registers:
# 64 x 64 x 16 tops at 186 registers a thread with 8 warps (64 x 128 x 32 spilled up to 3 KB). 16-bit operands:
# 64 x 128 x 32, 230 registers, tensor cores (mma on sm_80, wgmma on sm_90). A vocabulary tile for the row kernels.
TOKEN_TILES = {"fp32": {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 16, "num_warps": 8, "num_stages": 2},
               "16": {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32, "num_warps": 8, "num_stages": 2}}
ROW_TILE = 1024


@triton.jit
def _token_scores_kernel(h_ptr, w_ptr, b_ptr, y_ptr, out_ptr, N, V, D, stride_h, stride_w, ignore_index, smoothing,
                         HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ROUND_ONLY: tl.constexpr):
    """Rows loss, LSE, ||e_t||, ||g_t|| of ``out`` (4, N) for a block of BLOCK_N tokens."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < N
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows64, mask=rm, other=ignore_index).to(tl.int64)
    valid = rm & (y != ignore_index)
    ds0, vs0 = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_V)
    a2 = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + ds0
        h = tl.load(h_ptr + rows64[:, None] * stride_h + ds[None, :], mask=rm[:, None] & (ds[None, :] < D),
                    other=0.0).to(tl.float32)
        a2 += tl.sum(h * h, axis=1)
    if HAS_BIAS:
        a2 += 1.0
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s1 = tl.zeros((BLOCK_N,), tl.float32)
    r1 = tl.zeros((BLOCK_N,), tl.float32)
    r2 = tl.zeros((BLOCK_N,), tl.float32)
    z_y = tl.zeros((BLOCK_N,), tl.float32)
    z_sum = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        vs = v0 + vs0
        vm = vs < V
        z = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + ds0
            dm = ds < D
            h = tl.load(h_ptr + rows64[:, None] * stride_h + ds[None, :], mask=rm[:, None] & dm[None, :], other=0.0)
            w = tl.load(w_ptr + vs.to(tl.int64)[None, :] * stride_w + ds[:, None], mask=vm[None, :] & dm[:, None],
                        other=0.0)
            z = low_precision_dot(h, w, z, DOT_DTYPE, PRECISION, ROUND_ONLY)
        if HAS_BIAS:
            z += tl.load(b_ptr + vs, mask=vm, other=0.0).to(tl.float32)[None, :]
        is_y = vs[None, :] == y[:, None]
        z_y += tl.sum(tl.where(is_y, z, 0.0), axis=1)
        z_sum += tl.sum(tl.where(vm[None, :], z, 0.0), axis=1)
        z = tl.where(vm[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        ez = tl.exp(z - m_new[:, None])
        rest = tl.where(is_y, 0.0, ez)
        s1 = s1 * alpha + tl.sum(ez, axis=1)
        r1 = r1 * alpha + tl.sum(rest, axis=1)
        r2 = r2 * alpha * alpha + tl.sum(rest * rest, axis=1)
        m = m_new
    lse = m + tl.log(s1)
    loss = lse - (1.0 - smoothing) * z_y - smoothing / V * z_sum
    p_rest = r1 / s1
    off = smoothing / V
    e_y = smoothing - off - p_rest
    e2 = r2 / (s1 * s1) - 2.0 * off * p_rest + (V - 1) * off * off + e_y * e_y
    e_norm = tl.where(valid, tl.sqrt(tl.maximum(e2, 0.0)), 0.0)
    tl.store(out_ptr + rows64, tl.where(valid, loss, 0.0), mask=rm)
    tl.store(out_ptr + N + rows64, lse, mask=rm)
    tl.store(out_ptr + 2 * N + rows64, e_norm, mask=rm)
    tl.store(out_ptr + 3 * N + rows64, e_norm * tl.sqrt(a2), mask=rm)


@triton.jit
def _residual_rows_kernel(z_ptr, y_ptr, out_ptr, N, V, ignore_index, smoothing, BLOCK_V: tl.constexpr):
    """One token's fp32 logits row into e = (softmax(z) - q) [valid], in place; loss, LSE, ||e|| into ``out``."""
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + row).to(tl.int64)
    valid = y != ignore_index
    vs0 = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    z_y = tl.zeros((BLOCK_V,), tl.float32)
    z_sum = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):  # lane-wise online log-sum-exp, combined once after the loop
        vs = v0 + vs0
        z = tl.load(z_ptr + row * V + vs, mask=vs < V, other=float("-inf"))
        m_new = tl.maximum(m, z)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with no logit yet: exp(-inf) = 0, not NaN
        s = s * tl.exp(m - shift) + tl.exp(z - shift)
        m = m_new
        z_y += tl.where(vs == y, z, 0.0)
        z_sum += tl.where(vs < V, z, 0.0)
    top = tl.max(m, axis=0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))
    off = smoothing / V
    e2 = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        vs = v0 + vs0
        vm = vs < V
        z = tl.load(z_ptr + row * V + vs, mask=vm, other=0.0)
        e = tl.exp(z - lse) - off - tl.where(vs == y, 1.0 - smoothing, 0.0)
        e = tl.where(vm & valid, e, 0.0)
        e2 += e * e
        tl.store(z_ptr + row * V + vs, e, mask=vm)
    loss = lse - (1.0 - smoothing) * tl.sum(z_y, axis=0) - off * tl.sum(z_sum, axis=0)
    tl.store(out_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(out_ptr + N + row, lse)
    tl.store(out_ptr + 2 * N + row, tl.sqrt(tl.sum(e2, axis=0)))


@triton.jit
def _agreement_rows_kernel(z_ptr, u_ptr, y_ptr, lse_ptr, out_ptr, V, ignore_index, smoothing,
                           BLOCK_V: tl.constexpr):
    """e_t . u_t = p_t . u_t - (1 - eps) u_{t,y} - eps / V sum(u_t) for one token (0 where ignored)."""
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    vs0 = tl.arange(0, BLOCK_V)
    acc = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        vs = v0 + vs0
        vm = vs < V
        z = tl.load(z_ptr + row * V + vs, mask=vm, other=float("-inf"))
        u = tl.load(u_ptr + row * V + vs, mask=vm, other=0.0)
        acc += u * (tl.exp(z - lse) - smoothing / V - tl.where(vs == y, 1.0 - smoothing, 0.0))
    tl.store(out_ptr + row, tl.where(y != ignore_index, tl.sum(acc, axis=0), 0.0))


def residuals(z, targets, valid, label_smoothing: float, *, ignore_index: int):
    """:func:`dynbatch_kernels.lm_head.residuals` by ``_residual_rows_kernel`` (``valid`` is read from the
    targets against ``ignore_index``)."""
    n, v = z.shape
    out = torch.empty(3, n, dtype=torch.float32, device=z.device)
    if n:
        with on_device(z):
            _residual_rows_kernel[(n,)](z, targets, out, n, v, ignore_index, float(label_smoothing),
                                        BLOCK_V=min(ROW_TILE, triton.next_power_of_2(v)))
    return z, out[0], out[1], out[2]


def agreement_rows(z, ga, targets, valid, lse, label_smoothing: float, *, ignore_index: int):
    """:func:`dynbatch_kernels.lm_head.agreement_rows` by ``_agreement_rows_kernel``."""
    n, v = z.shape
    out = torch.empty(n, dtype=torch.float32, device=z.device)
    if n:
        with on_device(z):
            _agreement_rows_kernel[(n,)](z, ga, targets, lse.contiguous(), out, v, ignore_index,
                                         float(label_smoothing), BLOCK_V=min(ROW_TILE, triton.next_power_of_2(v)))
    return out


def token_scores(args) -> torch.Tensor:
    """The op's token rows, fp32 (4, N), by ``_token_scores_kernel`` (no logits formed)."""
    h, weight, bias = args.features, args.weight, args.bias
    h = h if h.stride(-1) == 1 else h.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    n, d = h.shape
    v = weight.shape[0]
    out = torch.empty(4, n, dtype=torch.float32, device=h.device)
    dot = torch.bfloat16 if torch.bfloat16 in (h.dtype, weight.dtype) else (
        torch.float16 if torch.float16 in (h.dtype, weight.dtype) else torch.float32)
    tf32 = h.is_cuda and torch.backends.cuda.matmul.allow_tf32
    tiles, launch = split_launch_options(TOKEN_TILES["fp32" if dot == torch.float32 else "16"])
    if n:
        with on_device(h):
            _token_scores_kernel[(triton.cdiv(n, tiles["BLOCK_N"]),)](
                h, weight, bias if bias is not None else h, args.targets, out, n, v, d, h.stride(0),
                weight.stride(0), int(args.ignore_index), float(args.label_smoothing), HAS_BIAS=bias is not None,
                **tiles, **dot_dtype_args(dot, tf32), **launch)
    return out


def lm_head(args):
    """The ``lm_head`` op on ``args``: the per-token scores alone by the fused pass; anything more (gradients,
    sequence scores) by the chunked path with the row kernels in place of its torch row functions."""
    if args.what == 0:
        tokens = token_scores(args)
        return tokens, tokens.new_zeros(2, args.offsets.shape[0] - 1), *(tokens.new_empty(0) for _ in range(3))
    ignore = int(args.ignore_index)
    rows = SimpleNamespace(residuals=lambda *a: residuals(*a, ignore_index=ignore),
                           agreement_rows=lambda *a: agreement_rows(*a, ignore_index=ignore))
    return _impl.lm_head(args, rows)
