"""Selective Backprop (Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the Biggest Losers"): keep each
sample with probability P = F(loss)^beta, F the percentile of its loss among the last ``sb_history`` losses seen,
and train on the kept ones.

The paper's rule: beta = 1 keeps about half of each batch (P is uniform on [0, 1] when losses are exchangeable),
beta = 2 a third, beta = 3 a quarter; its history holds the recent losses (R = 1024 here). The losses are those
of a scoring forward at the current weights (the paper's forward pass that feeds the selection), and the batch
joins the history before its percentiles are taken, so the first batch is compared with itself. Composer's
variant (a fixed kept fraction drawn without replacement by in-batch percentile, on a time window) is not this.

Kept samples are drawn from (seed, step) alone, so a resumed run keeps what the uninterrupted one kept; the
history is part of the checkpoint.

Own-loop component
------------------
::

    sb = SelectiveBackprop(sb_beta=1)
    keep = sb.select(losses, seed=step)        # bool (B,): kept with probability percentile^beta
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dynbatch.methods.scored import Choice, SelectionPolicy, choice_stats
from dynbatch.options import check_fields, option, positive, with_overrides
from dynbatch.ops import seeded_uniform

_SALT = 0x5B5B  # separates these draws from any other seeded stream of the run


@dataclass
class SelectiveBackpropOptions:
    sb_beta: float = option(1.0, "selectivity: keep with probability percentile^beta (1 keeps ~1/2, 2 ~1/3)",
                            check=positive("e.g. 1, 2 or 3"))
    sb_history: int = option(1024, "recent losses the percentile is taken among (R)",
                             check=positive("give a whole number of 1 or more, e.g. 1024"))

    def validate(self) -> None:
        check_fields(self)


def keep_probability(losses: torch.Tensor, history: torch.Tensor, beta: float) -> torch.Tensor:
    """P_i = F(loss_i)^beta, fp32 (B,), F the share of ``history`` (H,) below loss_i (ties count half)."""
    ordered = torch.sort(history.float()).values
    below = torch.searchsorted(ordered, losses.float(), right=False)
    upto = torch.searchsorted(ordered, losses.float(), right=True)
    return ((below + upto).float() / (2 * max(history.numel(), 1))).pow(beta)


def keep_mask(probability: torch.Tensor, uniform: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Bool (B,): u_i < P_i, and the highest loss when nothing else is kept (a step always trains on something)."""
    keep = uniform < probability
    top = torch.zeros_like(keep).index_fill_(0, losses.argmax().reshape(1), True)
    return keep | (top & ~keep.any())


class SelectiveBackprop:
    """Selective Backprop inside your own loop (see the module docstring); holds the loss history."""

    def __init__(self, options: SelectiveBackpropOptions | dict | None = None, **overrides):
        self.options = with_overrides(SelectiveBackpropOptions, options, overrides)
        self.history: torch.Tensor | None = None  # fp32 (up to sb_history,), the newest losses last

    def remember(self, losses: torch.Tensor) -> torch.Tensor:
        """Append ``losses`` (B,) to the history (the oldest fall out); returns the history."""
        r = self.options.sb_history
        new = losses.detach().float()
        if self.history is None:
            self.history = new[-r:]
        else:  # (a history restored from a checkpoint arrives on the CPU: moved once)
            self.history = torch.cat([self.history.to(new.device), new])[-r:]
        return self.history

    def select(self, losses: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Bool (B,) of the samples to train on; ``seed`` (e.g. the step) draws the coins."""
        history = self.remember(losses)
        p = keep_probability(losses, history, self.options.sb_beta)
        return keep_mask(p, seeded_uniform(seed ^ _SALT, losses.shape[0], device=losses.device), losses)

    def state_dict(self) -> dict[str, Any]:
        return {"history": None if self.history is None else self.history.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = state["history"]


class SelectiveBackpropPolicy(SelectionPolicy):
    name = "selective-backprop"
    help = "Selective Backprop: keep each sample with probability (percentile of its loss)^beta"
    options_type = SelectiveBackpropOptions

    def __init__(self, options=None, *, batch_size, config=None):
        super().__init__(options, batch_size=batch_size, config=config)
        self.selector = SelectiveBackprop(self.options)

    def choose(self, scores, y, ctx) -> Choice:
        losses = scores.loss
        keep = self.selector.select(losses, seed=(ctx.seed << 32) + ctx.step)
        kept = keep.sum()
        mean = torch.where(keep, losses, 0).sum() / kept
        return Choice(choice_stats(kept, mean, float("nan")), mask=keep)

    def state_dict(self):
        return self.selector.state_dict()

    def load_state_dict(self, state):
        self.selector.load_state_dict(state)
