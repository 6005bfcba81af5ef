"""Suite ``scores``: each sample's last-layer scores against its batch (``dynbatch.ops.sample_scores``), fused,
against computing them from per-sample gradients (the naive loop, ``torch.func`` vmap, Opacus and BackPACK where
installed), and against one ``torch.mm`` of the head's shape ((B x (D+1)) @ ((D+1) x C)), the physical floor: the
fused op is two such products and one elementwise pass.

Every implementation's scores are checked against the torch reference before it is timed. ``memory_bytes``: the
peak resident-set growth of one call (Linux), measured apart from the timing: per-sample gradients hold
B x C(D+1) floats, the fused op O(B(C + D) + CD).
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from .common import DEVICE, FULL, peer_missing, peer_per_sample_grads, run
from dynbatch import baselines
from dynbatch.monitor.memory import peak_growth
from dynbatch.ops import sample_scores, using_backend

BS, CS, DS = (128, 256, 1024), (10, 100), (64, 512)
SHAPES = list(itertools.product(BS, CS, DS)) if FULL else [(256, 10, 64), (1024, 100, 512), (128, 100, 512)]
NAIVE_MAX_B = 256  # one backward per sample: beyond this it is not measured
_case: dict = {}


class ScoreCase:
    """Features (B, D), a head (C, D) + (C,), targets (B,) and the logits, seeded."""

    def __init__(self, b: int, c: int, d: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.b, self.c, self.d = b, c, d
        self.features = torch.randn(b, d, generator=g).relu().to(DEVICE)
        self.weight = (torch.randn(c, d, generator=g) / d**0.5).to(DEVICE)
        self.bias = (0.1 * torch.randn(c, generator=g)).to(DEVICE)
        self.targets = torch.randint(0, c, (b,), generator=g).to(DEVICE)
        self.logits = F.linear(self.features, self.weight, self.bias)


def case_for(b, c, d) -> ScoreCase:
    if (b, c, d) not in _case:
        _case.clear()
        _case[(b, c, d)] = ScoreCase(b, c, d)
    return _case[(b, c, d)]


def implementation(case: ScoreCase, impl: str, by_class: bool):
    """A function computing the scores with ``impl``: a dict or a ``Scores``."""
    if impl in ("torch", "auto"):  # timed under using_backend(impl)
        return lambda: sample_scores(case.logits, case.targets, case.features, by_class=by_class)
    if impl == "naive":
        grads = lambda: baselines.naive_per_sample_grads(case.features, case.targets, case.weight, case.bias)  # noqa: E731
    elif impl == "functorch":
        grads = lambda: baselines.functorch_per_sample_grads(case.features, case.targets, case.weight, case.bias)  # noqa: E731
    else:
        grads = peer_per_sample_grads(case, impl)
    return lambda: baselines.scores_from_grads(grads(), case.targets, case.c, by_class)


IMPLS = ["naive", "functorch", "opacus", "backpack", "torch", "auto"]


@pytest.mark.parametrize("b, c, d", SHAPES)
@pytest.mark.parametrize("by_class", [False, True], ids=["batch", "class"])
@pytest.mark.parametrize("impl", IMPLS)
def test_scores(benchmark, impl, by_class, b, c, d):
    extra = dict(suite="scores", impl=impl, by_class=by_class, B=b, C=c, D=d)
    if impl in ("opacus", "backpack") and peer_missing(impl):
        benchmark.extra_info.update(extra, missing=peer_missing(impl))
        pytest.skip(peer_missing(impl))  # reported as missing in the table, not dropped
    if impl == "naive" and b > NAIVE_MAX_B:
        pytest.skip(f"the naive loop is not measured beyond B = {NAIVE_MAX_B}")
    case = case_for(b, c, d)
    fn = implementation(case, impl, by_class)
    want = sample_scores(case.logits, case.targets, case.features, by_class=by_class, backend="torch")
    with using_backend(impl if impl in ("torch", "auto") else "auto", DEVICE.type):
        _check_and_run(benchmark, fn, want, by_class, extra)


def _check_and_run(benchmark, fn, want, by_class, extra):
    got = fn()
    for name in ("grad_norm", "agreement", "consensus") + (("class_consensus",) if by_class else ()):
        value = got[name] if isinstance(got, dict) else getattr(got, name)
        scale = getattr(want, name).abs().max().clamp_min(1e-6)
        torch.testing.assert_close(value, getattr(want, name), rtol=1e-3, atol=1e-4 * float(scale))
    run(benchmark, fn, budget_s=1.0, memory_bytes=peak_growth(fn, DEVICE), **extra)


@pytest.mark.parametrize("b, c, d", SHAPES)
def test_head_mm(benchmark, b, c, d):
    """The floor: one product of the head's shape, (B x (D+1)) @ ((D+1) x C)."""
    a = torch.randn(b, d + 1, device=DEVICE)
    w = torch.randn(d + 1, c, device=DEVICE)
    run(benchmark, lambda: torch.mm(a, w), budget_s=1.0, suite="scores", impl="mm", by_class=False, B=b, C=c, D=d)
