"""The comparison points for selection: what a careful user writes without dynbatch.

Both materialise per-sample gradients of the last layer, G (B, C*D + C), weight first then bias, and reduce
them to subset-mean norms; they compute the same numbers as ``dynbatch.ops.subset_grad_norms`` (tested in
``tests/test_baselines.py``) and are what ``bench/`` measures the kernels against.

Inputs: features (B, D), targets (B,), the head's weight (C, D) and bias (C,) or None, masks (N, B) bool.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_per_sample_grads(features, targets, weight, bias=None, label_smoothing=0.0) -> torch.Tensor:
    """One autograd backward per sample: (B, C*D [+ C]) fp32."""
    w = weight.detach().float().requires_grad_(True)
    b = bias.detach().float().requires_grad_(True) if bias is not None else None
    params = [w] + ([b] if b is not None else [])
    rows = []
    for i in range(features.shape[0]):
        z = F.linear(features[i : i + 1].float(), w, b)
        loss = F.cross_entropy(z, targets[i : i + 1], label_smoothing=label_smoothing)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def functorch_per_sample_grads(features, targets, weight, bias=None, label_smoothing=0.0) -> torch.Tensor:
    """``torch.func.vmap(grad(...))`` over samples: (B, C*D [+ C]) fp32."""
    from torch.func import grad, vmap

    params = {"w": weight.detach().float()}
    if bias is not None:
        params["b"] = bias.detach().float()

    def loss(p, h, y):
        z = F.linear(h[None], p["w"], p.get("b"))
        return F.cross_entropy(z, y[None], label_smoothing=label_smoothing)

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, features.float(), targets)
    parts = [g["w"].reshape(features.shape[0], -1)] + ([g["b"]] if bias is not None else [])
    return torch.cat(parts, 1)


def subset_mean_norms_loop(grads: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """A Python loop over subsets: ||mean of the subset's rows of grads||, 0 for empty subsets; (N,)."""
    out = torch.zeros(masks.shape[0], device=grads.device)
    for n in range(masks.shape[0]):
        m = masks[n]
        if m.any():
            out[n] = grads[m].mean(0).norm()
    return out


def subset_mean_norms_matmul(grads: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The vectorised reduction a careful user writes: row norms of (M G) / |S|; (N,)."""
    m = masks.float()
    counts = m.sum(1)
    return torch.where(counts > 0, (m @ grads).norm(dim=1) / counts.clamp_min(1), torch.zeros_like(counts))


def naive_subset_grad_norms(features, targets, weight, bias, masks, label_smoothing=0.0) -> torch.Tensor:
    """The naive baseline: per-sample backward loop, then a Python loop over subsets."""
    return subset_mean_norms_loop(naive_per_sample_grads(features, targets, weight, bias, label_smoothing), masks)


def functorch_subset_grad_norms(features, targets, weight, bias, masks, label_smoothing=0.0) -> torch.Tensor:
    """``torch.func`` per-sample gradients, then the vectorised subset reduction."""
    g = functorch_per_sample_grads(features, targets, weight, bias, label_smoothing)
    return subset_mean_norms_matmul(g, masks)


def scores_from_grads(grads: torch.Tensor, targets: torch.Tensor, num_classes: int,
                      by_class: bool = False) -> dict[str, torch.Tensor]:
    """The gradient scores of ``dynbatch.ops.sample_scores`` from materialised per-sample gradients (B, P): what a
    user of a per-sample-gradient library computes. ``grad_norm``, ``agreement`` r_i = <g_i, G>, ``consensus``
    cos(g_i, G - g_i) (and per class, with one G_k per label, gathered back per sample); fp32 (B,) each."""
    from dynbatch_kernels.reference import consensus

    norms = grads.norm(dim=1)
    total = grads.sum(0)
    r = grads @ total
    out = {"grad_norm": norms, "agreement": r, "consensus": consensus(r, norms, total.square().sum())}
    if by_class:
        y = targets.long()
        per_class = torch.zeros(num_classes, grads.shape[1], device=grads.device).index_add_(0, y, grads)
        rc = (grads * per_class[y]).sum(1)
        out.update(class_agreement=rc, class_consensus=consensus(rc, norms, per_class.square().sum(1)[y]))
    return out
