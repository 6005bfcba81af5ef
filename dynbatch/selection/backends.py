"""Backend dispatch for the selection ops: Triton on CUDA, the native extension on CPU, torch everywhere.

Every backend implements two primitives with one contract:

- ``residuals(logits, targets, features, bias, smoothing) -> (E fp32 (B, C), per-sample norms fp32 (B,))``
- ``sq_sums(e, a, n, masks, seed, mode, thr, route, dot_dtype) -> (||sum_S g||^2 fp32 (N,), |S| fp32 (N,))``
  where ``masks`` is a uint8 (N, B) tensor when ``mode == 0``, else masks are drawn from ``seed``.
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

    def sq_sums(self, e, a, n, masks, seed, mode, thr, route, dot_dtype):
        ref = _reference()
        if mode != 0:
            return ref.seeded_subset_sq_sums(e, a, n, seed, mode, thr, route)
        return ref.subset_sq_sums(e, a, masks, route)


class NativeBackend:
    name = "native"

    def __init__(self, module):
        self.m = module

    def residuals(self, logits, targets, features, bias, smoothing):
        return self.m.residuals(logits, targets, features, bias, float(smoothing))

    def sq_sums(self, e, a, n, masks, seed, mode, thr, route, dot_dtype):
        return self.m.subset_sq_sums(e.contiguous(), a.contiguous(), n, masks, seed, mode, thr, route)


class TritonBackend:
    name = "triton"

    def residuals(self, logits, targets, features, bias, smoothing):
        from dynbatch_kernels.residuals import residuals_and_norms

        return residuals_and_norms(logits, targets, features, bias=bias, label_smoothing=smoothing)

    def sq_sums(self, e, a, n, masks, seed, mode, thr, route, dot_dtype):
        if route == "gram":
            from dynbatch_kernels.subset_norms_gram import subset_sq_sums_gram as fn
        else:
            from dynbatch_kernels.subset_norms_direct import subset_sq_sums_direct as fn
        return fn(e.contiguous(), a.contiguous(), n, masks=masks, seed=seed, mode=mode, thr=thr, dot_dtype=dot_dtype)


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
    from dynbatch.selection import native

    return {"torch": (True, "reference"), "native": native.status(), "triton": triton_status()}


def get_backend(name: str, device: torch.device):
    """The backend object for ``name`` on ``device``; ``auto`` is Triton on CUDA, native on CPU, else torch."""
    from dynbatch.selection import native

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
