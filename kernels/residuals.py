"""Fused softmax residuals and per-sample last-layer gradient norms.

Matches ``dynbatch_kernels.reference.residuals`` and ``dynbatch_kernels.reference.per_sample_grad_norms``: one program per sample
computes e_i = softmax(z_i) - t_i in fp32 (whatever the logits' dtype), stores it for the subset kernels, and
||g_i|| = ||e_i|| * ||[h_i, 1]||.
"""
import torch
import triton
import triton.language as tl

from .configs import on_device
from .reference import per_sample_grad_norms as REFERENCE  # noqa: F401  (the op this file must match)


@triton.jit
def softmax_residual(z, mx, s, is_target, ok, C, smoothing):
    """e = softmax(z) - t in fp32 from the logits ``z`` with their row maximum ``mx`` and sum of exp(z - mx) ``s``
    (broadcast against ``z``), ``is_target`` where the class is the sample's (t = 1 - smoothing + smoothing / C
    there, smoothing / C elsewhere); 0 where not ``ok``. One formula for a row (here) and a tile (the Gram kernel)."""
    target = tl.where(is_target, 1.0 - smoothing, 0.0) + smoothing / C
    return tl.where(ok, tl.exp(z - mx) / s - target, 0.0)


@triton.jit
def _residuals_kernel(logits_ptr, targets_ptr, feat_ptr, e_ptr, norm_ptr, a_ptr, loss_ptr, C, D, stride_l, stride_f,
                      smoothing, BIAS: tl.constexpr, WRITE_A: tl.constexpr, WRITE_LOSS: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cs = tl.arange(0, BLOCK_C)
    cm = cs < C
    z = tl.load(logits_ptr + row * stride_l + cs, mask=cm, other=float("-inf")).to(tl.float32)
    mx = tl.max(z, axis=0)
    s = tl.sum(tl.exp(z - mx), axis=0)  # exp(-inf) = 0 past C
    t = tl.load(targets_ptr + row).to(tl.int32)
    e = softmax_residual(z, mx, s, cs == t, cm, C, smoothing)
    tl.store(e_ptr + row * C + cs, e, mask=cm)
    if WRITE_LOSS:  # -sum_k t_k log p_k = logsumexp(z) - (1 - smoothing) z_y - smoothing / C sum_k z_k
        zs = tl.where(cm, z, 0.0)
        zy = tl.sum(tl.where(cs == t, zs, 0.0), axis=0)
        tl.store(loss_ptr + row, mx + tl.log(s) - (1.0 - smoothing) * zy - smoothing / C * tl.sum(zs, axis=0))
    a2 = tl.zeros((BLOCK_D,), tl.float32)
    if BIAS:
        da = D + 1
    else:
        da = D
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(feat_ptr + row * stride_f + ds, mask=ds < D, other=0.0).to(tl.float32)
        a2 += h * h
        if WRITE_A:  # the augmented features [h, 1] in fp32, for the subset kernels (no separate torch.cat)
            tl.store(a_ptr + row * da + ds, h, mask=ds < D)
    if WRITE_A and BIAS:
        tl.store(a_ptr + row * da + D, 1.0)
    a2_sum = tl.sum(a2, axis=0)
    if BIAS:
        a2_sum += 1.0
    tl.store(norm_ptr + row, tl.sqrt(tl.sum(e * e, axis=0)) * tl.sqrt(a2_sum))


def residuals_and_norms(head, *, augmented: bool = False, losses: torch.Tensor | None = None):
    """(E fp32 (B, C), per-sample gradient norms fp32 (B,)) of ``head``, an op's argument tuple (its ``logits``
    (B, C) and ``features`` (B, D) in any float dtype, ``targets``, ``bias``, ``label_smoothing`` are read).
    With ``augmented`` also A = [h, 1] (or h without ``bias``) fp32 (B, D + bias), written by the same launch;
    ``losses`` (fp32 (B,), contiguous) receives each sample's cross-entropy, also from the same launch."""
    logits, targets, features, bias = head.logits, head.targets, head.features, head.bias
    b, c = logits.shape
    d = features.shape[1]
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    features = features if features.stride(1) == 1 else features.contiguous()
    e = torch.empty((b, c), dtype=torch.float32, device=logits.device)
    norms = torch.empty((b,), dtype=torch.float32, device=logits.device)
    a = torch.empty((b, d + bool(bias)), dtype=torch.float32, device=logits.device) if augmented else norms
    if b > 0:
        with on_device(logits):
            _residuals_kernel[(b,)](
                logits, targets, features, e, norms, a, norms if losses is None else losses, c, d, logits.stride(0),
                features.stride(0), float(head.label_smoothing), BIAS=bias, WRITE_A=augmented,
                WRITE_LOSS=losses is not None, BLOCK_C=triton.next_power_of_2(c),
                BLOCK_D=min(triton.next_power_of_2(max(d, 1)), 1024),
            )
    return (e, norms, a) if augmented else (e, norms)
