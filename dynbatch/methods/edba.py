"""EDBA (Efficient Dynamic Batch Adaptation): train on the subset whose mean last-layer gradient best follows the
loss trend, and adapt the batch size.

One step:
1. Forward the loader batch once, capturing the final ``nn.Linear``'s input (a forward hook), without moving any
   buffer (BatchNorm running statistics are restored) and without a graph.
2. Draw ``--subsets`` random subsets from a per-step seed and score each by the norm G_S of its mean last-layer
   gradient (``dynbatch.ops``; fused kernels, no per-sample gradient materialised).
3. Choose the subset minimising the margin loss |(L - L_ema) / (G_S - G_ema) - 1|, where L is the batch loss.
   The first step has no EMAs and takes the largest subset. Then update both EMAs (decay ``--ema-decay``).
4. Train one usual step on the chosen samples: a fresh forward and backward on them alone (the paper's method).
   With ``--reuse-forward`` the step-1 forward keeps its graph and the loss is masked to the chosen samples instead:
   one forward fewer, but BatchNorm then normalises with statistics of the whole loader batch, and its running
   statistics are updated from the whole batch.

Under DDP (``torchrun``) every rank forwards its share, gathers the residual inputs of the whole global batch
(logits and last-layer inputs: B x (C + D) values), selects with the shared seed (so every rank picks the same
subset, which is checked), and trains on its own part of it; the executor weights the ranks' losses by the global
subset size. A rank holding none of the chosen samples contributes a zero-weight sample.

The selection, the EMAs and the batch-size rule are :class:`EDBASelector`'s, below (the same object a
researcher uses in their own loop); this policy adds what the trainer needs around it: DDP gathering, the
``--reuse-forward`` variant, the plan and the step record.

Own-loop component
------------------
EDBA for any PyTorch loop: which samples of a batch to train on, and how large the next batch should be.

Three layers, so each idea exists once and is used by ``EDBAPolicy``, the public API and the tests alike:

- :class:`EDBAOptions`: every option with its type, default and range.
- :class:`EDBAState` and :func:`advance`: the EMAs and the batch size, updated explicitly and purely from one
  step's batch loss and chosen gradient norm (EMAs after the choice, as in the paper).
- :class:`EDBASelector`: finds the model's final ``nn.Linear``, captures its input during a forward that builds
  no graph and moves no buffer, selects (``dynbatch.ops.select_subset``: fused kernels, no per-sample
  gradient materialised), advances the state, and holds it for ``state_dict()``.

Batch-size rules (the paper says only that the decision comes from margin-loss statistics: smaller batches while
the loss is high, larger once it is low); ``bs_rule`` picks one. Either moves the batch by ``bs_factor`` (at least
one sample) within [``bs_min``, ``bs_max``].

- ``loss`` (default): the loss-trend term of the margin, r = (L - L_ema) / L_ema, before the EMA update:
  r > ``shrink_above`` shrinks, r < -``grow_below`` grows. Under the paper's optimizer (lr 0.001) the loss moves
  too slowly for this to fire: a 1,500-epoch run on 100 images kept its batch at 100 throughout.
- ``share``: the chosen subset's share of the batch, s = |S| / B, as DBA grew or shrank from the number of
  gradients it kept: s > ``share_grow`` (the trend is best followed by most of the batch) grows, s <
  ``share_shrink`` shrinks. Under bernoulli(0.5) subsets the share varies around 0.5 step by step, so it moves.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynbatch.errors import RunFailure, UserError
from dynbatch.methods.base import (ForwardStep, LastLayerForward, Plan, Policy, ReuseStep, StepContext,
                                   capture_last_layer, chosen_rows)
from dynbatch.options import OptionError, check_fields, non_negative, one_of, option, positive, with_overrides, within
from dynbatch.ops import MAX_SUBSETS, Selection, SubsetSpec, select_subset


@dataclass
class EDBAOptions:
    subsets: int = option(4096, f"random subsets scored per step (1..{MAX_SUBSETS})",
                          check=within(f"1..{MAX_SUBSETS}", lambda v: 1 <= v <= MAX_SUBSETS, "e.g. 4096"))
    subset_mode: str = option("bernoulli", "bernoulli (each sample in with p) or uniform_size",
                              check=one_of("bernoulli", "uniform_size", hint="bernoulli is the default"))
    subset_p: float = option(0.5, "inclusion probability for bernoulli subsets",
                             check=within("(0, 1]", lambda v: 0 < v <= 1, "e.g. 0.5"))
    ema_decay: float = option(0.9, "decay of the loss and gradient-norm EMAs",
                              check=within("[0, 1)", lambda v: 0 <= v < 1, "e.g. 0.9"))
    margin_eps: float = option(1e-8, "floor of |G_S - G_ema| in the margin", check=positive("e.g. 1e-8"))
    reuse_forward: bool = option(False, "one forward per step, loss masked to the subset")
    bs_min: int = option(10, "smallest batch the batch-size rule may set")
    bs_max: int = option(1000, "largest batch the batch-size rule may set")
    bs_factor: float = option(1.1, "batch-size change factor (> 1)")
    bs_rule: str = option("loss", "batch-size rule: loss (trend of the loss) or share (chosen subset's share)",
                          check=one_of("loss", "share", hint="loss is the default"))
    grow_below: float = option(0.05, "rule loss: grow when (L - L_ema)/L_ema < -this", check=non_negative("e.g. 0.05"))
    shrink_above: float = option(0.05, "rule loss: shrink when (L - L_ema)/L_ema > this",
                                 check=non_negative("e.g. 0.05"))
    share_grow: float = option(0.55, "rule share: grow when the chosen subset holds more than this share")
    share_shrink: float = option(0.45, "rule share: shrink when it holds less than this share")
    selection_backend: str = option("auto", "auto, torch, native, triton",
                                    check=one_of("auto", "torch", "native", "triton",
                                                 hint="auto picks the fastest usable one"))
    grad_metric: str = option("mean", "subset score: norm of the subset's mean gradient (the paper's) or of its sum",
                              check=one_of("mean", "sum", hint="mean is the paper's"))

    def validate(self) -> None:
        """Raise ``OptionError`` (a ``ValueError``) naming the first bad option, its range and an example."""
        check_fields(self)
        if not 1 <= self.bs_min <= self.bs_max:
            raise OptionError(f"need 1 <= {{bs_min}} <= {{bs_max}} (got {self.bs_min}, {self.bs_max}); e.g. 10 and 1000")
        if not self.bs_factor > 1:
            raise OptionError(f"{{bs_factor}} must be above 1 (got {self.bs_factor}); e.g. 1.1")
        if not 0 <= self.share_shrink <= self.share_grow <= 1:
            raise OptionError(f"need 0 <= {{share_shrink}} <= {{share_grow}} <= 1 (got {self.share_shrink}, "
                              f"{self.share_grow}); e.g. 0.45 and 0.55")


@dataclass(frozen=True)
class EDBAState:
    """What EDBA carries from step to step: the next batch size and the EMAs (None before the first step)."""

    batch_size: int
    loss_ema: float | None = None
    grad_ema: float | None = None


@dataclass(frozen=True)
class Chosen:
    """One selection's numbers on the host: the batch's mean loss, the chosen subset's gradient norm, margin, size
    and index."""

    loss: float
    grad_norm: float
    margin: float
    size: int
    index: int


def next_batch_size(state: EDBAState, loss: float, opts: EDBAOptions, share: float | None = None) -> int:
    """The batch-size rule ``opts.bs_rule`` of the module docstring, from this step's batch loss (EMA not yet
    updated) or the chosen subset's share of the batch (``share``, 0..1)."""
    if opts.bs_rule == "share":
        grow, shrink = share is not None and share > opts.share_grow, share is not None and share < opts.share_shrink
    else:
        if state.loss_ema is None or state.loss_ema <= 0:
            return state.batch_size
        r = (loss - state.loss_ema) / state.loss_ema
        grow, shrink = r < -opts.grow_below, r > opts.shrink_above
    if shrink:
        return max(opts.bs_min, min(state.batch_size - 1, round(state.batch_size / opts.bs_factor)))
    if grow:
        return min(opts.bs_max, max(state.batch_size + 1, round(state.batch_size * opts.bs_factor)))
    return state.batch_size


def advance(state: EDBAState, loss: float, grad_norm: float, opts: EDBAOptions,
            share: float | None = None) -> EDBAState:
    """The state after a step with batch loss ``loss`` whose chosen subset has gradient norm ``grad_norm`` and
    holds ``share`` of the batch.

    A non-finite step (whose update the trainer skips) leaves the state as it was: it must not poison the EMAs.
    """
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return state
    nxt = next_batch_size(state, loss, opts, share)
    if state.loss_ema is None:
        return EDBAState(nxt, loss, grad_norm)
    b = opts.ema_decay
    return EDBAState(nxt, b * state.loss_ema + (1 - b) * loss, b * state.grad_ema + (1 - b) * grad_norm)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, without a dispatch when it already is (this runs on every step)."""
    return t if t.dtype == torch.float32 else t.float()


def batch_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float, *, reduction: str = "mean"):
    """The batch's cross-entropy, 0-d fp32 on the device, as the selection's gradients define it (same label
    smoothing); ``reduction="sum"`` for a rank's part of a global batch. A reduced loss, not per-sample losses
    summed: their unreduced kernel costs ~2.5x as much, at every step."""
    return nn.functional.cross_entropy(_fp32(logits.detach()), y, reduction=reduction,
                                       label_smoothing=label_smoothing)


class EDBASelector(LastLayerForward):
    """EDBA inside your own loop::

        selector = EDBASelector(model)                      # finds the final nn.Linear (or pass head=)
        for x, y in loader:                                 # batches of selector.batch_size (see the sampler)
            idx = selector.select(x, y, step=step).mask     # (B,) bool: the samples to train on
            loss = F.cross_entropy(model(x[idx]), y[idx])
            ...

    ``select`` runs one train-mode forward that builds no graph and leaves every buffer (BatchNorm running
    statistics) as it was, scores ``subsets`` random subsets, picks the one whose gradient norm best follows the
    loss trend, and advances the state (EMAs, next batch size). ``select_from`` does the same from logits and
    features you already have. Its options are those of ``EDBAOptions`` (keywords or ``options=``).
    """

    def __init__(self, model: nn.Module | None = None, *, head: nn.Linear | None = None, batch_size: int = 100,
                 seed: int = 0, options: EDBAOptions | dict | None = None, **overrides):
        super().__init__(model, head=head)
        self.options = with_overrides(EDBAOptions, options, overrides)
        self.seed = seed
        o = self.options
        self.spec = SubsetSpec(o.subsets, o.subset_mode, o.subset_p, grad_metric=o.grad_metric, eps=o.margin_eps,
                               backend=o.selection_backend)  # checked once, read at every step
        self.state = EDBAState(min(max(batch_size, o.bs_min), o.bs_max))
        self.last: Chosen | None = None  # the last selection's numbers, on the host

    @property
    def batch_size(self) -> int:
        """The batch size EDBA asks for next."""
        return self.state.batch_size

    def select(self, x: torch.Tensor, y: torch.Tensor, *, step: int, label_smoothing: float = 0.0,
               autocast=nullcontext) -> Selection:
        """Choose the samples of (x (B, ...), y (B,)) to train on at ``step`` (seeds the subsets), and advance."""
        logits, feats = self.forward(x, autocast=autocast)
        return self.select_from(logits, y, feats, batch_loss(logits, y, label_smoothing), step=step,
                                label_smoothing=label_smoothing)

    def select_from(self, logits: torch.Tensor, y: torch.Tensor, features: torch.Tensor, loss, *,
                    step: int, label_smoothing: float = 0.0) -> Selection:
        """The choice from a forward you ran: logits (B, C), features (B, D) (the head's input), and the batch's
        mean loss (a float or a 0-d tensor). Selects in fp32 whatever the inputs' dtype (the kernels convert); advances the state.

        One read from the device per call: loss, gradient norm, margin, size and index of the choice, packed
        (``self.last``), which the state's EMAs and batch-size rule need on the host."""
        o, s = self.options, self.state
        if logits.dim() != 2:
            raise UserError(f"EDBA needs one feature vector a sample, logits (B, C); got {tuple(logits.shape)} (a "
                            "sequence's head gradient is not rank one); select sequences with another method")
        sel = select_subset(
            logits.detach() if logits.requires_grad else logits, y,
            features.detach() if features.requires_grad else features, self.spec, seed=(self.seed << 32) + step,
            loss=loss, loss_ema=s.loss_ema, grad_ema=s.grad_ema, bias=self.head.bias is not None,
            label_smoothing=label_smoothing)
        loss, grad_norm, margin, size, index = sel.stats.tolist()  # the call's one read
        if math.isfinite(loss) and not math.isfinite(grad_norm):
            # Non-finite subset norms map to the largest margin, so a NaN would otherwise be chosen only silently,
            # when every subset is NaN; with a finite loss that is a kernel fault, not a divergence.
            raise RunFailure(f"EDBA's selection gave a non-finite gradient norm at step {step} although the loss is "
                             f"finite (backend {o.selection_backend}); rerun with --selection-backend torch and "
                             "report it")
        self.last = Chosen(loss, grad_norm, margin, int(size), int(index))
        self.state = advance(self.state, loss, grad_norm, o, size / max(y.shape[0], 1))
        return sel

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.state.batch_size, "loss_ema": self.state.loss_ema, "grad_ema": self.state.grad_ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = EDBAState(state["current"], state["loss_ema"], state["grad_ema"])


# ---- the trainer adapter -------------------------------------------------------------------------------------
class EDBAPolicy(Policy):
    name = "edba"
    help = "EDBA: train on the random subset whose last-layer gradient best follows the loss trend"
    optimizer_defaults = {"lr": 0.001, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-5}
    default_batch_size = 100
    options_type = EDBAOptions
    sequences = False  # a sequence's head gradient is a sum of rank-one terms; the subset ops need one

    def __init__(self, options=None, *, batch_size, config=None):
        super().__init__(options, batch_size=batch_size, config=config)
        # The model is bound at the first step; the seed is the run's (subsets are seeded by (seed, step)).
        self.selector = EDBASelector(None, batch_size=batch_size, seed=config.seed if config else 0,
                                     options=self.options)

    def batch_size(self) -> int:
        return self.selector.batch_size

    def plan(self, x, y, ctx: StepContext) -> Plan:
        o, d, selector = self.options, ctx.dist, self.selector
        if selector.model is None:
            selector.model = ctx.module
        selector.seed = ctx.seed
        t0 = time.perf_counter()
        xl, yl = d.local(x), d.local(y)
        if o.reuse_forward:  # the training forward itself: through the DDP wrapper, which syncs gradients
            logits, feats = capture_last_layer(ctx.model, selector.head, xl, keep_graph=True, autocast=ctx.autocast)
        else:  # no graph, no buffer change, no collective: the unwrapped module
            logits, feats = selector.forward(xl, autocast=ctx.autocast)
        g_logits, g_feats = _fp32(logits.detach()), _fp32(feats.detach())
        if d.enabled:  # the whole global batch on every rank, so every rank selects the same subset
            g_logits, g_feats = d.all_gather_rows(g_logits), d.all_gather_rows(g_feats)
            local = batch_loss(logits, yl, ctx.label_smoothing, reduction="sum").reshape(1)
            loss = d.all_reduce_sum(local)[0] / y.shape[0]  # stays on the device
        else:
            loss = batch_loss(logits, yl, ctx.label_smoothing)
        before = selector.state
        sel = selector.select_from(g_logits, y, g_feats, loss, step=ctx.step, label_smoothing=ctx.label_smoothing)
        c = selector.last  # the selection's one read
        if d.enabled:  # an invariant worth one tiny collective: every rank chose the same subset
            chosen = d.gather_objects(c.index)
            if len(set(chosen)) != 1:
                raise RuntimeError(f"EDBA ranks chose different subsets {chosen}: selection must be deterministic")
        record = {"batch_loss": c.loss, "chosen_size": c.size, "subset_index": c.index, "grad_norm": c.grad_norm,
                  "margin": c.margin, "loss_ema": before.loss_ema, "grad_ema": before.grad_ema,
                  "selection_s": time.perf_counter() - t0, "next_batch_size": selector.batch_size}
        weight = None
        if d.enabled:
            mask = sel.mask[d.share(y.shape[0])]
            if not bool(mask.any()):  # this rank holds none of the chosen samples: one at weight 0 keeps DDP in step
                mask = torch.zeros_like(mask)
                mask[0] = True
                weight = torch.zeros(1, device=x.device)
            rows = chosen_rows(mask, int(mask.sum()))
        else:
            rows = chosen_rows(sel.mask, c.size)  # the size is known from the one read: no sync to index
        in_batch = rows + d.share(y.shape[0]).start if d.enabled else rows  # rows of the global batch
        lr_scale = self.part_lr_scale(c.size)
        if o.reuse_forward:
            losses = ctx.loss_fn(_fp32(logits), yl)
            step = ReuseStep(losses[rows], logits[rows].detach(), yl[rows], lr_scale=lr_scale, sample_weight=weight,
                             rows=in_batch)
        else:
            step = ForwardStep(xl[rows], yl[rows], lr_scale=lr_scale, sample_weight=weight, rows=in_batch)
        return Plan([step], record)

    def state_dict(self):
        return self.selector.state_dict()

    def load_state_dict(self, state):
        self.selector.load_state_dict(state)
