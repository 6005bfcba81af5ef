"""Pure-torch references for every selection op: the ground truth that the Triton kernels (``kernels/``) and the
native extension (``csrc/``) must match. Torch only, so it imports everywhere.

Notation (DESIGN.md): for a linear head z = W a with a_i = [h_i, 1] when the layer has a bias, and cross-entropy
with (possibly smoothed) target t_i, sample i's own gradient is g_i = e_i a_i^T with e_i = softmax(z_i) - t_i.

Random subsets are a function of (seed, subset n, sample i) only: see :func:`subset_masks`.
"""
from __future__ import annotations

import torch

# ---- the counter-based subset generator -------------------------------------------------------------------------
# lowbias32 (a 32-bit integer mixer) evaluated in int64 with explicit wrap-around, so that torch, Triton (uint32)
# and C++ (uint32_t) produce the same bits.
M32 = 0xFFFFFFFF
MIX_C1, MIX_C2 = 0x7FEB352D, 0x846CA68B
GOLDEN = 0x9E3779B9  # spreads consecutive sample indices before mixing
RATE_SALT = 0x5BD1E995  # separates a subset's rate draw from its membership draws
MODES = {"bernoulli": 1, "uniform_size": 2}  # 0 is reserved for "masks given as a tensor"
THRESHOLD_BITS = 24  # membership compares the top 24 bits of a draw with an integer threshold


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * MIX_C1) & M32
    x = x ^ (x >> 15)
    x = (x * MIX_C2) & M32
    return x ^ (x >> 16)


def seed32(seed: int) -> int:
    """Fold a Python integer seed into the 32-bit key every backend uses."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return (seed ^ (seed >> 32)) & M32


def bernoulli_threshold(p: float) -> int:
    """Integer threshold: a sample is in iff its 24-bit draw is below it, i.e. with probability p."""
    return int(round(min(max(p, 0.0), 1.0) * (1 << THRESHOLD_BITS)))


def row_keys(seed: int, rows: torch.Tensor) -> torch.Tensor:
    """Per-subset keys (int64 in [0, 2^32)) for subset indices ``rows``."""
    return mix32((mix32(torch.tensor(seed32(seed), dtype=torch.int64, device=rows.device)) + rows) & M32)


def subset_masks(seed: int, rows: torch.Tensor, batch_size: int, mode: str = "bernoulli", p: float = 0.5) -> torch.Tensor:
    """Membership masks (len(rows), batch_size), bool, of the subsets with indices ``rows`` (int64).

    ``bernoulli``: each sample is in with probability p (p = 1/2: uniform over all subsets).
    ``uniform_size``: subset n draws its own rate p_n ~ U(0, 1) from its key, then includes each sample with
    probability p_n, so its size is uniform over 0..B.
    """
    if mode not in MODES:
        raise ValueError(f"unknown subset mode {mode!r}; choose one of {', '.join(MODES)}")
    return draw_masks(seed, rows, batch_size, MODES[mode], bernoulli_threshold(p))


def draw_masks(seed: int, rows: torch.Tensor, batch_size: int, mode_id: int, thr: int) -> torch.Tensor:
    """:func:`subset_masks` in the kernels' terms: a mode id from ``MODES`` and the integer Bernoulli threshold."""
    rows = rows.to(torch.int64)
    key = row_keys(seed, rows)[:, None]
    i = torch.arange(batch_size, dtype=torch.int64, device=rows.device)[None, :]
    draw = mix32((key + i * GOLDEN) & M32) >> (32 - THRESHOLD_BITS)
    if mode_id == MODES["bernoulli"]:
        limit = torch.tensor(thr, dtype=torch.int64, device=rows.device)
    else:
        limit = mix32(key ^ RATE_SALT) >> (32 - THRESHOLD_BITS)
    return draw < limit


# ---- last-layer residuals and per-sample norms ------------------------------------------------------------------
def residuals(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """E = softmax(logits) - target distribution, fp32 (B, C); each row sums to zero."""
    z = logits.float()
    c = z.shape[1]
    t = torch.full_like(z, label_smoothing / c)
    t.scatter_add_(1, targets.long()[:, None], torch.full_like(z[:, :1], 1.0 - label_smoothing))
    return torch.softmax(z, dim=1) - t


def augmented_features(features: torch.Tensor, bias: bool) -> torch.Tensor:
    """A = [h, 1] with a bias, else h; fp32 (B, D + bias)."""
    a = features.float()
    return torch.cat([a, torch.ones_like(a[:, :1])], 1) if bias else a


def per_sample_grad_norms(logits, targets, features, *, bias=True, label_smoothing=0.0) -> torch.Tensor:
    """||g_i|| = ||e_i|| * ||a_i||, fp32 (B,)."""
    e = residuals(logits, targets, label_smoothing)
    return e.norm(dim=1) * augmented_features(features, bias).norm(dim=1)


# ---- subset-mean gradient norms ---------------------------------------------------------------------------------
def choose_route(batch: int, classes: int, width: int) -> str:
    """The cheaper exact route: Gram costs N*B^2 multiply-adds, direct N*B*C*(D+1)."""
    return "gram" if batch < classes * width else "direct"


def gram_matrix(e: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """K = (E E^T) o (A A^T), fp32 (B, B): K_ij = <g_i, g_j>."""
    return (e @ e.T) * (a @ a.T)


def subset_sq_sums(e: torch.Tensor, a: torch.Tensor, masks: torch.Tensor, route: str = "gram",
                   chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(||sum_{i in S} g_i||^2, |S|) for every row S of ``masks`` (N, B); fp32 (N,) each.

    e: fp32 (B, C) residuals; a: fp32 (B, D') augmented features. Rows are processed ``chunk`` at a time so
    memory stays bounded at large N.
    """
    return _chunked_sq_sums(e, a, masks.shape[0], lambda lo, hi: masks[lo:hi], route, chunk)


def seeded_subset_sq_sums(e: torch.Tensor, a: torch.Tensor, args, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`subset_sq_sums` of subsets 0..N-1 drawn as ``args`` (an op's argument tuple: its ``num_subsets``,
    ``seed``, ``mode``, ``threshold`` and ``gram`` are read) says, a chunk at a time (no N x B mask is held)."""
    def masks_for(lo, hi):
        return draw_masks(args.seed, torch.arange(lo, hi, device=e.device), e.shape[0], args.mode, args.threshold)

    return _chunked_sq_sums(e, a, args.num_subsets, masks_for, "gram" if args.gram else "direct", chunk)


def _chunked_sq_sums(e, a, n, masks_for, route, chunk):
    if route == "gram":
        op = gram_matrix(e, a)  # formed once, whatever the number of chunks
    elif route == "direct":
        op = (e[:, :, None] * a[:, None, :]).reshape(e.shape[0], -1)  # the reference may materialise G
    else:
        raise ValueError(f"unknown route {route!r}; use direct or gram")
    q_parts, c_parts = [], []
    for lo in range(0, n, chunk):
        m = masks_for(lo, min(lo + chunk, n)).float()
        q_parts.append(((m @ op) * m).sum(1) if route == "gram" else (m @ op).square().sum(1))
        c_parts.append(m.sum(1))
    if not q_parts:
        empty = torch.zeros(0, device=e.device)
        return empty, empty
    return torch.cat(q_parts), torch.cat(c_parts)


GRAD_METRICS = ("mean", "sum")


def subset_norms(sq_sums: torch.Tensor, counts: torch.Tensor, metric: str = "mean") -> torch.Tensor:
    """A subset's gradient norm: of its mean gradient, sqrt(||sum||^2) / |S| (``mean``, EDBA as published), or of
    its summed gradient (``sum``); 0 for empty subsets (which selection never picks). fp32 (N,)."""
    root = sq_sums.clamp_min(0).sqrt()
    value = root / counts.clamp_min(1) if metric == "mean" else root
    return torch.where(counts > 0, value, torch.zeros_like(sq_sums))


def margins(norms: torch.Tensor, counts: torch.Tensor, loss, loss_ema, grad_ema, eps: float = 1e-8) -> torch.Tensor:
    """EDBA's margin loss |(L - L_ema) / (G_S - G_ema) - 1| per subset, fp32 (N,); +inf for empty subsets. ``loss``,
    ``loss_ema`` and ``grad_ema``: floats or 0-d tensors, taken in fp32.

    A denominator within ``eps`` of zero is replaced by ``eps`` with its sign (zero counts as positive), so
    identical samples or a converged EMA give large finite margins, never NaN or infinity. The native and Triton
    epilogues repeat these fp32 operations in this order, so all backends rank subsets alike.
    """
    def fp32(v):
        return torch.as_tensor(v, dtype=torch.float32, device=norms.device)

    num = fp32(loss) - fp32(loss_ema)
    den = norms - fp32(grad_ema)
    sign = torch.where(den < 0, -1.0, 1.0)
    den = torch.where(den.abs() < eps, sign * eps, den)
    m = (num / den - 1.0).abs()
    m = torch.nan_to_num(m, nan=torch.finfo(torch.float32).max, posinf=torch.finfo(torch.float32).max)
    return torch.where(counts > 0, m, torch.full_like(m, float("inf")))


def choose(sq_sums: torch.Tensor, counts: torch.Tensor, args, batch_size: int):
    """The selection's epilogue from every subset's (||sum||^2, |S|) (fp32 (N,) each) and ``args``, the
    ``select_subset`` op's argument tuple: its ``trend`` float64 (3,) = [batch loss, loss EMA, gradient-norm EMA]
    (the EMAs NaN before the first step), ``seed``, ``mode``, ``threshold``, ``eps`` and ``sum_metric``.

    The subset with the least margin wins (first index on ties); before any EMA the largest subset does, as the
    closest to the whole batch. The winner's mask is regenerated from (seed, index); if every subset is empty the
    whole batch is used. Returns ``(stats, mask)``: float64 (5,) = [loss, grad_norm, margin, size, index] and bool
    (B,), the contract of every backend's fused ``select``. No host read: the first step is told apart on the
    device.
    """
    trend = args.trend
    norms = subset_norms(sq_sums, counts, "sum" if args.sum_metric else "mean")
    t = trend.to(torch.float32)
    has_ema = ~(torch.isnan(t[1]) | torch.isnan(t[2]))
    m = margins(norms, counts, t[0], t[1], t[2], args.eps)
    # argmin: the first minimal margin; argmax: the first maximal count (empty subsets win only if all are empty)
    index = torch.where(has_ema, torch.argmin(m), torch.argmax(counts))
    m = torch.where(has_ema, m, torch.full_like(m, float("nan")))
    at = index.reshape(1)
    mask = draw_masks(args.seed, at, batch_size, args.mode, args.threshold)[0]
    mask = torch.where(counts.max() > 0, mask, torch.ones_like(mask))
    # index_select, not norms[index]: indexing with a 0-d tensor reads the index to the host.
    parts = (trend[:1], norms.index_select(0, at), m.index_select(0, at), mask.sum().reshape(1), at)
    return torch.cat([t.to(torch.float64) for t in parts]), mask


def select(args):
    """The whole selection in torch operators for ``args``, the ``select_subset`` op's argument tuple: the
    reference of the native and Triton fused selection."""
    e = residuals(args.logits, args.targets, args.label_smoothing)
    a = augmented_features(args.features, args.bias)
    q, c = seeded_subset_sq_sums(e, a, args)
    return choose(q, c, args, e.shape[0])


def subset_grad_norms(logits, targets, features, masks, *, bias=True, label_smoothing=0.0, route="auto"):
    """Norm of the mean last-layer gradient of each subset (row of ``masks``), fp32 (N,)."""
    e = residuals(logits, targets, label_smoothing)
    a = augmented_features(features, bias)
    if route == "auto":
        route = choose_route(*e.shape[:1], e.shape[1], a.shape[1])
    q, c = subset_sq_sums(e, a, masks.to(e.device), route)
    return subset_norms(q, c)


# ---- per-sample scores against the batch ------------------------------------------------------------------------
# Rows of the scores tensor (K, B) that ``sample_scores`` returns; the class rows only with ``by_class``.
SCORES = ("loss", "residual_norm", "grad_norm", "agreement", "consensus")
CLASS_SCORES = ("class_agreement", "class_consensus")
# ||G - g_i||^2 below this share of ||G||^2 + ||g_i||^2 is rounding, not a direction: the sample is alone (its
# class has one sample, or B = 1) and its consensus is 0. fp32 cancellation leaves ~1e-7 of the sum.
ALONE = 1e-5


def sample_losses(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of each sample against its (smoothed) target, fp32 (B,)."""
    return torch.nn.functional.cross_entropy(logits.float(), targets.long(), reduction="none",
                                             label_smoothing=label_smoothing)


def consensus(agreement: torch.Tensor, grad_norm: torch.Tensor, total_sq: torch.Tensor) -> torch.Tensor:
    """c_i = cos(g_i, G - g_i) = (r_i - ||g_i||^2) / (||g_i|| ||G - g_i||) from r_i = <g_i, G>, ||g_i|| and
    ||G||^2 (each fp32 (B,) or broadcastable), with ||G - g_i||^2 = ||G||^2 - 2 r_i + ||g_i||^2; 0 where either
    norm vanishes (a zero gradient, or a sample alone in its group), clamped to [-1, 1]. fp32 (B,)."""
    g2 = grad_norm * grad_norm
    rest = total_sq - 2 * agreement + g2
    alone = rest <= ALONE * (total_sq + g2)
    den = grad_norm * rest.clamp_min(0).sqrt()
    ok = ~alone & (den > 0)
    c = (agreement - g2) / torch.where(ok, den, torch.ones_like(den))
    return torch.where(ok, c.clamp(-1, 1), torch.zeros_like(c))


def sample_scores(logits, targets, features, *, bias=True, label_smoothing=0.0, by_class=False) -> torch.Tensor:
    """Each sample's scores against its batch, fp32 (K, B), rows named by ``SCORES`` (+ ``CLASS_SCORES`` with
    ``by_class``): loss, ||e_i||, ||g_i|| = ||e_i|| ||a_i||, r_i = <g_i, G> = e_i^T G a_i with G = E^T A the batch's
    summed gradient, c_i (:func:`consensus`), and the same two with G_k, the sum over the samples of the sample's
    own class. The reference forms the class-masked B x B Gram ((E E^T) o (A A^T) o [y_i = y_j]) rather than one
    G per class: no host read of the class counts, and only the kernels need to be fast."""
    e = residuals(logits, targets, label_smoothing)
    a = augmented_features(features, bias)
    e_norm = e.norm(dim=1)
    g_norm = e_norm * a.norm(dim=1)
    g = e.T @ a  # (C, D'): never B x C x D'
    r = ((a @ g.T) * e).sum(1)  # e_i . (G a_i): the second product has the head's shape
    rows = [sample_losses(logits, targets, label_smoothing), e_norm, g_norm, r, consensus(r, g_norm, g.square().sum())]
    if by_class:
        y = targets.long()
        rc = (gram_matrix(e, a) * (y[:, None] == y[None, :])).sum(1)
        class_sq = torch.zeros(logits.shape[1], device=e.device).index_add_(0, y, rc)  # ||G_k||^2 = sum_k r_i
        rows += [rc, consensus(rc, g_norm, class_sq[y])]
    return torch.stack(rows)
