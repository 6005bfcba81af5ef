"""``dynbatch::select_subset``: EDBA's subset choice in one fused op. N subsets are drawn from ``seed`` inside the
kernels, each scored by the norm of its mean (or summed) last-layer gradient, and the one with the least margin
loss is chosen. The batch loss and both EMAs travel packed in one tensor, ``trend`` float64 (3,) = [loss, loss_ema,
grad_ema] (EMAs NaN before the first step), so nothing is read to the host and nothing specialises under
``torch.compile(dynamic=True)``.

The public wrapper takes the head and a :class:`SubsetSpec` built once (the subsets' count, draw, route, metric
and backend); the op's arguments are the schema's, by name (``Args``), from there down to every kernel."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from dynbatch.errors import UserError
from dynbatch.ops import library, subset_sums
from dynbatch_kernels import reference as _reference

SCHEMA = f"({library.HEAD}, Tensor trend, {subset_sums.SUBSETS}, bool sum_metric, float eps) -> (Tensor, Tensor)"
Args = library.args_type("select_subset", SCHEMA)
MAX_SUBSETS = 1 << 20


def torch_impl(a):
    """(stats float64 (5,) = [loss, grad_norm, margin, size, index], mask bool (B,))."""
    return _reference.select(a)


def triton_impl(a):
    """Two launches on either route; the second picks the subset in its epilogue (``select_epilogue``)."""
    dot = library.dot_dtype(a.logits, a.features)
    if a.gram:
        from dynbatch_kernels.subset_norms_gram import select_gram

        return select_gram(a, dot)
    from dynbatch_kernels.residuals import residuals_and_norms
    from dynbatch_kernels.subset_norms_direct import select_direct

    e, _, feats = residuals_and_norms(a, augmented=True)
    return select_direct(e, feats, a, dot)


def fake(a):
    library.check_head(a)
    torch._check(a.trend.dim() == 1 and a.trend.shape[0] == 3,
                 lambda: "trend must be (3,) = [loss, loss_ema, grad_ema]")
    return a.logits.new_empty(5, dtype=torch.float64), a.logits.new_empty(a.logits.shape[0], dtype=torch.bool)


OP = library.define("select_subset", SCHEMA, Args, reference=torch_impl, triton=triton_impl, fake=fake)


@dataclass(frozen=True)
class SubsetSpec:
    """How a selection draws and scores its subsets, checked once when built (the selection runs every step).

    ``num_subsets`` N in 1..2^20; ``mode`` ``bernoulli`` (each sample in with probability ``p``) or
    ``uniform_size``; ``route`` ``direct``, ``gram`` or ``auto`` (the cheaper: Gram when B < C(D + 1));
    ``grad_metric`` ``mean`` (EDBA's) or ``sum``; ``eps`` the margin's smallest denominator; ``backend`` ``auto``
    (the device's own kernel), ``torch``, ``native`` or ``triton`` (see :func:`dynbatch.ops.using_backend`)."""

    num_subsets: int
    mode: str = "bernoulli"
    p: float = 0.5
    route: str = "auto"
    grad_metric: str = "mean"
    eps: float = 1e-8
    backend: str = "auto"
    mode_id: int = field(init=False, repr=False)
    threshold: int = field(init=False, repr=False)

    def __post_init__(self):
        if not 1 <= self.num_subsets <= MAX_SUBSETS:
            raise UserError(f"num_subsets must be in 1..{MAX_SUBSETS} (got {self.num_subsets})")
        if self.mode not in _reference.MODES:
            raise UserError(f"unknown subset mode {self.mode!r}; choose one of {', '.join(_reference.MODES)}")
        if not 0.0 < self.p <= 1.0:
            raise UserError(f"subset probability p must be in (0, 1] (got {self.p})")
        if self.route not in ("auto", "direct", "gram"):
            raise UserError(f"unknown route {self.route!r}; choose auto, direct or gram")
        subset_sums.check_metric(self.grad_metric)
        if self.backend != "auto" and self.backend not in library.BACKENDS:
            raise UserError(f"unknown backend {self.backend!r}; choose auto, {', '.join(library.BACKENDS)}")
        object.__setattr__(self, "mode_id", _reference.MODES[self.mode])
        object.__setattr__(self, "threshold", _reference.bernoulli_threshold(self.p))

    def args(self, head: tuple, trend: torch.Tensor, seed: int) -> tuple:
        """The op's arguments for ``head`` (checked, :func:`library.head`), ``trend`` and ``seed``."""
        gram = library.uses_gram(self.route, head[0], head[2], head[3])
        return Args(*head, trend, self.num_subsets, _reference.seed32(seed), self.mode_id, self.threshold, gram,
                    self.grad_metric == "sum", float(self.eps))


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


_host = threading.local()  # per thread: the CPU trend buffer, (numpy array, tensor on it, view of its first entry)


def _trend(loss, loss_ema, grad_ema, device: torch.device) -> torch.Tensor:
    """[loss, loss_ema, grad_ema] float64 (3,) on ``device``, EMAs NaN when None; each a float or a 0-d tensor.

    Tensors are never read: they are copied in on their device (one stack), and host floats are filled in there,
    never copied from pageable memory. On the CPU, outside a compiled graph, one buffer per thread is refilled (the
    loss by one copy, floats through numpy): the selection runs at every step, and here each extra torch operation
    costs several µs. The ops finish before returning on the CPU and keep no reference, so the buffer is free again
    when the call returns."""
    if loss_ema is None or grad_ema is None:
        loss_ema = grad_ema = None
    values = (loss, float("nan") if loss_ema is None else loss_ema, float("nan") if grad_ema is None else grad_ema)
    if device.type == "cpu" and not torch.compiler.is_compiling():
        if not hasattr(_host, "trend"):
            array = np.zeros(3)
            _host.trend = (array, torch.from_numpy(array), torch.from_numpy(array[:1]))
        array, trend, first = _host.trend
        for i, v in enumerate(values):
            if not isinstance(v, torch.Tensor):
                array[i] = float(v)
            elif i == 0:
                first.copy_(v)  # a 0-d loss broadcast into the first entry
            else:
                trend[i:i + 1].copy_(v.reshape(1))
        return trend
    return torch.stack([v.reshape(()).to(device=device, dtype=torch.float64) if isinstance(v, torch.Tensor)
                        else torch.full((), float(v), dtype=torch.float64, device=device) for v in values])


def select_subset(logits, targets, features, spec: SubsetSpec, *, seed, loss, loss_ema=None, grad_ema=None,
                  bias=True, label_smoothing=0.0) -> Selection:
    """Draw ``spec.num_subsets`` subsets from ``seed`` (inside the kernels), score each by the norm of its mean
    (or summed) last-layer gradient, and pick the one with the least margin loss; ties go to the lowest index.
    ``loss`` is the batch's mean loss and ``loss_ema``, ``grad_ema`` the EMAs, each a float or a 0-d tensor;
    tensors stay on the device (nothing is read to the host, so a compiled loop may keep them there).

    First step (``loss_ema`` or ``grad_ema`` None, or NaN): there is no trend yet, so the largest subset is chosen
    (lowest index among equals), the closest to the whole batch. Empty subsets are never chosen. One fused op:
    nothing of size N leaves the backend (see :func:`subset_scores` to inspect every subset's score).
    """
    head = library.head(logits, targets, features, bias, label_smoothing)
    args = spec.args(head, _trend(loss, loss_ema, grad_ema, logits.device), seed)
    return Selection(*library.call(OP, args, spec.backend))


def subset_scores(logits, targets, features, spec: SubsetSpec, *, seed, loss, loss_ema=None, grad_ema=None,
                  bias=True, label_smoothing=0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every subset's (gradient norm, margin), fp32 (N,) each, for the arguments of :func:`select_subset`, which
    chooses the first minimal margin (margins are NaN without EMAs). For inspection and tests: it materialises the
    N-sized scores that the fused selection never does."""
    head = library.head(logits, targets, features, bias, label_smoothing)
    a = spec.args(head, _trend(loss, loss_ema, grad_ema, logits.device), seed)
    sums = subset_sums.Args(*head, None, a.num_subsets, a.seed, a.mode, a.threshold, a.gram)
    q, c = library.call(subset_sums.OP, sums, spec.backend)
    norms = _reference.subset_norms(q, c, spec.grad_metric)
    if loss_ema is None or grad_ema is None:
        return norms, torch.full_like(norms, float("nan"))
    return norms, _reference.margins(norms, c, a.trend[0], a.trend[1], a.trend[2], spec.eps)


def margins(norms: torch.Tensor, counts: torch.Tensor, loss, loss_ema, grad_ema, eps: float = 1e-8) -> torch.Tensor:
    """EDBA's margin loss |(L - L_ema) / (G_S - G_ema) - 1| per subset, fp32 (N,); +inf for empty subsets.

    A denominator within ``eps`` of zero is replaced by ``eps`` with its sign, so identical samples or a converged
    EMA give large finite margins, never NaN or infinity.
    """
    return _reference.margins(norms, counts, loss, loss_ema, grad_ema, eps)
