"""Shared inputs for the selection tests: a real last layer, its autograd per-sample gradients, and odd shapes."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from dynbatch import ops

SPEC_FIELDS = ("num_subsets", "mode", "p", "route", "grad_metric", "eps", "backend")


def _with_spec(op, logits, targets, features, **kw):
    spec = ops.SubsetSpec(**{k: kw.pop(k) for k in SPEC_FIELDS if k in kw})
    return op(logits, targets, features, spec, **kw)


def select_subset(logits, targets, features, **kw):
    """``dynbatch.ops.select_subset`` with the :class:`~dynbatch.ops.SubsetSpec`'s fields given as keywords beside
    the call's own, as the tests' parametrisations spell them."""
    return _with_spec(ops.select_subset, logits, targets, features, **kw)


def subset_scores(logits, targets, features, **kw):
    """``dynbatch.ops.subset_scores``, the spec's fields as keywords (see :func:`select_subset`)."""
    return _with_spec(ops.subset_scores, logits, targets, features, **kw)


class TinyNet(nn.Module):
    """A conv trunk with a D-wide feature layer and a linear head: odd D and C without a big model."""

    def __init__(self, d: int, c: int, bias: bool = True):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                   nn.Linear(16, d), nn.ReLU())
        self.head = nn.Linear(d, c, bias=bias)

    def forward(self, x):
        return self.head(self.trunk(x))


def last_layer_inputs(model: nn.Module, head: nn.Linear, x: torch.Tensor):
    """(logits, features) of ``model`` on ``x``, with the head's input captured by a hook."""
    seen = {}
    h = head.register_forward_hook(lambda m, i, o: seen.__setitem__("h", i[0]))
    logits = model(x)
    h.remove()
    return logits, seen["h"]


def autograd_per_sample_grads(model, head, x, y, label_smoothing=0.0) -> torch.Tensor:
    """(B, C*D + C) flattened per-sample gradients of the head (weight, then bias), one backward per sample."""
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    logits = model(x)
    rows = []
    for i in range(x.shape[0]):
        li = nn.functional.cross_entropy(logits[i : i + 1], y[i : i + 1], label_smoothing=label_smoothing)
        gs = torch.autograd.grad(li, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def random_case(b, c, d, seed=0, dtype=torch.float32, identical=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g) * 2
    feats = torch.randn(b, d, generator=g).relu()
    y = torch.randint(0, c, (b,), generator=g)
    if identical:
        logits, feats, y = logits[:1].expand(b, c).clone(), feats[:1].expand(b, d).clone(), y[:1].expand(b).clone()
    return logits.to(dtype), y, feats.to(dtype)


def route_atol(route: str, logits, y, feats, bias=True, smoothing=0.0) -> float:
    """Absolute tolerance for subset-mean norms in fp32, scaled by the largest per-sample gradient norm.

    The direct route sums gradients before squaring: error ~ eps * max||g_i||. The Gram route squares first,
    m^T K m, whose terms cancel when the mean gradient is near zero: ||mean||^2 has error ~ eps * max||g_i||^2, so
    the norm has error ~ sqrt(eps) * max||g_i|| there (3e-4 of the scale; 1e-3 leaves margin). Away from zero
    both routes meet rtol 1e-4.
    """
    from dynbatch_kernels import reference as ref

    scale = float(ref.per_sample_grad_norms(logits, y, feats, bias=bias, label_smoothing=smoothing).max())
    return (1e-3 if route == "gram" else 1e-6) * max(scale, 1e-6)


def assert_same_choice_up_to_ties(margins, ref, got, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Two backends' selections agree: the subset ``got`` chose has a margin (``margins``: the reference's fp32
    (N,), from ``subset_scores``) within tolerance of the minimum (compiled GPU kernels use approximate exp/sqrt,
    so near-ties may resolve differently), and where both chose the same index they regenerated the same mask."""
    assert float(margins[int(got.index)]) <= float(margins.min()) * (1 + rtol) + atol
    if int(ref.index) == int(got.index):
        assert torch.equal(ref.mask, got.mask)


def autograd_scores(logits, y, feats, bias=True, label_smoothing=0.0) -> dict[str, torch.Tensor]:
    """Float64 oracle of every per-sample score, from autograd: a zero perturbation W (C, D') of a linear head
    on [h, 1] added to the given logits (so the logits are exactly the given ones), one backward per sample for
    its gradient g_i = dL_i/dW and its residual e_i = dL_i/dz_i; then G, r, c from those (B, C*D') gradients."""
    z = logits.double().detach().requires_grad_(True)
    a = feats.double()
    if bias:
        a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
    w = torch.zeros(logits.shape[1], a.shape[1], dtype=torch.float64, requires_grad=True)
    losses, res, grads = [], [], []
    for i in range(z.shape[0]):
        li = nn.functional.cross_entropy(z[i:i + 1] + a[i:i + 1] @ w.T, y[i:i + 1], label_smoothing=label_smoothing)
        gz, gw = torch.autograd.grad(li, (z, w))
        losses.append(li.detach())
        res.append(gz[i])
        grads.append(gw.reshape(-1))
    g = torch.stack(grads)

    def against(total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # total: (B, P), each row's G
        r = (g * total).sum(1)
        rest = (total - g).norm(dim=1)
        den = g.norm(dim=1) * rest
        c = torch.where(den > 0, (r - g.square().sum(1)) / torch.where(den > 0, den, 1.0), torch.zeros_like(r))
        return r, c

    r, c = against(g.sum(0).expand_as(g))
    same = (y[:, None] == y[None, :]).double()
    rc, cc = against(same @ g)
    return {"loss": torch.stack(losses), "residual_norm": torch.stack(res).norm(dim=1), "grad_norm": g.norm(dim=1),
            "agreement": r, "consensus": c, "class_agreement": rc, "class_consensus": cc}


def native_in_subprocess(code: str, out: Path, *, scalar: bool):
    """What ``code`` (a script that ``torch.save``s its results to ``sys.argv[1]``) computed in a fresh process,
    with the native kernels' portable loops forced by DYNBATCH_NATIVE_SCALAR (read once per process) or not."""
    env = {k: v for k, v in os.environ.items() if k != "DYNBATCH_NATIVE_SCALAR"}
    if scalar:
        env["DYNBATCH_NATIVE_SCALAR"] = "1"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, cwd=os.path.dirname(__file__))
    return torch.load(out)
