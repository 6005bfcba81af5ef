"""The native CPU extension against the torch reference: same numbers, same masks, same choice."""

import pytest
import torch

from dynbatch.ops import native, per_sample_grad_norms, random_subsets, subset_grad_norms
from selection_cases import native_in_subprocess, random_case, route_atol, select_subset, subset_scores

RTOL, ATOL = 1e-4, 1e-6


pytestmark = pytest.mark.native


def _rows_across_a_block_edge() -> int:
    """One whole block of subsets (the size the extension reports) and a partial second one."""
    return native.load().block_rows + 37


@pytest.mark.parametrize("b", [1, 2, 37, 100, 256])
@pytest.mark.parametrize("c", [2, 7, 10, 100])
@pytest.mark.parametrize("d", [1, 19, 64])
def test_native_matches_reference_over_odd_shapes(b, c, d):
    logits, y, feats = random_case(b, c, d, seed=b + c + d)
    for bias in (True, False):
        for smoothing in (0.0, 0.1):
            kw = dict(bias=bias, label_smoothing=smoothing)
            torch.testing.assert_close(per_sample_grad_norms(logits, y, feats, backend="native", **kw),
                                       per_sample_grad_norms(logits, y, feats, backend="torch", **kw), rtol=RTOL, atol=ATOL)
            masks = random_subsets(_rows_across_a_block_edge(), b, seed=b)
            for route in ("direct", "gram"):
                want = subset_grad_norms(logits, y, feats, masks, backend="torch", route=route, **kw)
                got = subset_grad_norms(logits, y, feats, masks, backend="native", route=route, **kw)
                atol = route_atol(route, logits, y, feats, bias, smoothing)
                torch.testing.assert_close(got, want, rtol=RTOL, atol=atol)


@pytest.mark.parametrize("mode", ["bernoulli", "uniform_size"])
@pytest.mark.parametrize("route", ["direct", "gram"])
def test_native_draws_the_same_subsets_and_picks_the_same(mode, route):
    logits, y, feats = random_case(100, 10, 19, seed=3)
    kw = dict(num_subsets=_rows_across_a_block_edge(), seed=2**33 + 5, loss=1.0, loss_ema=1.05, grad_ema=0.3,
              mode=mode, route=route)
    a = select_subset(logits, y, feats, backend="torch", **kw)
    b = select_subset(logits, y, feats, backend="native", **kw)
    norms_a, _ = subset_scores(logits, y, feats, backend="torch", **kw)
    norms_b, _ = subset_scores(logits, y, feats, backend="native", **kw)
    torch.testing.assert_close(norms_b, norms_a, rtol=RTOL, atol=route_atol(route, logits, y, feats))
    assert int(a.index) == int(b.index) and torch.equal(a.mask, b.mask)
    # Masks drawn inside the kernel equal random_subsets: scoring the explicit masks gives the same norms.
    explicit = subset_grad_norms(logits, y, feats, random_subsets(kw["num_subsets"], 100, seed=kw["seed"], mode=mode),
                                 backend="native", route=route)
    torch.testing.assert_close(explicit, norms_b, rtol=0, atol=0)  # same kernel, same masks: bit-identical


def test_native_low_precision_inputs():
    logits, y, feats = random_case(37, 7, 19, seed=4)
    masks = random_subsets(64, 37, seed=0)
    want = subset_grad_norms(logits, y, feats, masks, backend="torch")
    for dt, rtol in ((torch.bfloat16, 2e-2), (torch.float16, 2e-3)):  # from rounding the inputs alone
        got = subset_grad_norms(logits.to(dt), y, feats.to(dt), masks, backend="native")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-4)


def test_auto_backend_on_cpu_is_native():
    from dynbatch.ops import resolve_backend

    assert resolve_backend("auto", "cpu") == "op"  # the registered op, which has the native kernel on the CPU key
    for op in ("per_sample_grad_norms", "subset_sq_sums", "select_subset"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dynbatch::{op}", "CPU"), op


def test_portable_draw_matches_the_avx2_draw(tmp_path):
    """Machines without AVX2 draw subsets (and pack given masks) with scalar loops: the same subsets, so the same
    norms bit for bit (forced here with DYNBATCH_NATIVE_SCALAR, read once per process, hence the subprocess)."""
    code = ("import sys, torch\n"
            "from dynbatch.ops import subset_grad_norms\n"
            "from selection_cases import random_case, subset_scores\n"
            "out = []\n"
            "for b, mode in ((1, 'bernoulli'), (37, 'uniform_size'), (100, 'bernoulli'), (256, 'uniform_size')):\n"
            "    logits, y, feats = random_case(b, 7, 19, seed=b)\n"
            "    out += subset_scores(logits, y, feats, num_subsets=300, seed=b, loss=1.0, loss_ema=1.05,\n"
            "                         grad_ema=0.3, mode=mode, route='gram', backend='native')\n"
            "    masks = torch.rand(300, b, generator=torch.Generator().manual_seed(b)) < 0.5\n"
            "    out.append(subset_grad_norms(logits, y, feats, masks, route='gram', backend='native'))\n"
            "torch.save(out, sys.argv[1])\n")
    results = [native_in_subprocess(code, tmp_path / f"{int(scalar)}.pt", scalar=scalar) for scalar in (False, True)]
    assert len(results[0]) == 12
    for a, b in zip(*results):
        assert torch.equal(a, b)
