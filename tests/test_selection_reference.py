"""The torch reference against autograd, and the subset generator's contract."""
import pytest
import torch

from dynbatch.models import build_model, final_linear
from dynbatch.ops import margins, per_sample_grad_norms, random_subsets, subset_grad_norms
from selection_cases import (TinyNet, autograd_per_sample_grads, last_layer_inputs, random_case, route_atol,
                             select_subset, subset_scores)

RTOL, ATOL = 1e-4, 1e-6  # fp32


@pytest.mark.parametrize("b, c, d", [(1, 2, 1), (2, 7, 19), (37, 7, 19), (100, 10, 64), (37, 100, 1), (256, 2, 19)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_reference_matches_autograd(b, c, d, bias, smoothing):
    torch.manual_seed(b * 31 + c + d)
    model = TinyNet(d, c, bias).eval()
    x, y = torch.randn(b, 3, 6, 6), torch.randint(0, c, (b,))
    grads = autograd_per_sample_grads(model, model.head, x, y, smoothing)
    with torch.no_grad():
        logits, feats = last_layer_inputs(model, model.head, x)
    norms = per_sample_grad_norms(logits, y, feats, bias=bias, label_smoothing=smoothing, backend="torch")
    torch.testing.assert_close(norms, grads.norm(dim=1), rtol=RTOL, atol=ATOL)
    masks = random_subsets(20, b, seed=7)
    masks[0] = True  # the whole batch
    want = torch.stack([grads[m].mean(0).norm() if m.any() else torch.tensor(0.0) for m in masks])
    for route in ("direct", "gram"):
        got = subset_grad_norms(logits, y, feats, masks, bias=bias, label_smoothing=smoothing, backend="torch",
                                route=route)
        atol = route_atol(route, logits, y, feats, bias, smoothing)
        torch.testing.assert_close(got, want, rtol=RTOL, atol=atol)


def test_reference_on_a_real_model():
    torch.manual_seed(0)
    model = build_model("preresnet20", num_classes=10).eval()
    head = final_linear(model)
    x, y = torch.randn(12, 3, 16, 16), torch.randint(0, 10, (12,))
    grads = autograd_per_sample_grads(model, head, x, y)
    with torch.no_grad():
        logits, feats = last_layer_inputs(model, head, x)
    torch.testing.assert_close(per_sample_grad_norms(logits, y, feats, backend="torch"), grads.norm(dim=1),
                               rtol=RTOL, atol=ATOL)
    masks = random_subsets(16, 12, seed=1)
    want = torch.stack([grads[m].mean(0).norm() if m.any() else torch.tensor(0.0) for m in masks])
    torch.testing.assert_close(subset_grad_norms(logits, y, feats, masks, backend="torch"), want, rtol=RTOL, atol=ATOL)


def test_subset_generator_contract():
    a = random_subsets(4096, 64, seed=3)
    assert a.dtype == torch.bool and a.shape == (4096, 64)
    assert torch.equal(a, random_subsets(4096, 64, seed=3))
    assert not torch.equal(a, random_subsets(4096, 64, seed=4))
    assert not torch.equal(random_subsets(8, 64, seed=2**40), random_subsets(8, 64, seed=2**41))  # high bits count
    # p = 1/2: each sample in half the time; distinct rows (uniform over 2^64 subsets, collisions ~never)
    assert abs(a.float().mean().item() - 0.5) < 0.01
    assert len({tuple(r.tolist()) for r in a}) == 4096
    # Rows are a function of (seed, n) only: a prefix of a larger draw is the smaller draw.
    assert torch.equal(random_subsets(10, 64, seed=3), a[:10])
    assert abs(random_subsets(2000, 50, seed=0, p=0.2).float().mean().item() - 0.2) < 0.01
    # uniform_size: subset sizes spread over 0..B roughly uniformly
    sizes = random_subsets(8000, 20, seed=5, mode="uniform_size").sum(1)
    hist = torch.bincount(sizes, minlength=21).float() / 8000
    assert hist.min() > 0.02 and hist.max() < 0.08  # 1/21 = 0.048 each


def test_select_subset_is_argmin_of_recomputed_margins():
    logits, y, feats = random_case(37, 7, 19, seed=1)
    s = select_subset(logits, y, feats, num_subsets=500, seed=11, loss=1.2, loss_ema=1.3, grad_ema=0.4,
                      backend="torch")
    masks = random_subsets(500, 37, seed=11)
    norms = subset_grad_norms(logits, y, feats, masks, backend="torch")
    m = margins(norms, masks.sum(1).float(), 1.2, 1.3, 0.4)
    best = int(torch.argmin(m))
    assert int(s.index) == best and torch.equal(s.mask, masks[best])
    torch.testing.assert_close(s.margin, m[best])
    torch.testing.assert_close(s.grad_norm, norms[best])
    manual = abs((1.2 - 1.3) / (float(norms[best]) - 0.4) - 1)
    assert float(s.margin) == pytest.approx(manual, rel=1e-5)
    assert int(s.size) == int(masks[best].sum()) > 0


def test_first_step_ties_and_degenerate_batches():
    logits, y, feats = random_case(37, 7, 19, seed=2)
    first = select_subset(logits, y, feats, num_subsets=300, seed=5, loss=1.0, loss_ema=None, grad_ema=None,
                          backend="torch")
    masks = random_subsets(300, 37, seed=5)
    assert int(first.index) == int(torch.argmax(masks.sum(1)))  # the largest subset, first on ties
    # All-identical samples: every non-empty subset has the same mean gradient, so G_S - G_ema can be exactly 0.
    li, yi, fi = random_case(16, 5, 8, identical=True)
    g0 = float(per_sample_grad_norms(li[:1], yi[:1], fi[:1], backend="torch")[0])
    s = select_subset(li, yi, fi, num_subsets=64, seed=1, loss=1.0, loss_ema=0.9, grad_ema=g0, backend="torch")
    assert torch.isfinite(s.margin) and int(s.size) > 0
    _, m = subset_scores(li, yi, fi, num_subsets=64, seed=1, loss=1.0, loss_ema=0.9, grad_ema=g0, backend="torch")
    assert not m.isnan().any() and (m.isinf() == (random_subsets(64, 16, seed=1).sum(1) == 0)).all()
    nonempty = torch.nonzero(random_subsets(64, 16, seed=1).sum(1) > 0)[0, 0]
    assert int(s.index) == int(nonempty)  # a tie everywhere: the lowest non-empty index
    # Batch size 1: the only non-empty subset is the sample itself.
    l1, y1, f1 = random_case(1, 3, 4)
    s1 = select_subset(l1, y1, f1, num_subsets=16, seed=0, loss=1.0, loss_ema=1.1, grad_ema=0.1, backend="torch")
    assert s1.mask.tolist() == [True]


def test_margins_never_nan_and_empty_never_chosen():
    norms = torch.tensor([0.0, 0.5, 0.5, 1.0])
    counts = torch.tensor([0.0, 3.0, 2.0, 1.0])
    m = margins(norms, counts, loss=1.0, loss_ema=1.0, grad_ema=0.5)
    assert m[0] == float("inf") and torch.isfinite(m[1:]).all()
    assert int(torch.argmin(m)) != 0
