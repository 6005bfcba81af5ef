"""``dynbatch::lm_head``: a language model's head at vocabulary scale without its logits — per-token loss, LSE,
||e_t|| and ||g_t||, per-sequence ||G_b|| and agreement <G_b, G>, and the head's gradients, in the passes the loss
needs anyway (math: ``kernels/lm_head.py``). Beside it, :func:`linear_cross_entropy`, a drop-in for
``F.cross_entropy(h @ W.T + b, y)`` that never forms the logits and returns the scores as by-products.

Shapes: features (..., D) in fp32, bf16 or fp16, head ``weight`` (V, D), ``bias`` (V,) or None, targets (...,)
integer token ids; ``token_weights`` (...,) or None (1 a token); a token whose target is ``ignore_index`` has weight
0. Sequences: :class:`Sequences` of a uniform length T (features (B, T, D) or N = B T tokens) or of packed
``offsets`` (B + 1,), sequence b holding tokens offsets[b] .. offsets[b+1] - 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dynbatch.errors import UserError
from dynbatch.ops import library
from dynbatch.ops.per_sample_scores import Scores
from dynbatch_kernels import lm_head as _impl
from dynbatch_kernels import reference as _reference

# offsets: int64 (B + 1,) on the CPU, whatever the device (the chunks are planned on the host, without a read)
SCHEMA = ("(Tensor features, Tensor weight, Tensor? bias, Tensor targets, Tensor? token_weights, Tensor? grad_scale, "
          "Tensor offsets, int ignore_index, float label_smoothing, int what, bool gram) "
          "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
Args = library.args_type("lm_head", SCHEMA)
REDUCTIONS = ("none", "mean", "sum")


def fake(a):
    torch._check(a.features.dim() == 2 and a.weight.dim() == 2 and a.targets.dim() == 1,
                 lambda: "expected features (N, D), weight (V, D) and targets (N,)")
    torch._check(a.weight.shape[1] == a.features.shape[1], lambda: "features and weight differ in D")
    n, d = a.features.shape
    v = a.weight.shape[0]
    empty = a.features.new_empty(0, dtype=torch.float32)
    grads = a.what & _impl.GRADS
    return (a.features.new_empty(len(_impl.TOKEN_ROWS), n, dtype=torch.float32),
            a.features.new_empty(len(_impl.SEQUENCE_ROWS), a.offsets.shape[0] - 1, dtype=torch.float32),
            a.features.new_empty(n, d, dtype=torch.float32) if grads else empty,
            a.features.new_empty(v, d, dtype=torch.float32) if grads else empty,
            a.features.new_empty(v, dtype=torch.float32) if grads and a.bias is not None else empty)


def triton_impl(a):
    from dynbatch_kernels.lm_head_rows import lm_head as launch

    return launch(a)


OP = library.define("lm_head", SCHEMA, Args, reference=_impl.lm_head, triton=triton_impl, fake=fake)


@dataclass(frozen=True)
class Sequences:
    """Which tokens form a sequence, and which per-sequence scores to compute. ``layout``: an int T (every sequence
    T tokens) or offsets (B + 1,) of packed sequences; ``agreement``: also <G_b, G> (one more pass over the head);
    ``route``: ``gram`` (T^2 V a sequence), ``direct`` (T V D) or ``auto`` (Gram when T < D)."""

    layout: int | torch.Tensor
    agreement: bool = False
    route: str = "auto"

    def offsets(self, n: int) -> torch.Tensor:
        """int64 (B + 1,) on the CPU: the op plans its chunks from them on the host (a device's offsets are read
        once here; a uniform length costs no read)."""
        if isinstance(self.layout, int):
            if self.layout < 1 or n % self.layout:
                raise UserError(f"sequence length {self.layout} does not divide the {n} tokens; give offsets for "
                                "packed sequences")
            return torch.arange(0, n + 1, self.layout)
        o = self.layout.to(device="cpu", dtype=torch.int64).reshape(-1)
        if o.numel() < 2 or int(o[0]) != 0 or int(o[-1]) != n or bool((o.diff() < 0).any()):
            raise UserError(f"offsets must rise from 0 to the {n} tokens, (B + 1,); got {tuple(o.shape)} values")
        return o

    def gram(self, longest: int, d: int) -> bool:
        if self.route not in ("auto", "gram", "direct"):
            raise UserError(f"unknown route {self.route!r}; choose auto, gram or direct")
        return self.route == "gram" or (self.route == "auto" and longest < d)


class LMHeadScores:
    """Scores of the head, on the device: ``tokens`` fp32 (4, N) with rows ``loss``, ``lse``, ``residual_norm``
    (||e_t||), ``grad_norm`` (||g_t|| = ||e_t|| ||a_t||), each also an attribute (0 for ignored tokens but the
    LSE); ``sequences`` fp32 (2, B), rows ``sequence_grad_norm`` (||G_b||) and ``sequence_agreement``
    (<G_b, G>, NaN unless asked for), or None without :class:`Sequences`."""

    __slots__ = ("tokens", "sequences")

    def __init__(self, tokens: torch.Tensor, sequences: torch.Tensor | None):
        self.tokens, self.sequences = tokens, sequences

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in _impl.TOKEN_ROWS:
            return self.tokens[_impl.TOKEN_ROWS.index(name)]
        if name.startswith("sequence_") and name[9:] in _impl.SEQUENCE_ROWS:
            if self.sequences is None:
                raise UserError(f"{name} needs sequences=Sequences(...)")
            return self.sequences[_impl.SEQUENCE_ROWS.index(name[9:])]
        raise AttributeError(name)


def _flat(features, weight, targets, bias, token_weights):
    if features.dim() < 1 or weight.dim() != 2 or features.shape[-1] != weight.shape[1]:
        raise UserError(f"expected features (..., D) and weight (V, D); got {tuple(features.shape)} and "
                        f"{tuple(weight.shape)}")
    h = features.reshape(-1, features.shape[-1])
    y = targets.reshape(-1)
    if y.shape[0] != h.shape[0] or y.is_floating_point():
        raise UserError(f"targets must be integer token ids, one a token ({h.shape[0]}); got {tuple(targets.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise UserError(f"bias must be (V,) = ({weight.shape[0]},); got {tuple(bias.shape)}")
    w = None if token_weights is None else token_weights.reshape(-1)
    if w is not None and w.shape[0] != h.shape[0]:
        raise UserError(f"token_weights must hold one weight a token ({h.shape[0]}); got {tuple(token_weights.shape)}")
    return h, y, w


def _args(h, weight, bias, y, w, *, sequences, ignore_index, label_smoothing, what, grad_scale=None):
    if sequences is None:
        offsets, gram = torch.tensor([0, h.shape[0]]), False
    else:
        offsets = sequences.offsets(h.shape[0])
        lengths = offsets.diff()
        gram = sequences.gram(int(lengths.max()) if lengths.numel() else 0, h.shape[1])
        what |= _impl.NORMS | (_impl.AGREEMENT if sequences.agreement else 0)
    return Args(h, weight, bias, y, w, grad_scale, offsets, int(ignore_index), float(label_smoothing), what, gram)


def lm_head_scores(features, weight, targets, bias=None, *, token_weights=None, ignore_index=-100,
                   label_smoothing=0.0, sequences: Sequences | None = None, backend="auto") -> LMHeadScores:
    """The head's per-token scores (and per-sequence ones with ``sequences``) for features (..., D): one pass over
    the head (two with the agreement), memory one chunk of rows x V, never N x V (on CUDA the per-token scores
    alone form no logits at all). ``backend``: as the other ops (``auto``, ``torch``, ``native``, ``triton``)."""
    h, y, w = _flat(features, weight, targets, bias, token_weights)
    with torch.no_grad():
        tokens, seqs, *_ = library.call(OP, _args(h, weight, bias, y, w, sequences=sequences,
                                                  ignore_index=ignore_index, label_smoothing=label_smoothing,
                                                  what=0), backend)
    return _scores(tokens, seqs, sequences)


def _scores(tokens, seqs, sequences: Sequences | None) -> LMHeadScores:
    if sequences is not None and not sequences.agreement:
        seqs[1] = float("nan")  # not computed
    return LMHeadScores(tokens, seqs if sequences is not None else None)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward and backward of the fused loss. Reductions mean and sum compute the gradients in the forward pass
    (the upstream gradient is one number, applied in backward); ``none`` recomputes the logits in backward, where
    each token's upstream gradient is known."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, w, reduction, args_of):
        eager = reduction != "none" and any(ctx.needs_input_grad[:3])
        valid = y != args_of.ignore_index
        tw = valid.float() if w is None else w.float() * valid
        # the gradients of sum_t w_t loss_t (the op's default scale, whose head gradient the agreement reuses)
        tokens, seqs, d_h, d_w, d_b = args_of.run(h, weight, bias, y, w, what=_impl.GRADS if eager else 0)
        losses = tokens[0] * tw
        out = losses if reduction == "none" else losses.sum()
        if reduction == "mean":
            denom = tw.sum()
            out = out / denom
            if eager:
                d_h, d_w, d_b = (t.div_(denom) for t in (d_h, d_w, d_b))
        ctx.reduction, ctx.args_of = reduction, args_of
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.save_for_backward(*((d_h, d_w, d_b) if eager else (h, weight, bias, y, tw)))
        ctx.mark_non_differentiable(tokens, seqs)
        return out, tokens, seqs

    @staticmethod
    def backward(ctx, g, _tokens, _seqs):
        if ctx.reduction != "none":
            d_h, d_w, d_b = (t * g for t in ctx.saved_tensors)
        else:
            h, weight, bias, y, tw = ctx.saved_tensors
            _, _, d_h, d_w, d_b = ctx.args_of.run(h, weight, bias, y, None, what=_impl.GRADS,
                                                  grad_scale=g.float() * tw, sequences=False)
        h_type, w_type, b_type = ctx.dtypes
        return d_h.to(h_type), d_w.to(w_type), d_b.to(b_type) if b_type is not None else None, None, None, None, None


@dataclass
class _ArgsOf:
    """What the autograd function needs to call the op again."""

    sequences: Sequences | None
    ignore_index: int
    label_smoothing: float
    backend: str

    def run(self, h, weight, bias, y, w, *, what, grad_scale=None, sequences=True):
        args = _args(h, weight, bias, y, w, sequences=self.sequences if sequences else None,
                     ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, what=what,
                     grad_scale=grad_scale)
        return library.call(OP, args, self.backend)


def linear_cross_entropy(features, weight, targets, bias=None, *, reduction="mean", token_weights=None,
                         ignore_index=-100, label_smoothing=0.0, sequences: Sequences | None = None,
                         return_scores=False, backend="auto"):
    """``F.cross_entropy(features @ weight.T + bias, targets, ...)`` without the logits: features (..., D), weight
    (V, D), bias (V,) or None, targets (...,). ``token_weights`` multiply each token's loss (``mean`` divides by
    their sum over the tokens not ignored; without weights this is ``F.cross_entropy``'s mean). Gradients flow to
    features, weight and bias (not to the weights), in their dtypes, accumulated in fp32. With ``return_scores``
    returns (loss, :class:`LMHeadScores`): the per-token scores come from the same pass, the per-sequence ones
    (``sequences``) add what their math adds. ``backend``: as :func:`lm_head_scores`."""
    if reduction not in REDUCTIONS:
        raise UserError(f"unknown reduction {reduction!r}; choose none, mean or sum")
    h, y, w = _flat(features, weight, targets, bias, token_weights)
    args_of = _ArgsOf(sequences, int(ignore_index), float(label_smoothing), backend)
    loss, tokens, seqs = _LinearCrossEntropy.apply(h, weight, bias, y, w, reduction, args_of)
    if reduction == "none":
        loss = loss.reshape(targets.shape)
    return (loss, _scores(tokens, seqs, sequences)) if return_scores else loss


def sequence_scores(features, weight, targets, bias=None, *, label_smoothing=0.0, ignore_index=-100) -> Scores:
    """Each sequence's scores against its batch, as :func:`dynbatch.ops.sample_scores` gives a class's, for a
    sample that is a sequence: features (B, T, D), targets (B, T). The sample's loss is its tokens' mean, so its
    head gradient is g_b = G_b / T_b (token weights 1 / T_b); rows: ``loss``, ``residual_norm`` (the tokens' mean
    ||e_t||), ``grad_norm`` ||g_b||, ``agreement`` <g_b, G> with G = sum_b g_b, ``consensus`` cos(g_b, G - g_b).
    Two passes over the head (the agreement needs G), never B x T x V."""
    b, t = targets.shape
    valid = (targets != ignore_index).float()
    per_token = 1.0 / valid.sum(1, keepdim=True).clamp_min(1)
    s = lm_head_scores(features, weight, targets, bias, token_weights=(valid * per_token).expand(b, t),
                       ignore_index=ignore_index, label_smoothing=label_smoothing,
                       sequences=Sequences(t, agreement=True))
    loss = (s.loss.view(b, t) * per_token).sum(1)
    residual = (s.residual_norm.view(b, t) * per_token).sum(1)
    g_norm, r = s.sequence_grad_norm, s.sequence_agreement
    return Scores(torch.stack([loss, residual, g_norm, r, _reference.consensus(r, g_norm, r.sum())]))
