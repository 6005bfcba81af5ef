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

from collections import namedtuple

import torch

HEAD = "Tensor logits, Tensor targets, Tensor features, bool bias, float label_smoothing"
SUBSETS = "int num_subsets, int seed, int mode, int threshold, bool gram"
SCHEMAS = {
    "per_sample_grad_norms": f"({HEAD}) -> Tensor",
    "subset_sq_sums": f"({HEAD}, Tensor? masks, {SUBSETS}) -> (Tensor, Tensor)",
    "select_subset": f"({HEAD}, Tensor trend, {SUBSETS}, bool sum_metric, float eps) -> (Tensor, Tensor)",
    "sample_scores": f"({HEAD}, bool by_class) -> Tensor",
}

_LIB = torch.library.Library("dynbatch", "DEF")
for _name, _schema in SCHEMAS.items():
    _LIB.define(_name + _schema)


def _arg_names(schema: str) -> list[str]:
    return [arg.split()[-1] for arg in schema[1:schema.index(")")].split(",")]


# Each op's arguments by name, in schema order: the implementations below and the public API read and build them
# by name, so the order is written in SCHEMAS alone (and in the native kernels' C++ signatures).
ARGS = {name: type(f"{name}_args", (namedtuple(f"{name}_args", _arg_names(schema)),), {"__slots__": (), "op": name})
        for name, schema in SCHEMAS.items()}


def _reference():
    from dynbatch_kernels import reference

    return reference


# ---- the reference: every device without a kernel of its own ---------------------------------------------------
def _norms_reference(a):
    """||g_i|| = ||e_i|| ||a_i||, fp32 (B,)."""
    ref = _reference()
    e = ref.residuals(a.logits, a.targets, a.label_smoothing)
    return e.norm(dim=1) * ref.augmented_features(a.features, a.bias).norm(dim=1)


def _sq_sums_reference(a):
    """(||sum_S g||^2, |S|), fp32 (N,) each."""
    ref = _reference()
    e = ref.residuals(a.logits, a.targets, a.label_smoothing)
    feats = ref.augmented_features(a.features, a.bias)
    route = "gram" if a.gram else "direct"
    if a.mode != 0:
        return ref.seeded_subset_sq_sums(e, feats, a.num_subsets, a.seed, a.mode, a.threshold, route)
    return ref.subset_sq_sums(e, feats, a.masks, route)


def _select_reference(a):
    """(stats float64 (5,) = [loss, grad_norm, margin, size, index], mask bool (B,))."""
    return _reference().select(a.logits, a.targets, a.features, a.trend, num_subsets=a.num_subsets, seed=a.seed,
                               mode_id=a.mode, thr=a.threshold, route="gram" if a.gram else "direct", bias=a.bias,
                               label_smoothing=a.label_smoothing, eps=a.eps, metric="sum" if a.sum_metric else "mean")


def _scores_reference(a):
    """fp32 (K, B): rows ``reference.SCORES`` (+ ``CLASS_SCORES`` with ``by_class``)."""
    return _reference().sample_scores(a.logits, a.targets, a.features, bias=a.bias, label_smoothing=a.label_smoothing,
                                      by_class=a.by_class)


# ---- Triton: CUDA tensors (and CPU tensors under TRITON_INTERPRET=1, through the public API's backend="triton") ---
def dot_dtype(logits, features) -> torch.dtype:
    """The tensor-core operand type: the inputs' 16-bit type if either has one, else fp32."""
    low = [t.dtype for t in (logits, features) if t.dtype in (torch.bfloat16, torch.float16)]
    return low[0] if low else torch.float32


def _residuals_triton(a, augmented: bool):
    """(E fp32 (B, C), ||g_i|| fp32 (B,)[, A = [h, 1] fp32 (B, D + bias)]), one launch."""
    from dynbatch_kernels.residuals import residuals_and_norms

    return residuals_and_norms(a.logits, a.targets, a.features, bias=a.bias, label_smoothing=a.label_smoothing,
                               augmented=augmented)


def _norms_triton(a):
    return _residuals_triton(a, augmented=False)[1]


def _sq_sums_triton(a):
    dot = dot_dtype(a.logits, a.features)
    if a.gram:  # two launches: K from the logits and features, then the subsets
        from dynbatch_kernels.subset_norms_gram import subset_sq_sums_gram

        return subset_sq_sums_gram(a.logits, a.targets, a.features, a.num_subsets, bias=a.bias,
                                   label_smoothing=a.label_smoothing, masks=a.masks, seed=a.seed, mode=a.mode,
                                   thr=a.threshold, dot_dtype=dot)
    from dynbatch_kernels.subset_norms_direct import subset_sq_sums_direct

    e, _, feats = _residuals_triton(a, augmented=True)
    return subset_sq_sums_direct(e, feats, a.num_subsets, masks=a.masks, seed=a.seed, mode=a.mode, thr=a.threshold,
                                 dot_dtype=dot)


def _select_triton(a):
    """Two launches on either route; the second picks the subset in its epilogue (``select_epilogue``)."""
    kw = dict(num_subsets=a.num_subsets, seed=a.seed, mode_id=a.mode, thr=a.threshold, eps=a.eps,
              metric="sum" if a.sum_metric else "mean", dot_dtype=dot_dtype(a.logits, a.features))
    if a.gram:
        from dynbatch_kernels.subset_norms_gram import select_gram

        return select_gram(a.logits, a.targets, a.features, a.trend, bias=a.bias, label_smoothing=a.label_smoothing,
                           **kw)
    from dynbatch_kernels.subset_norms_direct import select_direct

    e, _, feats = _residuals_triton(a, augmented=True)
    return select_direct(e, feats, a.trend, **kw)


def _scores_triton(a):
    from dynbatch_kernels.sample_scores import sample_scores

    return sample_scores(a.logits, a.targets, a.features, bias=a.bias, label_smoothing=a.label_smoothing,
                         by_class=a.by_class)


def _by_name(name: str, fn):
    """``fn`` (one argument: the op's arguments by name) as an implementation taking them positionally."""
    args_type = ARGS[name]
    return lambda *args: fn(args_type(*args))


IMPLEMENTATIONS = {  # op -> (reference, Triton), each taking the op's arguments positionally
    name: (_by_name(name, ref), _by_name(name, triton)) for name, ref, triton in (
        ("per_sample_grad_norms", _norms_reference, _norms_triton),
        ("subset_sq_sums", _sq_sums_reference, _sq_sums_triton),
        ("select_subset", _select_reference, _select_triton),
        ("sample_scores", _scores_reference, _scores_triton))}
for _name, (_ref, _triton) in IMPLEMENTATIONS.items():
    _LIB.impl(_name, _ref, "CompositeExplicitAutograd")
    _LIB.impl(_name, _triton, "CUDA")


# ---- fakes: output shapes for torch.compile, after checking the inputs' shapes ---------------------------------
def _check_head(a):
    torch._check(a.logits.dim() == 2 and a.features.dim() == 2 and a.targets.dim() == 1,
                 lambda: "expected logits (B, C), targets (B,) and features (B, D)")
    torch._check(a.targets.shape[0] == a.logits.shape[0] and a.features.shape[0] == a.logits.shape[0],
                 lambda: "logits, targets and features must have the same batch size")


def _norms_fake(a):
    _check_head(a)
    return a.logits.new_empty(a.logits.shape[0], dtype=torch.float32)


def _sq_sums_fake(a):
    _check_head(a)
    if a.masks is not None:
        torch._check(a.masks.dim() == 2 and a.masks.shape[0] == a.num_subsets
                     and a.masks.shape[1] == a.logits.shape[0], lambda: "masks must be (num_subsets, B)")
    return tuple(a.logits.new_empty(a.num_subsets, dtype=torch.float32) for _ in range(2))


def _select_fake(a):
    _check_head(a)
    torch._check(a.trend.dim() == 1 and a.trend.shape[0] == 3, lambda: "trend must be (3,) = [loss, loss_ema, grad_ema]")
    return a.logits.new_empty(5, dtype=torch.float64), a.logits.new_empty(a.logits.shape[0], dtype=torch.bool)


def _scores_fake(a):
    _check_head(a)
    rows = len(_reference().SCORES) + len(_reference().CLASS_SCORES) * a.by_class
    return a.logits.new_empty(rows, a.logits.shape[0], dtype=torch.float32)


for _name, _fake in (("per_sample_grad_norms", _norms_fake), ("subset_sq_sums", _sq_sums_fake),
                     ("select_subset", _select_fake), ("sample_scores", _scores_fake)):
    torch.library.register_fake(f"dynbatch::{_name}", _by_name(_name, _fake))


OPS = {name: getattr(torch.ops.dynbatch, name).default for name in SCHEMAS}  # looked up once: a getattr is slow
