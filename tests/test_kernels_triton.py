"""Triton kernels against the torch reference. On CPU they run under TRITON_INTERPRET=1 (set in conftest), so
shapes stay small; on a GPU the same tests run compiled.

Tolerances: fp32 rtol 1e-4 (IEEE fp32 dots); bf16 inputs rtol 2e-2 and fp16 rtol 2e-3 against the fp32
reference (input rounding plus the low-precision dot operands; accumulation is fp32 throughout).
"""
from types import SimpleNamespace

import pytest
import torch

from dynbatch.ops import per_sample_grad_norms, random_subsets, subset_grad_norms
from selection_cases import assert_same_choice_up_to_ties, random_case, route_atol, select_subset, subset_scores

pytestmark = pytest.mark.interpreter
DEV = "cuda" if torch.cuda.is_available() else "cpu"
RTOL, ATOL = 1e-4, 1e-6


def _case(b, c, d, seed=0, dtype=torch.float32):
    return tuple(t.to(DEV) for t in random_case(b, c, d, seed=seed, dtype=dtype))


@pytest.mark.parametrize("b, c, d", [(1, 2, 1), (2, 7, 19), (37, 7, 19), (37, 2, 64), (100, 10, 1), (37, 100, 1),
                                     (256, 10, 19)])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_matches_reference(b, c, d, bias):
    logits, y, feats = _case(b, c, d, seed=b * 7 + d)
    for smoothing in (0.0, 0.1):
        kw = dict(bias=bias, label_smoothing=smoothing)
        torch.testing.assert_close(per_sample_grad_norms(logits, y, feats, backend="triton", **kw),
                                   per_sample_grad_norms(logits, y, feats, backend="torch", **kw), rtol=RTOL, atol=ATOL)
    masks = random_subsets(70, b, seed=b, device=DEV)  # 70: a partial second block of 64 subsets
    for route in ("direct", "gram"):
        want = subset_grad_norms(logits, y, feats, masks, backend="torch", route=route, bias=bias)
        got = subset_grad_norms(logits, y, feats, masks, backend="triton", route=route, bias=bias)
        torch.testing.assert_close(got, want, rtol=RTOL, atol=route_atol(route, logits, y, feats, bias))


@pytest.mark.parametrize("mode", ["bernoulli", "uniform_size"])
@pytest.mark.parametrize("route", ["direct", "gram"])
def test_triton_in_kernel_masks_equal_reference_masks(mode, route):
    logits, y, feats = _case(37, 7, 19, seed=5)
    for seed in (0, 12345, 2**32 + 99):
        kw = dict(num_subsets=130, seed=seed, loss=1.0, loss_ema=1.1, grad_ema=0.3, mode=mode, route=route)
        a = select_subset(logits, y, feats, backend="torch", **kw)
        b = select_subset(logits, y, feats, backend="triton", **kw)
        # Equal norms for all 130 subsets means equal masks: any differing sample would change a mean gradient.
        norms_a, margins_a = subset_scores(logits, y, feats, backend="torch", **kw)
        norms_b, _ = subset_scores(logits, y, feats, backend="triton", **kw)
        torch.testing.assert_close(norms_b, norms_a, rtol=RTOL, atol=route_atol(route, logits, y, feats))
        assert_same_choice_up_to_ties(margins_a, a, b)


@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("route", ["direct", "gram"])
def test_triton_low_precision(dtype, rtol, route):
    logits, y, feats = _case(37, 7, 19, seed=6)
    masks = random_subsets(64, 37, seed=1, device=DEV)
    want = subset_grad_norms(logits, y, feats, masks, backend="torch", route=route)
    got = subset_grad_norms(logits.to(dtype), y, feats.to(dtype), masks, backend="triton", route=route)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-4)


def test_triton_edge_cases():
    # Zero subsets, and a batch of identical samples whose every subset has the same mean gradient.
    logits, y, feats = _case(16, 5, 8, seed=0)
    empty = torch.zeros(0, 16, dtype=torch.bool, device=DEV)
    assert subset_grad_norms(logits, y, feats, empty, backend="triton").shape == (0,)
    li, yi, fi = (t.to(DEV) for t in random_case(16, 5, 8, identical=True))
    masks = random_subsets(64, 16, seed=2, device=DEV)
    got = subset_grad_norms(li, yi, fi, masks, backend="triton")
    one = per_sample_grad_norms(li[:1], yi[:1], fi[:1], backend="torch")[0]
    nonempty = masks.any(1)
    torch.testing.assert_close(got[nonempty], one.expand(int(nonempty.sum())), rtol=RTOL, atol=ATOL)
    assert (got[~nonempty] == 0).all()


@pytest.mark.parametrize("metric", ["mean", "sum"])
@pytest.mark.parametrize("first_step", [False, True])
@pytest.mark.parametrize("b, p", [(37, 0.5), (3, 0.02)])  # (3, 0.02): most subsets empty, some batches all empty
def test_triton_epilogue_equals_reference_choice(metric, first_step, b, p, monkeypatch):
    """The epilogue (scores and first minimum per program, then, in the last program to arrive, the winner and its
    mask) against the reference's torch operators on the same sums: same index, mask and stats; 2,100 subsets
    cross program edges; with 64-subset programs and a 16-wide finish the last program reads its 33 partials in three
    chunks (ties across chunks keep the earlier one)."""
    from dynbatch_kernels import reference, select_epilogue
    from dynbatch_kernels.select_epilogue import choose

    monkeypatch.setattr(select_epilogue, "FINISH_BLOCK", 16)

    g = torch.Generator().manual_seed(b)
    n = 2100
    q, c = torch.rand(n, generator=g) * 4, random_subsets(n, b, seed=9, p=p).sum(1).float()
    trend = torch.tensor([1.3, float("nan") if first_step else 1.2, 0.4], dtype=torch.float64)
    args = SimpleNamespace(trend=trend.to(DEV), seed=9, mode=1, threshold=reference.bernoulli_threshold(p), eps=1e-8,
                           sum_metric=metric == "sum")  # the fields of the select op's arguments that a choice reads
    want_stats, want_mask = reference.choose(q.to(DEV), c.to(DEV), args, b)
    for block in (1024, 64):
        got_stats, got_mask = choose(q.to(DEV), c.to(DEV), args, b, block=block)
        # The kernels' square root is correctly rounded; torch's CPU float32 sqrt is not (it differs in the last
        # bit for about 1 input in 5 here), and a margin divides by G_S - G_ema: hence rtol 1e-4, not bit equality.
        torch.testing.assert_close(got_stats, want_stats, rtol=1e-4, atol=1e-6, equal_nan=True)
        assert got_stats[4] == want_stats[4] and torch.equal(got_mask, want_mask)


@pytest.mark.parametrize("b, c, d", [(37, 7, 19), (1, 2, 1), (70, 100, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_augmented_features_and_gram_matrix_equal_reference(b, c, d, bias):
    """The residuals launch also writes A = [h, 1] (no torch.cat); K = (E E^T) o (A A^T) is one launch from the
    logits and features (its residuals formed in registers, over several class chunks at C = 100); both against the
    reference's torch operators (K: fp32 products in another summation order, rtol 1e-5)."""
    from dynbatch_kernels import reference
    from dynbatch_kernels.residuals import residuals_and_norms
    from dynbatch_kernels.subset_norms_gram import gram_matrix

    logits, y, feats = _case(b, c, d, seed=b + c)
    head = SimpleNamespace(logits=logits, targets=y, features=feats, bias=bias, label_smoothing=0.1)
    e, norms, a = residuals_and_norms(head, augmented=True)
    want_e = reference.residuals(logits, y, 0.1)
    want_a = reference.augmented_features(feats, bias)
    assert torch.equal(a, want_a)
    torch.testing.assert_close(e, want_e, rtol=RTOL, atol=ATOL)
    got = gram_matrix(head)
    torch.testing.assert_close(got, reference.gram_matrix(want_e, want_a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first_step", [False, True])
def test_triton_direct_selection_with_split_columns(first_step, monkeypatch):
    """On a GPU the direct kernel splits G's columns over several programs per row block (few subsets would not
    fill it); in the selection the row block's last program adds the partials and scores the block. The split is
    forced here by configuring for sm_80 under the interpreter; the choice must equal the reference's."""
    from dynbatch_kernels import subset_norms_direct

    monkeypatch.setattr(subset_norms_direct, "arch_of", lambda device: 80)
    logits, y, feats = _case(37, 7, 19, seed=11)
    kw = dict(num_subsets=130, seed=3, loss=1.0, loss_ema=None if first_step else 1.1,
              grad_ema=None if first_step else 0.3, route="direct")
    tiles, _, blocks, split, _ = subset_norms_direct._launch(torch.zeros(37, 7), torch.zeros(37, 20), 130,
                                                             torch.float32)
    assert blocks == 3 and split > 1
    want = select_subset(logits, y, feats, backend="torch", **kw)
    got = select_subset(logits, y, feats, backend="triton", **kw)
    if first_step:  # the first largest subset: exact
        assert int(got.index) == int(want.index) and torch.equal(got.mask, want.mask)
    else:
        assert_same_choice_up_to_ties(subset_scores(logits, y, feats, backend="torch", **kw)[1], want, got)
    torch.testing.assert_close(got.stats, want.stats, rtol=1e-4, atol=1e-6, equal_nan=True)
