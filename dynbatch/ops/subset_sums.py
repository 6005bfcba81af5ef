"""``dynbatch::subset_sq_sums``: for N subsets of the batch, (||sum_S g_i||^2, |S|), fp32 (N,) each, with the
subsets given as masks (``mode`` 0, masks (N, B)) or drawn inside the kernels from ``seed`` (``mode`` 1: bernoulli
with the integer ``threshold``, 2: uniform size); ``gram`` picks the Gram route over the direct one. Also the
subsets' draw itself (:func:`random_subsets`, :func:`seeded_uniform`), the same on every backend."""
from __future__ import annotations

import torch

from dynbatch.errors import UserError
from dynbatch.ops import library
from dynbatch_kernels import reference as _reference

SUBSETS = "int num_subsets, int seed, int mode, int threshold, bool gram"
SCHEMA = f"({library.HEAD}, Tensor? masks, {SUBSETS}) -> (Tensor, Tensor)"
Args = library.args_type("subset_sq_sums", SCHEMA)


def torch_impl(a):
    e = _reference.residuals(a.logits, a.targets, a.label_smoothing)
    feats = _reference.augmented_features(a.features, a.bias)
    if a.mode != 0:
        return _reference.seeded_subset_sq_sums(e, feats, a)
    return _reference.subset_sq_sums(e, feats, a.masks, "gram" if a.gram else "direct")


def triton_impl(a):
    dot = library.dot_dtype(a.logits, a.features)
    if a.gram:  # two launches: K from the logits and features, then the subsets
        from dynbatch_kernels.subset_norms_gram import subset_sq_sums_gram

        return subset_sq_sums_gram(a, dot)
    from dynbatch_kernels.residuals import residuals_and_norms
    from dynbatch_kernels.subset_norms_direct import subset_sq_sums_direct

    e, _, feats = residuals_and_norms(a, augmented=True)
    return subset_sq_sums_direct(e, feats, a, dot)


def fake(a):
    library.check_head(a)
    if a.masks is not None:
        torch._check(a.masks.dim() == 2 and a.masks.shape[0] == a.num_subsets
                     and a.masks.shape[1] == a.logits.shape[0], lambda: "masks must be (num_subsets, B)")
    return tuple(a.logits.new_empty(a.num_subsets, dtype=torch.float32) for _ in range(2))


OP = library.define("subset_sq_sums", SCHEMA, Args, reference=torch_impl, triton=triton_impl, fake=fake)


def check_metric(grad_metric: str) -> str:
    if grad_metric not in _reference.GRAD_METRICS:
        raise UserError(f"unknown grad_metric {grad_metric!r}; choose mean (the paper's) or sum")
    return grad_metric


def subset_grad_norms(logits, targets, features, masks, *, bias=True, label_smoothing=0.0, backend="auto",
                      route="auto", grad_metric="mean") -> torch.Tensor:
    """Norm of the mean (or, with ``grad_metric="sum"``, summed) last-layer gradient of each subset (row of
    ``masks`` (N, B)): fp32 (N,); 0 for empty rows."""
    head = library.head(logits, targets, features, bias, label_smoothing)
    check_metric(grad_metric)
    if masks.dim() != 2 or masks.shape[1] != logits.shape[0]:
        raise UserError(f"masks must be (N, {logits.shape[0]}), got {tuple(masks.shape)}")
    m = masks.to(device=logits.device)
    m = (m if m.dtype in (torch.bool, torch.uint8) else m != 0).contiguous()
    gram = library.uses_gram(route, logits, features, bias)
    q, c = library.call(OP, Args(*head, m, m.shape[0], 0, 0, 0, gram), backend)  # mode 0: the masks given
    return _reference.subset_norms(q, c, grad_metric)


def random_subsets(num_subsets, batch_size, *, seed, mode="bernoulli", p=0.5, device=None) -> torch.Tensor:
    """The masks (N, B) bool that every backend draws for ``seed``: row n is subset n."""
    if mode not in _reference.MODES:
        raise UserError(f"unknown subset mode {mode!r}; choose one of {', '.join(_reference.MODES)}")
    if not 0.0 < p <= 1.0:
        raise UserError(f"subset probability p must be in (0, 1] (got {p})")
    rows = torch.arange(num_subsets, dtype=torch.int64, device=device)
    return _reference.subset_masks(seed, rows, batch_size, mode, p)


def seeded_uniform(seed: int, n: int, *, device=None) -> torch.Tensor:
    """n draws in [0, 1), fp32 (n,), a function of (seed, i) alone: the same on every device and after a resume
    (the subset generator's mixer, 24 bits a draw)."""
    key = _reference.row_keys(seed, torch.zeros(1, dtype=torch.int64, device=device))
    i = torch.arange(n, dtype=torch.int64, device=device)
    bits = _reference.mix32((key + i * _reference.GOLDEN) & _reference.M32) >> (32 - _reference.THRESHOLD_BITS)
    return bits.to(torch.float32) / float(1 << _reference.THRESHOLD_BITS)
