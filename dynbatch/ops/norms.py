"""``dynbatch::per_sample_grad_norms``: the norm of each sample's own last-layer gradient, ||g_i|| = ||e_i|| ||a_i||
with e_i = softmax(z_i) - t_i and a_i = [h_i, 1] (or h_i without a bias): fp32 (B,)."""
from __future__ import annotations

import torch

from dynbatch.ops import library
from dynbatch_kernels import reference as _reference

SCHEMA = f"({library.HEAD}) -> Tensor"
Args = library.args_type("per_sample_grad_norms", SCHEMA)


def torch_impl(a):
    e = _reference.residuals(a.logits, a.targets, a.label_smoothing)
    return e.norm(dim=1) * _reference.augmented_features(a.features, a.bias).norm(dim=1)


def triton_impl(a):
    from dynbatch_kernels.residuals import residuals_and_norms

    return residuals_and_norms(a, augmented=False)[1]


def fake(a):
    library.check_head(a)
    return a.logits.new_empty(a.logits.shape[0], dtype=torch.float32)


OP = library.define("per_sample_grad_norms", SCHEMA, Args, reference=torch_impl, triton=triton_impl,
                    fake=fake)


def per_sample_grad_norms(logits, targets, features, *, bias=True, label_smoothing=0.0, backend="auto"):
    """Norm of each sample's own last-layer gradient (weight, and bias when ``bias``): fp32 (B,)."""
    return library.call(OP, Args(*library.head(logits, targets, features, bias, label_smoothing)), backend)
