"""Backend dispatch for the selection ops: Triton on CUDA, the native extension on CPU, torch everywhere.

Every backend implements two primitives with one contract:

- ``residuals(logits, targets, features, bias, smoothing) -> (E fp32 (B, C), per-sample norms fp32 (B,))``
- ``sq_sums(logits, targets, features, masks, n, seed, mode, thr, route, bias, smoothing)
  -> (||sum_S g||^2 fp32 (N,), |S| fp32 (N,))`` where ``masks`` is a bool/uint8 (N, B) tensor when ``mode == 0``,
  else masks are drawn from ``seed``.

and the fused selection ``select(logits, targets, features, loss, **kw) -> (stats float64 (5,), mask bool (B,))``
with the keywords and result of ``dynbatch_kernels.reference.select``. Callers reach them through the registered
ops of ``dynbatch.ops.library``, never directly.
"""
from __future__ import annotations

import os

import torch

from dynbatch.errors import UserError

BACKENDS = ("torch", "native", "triton")


def _reference():
    from dynbatch_kernels import reference

    return reference


class TorchBackend:
    name = "torch"

    def residuals(self, logits, targets, features, bias, smoothing):
        ref = _reference()
        e = ref.residuals(logits, targets, smoothing)
        return e, e.norm(dim=1) * ref.augmented_features(features, bias).norm(dim=1)

    def sq_sums(self, logits, targets, features, masks, n, seed, mode, thr, route, bias, smoothing):
        ref = _reference()
        e = ref.residuals(logits, targets, smoothing)
        a = ref.augmented_features(features, bias)
        if mode != 0:
            return ref.seeded_subset_sq_sums(e, a, n, seed, mode, thr, route)
        return ref.subset_sq_sums(e, a, masks, route)

    def select(self, logits, targets, features, loss, **kw):
        return _reference().select(logits, targets, features, loss, **kw)


class NativeBackend:
    name = "native"

    def __init__(self, module):
        self.m = module

    def residuals(self, logits, targets, features, bias, smoothing):
        return self.m.residuals(logits, targets, features, bias, float(smoothing))

    def sq_sums(self, logits, targets, features, masks, n, seed, mode, thr, route, bias, smoothing):
        return self.m.subset_sq_sums(logits, targets, features, masks, n, seed, mode, thr, route, bias, smoothing)

    def select(self, logits, targets, features, loss, *, num_subsets, seed, mode_id, thr, route, bias,
               label_smoothing, loss_ema, grad_ema, has_ema, eps, metric):
        return self.m.select_subset(logits, targets, features, loss, num_subsets, seed, mode_id, thr, route, bias,
                                    label_smoothing, loss_ema, grad_ema, has_ema, eps, metric == "sum")


class TritonBackend:
    name = "triton"

    def residuals(self, logits, targets, features, bias, smoothing):
        from dynbatch_kernels.residuals import residuals_and_norms

        return residuals_and_norms(logits, targets, features, bias=bias, label_smoothing=smoothing)

    def sq_sums(self, logits, targets, features, masks, n, seed, mode, thr, route, bias, smoothing):
        dot = dot_dtype(logits, features)
        if route == "gram":  # two launches: K from the logits and features, then the subsets
            from dynbatch_kernels.subset_norms_gram import subset_sq_sums_gram

            return subset_sq_sums_gram(logits, targets, features, n, bias=bias, label_smoothing=smoothing,
                                       masks=masks, seed=seed, mode=mode, thr=thr, dot_dtype=dot)
        from dynbatch_kernels.subset_norms_direct import subset_sq_sums_direct

        e, a = self._residuals(logits, targets, features, bias, smoothing)
        return subset_sq_sums_direct(e, a, n, masks=masks, seed=seed, mode=mode, thr=thr, dot_dtype=dot)

    def select(self, logits, targets, features, loss, *, num_subsets, seed, mode_id, thr, route, bias,
               label_smoothing, loss_ema, grad_ema, has_ema, eps, metric):
        """Two launches on either route; the second picks the subset in its epilogue (``select_epilogue``)."""
        kw = dict(num_subsets=num_subsets, seed=seed, mode_id=mode_id, thr=thr, loss_ema=loss_ema, grad_ema=grad_ema,
                  has_ema=has_ema, eps=eps, metric=metric, dot_dtype=dot_dtype(logits, features))
        if route == "gram":
            from dynbatch_kernels.subset_norms_gram import select_gram

            return select_gram(logits, targets, features, loss, bias=bias, label_smoothing=label_smoothing, **kw)
        from dynbatch_kernels.subset_norms_direct import select_direct

        e, a = self._residuals(logits, targets, features, bias, label_smoothing)
        return select_direct(e, a, loss, **kw)

    @staticmethod
    def _residuals(logits, targets, features, bias, smoothing):
        """E fp32 (B, C) and A = [h, 1] fp32 (B, D + bias), one launch."""
        from dynbatch_kernels.residuals import residuals_and_norms

        e, _, a = residuals_and_norms(logits, targets, features, bias=bias, label_smoothing=smoothing, augmented=True)
        return e, a


def dot_dtype(logits, features) -> torch.dtype:
    """The tensor-core operand type: the inputs' 16-bit type if either has one, else fp32."""
    low = [t.dtype for t in (logits, features) if t.dtype in (torch.bfloat16, torch.float16)]
    return low[0] if low else torch.float32


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
    from dynbatch.ops import native

    return {"torch": (True, "reference"), "native": native.status(), "triton": triton_status()}


_resolved: dict[tuple[str, str], object] = {}


def get_backend(name: str, device: torch.device):
    """The backend object for ``name`` on ``device``; ``auto`` is Triton on CUDA, native on CPU, else torch.

    Resolved once per (name, device type): selection runs every step, and the answer cannot change within a
    process (the extension is built or not at first use; TRITON_INTERPRET is read at import by Triton)."""
    key = (name, device.type)
    be = _resolved.get(key)
    if be is None:
        be = _resolved[key] = _resolve(name, device)
    return be


def _resolve(name: str, device: torch.device):
    from dynbatch.ops import native

    if name == "auto":
        if device.type == "cuda" and triton_status()[0]:
            return TritonBackend()
        if device.type == "cpu":
            module = native.load()
            if module is not None:
                return NativeBackend(module)
        return TorchBackend()
    if name == "torch":
        return TorchBackend()
    if name == "native":
        if device.type != "cpu":
            raise UserError("backend native runs on CPU tensors; use backend triton or auto on CUDA")
        module = native.load()
        if module is None:
            raise UserError(f"native backend unavailable: {native.status()[1]}; use backend torch or auto")
        return NativeBackend(module)
    if name == "triton":
        ok, why = triton_status()
        if not ok:
            raise UserError(f"triton backend unavailable: {why}; use backend auto")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError("triton backend needs CUDA tensors (or TRITON_INTERPRET=1)")
        return TritonBackend()
    raise UserError(f"unknown backend {name!r}; choose auto, {', '.join(BACKENDS)}")
