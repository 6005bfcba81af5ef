"""The selection ops, registered with ``torch.library`` as ``torch.ops.dynbatch.*``.

Registration makes each op one opaque node to ``torch.compile`` (its fake implementation gives the output
shapes, so a step that calls it traces without a graph break) and puts the choice of backend (Triton on CUDA, the
native extension on CPU, the torch reference anywhere; ``dynbatch.ops.backends``) in one place: the op's
implementation, from its ``backend`` argument.

Why ``Library.define``/``impl`` rather than the ``torch.library.custom_op`` decorator: the decorator wraps every
call in a Python autograd layer (alias checks, requires-grad checks, a redispatch), measured at ~55 µs per call of
``select_subset`` (17 arguments) on this project's CPU, more than the whole selection at small batches; the
low-level registration dispatches in ~8 µs. The ops have no autograd formula: selection reads detached values.

Arguments are checked and normalised by ``dynbatch.ops``, the public API: modes are ids, seeds
are folded to 32 bits, routes are ``direct`` or ``gram``.
"""
from __future__ import annotations

import torch

from dynbatch.ops.backends import get_backend

_LIB = torch.library.Library("dynbatch", "DEF")
_LIB.define("select_subset(Tensor logits, Tensor targets, Tensor features, Tensor loss, int num_subsets, int seed, "
            "int mode_id, int thr, str route, bool bias, float label_smoothing, float loss_ema, float grad_ema, "
            "bool has_ema, float eps, str metric, str backend) -> (Tensor, Tensor)")
_LIB.define("subset_sq_sums(Tensor logits, Tensor targets, Tensor features, Tensor? masks, int num_subsets, "
            "int seed, int mode_id, int thr, str route, bool bias, float label_smoothing, str backend) "
            "-> (Tensor, Tensor)")
_LIB.define("per_sample_grad_norms(Tensor logits, Tensor targets, Tensor features, bool bias, "
            "float label_smoothing, str backend) -> Tensor")


def _select_subset(logits, targets, features, loss, num_subsets, seed, mode_id, thr, route, bias, label_smoothing,
                   loss_ema, grad_ema, has_ema, eps, metric, backend):
    """EDBA's fused selection: (stats float64 (5,) = [loss, grad_norm, margin, size, index], mask bool (B,))."""
    return get_backend(backend, logits.device).select(
        logits, targets, features, loss, num_subsets=num_subsets, seed=seed, mode_id=mode_id, thr=thr, route=route,
        bias=bias, label_smoothing=label_smoothing, loss_ema=loss_ema, grad_ema=grad_ema, has_ema=has_ema, eps=eps,
        metric=metric)


def _subset_sq_sums(logits, targets, features, masks, num_subsets, seed, mode_id, thr, route, bias, label_smoothing,
                    backend):
    """(||sum_S g||^2 fp32 (N,), |S| fp32 (N,)) of the given ``masks`` (mode 0, uint8/bool (N, B)) or of subsets
    drawn from ``seed``."""
    return get_backend(backend, logits.device).sq_sums(logits, targets, features, masks, num_subsets, seed, mode_id,
                                                       thr, route, bias, label_smoothing)


def _per_sample_grad_norms(logits, targets, features, bias, label_smoothing, backend):
    """||g_i|| of each sample's own last-layer gradient, fp32 (B,)."""
    return get_backend(backend, logits.device).residuals(logits, targets, features, bias, label_smoothing)[1]


for _name, _fn in (("select_subset", _select_subset), ("subset_sq_sums", _subset_sq_sums),
                   ("per_sample_grad_norms", _per_sample_grad_norms)):
    _LIB.impl(_name, _fn, "CompositeExplicitAutograd")


@torch.library.register_fake("dynbatch::select_subset")
def _(logits, targets, features, loss, num_subsets, seed, mode_id, thr, route, bias, label_smoothing, loss_ema,
      grad_ema, has_ema, eps, metric, backend):
    return logits.new_empty(5, dtype=torch.float64), logits.new_empty(logits.shape[0], dtype=torch.bool)


@torch.library.register_fake("dynbatch::subset_sq_sums")
def _(logits, targets, features, masks, num_subsets, seed, mode_id, thr, route, bias, label_smoothing, backend):
    return logits.new_empty(num_subsets, dtype=torch.float32), logits.new_empty(num_subsets, dtype=torch.float32)


@torch.library.register_fake("dynbatch::per_sample_grad_norms")
def _(logits, targets, features, bias, label_smoothing, backend):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


select_subset_op = torch.ops.dynbatch.select_subset.default
subset_sq_sums_op = torch.ops.dynbatch.subset_sq_sums.default
per_sample_grad_norms_op = torch.ops.dynbatch.per_sample_grad_norms.default
