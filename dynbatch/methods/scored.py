"""What the online selection methods share (``importance``, ``selective-backprop``, ``small-loss``, ``consensus``):
the scoring forward, the shape of a choice, and the trainer adapter that trains on it.

One step of any of them: a forward of the loader batch that builds no graph and moves no buffer, capturing the
head's input; each sample's scores from the fused last-layer op (:func:`dynbatch.ops.sample_scores`: loss,
||e||, ||g||, agreement, consensus, class consensus); the method's pure choice on the device; one read of the
choice's numbers; one training step (a fresh forward and backward) on the chosen rows.

Under DDP (``torchrun``) every rank forwards its share and gathers the logits and head inputs of the global batch
(B x (C + D) values), so every rank computes the same scores and the same choice (random draws are a function of
(seed, step) alone), then trains on its share of the chosen rows; the executor normalises over all ranks. A rank
with none of them sends one sample at weight 0, so DDP's backward still synchronises.
"""
from __future__ import annotations

import time
from abc import abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from dynbatch.methods.base import ForwardStep, LastLayerForward, Plan, Policy, StepContext, chosen_rows
from dynbatch.errors import UserError
from dynbatch.ops import Scores, sample_scores, seeded_uniform, sequence_scores


class BatchScorer(LastLayerForward):
    """Each sample's scores for your own loop::

        scorer = BatchScorer(model)                     # finds the final nn.Linear (or pass head=)
        scores = scorer(x, y)                           # dynbatch.ops.Scores: .loss, .grad_norm, .consensus, ...

    One train-mode forward without a graph that leaves every buffer as it was, then the fused op: fp32 (B,) rows
    on the device, nothing read to the host."""

    def __init__(self, model=None, *, head=None, by_class: bool = False, backend: str = "auto"):
        super().__init__(model, head=head)
        self.by_class, self.backend = by_class, backend

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, label_smoothing: float = 0.0,
                 autocast=nullcontext) -> Scores:
        logits, features = self.forward(x, autocast=autocast)
        return self.score(logits, y, features, label_smoothing=label_smoothing)

    def score(self, logits, y, features, *, label_smoothing: float = 0.0) -> Scores:
        """The scores from a forward you ran: logits (B, C) and the head's input (B, D); or, for a language model,
        logits (B, T, V), next tokens (B, T) and the head's input (B, T, D): each sequence's scores, from the
        head's weights (``dynbatch.ops.sequence_scores``; the logits are not read)."""
        if logits.dim() == 3:
            if self.by_class:
                raise UserError("the class scores have no meaning for sequences; use a method without them")
            return sequence_scores(features.detach(), self.head.weight.detach(), y,
                                   None if self.head.bias is None else self.head.bias.detach(),
                                   label_smoothing=label_smoothing)
        return sample_scores(logits.detach(), y, features.detach(), bias=self.head.bias is not None,
                             label_smoothing=label_smoothing, by_class=self.by_class, backend=self.backend)


@dataclass(slots=True)
class Choice:
    """What a method chose from a batch of B, on the device: ``rows`` int64 (k,) to train on (repeats allowed:
    importance sampling draws with replacement), or ``mask`` bool (B,) when k is known only after the read;
    ``weight`` fp32 (k,) the rows' loss weights (None: a plain mean); ``stats`` float64 (3 + m,) = [kept, mean
    score of the kept, threshold, ...m numbers the method's ``note`` needs], read once."""

    stats: torch.Tensor
    rows: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    record: dict[str, Any] = field(default_factory=dict)


def choice_stats(kept, mean_score, threshold, *extra) -> torch.Tensor:
    """A :class:`Choice`'s ``stats`` from 0-d device tensors or host numbers, float64 on their device."""
    device = next((v.device for v in (kept, mean_score, threshold, *extra) if isinstance(v, torch.Tensor)), None)
    return torch.stack([v.reshape(()).to(torch.float64) if isinstance(v, torch.Tensor)
                        else torch.tensor(float(v), dtype=torch.float64, device=device)
                        for v in (kept, mean_score, threshold, *extra)])


def random_rows(batch: int, count: int, *, seed: int, device=None) -> torch.Tensor:
    """``count`` distinct rows of a batch of ``batch``, int64, uniformly at random from ``seed`` alone."""
    return torch.argsort(seeded_uniform(seed ^ _CONTROL_SALT, batch, device=device))[:count]


_CONTROL_SALT = 0xC0_17_01  # the control's draws, apart from the methods' own


class SelectionPolicy(Policy):
    """The trainer adapter of a selection method: subclasses set ``options_type`` and implement :meth:`choose`
    (and :meth:`note`, to update host state from the read); the scoring forward, the DDP gathering, the read and
    the step are here. With the trainer's ``selection_control`` the step trains on as many random rows as the
    method chose, unweighted (the method still runs, so its state and records are the real run's)."""

    by_class = False  # whether choose() needs the class scores

    def __init__(self, options=None, *, batch_size, config=None):
        super().__init__(options, batch_size=batch_size, config=config)
        self.scorer = BatchScorer(by_class=self.by_class)

    @abstractmethod
    def choose(self, scores: Scores, y: torch.Tensor, ctx: StepContext) -> Choice:
        """The choice from the global batch's scores (rows fp32 (B,)) and labels y (B,)."""

    def note(self, values: list[float], ctx: StepContext) -> dict[str, Any]:
        """Fields for the step's row from the read ``stats``, after updating any host state from them."""
        return {}

    def plan(self, x, y, ctx: StepContext) -> Plan:
        d, scorer = ctx.dist, self.scorer
        if scorer.model is None:
            scorer.model = ctx.module
        t0 = time.perf_counter()
        logits, features = scorer.forward(d.local(x), autocast=ctx.autocast)
        if d.enabled:  # the whole global batch on every rank, so every rank makes the same choice
            logits, features = d.all_gather_rows(logits.float()), d.all_gather_rows(features.float())
        choice = self.choose(scorer.score(logits, y, features, label_smoothing=ctx.label_smoothing), y, ctx)
        values = choice.stats.tolist()  # the step's one read
        kept = int(values[0])
        record = {"kept": kept, "mean_score": values[1], "threshold": values[2], **choice.record,
                  **self.note(values, ctx), "selection_s": time.perf_counter() - t0}
        rows = choice.rows if choice.rows is not None else chosen_rows(choice.mask, kept)
        weight = choice.weight
        if self.config is not None and self.config.selection_control:
            rows, weight = random_rows(y.shape[0], kept, seed=(ctx.seed << 32) + ctx.step, device=y.device), None
        if d.enabled:  # this rank's share of the chosen rows (every rank holds the global batch)
            share = d.share(kept)
            rows, weight = rows[share], None if weight is None else weight[share]
            if rows.numel() == 0:  # none for this rank: one sample at weight 0 keeps DDP in step
                rows, weight = torch.zeros(1, dtype=torch.long, device=x.device), torch.zeros(1, device=x.device)
        step = ForwardStep(x[rows], y[rows], lr_scale=self.part_lr_scale(kept), sample_weight=weight, rows=rows,
                           mean_over_count=weight is not None)
        return Plan([step], record)
