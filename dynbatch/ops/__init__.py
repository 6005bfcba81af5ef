"""The last-layer ops for your own code: per-sample and subset gradient norms, random subsets, EDBA's subset choice.

Shapes: logits (B, C) and features (B, D) in fp32, bf16 or fp16; targets (B,) integer class indices; masks
(N, B) bool. Results are fp32 whatever the input dtype. ``backend``: ``auto`` (the registered op: the native
extension on CPU, Triton on CUDA, the torch reference elsewhere), ``torch`` (the reference), ``native`` or
``triton``. ``route``: ``direct``, ``gram`` or ``auto`` (the cheaper: Gram when B < C(D+1)). The ops and their
schemas: ``dynbatch.ops.library``.
"""
from __future__ import annotations

import functools
import os
import threading

import numpy as np
import torch

from dynbatch.errors import UserError
from dynbatch.ops import library, native
from dynbatch_kernels import reference as _reference

BACKENDS = ("torch", "native", "triton")
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


@functools.lru_cache(maxsize=64)  # called at every selection step with the same two values
def _mode_threshold(mode: str, p: float) -> tuple[int, int]:
    mode_id = _reference.MODES.get(mode)
    if mode_id is None:
        raise UserError(f"unknown subset mode {mode!r}; choose one of {', '.join(_reference.MODES)}")
    if not 0.0 < p <= 1.0:
        raise UserError(f"subset probability p must be in (0, 1] (got {p})")
    return mode_id, _reference.bernoulli_threshold(p)


def triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton not importable ({e})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "CPU interpreter (TRITON_INTERPRET=1): exact but slow"
    if not torch.cuda.is_available():
        return False, "needs a CUDA device (or TRITON_INTERPRET=1 for the interpreter)"
    return True, ""


def backend_status() -> dict[str, tuple[bool, str]]:
    return {"torch": (True, "reference"), "native": native.status(), "triton": triton_status()}


def resolve_backend(backend: str, device_type: str) -> str:
    """What ``backend`` runs on ``device_type``: ``op`` (the registered op, dispatched by device), ``torch`` (the
    reference, called directly) or ``triton`` (the launchers, called directly). For ``auto`` and ``native`` on CPU
    it loads the native extension first, which registers its kernels on the CPU key. A constant to
    ``torch.compile``: it cannot change within a process (so it is resolved once per backend and device type)."""
    how = _resolved.get((backend, device_type))
    if how is None:
        how = _resolved[(backend, device_type)] = _resolve(backend, device_type)
    return how


# torch.compiler.assume_constant_result(resolve_backend), without importing torch._dynamo (and Triton with it) when
# dynbatch.ops is imported: the decorator sets only this mark. The compiled-loop test fails if the mark stops working.
resolve_backend._dynamo_marked_constant = True
_resolved: dict[tuple[str, str], str] = {}


def _resolve(backend: str, device_type: str) -> str:
    if backend == "auto":
        if device_type == "cpu":
            native.load()
        return "op"
    if backend == "torch":
        return "torch"
    if backend == "native":
        if device_type != "cpu":
            raise UserError("backend native runs on CPU tensors; use backend triton or auto on CUDA")
        if native.load() is None:
            raise UserError(f"native backend unavailable: {native.status()[1]}; use backend torch or auto")
        return "op"
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            raise UserError(f"triton backend unavailable: {why}; use backend auto")
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError("triton backend needs CUDA tensors (or TRITON_INTERPRET=1)")
        return "triton"
    raise UserError(f"unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")


def _run(backend: str, args: tuple):
    """The op whose arguments ``args`` holds (a ``library.ARGS`` tuple, built by name) on ``backend``."""
    name = type(args).op
    how = resolve_backend(backend, args.logits.device.type)
    if how == "op":
        return library.OPS[name](*args)
    reference, triton = library.IMPLEMENTATIONS[name]
    return (reference if how == "torch" else triton)(*args)


_host = threading.local()  # per thread: the CPU trend buffer, (numpy array, tensor on it, view of its first entry)


def _trend(loss, loss_ema, grad_ema, device: torch.device) -> torch.Tensor:
    """[loss, loss_ema, grad_ema] float64 (3,) on ``device``, EMAs NaN when None; each a float or a 0-d tensor.

    Tensors are never read: they are copied in on their device (one stack), and host floats are filled in there,
    never copied from pageable memory. On the CPU, outside a compiled graph, one buffer per thread is refilled (the
    loss by one copy, floats through numpy): the selection runs at every step, and here each extra torch operation
    costs several µs. The ops finish before returning on the CPU and keep no reference, so the buffer is free again
    when the call returns."""
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


def per_sample_grad_norms(logits, targets, features, *, bias=True, label_smoothing=0.0, backend="auto"):
    """Norm of each sample's own last-layer gradient (weight, and bias when ``bias``): fp32 (B,)."""
    _check(logits, targets, features)
    return _run(backend, library.ARGS["per_sample_grad_norms"](**_head(logits, targets, features, bias,
                                                                             label_smoothing)))


SCORES = _reference.SCORES + _reference.CLASS_SCORES


class Scores:
    """Each sample's scores against its batch, on the device: ``table`` fp32 (K, B), one row per name in
    ``names`` (:data:`SCORES`, the class rows only when asked for), each row also an attribute::

        s = sample_scores(logits, y, features, by_class=True)
        s.loss, s.residual_norm, s.grad_norm, s.agreement, s.consensus, s.class_agreement, s.class_consensus

    - ``loss``: cross-entropy against the (smoothed) target;
    - ``residual_norm``: ||e_i||, e_i = softmax(z_i) - t_i (EL2N; Katharopoulos & Fleuret's upper bound);
    - ``grad_norm``: ||g_i|| = ||e_i|| ||a_i||, the last layer's per-sample gradient norm, a_i = [h_i, 1];
    - ``agreement``: r_i = <g_i, G>, G the batch's summed last-layer gradient;
    - ``consensus``: cos(g_i, G - g_i), in [-1, 1]; 0 for a zero gradient or a sample alone;
    - ``class_*``: the same against G_k, the sum over the samples of i's own class.
    """

    __slots__ = ("table", "names")

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.names = SCORES[:table.shape[0]]

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in SCORES:
            if name not in self.names:
                raise UserError(f"{name} needs the class scores; call sample_scores(..., by_class=True)")
            return self.table[self.names.index(name)]
        raise AttributeError(name)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.table))


def sample_scores(logits, targets, features, *, bias=True, label_smoothing=0.0, by_class=False,
                  backend="auto") -> Scores:
    """Each sample's last-layer scores against its batch (see :class:`Scores`), in one pass over the head: the
    residuals, one C x (D + bias) product, one bilinear pass (and with ``by_class`` a class-masked one); fp32
    accumulation whatever the inputs' dtype; nothing of size B x C(D + 1) is allocated."""
    _check(logits, targets, features)
    return Scores(_run(backend, library.ARGS["sample_scores"](
        **_head(logits, targets, features, bias, label_smoothing), by_class=bool(by_class))))


def random_subsets(num_subsets, batch_size, *, seed, mode="bernoulli", p=0.5, device=None) -> torch.Tensor:
    """The masks (N, B) bool that every backend draws for ``seed``: row n is subset n."""
    _mode_threshold(mode, p)
    rows = torch.arange(num_subsets, dtype=torch.int64, device=device)
    return _reference.subset_masks(seed, rows, batch_size, mode, p)


def seeded_uniform(seed: int, n: int, *, device=None) -> torch.Tensor:
    """n draws in [0, 1), fp32 (n,), a function of (seed, i) alone: the same on every device and after a resume
    (the subset generator's mixer, 24 bits a draw)."""
    key = _reference.row_keys(seed, torch.zeros(1, dtype=torch.int64, device=device))
    i = torch.arange(n, dtype=torch.int64, device=device)
    bits = _reference.mix32((key + i * _reference.GOLDEN) & _reference.M32) >> (32 - _reference.THRESHOLD_BITS)
    return bits.to(torch.float32) / float(1 << _reference.THRESHOLD_BITS)


def _gram(route: str, logits, features, bias) -> bool:
    return _route(route, logits.shape[0], logits.shape[1], features.shape[1] + bool(bias)) == "gram"


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
    q, c = _run(backend, library.ARGS["subset_sq_sums"](
        **_head(logits, targets, features, bias, label_smoothing), masks=m, num_subsets=m.shape[0], seed=0, mode=0,
        threshold=0, gram=_gram(route, logits, features, bias)))
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


def _head(logits, targets, features, bias, label_smoothing) -> dict:
    """The arguments every op starts with."""
    return dict(logits=logits, targets=targets, features=features, bias=bool(bias),
                label_smoothing=float(label_smoothing))


def _selection_args(logits, targets, features, *, num_subsets, seed, loss, loss_ema, grad_ema, mode, p, route, bias,
                    label_smoothing, eps, grad_metric):
    """The arguments of ``select_subset``, checked (the selection runs at every step: no dictionaries here)."""
    _check(logits, targets, features)
    if not 1 <= num_subsets <= MAX_SUBSETS:
        raise UserError(f"num_subsets must be in 1..{MAX_SUBSETS} (got {num_subsets})")
    # (a compiled graph traces the function itself: dynamo warns about tracing through a cache)
    mode_id, thr = (_mode_threshold.__wrapped__ if torch.compiler.is_compiling() else _mode_threshold)(mode, p)
    if loss_ema is None or grad_ema is None:
        loss_ema = grad_ema = None
    return library.ARGS["select_subset"](
        logits=logits, targets=targets, features=features, bias=bool(bias), label_smoothing=float(label_smoothing),
        trend=_trend(loss, loss_ema, grad_ema, logits.device), num_subsets=num_subsets, seed=_reference.seed32(seed),
        mode=mode_id, threshold=thr, gram=_gram(route, logits, features, bias),
        sum_metric=_metric(grad_metric) == "sum", eps=float(eps))


def select_subset(logits, targets, features, *, num_subsets, seed, loss, loss_ema, grad_ema, mode="bernoulli",
                  p=0.5, backend="auto", route="auto", bias=True, label_smoothing=0.0, eps=1e-8,
                  grad_metric="mean") -> Selection:
    """Draw ``num_subsets`` subsets from ``seed`` (inside the kernels), score each by the norm of its mean (or
    summed, ``grad_metric="sum"``) last-layer gradient, and pick the one with the least margin loss; ties go to
    the lowest index. ``loss`` is the batch's mean loss and ``loss_ema``, ``grad_ema`` the EMAs, each a float or a
    0-d tensor; tensors stay on the device (nothing is read to the host, so a compiled loop may keep them there).

    First step (``loss_ema`` or ``grad_ema`` None, or NaN): there is no trend yet, so the largest subset is chosen
    (lowest index among equals), the closest to the whole batch. Empty subsets are never chosen. One fused op:
    nothing of size N leaves the backend (see :func:`subset_scores` to inspect every subset's score).
    """
    return Selection(*_run(backend, _selection_args(
        logits, targets, features, num_subsets=num_subsets, seed=seed, loss=loss, loss_ema=loss_ema,
        grad_ema=grad_ema, mode=mode, p=p, route=route, bias=bias, label_smoothing=label_smoothing, eps=eps,
        grad_metric=grad_metric)))


def subset_scores(logits, targets, features, *, num_subsets, seed, loss, loss_ema, grad_ema, mode="bernoulli",
                  p=0.5, backend="auto", route="auto", bias=True, label_smoothing=0.0, eps=1e-8,
                  grad_metric="mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Every subset's (gradient norm, margin), fp32 (N,) each, for the arguments of :func:`select_subset`, which
    chooses the first minimal margin (margins are NaN without EMAs). For inspection and tests: it materialises the
    N-sized scores that the fused selection never does."""
    a = _selection_args(logits, targets, features, num_subsets=num_subsets, seed=seed, loss=loss, loss_ema=loss_ema,
                        grad_ema=grad_ema, mode=mode, p=p, route=route, bias=bias, label_smoothing=label_smoothing,
                        eps=eps, grad_metric=grad_metric)
    sums = library.ARGS["subset_sq_sums"]._fields
    q, c = _run(backend, library.ARGS["subset_sq_sums"](**{k: (None if k == "masks" else getattr(a, k)) for k in sums}))
    norms = _reference.subset_norms(q, c, grad_metric)
    if loss_ema is None or grad_ema is None:
        return norms, torch.full_like(norms, float("nan"))
    return norms, _reference.margins(norms, c, a.trend[0], a.trend[1], a.trend[2], eps)
