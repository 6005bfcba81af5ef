"""Suite ``lm-head``: a language model's head at vocabulary scale, forward and backward, and its per-token and
per-sequence scores, against the materialised logits and the per-sequence-gradient libraries.

Shapes: the CPU shape N = 4,096 tokens (16 sequences of 256), D = 512, V = 32,768; with ``DYNBATCH_BENCH=full``
(and on a GPU) also GPT-2's, N = 16,384 (16 of 1,024), D = 768, V = 50,257. Rows (median s, peak memory growth of
one call in bytes):

- ``materialised``: ``F.cross_entropy(h @ W.T + b, y)`` forward and backward;
- ``fused``: :func:`dynbatch.ops.linear_cross_entropy` forward and backward (the device's kernels: native on CPU,
  Triton row kernels and cuBLAS on CUDA); ``fused_reference``: the same by the chunked torch implementation;
- ``fused_token_scores``: the same with the per-token scores returned;
- ``fused_sequence_norms``: and each sequence's head-gradient norm ||G_b||;
- ``fused_agreement``: and each sequence's agreement <G_b, G>;
- ``torch_func``: ``torch.func.vmap(grad)`` per-sequence head gradients and their norms (the loss and the gradient
  of the head's input not included, so the ratio flatters it);
- ``opacus_ghost``: Opacus' ghost-clipping norms of the head (where opacus imports);
- ``liger``, ``cut_cross_entropy``: the peers' fused losses, on a GPU where they import;
- ``materialised_scores``: the logits and ``F.cross_entropy(reduction='none')``, no backward; ``token_scores``:
  :func:`dynbatch.ops.lm_head_scores`, the per-token scores alone (on CUDA one pass that forms no logits).
"""
import pytest
import torch
import torch.nn.functional as F

from .common import DEVICE, FULL, peer_missing, run
from dynbatch.monitor.memory import peak_growth
from dynbatch.ops import Sequences, linear_cross_entropy, lm_head_scores

SHAPES = [(4096, 512, 32768, 256)] + ([(16384, 768, 50257, 1024)] if FULL or DEVICE.type == "cuda" else [])
IMPLS = ["materialised", "fused", "fused_reference", "fused_token_scores", "fused_sequence_norms", "fused_agreement",
         "torch_func", "opacus_ghost", "liger", "cut_cross_entropy", "materialised_scores", "token_scores"]
_case: dict = {}


class LMCase:
    def __init__(self, n, d, v, t, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.n, self.d, self.v, self.t = n, d, v, t
        self.h = torch.randn(n, d, generator=g).to(DEVICE).requires_grad_()
        self.w = (torch.randn(v, d, generator=g) / d**0.5).to(DEVICE).requires_grad_()
        self.b = torch.zeros(v, device=DEVICE, requires_grad=True)
        self.y = torch.randint(0, v, (n,), generator=g).to(DEVICE)

    def zero(self):
        for p in (self.h, self.w, self.b):
            p.grad = None


def case_for(n, d, v, t) -> LMCase:
    if (n, d, v, t) not in _case:
        _case.clear()
        _case[(n, d, v, t)] = LMCase(n, d, v, t)
    return _case[(n, d, v, t)]


def _fused(c: LMCase, **kw):
    def step():
        c.zero()
        out = linear_cross_entropy(c.h, c.w, c.y, c.b, **kw)
        (out[0] if isinstance(out, tuple) else out).backward()
        return out
    return step


def _torch_func(c: LMCase):
    from torch.func import grad, vmap

    def seq_loss(w, b, h, y):
        return F.cross_entropy(h @ w.T + b, y, reduction="sum")

    per_seq = vmap(grad(seq_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))
    h, y = c.h.detach().reshape(-1, c.t, c.d), c.y.reshape(-1, c.t)
    w, b = c.w.detach(), c.b.detach()

    def norms():
        gw, gb = per_seq(w, b, h, y)
        return (gw.square().sum((1, 2)) + gb.square().sum(1)).sqrt()
    return norms


def _opacus_ghost(c: LMCase):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    head = torch.nn.Linear(c.d, c.v).to(DEVICE)
    with torch.no_grad():
        head.weight.copy_(c.w)
        head.bias.copy_(c.b)
    gsm = GradSampleModuleFastGradientClipping(head, max_grad_norm=1.0, use_ghost_clipping=True,
                                               loss_reduction="sum")  # each sequence's summed loss, as ours
    h, y = c.h.detach().reshape(-1, c.t, c.d), c.y.reshape(-1, c.t)

    def norms():
        gsm.zero_grad(set_to_none=True)
        loss = F.cross_entropy(gsm(h).transpose(1, 2), y, reduction="none").sum(1)
        loss.sum().backward(retain_graph=True)
        return gsm.get_norm_sample()
    return norms


def _peer(c: LMCase, name: str):
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss()

        def step():
            c.zero()
            loss_fn(c.w, c.h, c.y, c.b).backward()
        return step
    from cut_cross_entropy import linear_cross_entropy as cce

    def step():
        c.zero()
        cce(c.h, c.w, c.y, bias=c.b).backward()
    return step


def implementation(c: LMCase, impl: str):
    seqs = Sequences(c.t)
    if impl == "materialised":
        def step():
            c.zero()
            F.cross_entropy(c.h @ c.w.T + c.b, c.y).backward()
        return step
    if impl == "materialised_scores":
        def scores():
            with torch.no_grad():
                return F.cross_entropy(c.h @ c.w.T + c.b, c.y, reduction="none")
        return scores
    if impl == "token_scores":
        return lambda: lm_head_scores(c.h.detach(), c.w.detach(), c.y, c.b.detach())
    fused = {"fused": {}, "fused_reference": {"backend": "torch"}, "fused_token_scores": {"return_scores": True},
             "fused_sequence_norms": {"return_scores": True, "sequences": seqs},
             "fused_agreement": {"return_scores": True, "sequences": Sequences(c.t, agreement=True)}}
    if impl in fused:
        return _fused(c, **fused[impl])
    if impl == "torch_func":
        return _torch_func(c)
    if impl == "opacus_ghost":
        return _opacus_ghost(c)
    return _peer(c, impl)


def _missing(impl: str) -> str | None:
    module = {"opacus_ghost": "opacus", "liger": "liger_kernel", "cut_cross_entropy": "cut_cross_entropy"}.get(impl)
    if module is None:
        return None
    if impl in ("liger", "cut_cross_entropy") and DEVICE.type != "cuda":
        return f"{impl} runs on CUDA only"
    return peer_missing(module)


@pytest.mark.parametrize("n, d, v, t", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_lm_head(benchmark, impl, n, d, v, t):
    extra = dict(suite="lm_head", impl=impl, N=n, D=d, V=v, T=t)
    why = _missing(impl)
    if why:
        benchmark.extra_info.update(extra, missing=why)
        pytest.skip(why)  # reported as missing in the table, not dropped
    c = case_for(n, d, v, t)
    fn = implementation(c, impl)
    try:
        memory = peak_growth(fn, DEVICE)
    except Exception as e:  # a row that cannot run here (memory, a peer's dtype rules): said, never a silent gap
        benchmark.extra_info.update(extra, missing=f"cannot run: {str(e).splitlines()[0][:120]}")
        pytest.skip(str(e).splitlines()[0][:120])
    run(benchmark, fn, budget_s=3.0, memory_bytes=memory, **extra)
