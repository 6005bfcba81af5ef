"""The language-model head op and the fused linear cross-entropy against float64 oracles from autograd on
materialised logits: odd shapes (N = 37, D = 19, V = 101), ragged sequences, a single-token sequence, a sequence
whose tokens are all ignored, an empty one, saturated logits, label smoothing, token weights, bias on and off, and
chunks smaller than a sequence's share (the chunking is exact); on every backend: the torch reference, the native
CPU kernel, and the Triton kernels (under ``TRITON_INTERPRET=1`` on the CPU).

Tolerances: fp32 accumulation against float64, rtol 1e-4 with atol 1e-5 of the quantity's scale; bf16 inputs
against the fp32 computation on the same rounded inputs, rtol 1e-3 (inputs are rounded before either runs, so what
remains is the order of fp32 sums)."""
import re

import pytest
import torch
import torch.nn.functional as F

from dynbatch.errors import UserError
from dynbatch.ops import Sequences, linear_cross_entropy, lm_head_scores
from dynbatch_kernels import lm_head as impl

BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.native),
            pytest.param("triton", marks=pytest.mark.interpreter)]
N, D, V = 37, 19, 101
OFFSETS = [0, 1, 9, 15, 15, 30, 37]  # lengths 1, 8, 6, 0, 15, 7
IGNORED = list(range(9, 15))  # every token of the third sequence


def case(seed=0, bias=True, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g) * scale).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.3).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[IGNORED] = -100
    tw = torch.rand(N, generator=g) + 0.5
    return h, w, b, y, tw


def oracle(h, w, b, y, tw, eps, offsets=OFFSETS):
    """float64: per-token (loss, lse, ||e||, ||g||), per-sequence (||G_b||, <G_b, G>) from autograd's gradients of
    each sequence's weighted loss wrt the head."""
    h64, w64 = h.double(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    z = h64 @ w64.T + (b64 if b64 is not None else 0)
    valid = y != -100
    loss = F.cross_entropy(z, y, reduction="none", ignore_index=-100, label_smoothing=eps)
    q = F.one_hot(y.clamp_min(0), V).double() * (1 - eps) + eps / V
    e = (z.softmax(1) - q) * valid[:, None]
    a2 = h64.square().sum(1) + (1.0 if b is not None else 0.0)
    tokens = torch.stack([loss, torch.logsumexp(z, 1), e.norm(dim=1), e.norm(dim=1) * a2.sqrt()])
    params = [p for p in (w64, b64) if p is not None]
    per_seq = []
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        part = (loss[lo:hi] * tw[lo:hi].double() * valid[lo:hi]).sum()
        grads = torch.autograd.grad(part, params, retain_graph=True, allow_unused=True) if hi > lo else None
        per_seq.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                  for g, p in zip(grads, params)]) if grads else torch.zeros(sum(p.numel() for p in params), dtype=torch.float64))
    total = torch.stack(per_seq).sum(0)
    seqs = torch.stack([torch.stack([g.norm() for g in per_seq]), torch.stack([g @ total for g in per_seq])])
    return tokens.detach(), seqs.detach()


def close(got, want, rtol=1e-4):
    want = want.double().cpu()
    torch.testing.assert_close(got.double().cpu(), want, rtol=rtol,
                               atol=1e-5 * float(want.abs().max().clamp_min(1e-6)))


def on(backend, *tensors):
    """The tensors on the backend's device: Triton's is CUDA where there is one (else the interpreter's CPU)."""
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    return [t.to(dev) if t is not None else None for t in tensors]


# (backend, small chunks): the native kernel's chunk size is fixed in C++ (test_native_chunks_as_the_reference)
CHUNKINGS = [("torch", False), ("torch", True), pytest.param("native", False, marks=pytest.mark.native),
             pytest.param("triton", False, marks=pytest.mark.interpreter),
             pytest.param("triton", True, marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("backend, small_chunks", CHUNKINGS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("route", ["gram", "direct"])
@pytest.mark.parametrize("scale", [1.0, 40.0], ids=["plain", "saturated"])
def test_scores_equal_the_float64_oracle(backend, small_chunks, bias, eps, route, scale, monkeypatch):
    if small_chunks:
        monkeypatch.setattr(impl, "CHUNK_ELEMENTS", 4 * V)  # four rows a chunk: one sequence a chunk here
    h, w, b, y, tw = case(bias=bias, scale=scale)
    want_tokens, want_seqs = oracle(h, w, b, y, tw, eps)
    h, w, b, y, tw = on(backend, h, w, b, y, tw)
    s = lm_head_scores(h, w, y, b, token_weights=tw, label_smoothing=eps, backend=backend,
                       sequences=Sequences(torch.tensor(OFFSETS), agreement=True, route=route))
    close(s.tokens, want_tokens)
    # the per-token scores alone: on Triton the fused pass that forms no logits
    close(lm_head_scores(h, w, y, b, label_smoothing=eps, backend=backend).tokens, want_tokens)
    close(s.sequence_grad_norm, want_seqs[0])
    close(s.sequence_agreement, want_seqs[1])
    assert (s.loss[IGNORED] == 0).all() and (s.grad_norm[IGNORED] == 0).all()
    assert s.sequence_grad_norm[2] == 0 and s.sequence_grad_norm[3] == 0  # all ignored; empty
    assert s.tokens.device == h.device


def test_uniform_layout_and_per_token_only():
    h, w, b, y, tw = case(seed=3)
    y2, h2 = y[:36], h[:36].reshape(4, 9, D)  # (B, T, D) with T = 9
    offsets = list(range(0, 37, 9))
    want_tokens, want_seqs = oracle(h[:36], w, b, y2, torch.ones(36), 0.0, offsets)
    s = lm_head_scores(h2, w, y2.reshape(4, 9), b, sequences=Sequences(9))
    close(s.tokens, want_tokens)
    close(s.sequence_grad_norm, want_seqs[0])
    assert torch.isnan(s.sequence_agreement).all()  # not asked for
    plain = lm_head_scores(h2, w, y2.reshape(4, 9), b)
    assert plain.sequences is None
    torch.testing.assert_close(plain.tokens, s.tokens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_loss_and_gradients_equal_cross_entropy_on_materialised_logits(backend, reduction, weighted, bias):
    """The cases Liger-Kernel got wrong (#488, #872, #968): reduction none with ignore_index and a weight mask."""
    h, w, b, y, tw = case(seed=5, bias=bias)
    tw = tw if weighted else None
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(1)).double()

    def run(fn, h, w, b):
        loss = fn(h, w, b)
        (loss * (upstream.to(loss) if reduction == "none" else 1.7)).sum().backward()
        return loss.detach(), [t.grad for t in (h, w, b) if t is not None]

    def materialised(h, w, b):
        per = F.cross_entropy(h @ w.T + (b if b is not None else 0), y, reduction="none", label_smoothing=0.1)
        mask = (y != -100).double() * (tw.double() if tw is not None else 1)
        per = per * mask
        return per if reduction == "none" else per.sum() / (mask.sum() if reduction == "mean" else 1)

    def fused(h, w, b):
        y_d, tw_d = on(backend, y, tw)
        return linear_cross_entropy(h, w, y_d, b, reduction=reduction, token_weights=tw_d, label_smoothing=0.1,
                                    backend=backend)

    leaf = lambda t, dt: t.to(dt).clone().requires_grad_() if t is not None else None  # noqa: E731
    want, want_grads = run(materialised, *(leaf(t, torch.float64) for t in (h, w, b)))
    got, got_grads = run(fused, *(leaf(t, torch.float32) for t in on(backend, h, w, b)))
    close(got, want)
    for g, wg in zip(got_grads, want_grads):
        assert g.dtype == torch.float32
        close(g, wg)


def test_fused_loss_matches_cross_entropy_exactly_as_a_drop_in():
    h, w, b, y, _ = case(seed=7)
    h, w, b = (t.clone().requires_grad_() for t in (h, w, b))
    want = F.cross_entropy(h @ w.T + b, y)
    got, scores = linear_cross_entropy(h, w, y, b, return_scores=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.loss, F.cross_entropy(h @ w.T + b, y, reduction="none").detach(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_accumulate_in_fp32(backend):
    h, w, b, y, tw = on(backend, *case(seed=9, dtype=torch.bfloat16))
    seq = Sequences(torch.tensor(OFFSETS), agreement=True)
    want = lm_head_scores(h.float(), w.float(), y, b.float(), token_weights=tw, sequences=seq, backend="torch")
    for seqs in (seq, None):  # with the sequences, and the per-token pass alone
        got = lm_head_scores(h, w, y, b, token_weights=tw, sequences=seqs, backend=backend)
        assert got.tokens.dtype == torch.float32
        torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(lm_head_scores(h, w, y, b, token_weights=tw, sequences=seq, backend=backend).sequences,
                               want.sequences, rtol=1e-3, atol=1e-3)
    hb, wb = h.clone().requires_grad_(), w.clone().requires_grad_()
    linear_cross_entropy(hb, wb, y, b, backend=backend).backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16


def test_memory_holds_one_chunk_never_the_logits(monkeypatch):
    """Every product the op forms is at most one chunk of rows x V (counted over the products it dispatches: the
    torch implementation's, whose chunk plan the native kernel repeats in C++, out of a dispatch mode's sight)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.shape != (V, D):
                    Largest.biggest = max(Largest.biggest, t.numel())
            return out

    monkeypatch.setattr(impl, "CHUNK_ELEMENTS", 8 * V)
    h, w, b, y, tw = case(seed=2)
    with Largest():
        linear_cross_entropy(h.requires_grad_(), w.requires_grad_(), y, b, return_scores=True, backend="torch")
    assert Largest.biggest <= 8 * V < N * V


@pytest.mark.native
def test_native_chunks_as_the_reference():
    """The native kernel's own chunk plan (2^22 logits, fixed in C++): at V = 40,000 a chunk holds 104 tokens, so
    300 tokens in ragged sequences of up to 90 span three chunks; every output equals the reference's."""
    g = torch.Generator().manual_seed(11)
    n, d, v = 300, 16, 40_000
    h, w, b = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.3, torch.randn(v, generator=g) * 0.1
    y = torch.randint(0, v, (n,), generator=g)
    y[40:50] = -100
    tw = torch.rand(n, generator=g) + 0.5
    seq = Sequences(torch.tensor([0, 90, 120, 121, 210, 300]), agreement=True)
    got, want = (lm_head_scores(h, w, y, b, token_weights=tw, sequences=seq, backend=be) for be in ("native", "torch"))
    torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.sequences, want.sequences, rtol=1e-4, atol=1e-4)
    grads = []
    for be in ("native", "torch"):
        leaves = [t.clone().requires_grad_() for t in (h, w, b)]
        linear_cross_entropy(*leaves[:2], y, leaves[2], token_weights=tw, label_smoothing=0.1, backend=be).backward()
        grads.append([t.grad for t in leaves])
    for got_g, want_g in zip(*grads):
        torch.testing.assert_close(got_g, want_g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("call, needle", [
    (lambda h, w, y: lm_head_scores(h, w[:, :5], y), "weight (V, D)"),
    (lambda h, w, y: lm_head_scores(h, w, y[:5]), "one a token"),
    (lambda h, w, y: lm_head_scores(h, w, y, sequences=Sequences(5)), "does not divide"),
    (lambda h, w, y: lm_head_scores(h, w, y, sequences=Sequences(torch.tensor([0, 40]))), "offsets must rise"),
    (lambda h, w, y: lm_head_scores(h, w, y, sequences=Sequences(37, route="fast")), "unknown route"),
    (lambda h, w, y: linear_cross_entropy(h, w, y, reduction="avg"), "unknown reduction"),
])
def test_bad_input_is_one_line(call, needle):
    h, w, _, y, _ = case()
    with pytest.raises(UserError, match=re.escape(needle)):
        call(h, w, y)


def test_every_benchmark_row_runs_at_a_tiny_shape():
    """The ``lm-head`` suite's rows (bench/test_lm_head.py) at N = 32, so a row that rots fails here, not in a long
    benchmark run; the rows of peers not installed (or CUDA-only) are reported missing there, skipped here."""
    from bench.test_lm_head import IMPLS, LMCase, _missing, implementation

    case = LMCase(32, 8, 50, 8)
    ran = []
    for row in IMPLS:
        if not _missing(row):
            implementation(case, row)()  # raises if the row broke
            ran.append(row)
    assert {"materialised", "fused", "fused_reference", "fused_agreement", "torch_func", "materialised_scores",
            "token_scores"} <= set(ran)


def test_opacus_ghost_norms_equal_the_sequence_norms():
    """A peer's per-sequence head-gradient norms (Opacus' ghost clipping, each sequence's summed loss) against the
    op's, where opacus is installed (pip install 'dynbatch[peers]')."""
    pytest.importorskip("opacus")
    from bench.test_lm_head import LMCase, _opacus_ghost

    case = LMCase(64, 8, 50, 16)
    ghost = _opacus_ghost(case)()
    mine = lm_head_scores(case.h.detach(), case.w.detach(), case.y, case.b.detach(), sequences=Sequences(16))
    torch.testing.assert_close(mine.sequence_grad_norm, ghost.to(torch.float32), rtol=1e-4, atol=1e-5)
