"""Per-sample scores (``dynbatch.ops.sample_scores``) on every backend against a float64 oracle from autograd.

Tolerances, the same for fp32, bf16 and fp16 inputs (the oracle is built from the very input values the op gets,
so input rounding is not error; every backend accumulates in fp32):
- loss, ||e_i||, ||g_i||: rtol 1e-5, atol 1e-6;
- r_i (a sum of B products of norms): |err| <= 1e-5 ||g_i|| sum_j ||g_j|| + 1e-6;
- c_i (a cosine): |err| <= 1e-4, except where ||G - g_i|| is within 1e-2 of ||G|| + ||g_i|| of the rounding floor
  (none of these cases). Under the interpreter Triton's dots are IEEE fp32; on a GPU they run in tf32 where torch
  allows it, which these bounds do not cover (the GPU check measures it).
"""
import pytest
import torch

from dynbatch.errors import UserError
from dynbatch.monitor.memory import CAN_RESET_PEAK, peak_growth
from dynbatch.ops import SCORES, Scores, per_sample_grad_norms, sample_scores
from selection_cases import TinyNet, autograd_per_sample_grads, autograd_scores, last_layer_inputs, \
    native_in_subprocess, random_case

# Shapes this small take the native kernel's fused pass over each class's pairs; its other class routes have their
# own tests below (a dominant class; classes too large for the fused pass).
SHAPES = [(37, 7, 19), (1, 7, 19), (2, 3, 1), (64, 10, 33), (64, 3, 33)]


def _assert_scores(got, want: dict, names=SCORES):
    gn = want["grad_norm"]
    for name in names:
        w, g = want[name], getattr(got, name).double()
        if name in ("loss", "residual_norm", "grad_norm"):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)
        elif name.endswith("agreement"):
            assert ((g - w).abs() <= 1e-5 * gn * gn.sum() + 1e-6).all(), (name, (g - w).abs().max())
        else:
            assert ((g - w).abs() <= 1e-4).all(), (name, (g - w).abs().max())


def _singleton_class(y: torch.Tensor, c: int) -> torch.Tensor:
    """``y`` with class c - 1 held by sample 0 alone (a class whose class consensus must be 0)."""
    y = y % (c - 1) if c > 1 else y.clone()
    y[0] = c - 1
    return y


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=pytest.mark.native)])
@pytest.mark.parametrize("b, c, d", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_scores_match_autograd(backend, b, c, d, bias):
    logits, y, feats = random_case(b, c, d, seed=b + d)
    y = _singleton_class(y, c)
    for smoothing in (0.0, 0.1):
        want = autograd_scores(logits, y, feats, bias, smoothing)
        got = sample_scores(logits, y, feats, bias=bias, label_smoothing=smoothing, by_class=True, backend=backend)
        _assert_scores(got, want, got.names)
        assert got.class_consensus[0] == 0  # alone in its class
        if b == 1:
            assert got.consensus[0] == 0 and got.class_consensus[0] == 0


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=pytest.mark.native)])
def test_a_dominant_class_is_scored_class_by_class(backend):
    """350 of 400 samples in one class: too many pairs for the fused pass, and padding every class to its size
    would cost more than 4 x B rows, so the native kernel scores class by class (the large class by its G, the
    small ones by their Gram)."""
    logits, y, feats = random_case(400, 7, 40, seed=5)
    y = torch.where(torch.arange(400) < 350, torch.zeros_like(y), y)
    want = autograd_scores(logits, y, feats)
    _assert_scores(sample_scores(logits, y, feats, by_class=True, backend=backend), want,
                   ("class_agreement", "class_consensus"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=pytest.mark.native)])
@pytest.mark.parametrize("bias", [True, False])
def test_large_classes_are_scored_by_their_g_batched(backend, bias):
    """Three classes of ~100 (B = 300, D = 200): their pairs cost more than their G, which the native kernel forms
    for all classes at once, padded to the largest."""
    logits, y, feats = random_case(300, 3, 200, seed=8)
    want = autograd_scores(logits, y, feats, bias)
    _assert_scores(sample_scores(logits, y, feats, bias=bias, by_class=True, backend=backend), want,
                   ("class_agreement", "class_consensus"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=pytest.mark.native)])
def test_saturated_logits(backend):
    """Logit gaps far past exp's fp32 range (the native kernel's exp returns 0 below z - max = -87, where libm's
    would be subnormal), -inf logits off the target, and C = 37 (lanes plus a tail): same tolerances."""
    logits, y, feats = random_case(37, 37, 19, seed=11)
    logits = logits * 300
    logits[torch.arange(0, 37, 3), (y[::3] + 1) % 37] = -float("inf")
    for smoothing in (0.0, 0.1):
        want = autograd_scores(logits, y, feats, True, smoothing)
        got = sample_scores(logits, y, feats, label_smoothing=smoothing, by_class=True, backend=backend)
        _assert_scores(got, want, ("loss", "residual_norm", "grad_norm", "agreement", "class_agreement"))
        # A saturated row's residual is 0 at fp32 (cosine 0 by definition) but ~e^-300 in the oracle, whose cosine
        # is defined: the cosines are compared where the oracle's gradient is not below fp32's resolution.
        live = want["grad_norm"] > 1e-6
        assert live.sum() > 0
        _assert_scores(Scores(got.table[:, live]), {k: v[live] for k, v in want.items()},
                       ("consensus", "class_consensus"))


@pytest.mark.native
def test_native_portable_class_pairs(tmp_path):
    """Machines without AVX2/FMA take the class pairs one dot at a time (forced here with DYNBATCH_NATIVE_SCALAR,
    read once per process, hence the subprocess): the same tolerances against the oracle, over C and D that leave
    the vector loops a tail (7, 19) and none (16, 32)."""
    cases = [(37, 7, 19, 1), (64, 16, 32, 2)]
    code = ("import sys, torch\n"
            "from dynbatch.ops import sample_scores\n"
            "from selection_cases import random_case\n"
            f"cases = {cases!r}\n"
            "out = [sample_scores(*random_case(b, c, d, seed=s), by_class=True, backend='native').table\n"
            "       for b, c, d, s in cases]\n"
            "torch.save(out, sys.argv[1])\n")
    for table, (b, c, d, seed) in zip(native_in_subprocess(code, tmp_path / "scalar.pt", scalar=True), cases):
        got = Scores(table)
        _assert_scores(got, autograd_scores(*random_case(b, c, d, seed=seed)), got.names)


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=pytest.mark.native)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(backend, dtype):
    logits, y, feats = random_case(37, 7, 19, seed=3, dtype=dtype)
    got = sample_scores(logits, y, feats, by_class=True, backend=backend)
    assert got.table.dtype == torch.float32
    _assert_scores(got, autograd_scores(logits, y, feats), got.names)


@pytest.mark.interpreter
@pytest.mark.parametrize("b, c, d", [(37, 7, 19), (1, 7, 19), (40, 20, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_scores_match_autograd(b, c, d, dtype):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    logits, y, feats = random_case(b, c, d, seed=b, dtype=dtype)
    y = _singleton_class(y, c)
    for bias in (True, False):
        want = autograd_scores(logits, y, feats, bias, 0.1)
        got = sample_scores(logits.to(dev), y.to(dev), feats.to(dev), bias=bias, label_smoothing=0.1, by_class=True,
                            backend="triton")
        if dev == "cpu":  # interpreter: IEEE fp32 dots
            _assert_scores(type(got)(got.table.cpu()), want, got.names)
        else:  # tf32 dots: 1e-3 of the scale
            torch.testing.assert_close(got.table.cpu()[:3].double(), torch.stack([want[n] for n in SCORES[:3]]),
                                       rtol=2e-3, atol=1e-4)


def test_scores_on_a_real_model_agree_with_its_per_sample_gradients():
    torch.manual_seed(0)
    model = TinyNet(19, 7).double()
    x, y = torch.randn(37, 3, 8, 8, dtype=torch.float64), torch.randint(0, 7, (37,))
    grads = autograd_per_sample_grads(model, model.head, x, y)
    logits, feats = last_layer_inputs(model, model.head, x)
    got = sample_scores(logits.detach().float(), y, feats.detach().float())
    torch.testing.assert_close(got.grad_norm.double(), grads.norm(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.agreement.double(), grads @ grads.sum(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.grad_norm, per_sample_grad_norms(logits.detach(), y, feats.detach()),
                               rtol=1e-5, atol=1e-6)


def test_identical_samples_fully_agree_and_class_rows_need_asking():
    logits, y, feats = random_case(9, 5, 4, identical=True)
    got = sample_scores(logits, y, feats, by_class=True)
    torch.testing.assert_close(got.consensus, torch.ones(9), rtol=0, atol=1e-5)
    torch.testing.assert_close(got.class_consensus, torch.ones(9), rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="by_class=True"):
        _ = sample_scores(logits, y, feats).class_consensus


@pytest.mark.skipif(not CAN_RESET_PEAK, reason="needs Linux's resettable peak RSS")
@pytest.mark.parametrize("backend", [pytest.param("native", marks=pytest.mark.native), "torch"])
def test_nothing_batch_by_classes_times_width_is_allocated(backend):
    """At B = 2048, C = 100, D = 511 the per-sample gradients would be 420 MB; the op's own buffers are O(B (C + D)
    + C D + B^2) (the reference's class Gram), ~40 MB."""
    b, c, d = 2048, 100, 511
    logits, y, feats = random_case(b, c, d)
    sample_scores(logits[:8], y[:8], feats[:8], backend=backend)  # load the extension first
    grown = peak_growth(lambda: sample_scores(logits, y, feats, by_class=True, backend=backend))
    assert grown < b * c * (d + 1) * 4 / 4, grown
