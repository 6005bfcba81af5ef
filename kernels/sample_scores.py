"""Per-sample scores against the batch, fused: loss, ||e_i||, ||g_i||, agreement r_i = e_i^T G a_i and consensus
c_i = cos(g_i, G - g_i), and with ``by_class`` the same two against G_k, the sum over the sample's own class.

Matches ``dynbatch_kernels.reference.sample_scores``. Launches, none of them B x C(D+1) in size:

1. ``residuals_and_norms`` (``residuals.py``): E (B, C), A = [h, 1] (B, D') in fp32, ||g_i||, and each loss;
2. G = E^T A (C, D') and ||G||^2: one product of the head's shape (cuBLAS);
3. ``_bilinear_kernel``: per block of samples, (E G) o A summed over D' (r_i), ||e_i||, and the consensus;
4. with ``by_class``: ``_class_gram_kernel`` sums K_ij = (e_i.e_j)(a_i.a_j) over the samples j of i's class, tile by
   tile (the class-masked Gram, never stored: no G_k per class and no host read of the class counts), then
   ||G_k||^2 = sum of r^k_i over the class, and ``_consensus_kernel`` the class consensus.

Dots take fp32 operands (tf32 on tensor cores when torch allows it, exact under the interpreter); accumulation is
fp32 whatever the inputs' dtype.
"""
import torch
import triton
import triton.language as tl

from .configs import on_device
from .reference import ALONE, CLASS_SCORES, SCORES
from .reference import sample_scores as REFERENCE  # noqa: F401  (the op this file must match)
from .residuals import residuals_and_norms


@triton.jit
def consensus(r, gn, total_sq, alone):
    """The reference's ``consensus``: cos(g_i, G - g_i) from r_i, ||g_i|| and ||G||^2; 0 for a lone sample."""
    g2 = gn * gn
    rest = total_sq - 2.0 * r + g2
    den = gn * tl.sqrt(tl.maximum(rest, 0.0))
    ok = (rest > alone * (total_sq + g2)) & (den > 0.0)
    c = (r - g2) / tl.where(ok, den, 1.0)
    return tl.where(ok, tl.minimum(tl.maximum(c, -1.0), 1.0), 0.0)


@triton.jit
def _bilinear_kernel(e_ptr, a_ptr, g_ptr, total_ptr, out_ptr, B, C, DA, alone,
                     BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows 1..4 of the scores (||e||, ||g||, r, c) for a block of BLOCK_B samples."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rm = rows < B
    rows64 = rows.to(tl.int64)
    cs0, ds0 = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_D)
    e2 = tl.zeros((BLOCK_B,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + cs0
        e = tl.load(e_ptr + rows64[:, None] * C + cs[None, :], mask=rm[:, None] & (cs[None, :] < C), other=0.0)
        e2 += tl.sum(e * e, axis=1)
    r = tl.zeros((BLOCK_B,), tl.float32)
    a2 = tl.zeros((BLOCK_B,), tl.float32)
    for d0 in range(0, DA, BLOCK_D):
        ds = d0 + ds0
        dm = ds < DA
        a = tl.load(a_ptr + rows64[:, None] * DA + ds[None, :], mask=rm[:, None] & dm[None, :], other=0.0)
        p = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
        for c0 in range(0, C, BLOCK_C):  # (E G)[:, ds] a C-chunk at a time
            cs = c0 + cs0
            e = tl.load(e_ptr + rows64[:, None] * C + cs[None, :], mask=rm[:, None] & (cs[None, :] < C), other=0.0)
            g = tl.load(g_ptr + cs[:, None] * DA + ds[None, :], mask=(cs[:, None] < C) & dm[None, :], other=0.0)
            p += tl.dot(e, g)
        r += tl.sum(p * a, axis=1)
        a2 += tl.sum(a * a, axis=1)
    en = tl.sqrt(e2)
    gn = en * tl.sqrt(a2)
    total_sq = tl.load(total_ptr)
    tl.store(out_ptr + 1 * B + rows64, en, mask=rm)
    tl.store(out_ptr + 2 * B + rows64, gn, mask=rm)
    tl.store(out_ptr + 3 * B + rows64, r, mask=rm)
    tl.store(out_ptr + 4 * B + rows64, consensus(r, gn, total_sq, alone), mask=rm)


@triton.jit
def _class_gram_kernel(e_ptr, a_ptr, y_ptr, out_ptr, B, C, DA,
                       BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row 5 of the scores: r^k_i = sum over j of i's class of (e_i . e_j)(a_i . a_j), BLOCK_I samples i per
    program, the samples j a tile at a time."""
    ri = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    im = ri < B
    ri64 = ri.to(tl.int64)
    yi = tl.load(y_ptr + ri64, mask=im, other=-1)
    ks0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_I,), tl.float32)
    for j0 in range(0, B, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        jm = rj < B
        rj64 = rj.to(tl.int64)
        yj = tl.load(y_ptr + rj64, mask=jm, other=-2)
        ee = tl.zeros((BLOCK_I, BLOCK_J), tl.float32)
        for k0 in range(0, C, BLOCK_K):
            ks = k0 + ks0
            ei = tl.load(e_ptr + ri64[:, None] * C + ks[None, :], mask=im[:, None] & (ks[None, :] < C), other=0.0)
            ej = tl.load(e_ptr + rj64[None, :] * C + ks[:, None], mask=jm[None, :] & (ks[:, None] < C), other=0.0)
            ee += tl.dot(ei, ej)
        aa = tl.zeros((BLOCK_I, BLOCK_J), tl.float32)
        for k0 in range(0, DA, BLOCK_K):
            ks = k0 + ks0
            ai = tl.load(a_ptr + ri64[:, None] * DA + ks[None, :], mask=im[:, None] & (ks[None, :] < DA), other=0.0)
            aj = tl.load(a_ptr + rj64[None, :] * DA + ks[:, None], mask=jm[None, :] & (ks[:, None] < DA), other=0.0)
            aa += tl.dot(ai, aj)
        acc += tl.sum(tl.where(yi[:, None] == yj[None, :], ee * aa, 0.0), axis=1)
    tl.store(out_ptr + 5 * B + ri64, acc, mask=im)


@triton.jit
def _consensus_kernel(out_ptr, y_ptr, class_sq_ptr, B, alone, BLOCK: tl.constexpr):
    """Row 6 of the scores: the class consensus from rows 2 (||g||) and 5 (r^k) and ||G_k||^2 per class."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = rows < B
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows64, mask=m, other=0)
    gn = tl.load(out_ptr + 2 * B + rows64, mask=m, other=0.0)
    rc = tl.load(out_ptr + 5 * B + rows64, mask=m, other=0.0)
    total = tl.load(class_sq_ptr + y, mask=m, other=0.0)
    tl.store(out_ptr + 6 * B + rows64, consensus(rc, gn, total, alone), mask=m)


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))  # tl.dot needs every side >= 16


def sample_scores(args) -> torch.Tensor:
    """Scores fp32 (K, B), rows ``SCORES`` (+ ``CLASS_SCORES``) for ``args``, the op's argument tuple (logits
    (B, C), features (B, D) any float dtype)."""
    logits, targets, by_class = args.logits, args.targets, args.by_class
    b, c = logits.shape
    out = torch.empty((len(SCORES) + len(CLASS_SCORES) * bool(by_class), b), dtype=torch.float32,
                      device=logits.device)
    if b == 0:
        return out
    e, _, a = residuals_and_norms(args, augmented=True, losses=out[0])
    da = a.shape[1]
    g = e.T @ a  # (C, D'): the one product of the head's shape
    total_sq = g.square().sum()
    y = targets if targets.is_contiguous() else targets.contiguous()
    with on_device(logits):
        block_b = 32
        # 8 warps: at 4 the (32 x 64) product tile and its operands spill on sm_80 (672 bytes, aot sweep)
        _bilinear_kernel[(triton.cdiv(b, block_b),)](
            e, a, g, total_sq, out, b, c, da, ALONE, BLOCK_B=block_b, BLOCK_C=_block(c, 64), BLOCK_D=_block(da, 64),
            num_warps=8)
        if by_class:
            block = 32  # 4 warps: at 8 this kernel spills on sm_90 (24 bytes, aot sweep)
            _class_gram_kernel[(triton.cdiv(b, block),)](e, a, y, out, b, c, da, BLOCK_I=block, BLOCK_J=block,
                                                         BLOCK_K=32, num_warps=4)
            class_sq = torch.zeros(c, dtype=torch.float32, device=logits.device).index_add_(0, y.long(), out[5])
            _consensus_kernel[(triton.cdiv(b, 256),)](out, y, class_sq, b, ALONE, BLOCK=256)
    return out
