"""The language-model head in torch operators, a chunk of whole sequences at a time, never N x V: per-token loss,
log-sum-exp, ||e_t|| and ||g_t||; per-sequence ||G_b|| and <G_b, G>; the head's gradients.

Tokens t (N of them) with features h_t (D,), a_t = [h_t, 1] with a bias (h_t without), head W (V, D) and bias b
(V,), z_t = W h_t + b, p_t = softmax(z_t), targets y_t smoothed to q_t = (1 - eps) onehot(y_t) + eps / V,
e_t = p_t - q_t, token weights w_t (0 for ``ignore_index``). Sequence b holds tokens offsets[b]..offsets[b+1]-1.

- per token: loss_t = LSE(z_t) - q_t . z_t, ||e_t||, ||g_t|| = ||e_t|| ||a_t|| (0 for ignored tokens);
- per sequence: G_b = sum_t w_t e_t a_t^T, its norm by the Gram route sum_ts w_t w_s (e_t . e_s)(a_t . a_s)
  (T^2 V a sequence) or the direct route ||E_b^T diag(w) A_b|| (T V D, the head-gradient product split by
  sequence), and the agreement <G_b, G> with G = sum_b G_b (a second pass: the logits again and A G^T);
- gradients of sum_t s_t loss_t (``grad_scale`` s, default w): features (N, D), W (V, D), b (V,).

Each chunk's logits are formed once (one product), turned into residuals in place, and used for the feature
gradient (E W) and the head gradient (E^T A): three products, as the materialised forward and backward, holding
one chunk of rows x V. Accumulation in fp32 whatever the inputs' dtype. This is the reference every backend must
match: the native CPU kernel (``csrc/dynbatch_native.cpp``, ``lm_head``) repeats its chunk plan in C++, and the
Triton launcher (``lm_head_rows.py``) runs this loop with its own row kernels in place of :func:`residuals` and
:func:`agreement_rows`.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

GRADS, NORMS, AGREEMENT = 1, 2, 4  # bits of ``what``
TOKEN_ROWS = ("loss", "lse", "residual_norm", "grad_norm")
SEQUENCE_ROWS = ("grad_norm", "agreement")
CHUNK_ELEMENTS = 1 << 22  # logits a chunk holds (16 MiB in fp32), unless one sequence needs more


def chunk_bounds(offsets: list[int], vocab: int, whole_sequences: bool) -> list[tuple[int, int, int, int]]:
    """(first token, end token, first sequence, end sequence) of each chunk: consecutive whole sequences whose
    logits fit ``CHUNK_ELEMENTS`` (a longer sequence alone), or, without ``whole_sequences``, plain row ranges."""
    rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    n = offsets[-1]
    if not whole_sequences:
        return [(lo, min(lo + rows, n), 0, 0) for lo in range(0, n, rows)]
    out, start = [], 0
    while start < len(offsets) - 1:
        end = start + 1
        while end < len(offsets) - 1 and offsets[end + 1] - offsets[start] <= rows:
            end += 1
        out.append((offsets[start], offsets[end], start, end))
        start = end
    return out


def _logits(h, weight, bias) -> torch.Tensor:
    z = h.float() @ weight.T
    if bias is not None:
        z += bias
    return z


def residuals(z, targets, valid, label_smoothing: float):
    """(E fp32 (n, V) with ignored rows 0, loss fp32 (n,), LSE fp32 (n,), ||e_t|| fp32 (n,)) of one chunk's fp32
    logits ``z`` (n, V), turned into E in place (the softmax's exponentials taken once, no temporary of its size).
    ``targets`` (n,) hold anything where not ``valid``."""
    y = torch.where(valid, targets, torch.zeros_like(targets)).long()
    z_y = z.gather(1, y[:, None])[:, 0]
    eps, v = float(label_smoothing), z.shape[1]
    z_mean = z.mean(dim=1) if eps else None
    top = z.amax(dim=1)
    e = z.sub_(top[:, None]).exp_()  # exp(z - max), in the logits' memory
    total = e.sum(dim=1)
    lse = top + total.log()
    e.mul_(total.reciprocal()[:, None])  # p
    loss = lse - (1 - eps) * z_y - (eps * z_mean if eps else 0.0)
    e.scatter_add_(1, y[:, None], torch.full_like(lse[:, None], -(1 - eps)))
    if eps:
        e -= eps / v
    e *= valid[:, None]
    return e, torch.where(valid, loss, torch.zeros_like(loss)), lse, e.norm(dim=1)


def agreement_rows(z, ga, targets, valid, lse, label_smoothing: float):
    """e_t . u_t fp32 (n,) for one chunk's fp32 logits ``z`` (n, V) (overwritten), u_t = ``ga`` (n, V) and the
    first pass's ``lse`` (n,): with it the softmax is one exponential, and e . u = p . u - (1 - eps) u_y
    - eps / V sum(u) needs no E. Rows not ``valid`` hold anything."""
    eps = float(label_smoothing)
    y = torch.where(valid, targets, torch.zeros_like(targets)).long()
    r = ga.gather(1, y[:, None])[:, 0] * -(1 - eps) - (eps / ga.shape[1] * ga.sum(1) if eps else 0.0)
    return r + z.sub_(lse[:, None]).exp_().mul_(ga).sum(1)


def _augmented_sq_norms(h, bias) -> torch.Tensor:
    return h.float().square().sum(1) + (1.0 if bias is not None else 0.0)


def _sequence_sq_norms(e, h, w, bias, seq: list[int], gram: bool) -> torch.Tensor:
    """||G_b||^2 of each sequence of a chunk (token ranges ``seq`` relative to it), fp32 (S,)."""
    out = []
    for lo, hi in zip(seq[:-1], seq[1:]):
        ew = e[lo:hi] * w[lo:hi, None]
        a = h[lo:hi].float()
        if gram:
            k = (ew @ ew.T) * (a @ a.T + (1.0 if bias is not None else 0.0))
            out.append(k.sum())
        else:
            g = ew.T @ a
            out.append(g.square().sum() + (ew.sum(0).square().sum() if bias is not None else 0.0))
    return torch.stack(out) if out else e.new_zeros(0)


def lm_head(args, rows=None):
    """The ``lm_head`` op on ``args``, its argument tuple: (tokens fp32 (4, N) rows ``TOKEN_ROWS``, sequences
    fp32 (2, B) rows ``SEQUENCE_ROWS`` (zeros where not asked), d_features fp32 (N, D), d_weight fp32 (V, D),
    d_bias fp32 (V,); gradients empty unless ``what`` has ``GRADS``). ``rows``: where :func:`residuals` and
    :func:`agreement_rows` come from (this module by default; the Triton launcher passes its kernels)."""
    rows = rows or _TORCH_ROWS
    h, weight, bias, targets = args.features, args.weight, args.bias, args.targets
    n, d = h.shape
    v = weight.shape[0]
    dev = h.device
    w32 = weight.float()
    b32 = bias.float() if bias is not None else None
    valid = targets != args.ignore_index
    w = valid.float() if args.token_weights is None else args.token_weights.float() * valid
    scale = w if args.grad_scale is None else args.grad_scale.float() * valid
    offsets = args.offsets.tolist()
    grads, norms, agree = (bool(args.what & bit) for bit in (GRADS, NORMS, AGREEMENT))
    tokens = torch.zeros(4, n, dtype=torch.float32, device=dev)
    sequences = torch.zeros(2, len(offsets) - 1, dtype=torch.float32, device=dev)
    d_h = torch.zeros(n, d, dtype=torch.float32, device=dev) if grads else tokens.new_empty(0)
    d_w = torch.zeros(v, d, dtype=torch.float32, device=dev) if grads or agree else tokens.new_empty(0)
    d_b = torch.zeros(v, dtype=torch.float32, device=dev) if (grads or agree) and bias is not None else tokens.new_empty(0)
    bounds = chunk_bounds(offsets, v, norms or agree)
    # G for the agreement is sum_t w_t e_t a_t^T: the gradient itself when the scale is w (no grad_scale), else its
    # own sum
    own_total = agree and (not grads or args.grad_scale is not None)
    total_w = torch.zeros(v, d, device=dev) if own_total else d_w
    total_b = (torch.zeros(v, device=dev) if own_total else d_b) if bias is not None else None
    for lo, hi, s0, s1 in bounds:
        z = _logits(h[lo:hi], w32, b32)
        e, loss, lse, e_norm = rows.residuals(z, targets[lo:hi], valid[lo:hi], args.label_smoothing)
        tokens[:, lo:hi] = torch.stack([loss, lse, e_norm, e_norm * _augmented_sq_norms(h[lo:hi], bias).sqrt()])
        if norms:
            seq = [o - lo for o in offsets[s0:s1 + 1]]
            sequences[0, s0:s1] = _sequence_sq_norms(e, h[lo:hi], w[lo:hi], bias, seq, bool(args.gram)).sqrt()
        if grads:
            es = e * scale[lo:hi, None]
            d_h[lo:hi] = es @ w32
            d_w.addmm_(es.T, h[lo:hi].float())
            if bias is not None:
                d_b += es.sum(0)
        if own_total:
            ew = e * w[lo:hi, None]
            total_w.addmm_(ew.T, h[lo:hi].float())
            if bias is not None:
                total_b += ew.sum(0)
    if agree:
        sequences[1] = _agreement(args, rows, w32, b32, w, tokens[1], bounds, offsets, total_w, total_b)
    return tokens, sequences, d_h, d_w if grads else tokens.new_empty(0), d_b if grads else tokens.new_empty(0)


def _agreement(args, rows, w32, b32, w, lse, bounds, offsets, total_w, total_b) -> torch.Tensor:
    """<G_b, G> = sum_{t in b} w_t e_t . (G a_t) per sequence: the second pass, fp32 (B,)."""
    h, valid = args.features, args.targets != args.ignore_index
    out = torch.zeros(len(offsets) - 1, device=h.device)
    for lo, hi, s0, s1 in bounds:
        ga = _logits(h[lo:hi], total_w, total_b)  # G a_t (with G's bias column)
        r = rows.agreement_rows(_logits(h[lo:hi], w32, b32), ga, args.targets[lo:hi], valid[lo:hi], lse[lo:hi],
                                args.label_smoothing) * w[lo:hi]
        seq = torch.tensor([o - lo for o in offsets[s0:s1 + 1]], device=h.device)
        out[s0:s1] = torch.segment_reduce(r, "sum", lengths=seq.diff())
    return out


_TORCH_ROWS = SimpleNamespace(residuals=residuals, agreement_rows=agreement_rows)
