import pytest
import torch

from dynbatch import baselines
from dynbatch.ops import random_subsets, subset_grad_norms
from selection_cases import TinyNet, autograd_per_sample_grads, last_layer_inputs


@pytest.mark.parametrize("bias", [True, False])
def test_baselines_compute_the_same_norms(bias):
    torch.manual_seed(0)
    model = TinyNet(19, 7, bias).eval()
    x, y = torch.randn(37, 3, 6, 6), torch.randint(0, 7, (37,))
    with torch.no_grad():
        logits, feats = last_layer_inputs(model, model.head, x)
    w, b = model.head.weight, model.head.bias
    want = autograd_per_sample_grads(model, model.head, x, y, 0.1)
    for fn in (baselines.naive_per_sample_grads, baselines.functorch_per_sample_grads):
        torch.testing.assert_close(fn(feats, y, w, b, 0.1), want, rtol=1e-4, atol=1e-6)
    masks = random_subsets(40, 37, seed=2)
    masks[3] = False  # an empty subset: norm 0 everywhere
    ref = subset_grad_norms(logits, y, feats, masks, bias=bias, backend="torch", route="direct")
    torch.testing.assert_close(baselines.naive_subset_grad_norms(feats, y, w, b, masks), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(baselines.functorch_subset_grad_norms(feats, y, w, b, masks), ref, rtol=1e-4, atol=1e-6)
    assert ref[3] == 0
