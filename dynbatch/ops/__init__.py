"""Public functional API of EDBA's selection (``dynbatch.ops``).

Shapes: logits (B, C) and features (B, D) in fp32, bf16 or fp16; targets (B,) integer class indices; masks
(N, B) bool. Results are fp32 whatever the input dtype. ``backend``: ``auto`` (Triton on CUDA, native on CPU,
torch otherwise), ``torch`` (the reference), ``native`` or ``triton``. ``route``: ``direct``, ``gram`` or
``auto`` (the cheaper: Gram when B < C(D+1)).
"""
from __future__ import annotations

import torch

from dynbatch.errors import UserError
from dynbatch.ops import library as ops
from dynbatch_kernels import reference as _reference
from dynbatch.ops.backends import BACKENDS

MAX_SUBSETS = 1 << 20


def _check(logits, targets, features):
    if logits.dim() != 2 or features.dim() != 2 or targets.dim() != 1:
        raise UserError("expected logits (B, C), targets (B,) and features (B, D)")
    b = logits.shape[0]
    if targets.shape[0] != b or features.shape[0] != b:
        raise UserError(f"batch sizes differ: logits {b}, targets {targets.shape[0]}, features {features.shape[0]}")
    if logits.shape[1] < 1:
        raise UserError("logits need at least one class")


def _route(route: str, b: int, c: int, da: int) -> str:
    if route == "auto":
        return _reference.choose_route(b, c, da)
    if route not in ("direct", "gram"):
        raise UserError(f"unknown route {route!r}; choose auto, direct or gram")
    return route


def _mode_threshold(mode: str, p: float) -> tuple[int, int]:
    mode_id = _reference.MODES.get(mode)
    if mode_id is None:
        raise UserError(f"unknown subset mode {mode!r}; choose one of {', '.join(_reference.MODES)}")
    if not 0.0 < p <= 1.0:
        raise UserError(f"subset probability p must be in (0, 1] (got {p})")
    return mode_id, _reference.bernoulli_threshold(p)


def _backend_name(backend: str) -> str:
    if backend not in ("auto", *BACKENDS):
        raise UserError(f"unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")
    return backend


def per_sample_grad_norms(logits, targets, features, *, bias=True, label_smoothing=0.0, backend="auto"):
    """Norm of each sample's own last-layer gradient (weight, and bias when ``bias``): fp32 (B,)."""
    _check(logits, targets, features)
    return ops.per_sample_grad_norms_op(logits, targets, features, bias, float(label_smoothing),
                                        _backend_name(backend))


def random_subsets(num_subsets, batch_size, *, seed, mode="bernoulli", p=0.5, device=None) -> torch.Tensor:
    """The masks (N, B) bool that every backend draws for ``seed``: row n is subset n."""
    _mode_threshold(mode, p)
    rows = torch.arange(num_subsets, dtype=torch.int64, device=device)
    return _reference.subset_masks(seed, rows, batch_size, mode, p)


def _sq_sums(logits, targets, features, masks, num_subsets, seed, mode_id, thr, bias, label_smoothing, backend,
             route):
    r = _route(route, logits.shape[0], logits.shape[1], features.shape[1] + bool(bias))
    return ops.subset_sq_sums_op(logits, targets, features, masks, num_subsets, _reference.seed32(seed), mode_id,
                                 thr, r, bias, float(label_smoothing), _backend_name(backend))


def subset_grad_norms(logits, targets, features, masks, *, bias=True, label_smoothing=0.0, backend="auto",
                      route="auto", grad_metric="mean") -> torch.Tensor:
    """Norm of the mean (or, with ``grad_metric="sum"``, summed) last-layer gradient of each subset (row of
    ``masks`` (N, B)): fp32 (N,); 0 for empty rows."""
    _check(logits, targets, features)
    _metric(grad_metric)
    if masks.dim() != 2 or masks.shape[1] != logits.shape[0]:
        raise UserError(f"masks must be (N, {logits.shape[0]}), got {tuple(masks.shape)}")
    m = masks.to(device=logits.device)
    m = (m if m.dtype in (torch.bool, torch.uint8) else m != 0).contiguous()
    q, c = _sq_sums(logits, targets, features, m, m.shape[0], 0, 0, 0, bias, label_smoothing, backend, route)
    return _reference.subset_norms(q, c, grad_metric)


def margins(norms: torch.Tensor, counts: torch.Tensor, loss, loss_ema, grad_ema, eps: float = 1e-8) -> torch.Tensor:
    """EDBA's margin loss |(L - L_ema) / (G_S - G_ema) - 1| per subset, fp32 (N,); +inf for empty subsets.

    A denominator within ``eps`` of zero is replaced by ``eps`` with its sign, so identical samples or a converged
    EMA give large finite margins, never NaN or infinity.
    """
    return _reference.margins(norms, counts, loss, loss_ema, grad_ema, eps)


def _metric(grad_metric: str) -> str:
    if grad_metric not in _reference.GRAD_METRICS:
        raise UserError(f"unknown grad_metric {grad_metric!r}; choose mean (the paper's) or sum")
    return grad_metric


class Selection:
    """The chosen subset. Everything stays on the device: ``stats`` packs the numbers a caller needs on the host
    (one ``stats.tolist()``), and the 0-d views below are built only when asked for."""

    __slots__ = ("stats", "mask")

    def __init__(self, stats: torch.Tensor, mask: torch.Tensor):
        self.stats = stats  # float64 (5,): [loss, grad_norm, margin, size, index]
        self.mask = mask  # bool (B,): the samples to train on

    @property
    def loss(self) -> torch.Tensor:
        """fp32 0-d: the batch's mean loss the margins were computed from."""
        return self.stats[0].float()

    @property
    def grad_norm(self) -> torch.Tensor:
        """fp32 0-d: the chosen subset's gradient norm."""
        return self.stats[1].float()

    @property
    def margin(self) -> torch.Tensor:
        """fp32 0-d: its margin loss (NaN on the first step, which has no EMAs)."""
        return self.stats[2].float()

    @property
    def size(self) -> torch.Tensor:
        """int64 0-d: |S|."""
        return self.stats[3].long()

    @property
    def index(self) -> torch.Tensor:
        """int64 0-d: the subset's index n, from which any backend regenerates its mask."""
        return self.stats[4].long()


def _selection_args(logits, targets, features, num_subsets, seed, loss, loss_ema, grad_ema, mode, p, backend, route,
                    bias, label_smoothing, eps, grad_metric) -> tuple:
    _check(logits, targets, features)
    if not 1 <= num_subsets <= MAX_SUBSETS:
        raise UserError(f"num_subsets must be in 1..{MAX_SUBSETS} (got {num_subsets})")
    mode_id, thr = _mode_threshold(mode, p)
    has_ema = loss_ema is not None and grad_ema is not None
    if not isinstance(loss, torch.Tensor):
        loss = torch.tensor(float(loss), device=logits.device)
    elif loss.dim():
        loss = loss.reshape(())
    r = _route(route, logits.shape[0], logits.shape[1], features.shape[1] + bool(bias))
    return (logits, targets, features, loss, num_subsets, _reference.seed32(seed), mode_id, thr, r, bias,
            float(label_smoothing), float(loss_ema) if has_ema else 0.0, float(grad_ema) if has_ema else 0.0, has_ema,
            float(eps), _metric(grad_metric), _backend_name(backend))


def select_subset(logits, targets, features, *, num_subsets, seed, loss, loss_ema, grad_ema, mode="bernoulli",
                  p=0.5, backend="auto", route="auto", bias=True, label_smoothing=0.0, eps=1e-8,
                  grad_metric="mean") -> Selection:
    """Draw ``num_subsets`` subsets from ``seed`` (inside the kernels), score each by the norm of its mean (or
    summed, ``grad_metric="sum"``) last-layer gradient, and pick the one with the least margin loss; ties go to
    the lowest index. ``loss`` is the batch's mean loss (a float or a 0-d tensor, left on the device).

    First step (``loss_ema`` or ``grad_ema`` None): there is no trend yet, so the largest subset is chosen (lowest
    index among equals), the closest to the whole batch. Empty subsets are never chosen. One fused op: nothing of
    size N leaves the backend (see :func:`subset_scores` to inspect every subset's score).
    """
    args = _selection_args(logits, targets, features, num_subsets, seed, loss, loss_ema, grad_ema, mode, p, backend,
                           route, bias, label_smoothing, eps, grad_metric)
    return Selection(*ops.select_subset_op(*args))


def subset_scores(logits, targets, features, *, num_subsets, seed, loss, loss_ema, grad_ema, mode="bernoulli",
                  p=0.5, backend="auto", route="auto", bias=True, label_smoothing=0.0, eps=1e-8,
                  grad_metric="mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Every subset's (gradient norm, margin), fp32 (N,) each, for the arguments of :func:`select_subset`, which
    chooses the first minimal margin (margins are NaN without EMAs). For inspection and tests: it materialises the
    N-sized scores that the fused selection never does."""
    (logits, targets, features, loss, n, seed32, mode_id, thr, r, bias, smoothing, loss_ema, grad_ema, has_ema, eps,
     metric, backend) = _selection_args(logits, targets, features, num_subsets, seed, loss, loss_ema, grad_ema, mode,
                                        p, backend, route, bias, label_smoothing, eps, grad_metric)
    q, c = ops.subset_sq_sums_op(logits, targets, features, None, n, seed32, mode_id, thr, r, bias, smoothing,
                                 backend)
    norms = _reference.subset_norms(q, c, metric)
    if not has_ema:
        return norms, torch.full_like(norms, float("nan"))
    return norms, _reference.margins(norms, c, loss, loss_ema, grad_ema, eps)
