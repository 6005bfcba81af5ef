"""Suite 1 (selection) and 2 (roofline): norms of N subset-mean last-layer gradients.

Every implementation gets the same features, head and (N, B) masks; its output is checked against the torch
reference before it is timed. ``select_*`` rows time the full ``select_subset``, masks drawn inside the kernels.
``mm_*`` rows time ``torch.mm`` on the product each route is equivalent to, for the roofline ratio.
"""
import itertools

import pytest
import torch

from .common import DEVICE, FULL, NAIVE_MAX_N, SelectionCase, peer_missing, peer_subset_norms, run
from dynbatch import baselines
from dynbatch.ops import SubsetSpec, select_subset, subset_grad_norms, using_backend
from dynbatch_kernels.reference import choose_route

BS, CS, D = (100, 256, 1000), (10, 100), 64
NS = (1024, 4096, 16384) if FULL else (1024, 4096)
SHAPES = list(itertools.product(BS, CS, NS))
_cases: dict = {}


def case_for(b, c, n) -> SelectionCase:
    if (b, c, n) not in _cases:
        _cases.clear()  # one shape at a time keeps memory flat
        _cases[(b, c, n)] = SelectionCase(b, c, D, n)
    return _cases[(b, c, n)]


BACKEND_OF = {"torch_direct": "torch", "torch_gram": "torch", "native": "native", "triton": "triton"}


def impls(case: SelectionCase):
    ref = lambda: subset_grad_norms(case.logits, case.targets, case.features, case.masks, backend="torch")  # noqa: E731
    out = {  # timed under using_backend(BACKEND_OF[impl]): the dispatcher's registration, chosen once
        "torch_direct": lambda: subset_grad_norms(case.logits, case.targets, case.features, case.masks,
                                                  route="direct"),
        "torch_gram": lambda: subset_grad_norms(case.logits, case.targets, case.features, case.masks, route="gram"),
        "auto": lambda: subset_grad_norms(case.logits, case.targets, case.features, case.masks),
        "functorch": lambda: baselines.functorch_subset_grad_norms(case.features, case.targets, case.weight,
                                                                   case.bias, case.masks),
    }
    out["native" if DEVICE.type == "cpu" else "triton"] = out["auto"]
    out.update({peer: peer_subset_norms(case, peer) for peer in ("opacus", "backpack") if not peer_missing(peer)})
    return ref, out


NAMES = ["naive", "functorch", "opacus", "backpack", "torch_direct", "torch_gram", "native", "triton", "auto"]


@pytest.mark.parametrize("b, c, n", SHAPES)
@pytest.mark.parametrize("impl", NAMES)
def test_subset_norms(benchmark, impl, b, c, n):
    if impl in ("opacus", "backpack") and peer_missing(impl):
        benchmark.extra_info.update(suite="selection", impl=impl, missing=peer_missing(impl))
        pytest.skip(peer_missing(impl))  # reported as missing in the table, not dropped
    if (impl == "native" and DEVICE.type != "cpu") or (impl == "triton" and DEVICE.type != "cuda"):
        pytest.skip(f"{impl} does not run on {DEVICE.type}")
    case = case_for(b, c, n)
    route = choose_route(b, c, D + 1)
    extra = dict(suite="selection", impl=impl, B=b, C=c, D=D, N=n, route=route)
    if impl == "naive":
        n_eff = min(n, NAIVE_MAX_N)
        sub = case.masks[:n_eff]
        fn = lambda: baselines.naive_subset_grad_norms(case.features, case.targets, case.weight, case.bias, sub)  # noqa: E731
        want = subset_grad_norms(case.logits, case.targets, case.features, sub, backend="torch")
        torch.testing.assert_close(fn(), want, rtol=1e-3, atol=1e-4)
        run(benchmark, fn, budget_s=1.0, measured_N=n_eff, **extra)
        return
    ref, fns = impls(case)
    fn, want = fns[impl], ref()
    with using_backend(BACKEND_OF.get(impl, "auto"), DEVICE.type):
        torch.testing.assert_close(fn(), want, rtol=1e-3, atol=1e-4)
        used = route if impl in ("auto", "native", "triton") else impl.split("_")[-1]
        run(benchmark, fn, measured_N=n, macs=case.macs(used if used in ("direct", "gram") else route), **extra)


@pytest.mark.parametrize("b, c, n", SHAPES)
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_select_subset(benchmark, backend, b, c, n):
    case = case_for(b, c, n)
    fn = lambda: select_subset(case.logits, case.targets, case.features, SubsetSpec(n), seed=1, loss=1.0,  # noqa: E731
                               loss_ema=1.1, grad_ema=0.2).index
    with using_backend("torch", DEVICE.type):
        want = int(fn())
    with using_backend(backend, DEVICE.type):  # the dispatcher's registration, chosen outside the timed call
        assert int(fn()) == want
        run(benchmark, fn, suite="selection", impl=f"select_{backend}", B=b, C=c, D=D, N=n,
            route=choose_route(b, c, D + 1), measured_N=n)


@pytest.mark.parametrize("b, c, n", SHAPES)
def test_mm_roofline(benchmark, b, c, n):
    """torch.mm on the product the chosen route is equivalent to: (N x B) @ (B x B) or (N x B) @ (B x C(D+1))."""
    route = choose_route(b, c, D + 1)
    cols = b if route == "gram" else c * (D + 1)
    m = torch.randn(n, b, device=DEVICE)
    k = torch.randn(b, cols, device=DEVICE)
    run(benchmark, lambda: torch.mm(m, k), suite="roofline", impl="mm", B=b, C=c, D=D, N=n, route=route,
        macs=n * b * cols)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_select_fixed_cost(benchmark, backend):
    """``select_subset`` where the work is nil (B = 8, N = 16): what a call costs whatever the batch."""
    case = SelectionCase(8, 10, D, 16)
    loss = torch.tensor(1.0, device=DEVICE)
    spec = SubsetSpec(16)
    fn = lambda: select_subset(case.logits, case.targets, case.features, spec, seed=1, loss=loss,  # noqa: E731
                               loss_ema=1.1, grad_ema=0.2).stats
    with using_backend(backend, DEVICE.type):
        run(benchmark, fn, budget_s=1.0, suite="selection_fixed", impl=f"select_{backend}", B=8, N=16)
