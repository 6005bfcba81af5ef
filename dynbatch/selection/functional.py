"""Public functional API of EDBA's selection (``dynbatch.selection``).

Shapes: logits (B, C) and features (B, D) in fp32, bf16 or fp16; targets (B,) integer class indices; masks
(N, B) bool. Results are fp32 whatever the input dtype. ``backend``: ``auto`` (Triton on CUDA, native on CPU,
torch otherwise), ``torch`` (the reference), ``native`` or ``triton``. ``route``: ``direct``, ``gram`` or
``auto`` (the cheaper: Gram when B < C(D+1)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dynbatch.errors import UserError
from dynbatch.selection.backends import get_backend

MAX_SUBSETS = 1 << 20


def _ref():
    from dynbatch_kernels import reference

    return reference


def _check(logits, targets, features):
    if logits.dim() != 2 or features.dim() != 2 or targets.dim() != 1:
        raise UserError("expected logits (B, C), targets (B,) and features (B, D)")
    b = logits.shape[0]
    if targets.shape[0] != b or features.shape[0] != b:
        raise UserError(f"batch sizes differ: logits {b}, targets {targets.shape[0]}, features {features.shape[0]}")
    if logits.shape[1] < 1:
        raise UserError("logits need at least one class")


def _dot_dtype(logits, features) -> torch.dtype:
    low = [t.dtype for t in (logits, features) if t.dtype in (torch.bfloat16, torch.float16)]
    return low[0] if low else torch.float32


def _route(route: str, b: int, c: int, da: int) -> str:
    if route == "auto":
        return _ref().choose_route(b, c, da)
    if route not in ("direct", "gram"):
        raise UserError(f"unknown route {route!r}; choose auto, direct or gram")
    return route


def _mode_threshold(mode: str, p: float) -> tuple[int, int]:
    ref = _ref()
    if mode not in ref.MODES:
        raise UserError(f"unknown subset mode {mode!r}; choose one of {', '.join(ref.MODES)}")
    if not 0.0 < p <= 1.0:
        raise UserError(f"subset probability p must be in (0, 1] (got {p})")
    return ref.MODES[mode], ref.bernoulli_threshold(p)


def per_sample_grad_norms(logits, targets, features, *, bias=True, label_smoothing=0.0, backend="auto"):
    """Norm of each sample's own last-layer gradient (weight, and bias when ``bias``): fp32 (B,)."""
    _check(logits, targets, features)
    return get_backend(backend, logits.device).residuals(logits, targets, features, bias, label_smoothing)[1]


def random_subsets(num_subsets, batch_size, *, seed, mode="bernoulli", p=0.5, device=None) -> torch.Tensor:
    """The masks (N, B) bool that every backend draws for ``seed``: row n is subset n."""
    _mode_threshold(mode, p)
    rows = torch.arange(num_subsets, dtype=torch.int64, device=device)
    return _ref().subset_masks(seed, rows, batch_size, mode, p)


def _sq_sums(logits, targets, features, *, masks, num_subsets, seed, mode, thr, bias, label_smoothing, backend,
             route):
    be = get_backend(backend, logits.device)
    e, _ = be.residuals(logits, targets, features, bias, label_smoothing)
    a = _ref().augmented_features(features, bias)
    r = _route(route, e.shape[0], e.shape[1], a.shape[1])
    q, c = be.sq_sums(e, a, num_subsets, masks, _ref().seed32(seed), mode, thr, r, _dot_dtype(logits, features))
    return q, c


def subset_grad_norms(logits, targets, features, masks, *, bias=True, label_smoothing=0.0, backend="auto",
                      route="auto") -> torch.Tensor:
    """Norm of the mean last-layer gradient of each subset (row of ``masks``): fp32 (N,); 0 for empty rows."""
    _check(logits, targets, features)
    if masks.dim() != 2 or masks.shape[1] != logits.shape[0]:
        raise UserError(f"masks must be (N, {logits.shape[0]}), got {tuple(masks.shape)}")
    m = masks.to(device=logits.device)
    m = (m if m.dtype in (torch.bool, torch.uint8) else m != 0).contiguous()
    q, c = _sq_sums(logits, targets, features, masks=m, num_subsets=m.shape[0], seed=0, mode=0, thr=0, bias=bias,
                    label_smoothing=label_smoothing, backend=backend, route=route)
    return _ref().mean_norms(q, c)


def margins(norms: torch.Tensor, counts: torch.Tensor, loss, loss_ema, grad_ema, eps: float = 1e-8) -> torch.Tensor:
    """EDBA's margin loss |(L - L_ema) / (G_S - G_ema) - 1| per subset, fp32 (N,); +inf for empty subsets.

    A denominator within ``eps`` of zero is replaced by ``eps`` with its sign (zero counts as positive), so
    identical samples or a converged EMA give large finite margins, never NaN or infinity.
    """
    num = torch.as_tensor(loss, dtype=torch.float32, device=norms.device) - float(loss_ema)
    den = norms - float(grad_ema)
    sign = torch.where(den < 0, -1.0, 1.0)
    den = torch.where(den.abs() < eps, sign * eps, den)
    m = (num / den - 1.0).abs()
    m = torch.nan_to_num(m, nan=torch.finfo(torch.float32).max, posinf=torch.finfo(torch.float32).max)
    return torch.where(counts > 0, m, torch.full_like(m, float("inf")))


@dataclass
class Selection:
    """The chosen subset. 0-d tensors stay on the device (no host synchronisation inside the selection)."""

    mask: torch.Tensor  # bool (B,)
    index: torch.Tensor  # int64 0-d: the subset's index n, from which any backend regenerates its mask
    grad_norm: torch.Tensor  # fp32 0-d: norm of its mean last-layer gradient
    margin: torch.Tensor  # fp32 0-d: its margin loss (NaN on the first step, which has no EMAs)
    size: torch.Tensor  # 0-d: |S|
    norms: torch.Tensor  # fp32 (N,): every subset's gradient norm
    margins: torch.Tensor  # fp32 (N,)


def select_subset(logits, targets, features, *, num_subsets, seed, loss, loss_ema, grad_ema, mode="bernoulli",
                  p=0.5, backend="auto", route="auto", bias=True, label_smoothing=0.0, eps=1e-8) -> Selection:
    """Draw ``num_subsets`` subsets from ``seed`` (inside the kernels), score each by the norm of its mean
    last-layer gradient, and pick the one with the least margin loss; ties go to the lowest index.

    First step (``loss_ema`` or ``grad_ema`` None): there is no trend yet, so the largest subset is chosen (lowest
    index among equals), the closest to the whole batch. Empty subsets are never chosen.
    """
    _check(logits, targets, features)
    if not 1 <= num_subsets <= MAX_SUBSETS:
        raise UserError(f"num_subsets must be in 1..{MAX_SUBSETS} (got {num_subsets})")
    mode_id, thr = _mode_threshold(mode, p)
    q, counts = _sq_sums(logits, targets, features, masks=None, num_subsets=num_subsets, seed=seed, mode=mode_id,
                         thr=thr, bias=bias, label_smoothing=label_smoothing, backend=backend, route=route)
    norms = _ref().mean_norms(q, counts)
    if loss_ema is None or grad_ema is None:
        m = torch.full_like(norms, float("nan"))
        # argmax returns the first maximal index; empty subsets only win when every subset is empty.
        index = torch.argmax(counts)
    else:
        m = margins(norms, counts, loss, loss_ema, grad_ema, eps)
        index = torch.argmin(m)  # first minimal index on ties
    b = logits.shape[0]
    mask = _ref().subset_masks(seed, index.reshape(1), b, mode, p)[0]
    # All subsets empty (possible only for tiny B): train on the whole batch. torch.where keeps this sync-free.
    mask = torch.where(counts.max() > 0, mask, torch.ones_like(mask))
    # index_select, not norms[index]: indexing with a 0-d tensor reads the index to the host.
    at = index.reshape(1)
    return Selection(mask=mask, index=index, grad_norm=norms.index_select(0, at)[0], margin=m.index_select(0, at)[0],
                     size=mask.sum(), norms=norms, margins=m)
