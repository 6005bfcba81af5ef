"""InfoBatch (Qin et al., ICLR 2024, "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning"):
each epoch, prune part of the samples whose last loss was below the mean, and scale up the loss of the kept ones
among them so that the epoch's expected gradient is the full one.

The rule, per epoch e of E:

- every sample has a score, the loss the training forward computed the last time it was drawn (``ib_initial``
  before its first draw: all equal, so the first epoch prunes nothing);
- the *last* ``ceil(ib_delta * E)`` epochs draw every sample, unweighted (the paper's annealing: the end of
  training sees the data set unbiased);
- before that, a sample scoring strictly below the mean score is pruned with probability ``ib_ratio`` (r) and, when
  kept, its loss is weighted 1 / (1 - r): E[weight * kept] = 1, the expected gradient of the epoch is the full one.

No extra forward: the scores are the per-sample losses of the training step itself. The pruning draw is a function
of (seed, epoch) alone, and the scores and the epoch's weights are part of the checkpoint, so a resumed run prunes
what the uninterrupted one pruned. The epoch is shorter by the pruned share; the learning-rate schedule, stated in
epochs, runs through a pruned epoch in fewer steps (the paper's setting).

Under DDP every rank holds the whole score table: each forwards its share of the batch and the batch's losses are
gathered, so every rank updates the same table and prunes the same samples; the sampler gives each rank its share of
the kept ones.

Own-loop component
------------------
::

    ib = InfoBatch(len(train_set), epochs=E, ib_ratio=0.5, ib_delta=0.125)
    for epoch in range(E):
        for idx in ib.batches(epoch, batch_size=128):          # int64 (B,) rows of the kept samples, shuffled
            x, y = train_set[idx]
            losses = F.cross_entropy(model(x), y, reduction="none")
            ib.weighted_mean(losses, idx).backward()          # updates the scores, rescales the pruned class
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from dynbatch.errors import UserError
from dynbatch.methods.base import Plan, Policy, ReuseStep, StepContext
from dynbatch.options import check_fields, option, with_overrides, within
from dynbatch.ops import seeded_uniform

_SALT = 0x1B_0B  # the pruning draws, apart from every other seeded stream of the run


@dataclass
class InfoBatchOptions:
    ib_ratio: float = option(0.5, "r: probability of pruning a sample whose score is below the mean",
                             check=within("[0, 1)", lambda v: 0 <= v < 1,
                                          "a probability of 1 would prune every such sample; e.g. 0.5"))
    ib_delta: float = option(0.125, "share of the epochs, at the end, that train on every sample (annealing)",
                             check=within("[0, 1]", lambda v: 0 <= v <= 1, "e.g. 0.125"))
    ib_initial: float = option(1.0, "score of a sample not yet drawn (all equal: the first epoch prunes nothing)",
                               check=within("(-inf, inf)", math.isfinite, "e.g. 1.0"))

    def validate(self) -> None:
        check_fields(self)


def full_epochs(epochs: int, delta: float) -> int:
    """How many of the last epochs of a run of ``epochs`` draw every sample: ceil(delta * epochs)."""
    return min(epochs, math.ceil(delta * epochs - 1e-9))


def prune(scores: torch.Tensor, ratio: float, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep bool (N,), weight fp32 (N,)) from scores (N,) and uniform draws (N,) in [0, 1): a sample below the
    mean score is pruned when its draw is below ``ratio``; its kept peers weigh 1 / (1 - ratio), the rest 1."""
    low = scores < scores.float().mean()
    keep = ~(low & (uniform < ratio))
    weight = torch.where(low & keep, 1.0 / (1.0 - ratio), 1.0).to(torch.float32)
    return keep, weight


class InfoBatch:
    """InfoBatch in your own loop (see the module docstring): the score table of ``n`` samples, on ``device``, and
    the current epoch's draw."""

    def __init__(self, n: int, *, epochs: int, options: InfoBatchOptions | dict | None = None, seed: int = 0,
                 device: torch.device | str | None = None, **overrides):
        if n < 1 or epochs < 1:
            raise UserError(f"InfoBatch needs at least one sample and one epoch (got n = {n}, epochs = {epochs})")
        self.options = with_overrides(InfoBatchOptions, options, overrides)
        self.n, self.epochs, self.seed = n, epochs, seed
        self.scores = torch.full((n,), self.options.ib_initial, dtype=torch.float32, device=device)
        self.weight = torch.ones(n, dtype=torch.float32, device=device)  # this epoch's loss weight per sample
        self.pruned = self.rescaled = 0  # this epoch's counts

    def prune(self, epoch: int) -> torch.Tensor:
        """Bool (n,) on the CPU: the samples epoch ``epoch`` draws; sets the epoch's weights. One device read."""
        o = self.options
        if epoch >= self.epochs - full_epochs(self.epochs, o.ib_delta) or o.ib_ratio == 0.0:
            keep = torch.ones(self.n, dtype=torch.bool, device=self.scores.device)
            self.weight = torch.ones_like(self.scores)
        else:
            draws = seeded_uniform((self.seed << 20) ^ (_SALT + epoch), self.n, device=self.scores.device)
            keep, self.weight = prune(self.scores, o.ib_ratio, draws)
        keep_cpu, rescaled_cpu = torch.stack([keep, self.weight > 1]).cpu()  # the epoch's one read
        self.pruned, self.rescaled = self.n - int(keep_cpu.sum()), int(rescaled_cpu.sum())
        return keep_cpu

    def batches(self, epoch: int, batch_size: int) -> Iterator[torch.Tensor]:
        """The kept samples of epoch ``epoch`` in batches of ``batch_size`` (int64 each), in a permutation seeded by
        (seed, epoch)."""
        keep = self.prune(epoch)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        yield from order[keep[order]].split(batch_size)

    def observe(self, indices: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Record ``losses`` (B,) of the samples ``indices`` (B,) as their scores; returns their weights (B,)."""
        idx = indices.to(self.scores.device)
        self.scores.index_copy_(0, idx, losses.detach().float().to(self.scores.device))
        return self.weight[idx].to(losses.device)

    def weighted_mean(self, losses: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The step's loss: sum of weight x loss over the batch's count, scores updated (0-d, with the graph)."""
        return (losses * self.observe(indices, losses).to(losses.dtype)).mean()

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.cpu(), "weight": self.weight.cpu(), "pruned": self.pruned,
                "rescaled": self.rescaled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.scores.device
        if state["scores"].shape != self.scores.shape:
            raise UserError(f"the checkpoint's InfoBatch table has {state['scores'].numel()} samples, the data "
                            f"{self.n}; resume with the run's own data")
        self.scores, self.weight = state["scores"].to(device), state["weight"].to(device)
        self.pruned, self.rescaled = state["pruned"], state["rescaled"]


class InfoBatchPolicy(Policy):
    name = "infobatch"
    help = "InfoBatch: prune part of the below-mean-loss samples each epoch, rescale the rest (no extra forward)"
    options_type = InfoBatchOptions

    def __init__(self, options=None, *, batch_size, config=None):
        super().__init__(options, batch_size=batch_size, config=config)
        if config is not None and config.redraw_subset != "never":
            raise UserError("--policy infobatch keeps a score per training image, which --redraw-subset would swap "
                            "under it; drop --redraw-subset")
        self.table: InfoBatch | None = None  # built for the training split's size at the first epoch
        self._pending: dict[str, Any] | None = None  # a checkpoint's table, before the size is known
        self.device, self.seed = torch.device("cpu"), 0  # the run's, from attach()

    def attach(self, ctx: StepContext) -> None:
        self.device, self.seed = ctx.device, ctx.seed

    def _table(self, n: int) -> InfoBatch:
        if self.table is None:
            epochs = self.config.epochs if self.config is not None else 1
            self.table = InfoBatch(n, epochs=epochs, options=self.options, seed=self.seed, device=self.device)
            if self._pending is not None:
                self.table.load_state_dict(self._pending)
                self._pending = None
        return self.table

    def epoch_samples(self, epoch: int, n: int) -> torch.Tensor:
        table = self._table(n)
        if self.config is not None:  # a resumed run may have been given more epochs: the annealing moves with them
            table.epochs = self.config.epochs
        return table.prune(epoch)

    def _shares(self) -> dict[str, float]:
        t = self.table
        return {"ib_pruned": t.pruned / t.n, "ib_rescaled": t.rescaled / t.n}

    def epoch_record(self) -> dict[str, Any]:
        return self._shares()

    def plan(self, x, y, ctx: StepContext) -> Plan:
        # After a resume mid-epoch the table is built here, from the checkpoint's (epoch_samples is not called).
        d, table = ctx.dist, self.table or self._table(self._pending["scores"].numel())
        xl, yl = d.local(x), d.local(y)
        with ctx.autocast():  # the training forward, through the wrapper that trains (DDP syncs its backward)
            logits = ctx.model(xl)
        losses = ctx.loss_fn(logits.float(), yl)
        if d.enabled:  # every rank records the whole batch's losses: the tables stay equal
            weight = table.observe(ctx.indices, d.all_gather_rows(losses.detach()))[d.share(y.shape[0])]
        else:
            weight = table.observe(ctx.indices, losses)
        step = ReuseStep(losses, logits.detach(), yl, sample_weight=weight, mean_over_count=True)
        return Plan([step], self._shares())

    def state_dict(self):
        return self.table.state_dict() if self.table is not None else (self._pending or {})

    def load_state_dict(self, state):
        if not state:
            return
        if self.table is None:
            self._pending = state
        else:
            self.table.load_state_dict(state)
