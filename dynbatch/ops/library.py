"""The last-layer ops, registered with ``torch.library`` as ``torch.ops.dynbatch.*``: each schema is written here
once, and each implementation is registered per dispatch key.

- ``CPU``: the native extension (``csrc/dynbatch_native.cpp``, ``TORCH_LIBRARY_IMPL(dynbatch, CPU, m)``), once it
  is loaded (:func:`dynbatch.ops.native.load`, on the first CPU call of the public API);
- ``CUDA``: the Triton kernels (``kernels/``);
- ``CompositeExplicitAutograd``: the torch reference (``kernels/reference.py``), for every device without its own
  kernel (and the CPU while the extension is not loaded).

Every op starts with the same head: ``logits (B, C), targets (B,), features (B, D)`` of any float dtype, ``bias``
(whether the head has one, i.e. a_i = [h_i, 1]) and ``label_smoothing``; results are fp32 (stats float64).
``select_subset`` takes the batch loss and both EMAs packed in one tensor, ``trend`` float64 (3,) = [loss,
loss_ema, grad_ema] (EMAs NaN before the first step), so that nothing is read to the host and nothing specialises
under ``torch.compile(dynamic=True)``. Subset ``mode`` 0 takes explicit ``masks`` (N, B), 1 and 2 draw them from
``seed`` (bernoulli with ``threshold``, uniform size); ``gram`` picks the Gram route over the direct one.

Why ``Library.define``/``impl`` rather than the ``torch.library.custom_op`` decorator: the decorator wraps every
call in a Python autograd layer, measured at ~55 µs per call of ``select_subset`` on this project's CPU, more than
the whole selection at small batches; a C++ kernel on the CPU key dispatches with no Python at all. The ops have no
autograd formula: selection reads detached values. Arguments are checked and normalised by the public API
(``dynbatch.ops``).
"""
from __future__ import annotations

import torch

HEAD = "Tensor logits, Tensor targets, Tensor features, bool bias, float label_smoothing"
SUBSETS = "int num_subsets, int seed, int mode, int threshold, bool gram"
SCHEMAS = {
    "per_sample_grad_norms": f"({HEAD}) -> Tensor",
    "subset_sq_sums": f"({HEAD}, Tensor? masks, {SUBSETS}) -> (Tensor, Tensor)",
    "select_subset": f"({HEAD}, Tensor trend, {SUBSETS}, bool sum_metric, float eps) -> (Tensor, Tensor)",
}

_LIB = torch.library.Library("dynbatch", "DEF")
for _name, _schema in SCHEMAS.items():
    _LIB.define(_name + _schema)


def _reference():
    from dynbatch_kernels import reference

    return reference


# ---- the reference: every device without a kernel of its own ---------------------------------------------------
def _norms_reference(logits, targets, features, bias, label_smoothing):
    """||g_i|| = ||e_i|| ||a_i||, fp32 (B,)."""
    ref = _reference()
    e = ref.residuals(logits, targets, label_smoothing)
    return e.norm(dim=1) * ref.augmented_features(features, bias).norm(dim=1)


def _sq_sums_reference(logits, targets, features, bias, label_smoothing, masks, num_subsets, seed, mode, threshold,
                       gram):
    """(||sum_S g||^2, |S|), fp32 (N,) each."""
    ref = _reference()
    e = ref.residuals(logits, targets, label_smoothing)
    a = ref.augmented_features(features, bias)
    route = "gram" if gram else "direct"
    if mode != 0:
        return ref.seeded_subset_sq_sums(e, a, num_subsets, seed, mode, threshold, route)
    return ref.subset_sq_sums(e, a, masks, route)


def _select_reference(logits, targets, features, bias, label_smoothing, trend, num_subsets, seed, mode, threshold,
                      gram, sum_metric, eps):
    """(stats float64 (5,) = [loss, grad_norm, margin, size, index], mask bool (B,))."""
    return _reference().select(logits, targets, features, trend, num_subsets=num_subsets, seed=seed, mode_id=mode,
                               thr=threshold, route="gram" if gram else "direct", bias=bias,
                               label_smoothing=label_smoothing, eps=eps, metric="sum" if sum_metric else "mean")


# ---- Triton: CUDA tensors (and CPU tensors under TRITON_INTERPRET=1, through the public API's backend="triton") ---
def dot_dtype(logits, features) -> torch.dtype:
    """The tensor-core operand type: the inputs' 16-bit type if either has one, else fp32."""
    low = [t.dtype for t in (logits, features) if t.dtype in (torch.bfloat16, torch.float16)]
    return low[0] if low else torch.float32


def _residuals_triton(logits, targets, features, bias, label_smoothing):
    """E fp32 (B, C) and A = [h, 1] fp32 (B, D + bias), one launch."""
    from dynbatch_kernels.residuals import residuals_and_norms

    e, _, a = residuals_and_norms(logits, targets, features, bias=bias, label_smoothing=label_smoothing,
                                  augmented=True)
    return e, a


def _norms_triton(logits, targets, features, bias, label_smoothing):
    from dynbatch_kernels.residuals import residuals_and_norms

    return residuals_and_norms(logits, targets, features, bias=bias, label_smoothing=label_smoothing)[1]


def _sq_sums_triton(logits, targets, features, bias, label_smoothing, masks, num_subsets, seed, mode, threshold,
                    gram):
    dot = dot_dtype(logits, features)
    if gram:  # two launches: K from the logits and features, then the subsets
        from dynbatch_kernels.subset_norms_gram import subset_sq_sums_gram

        return subset_sq_sums_gram(logits, targets, features, num_subsets, bias=bias, label_smoothing=label_smoothing,
                                   masks=masks, seed=seed, mode=mode, thr=threshold, dot_dtype=dot)
    from dynbatch_kernels.subset_norms_direct import subset_sq_sums_direct

    e, a = _residuals_triton(logits, targets, features, bias, label_smoothing)
    return subset_sq_sums_direct(e, a, num_subsets, masks=masks, seed=seed, mode=mode, thr=threshold, dot_dtype=dot)


def _select_triton(logits, targets, features, bias, label_smoothing, trend, num_subsets, seed, mode, threshold, gram,
                   sum_metric, eps):
    """Two launches on either route; the second picks the subset in its epilogue (``select_epilogue``)."""
    kw = dict(num_subsets=num_subsets, seed=seed, mode_id=mode, thr=threshold, eps=eps,
              metric="sum" if sum_metric else "mean", dot_dtype=dot_dtype(logits, features))
    if gram:
        from dynbatch_kernels.subset_norms_gram import select_gram

        return select_gram(logits, targets, features, trend, bias=bias, label_smoothing=label_smoothing, **kw)
    from dynbatch_kernels.subset_norms_direct import select_direct

    e, a = _residuals_triton(logits, targets, features, bias, label_smoothing)
    return select_direct(e, a, trend, **kw)


IMPLEMENTATIONS = {  # op -> (reference, Triton)
    "per_sample_grad_norms": (_norms_reference, _norms_triton),
    "subset_sq_sums": (_sq_sums_reference, _sq_sums_triton),
    "select_subset": (_select_reference, _select_triton),
}
for _name, (_ref, _triton) in IMPLEMENTATIONS.items():
    _LIB.impl(_name, _ref, "CompositeExplicitAutograd")
    _LIB.impl(_name, _triton, "CUDA")


# ---- fakes: output shapes for torch.compile, after checking the inputs' shapes ---------------------------------
def _check_head(logits, targets, features):
    torch._check(logits.dim() == 2 and features.dim() == 2 and targets.dim() == 1,
                 lambda: "expected logits (B, C), targets (B,) and features (B, D)")
    torch._check(targets.shape[0] == logits.shape[0] and features.shape[0] == logits.shape[0],
                 lambda: "logits, targets and features must have the same batch size")


@torch.library.register_fake("dynbatch::per_sample_grad_norms")
def _(logits, targets, features, bias, label_smoothing):
    _check_head(logits, targets, features)
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


@torch.library.register_fake("dynbatch::subset_sq_sums")
def _(logits, targets, features, bias, label_smoothing, masks, num_subsets, seed, mode, threshold, gram):
    _check_head(logits, targets, features)
    if masks is not None:
        torch._check(masks.dim() == 2 and masks.shape[0] == num_subsets and masks.shape[1] == logits.shape[0],
                     lambda: "masks must be (num_subsets, B)")
    return (logits.new_empty(num_subsets, dtype=torch.float32), logits.new_empty(num_subsets, dtype=torch.float32))


@torch.library.register_fake("dynbatch::select_subset")
def _(logits, targets, features, bias, label_smoothing, trend, num_subsets, seed, mode, threshold, gram, sum_metric,
      eps):
    _check_head(logits, targets, features)
    torch._check(trend.dim() == 1 and trend.shape[0] == 3, lambda: "trend must be (3,) = [loss, loss_ema, grad_ema]")
    return logits.new_empty(5, dtype=torch.float64), logits.new_empty(logits.shape[0], dtype=torch.bool)


OPS = {name: getattr(torch.ops.dynbatch, name).default for name in SCHEMAS}  # looked up once: a getattr is slow
