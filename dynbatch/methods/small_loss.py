"""Small-loss selection (Han et al. 2018, "Co-teaching", with one network): train on the (1 - tau(t)) lowest-loss
fraction of each batch, the forget rate tau(t) ramping from 0 to ``forget_rate`` over ``ramp_epochs`` epochs.

Under label noise, the samples a network has not fitted yet are disproportionately the mislabeled ones, early in
training (the memorisation effect); the ramp lets the network learn the easy patterns on the whole batch first.
Co-teaching's schedule is tau(t) = forget_rate x min((t / T_k)^c, 1) at epoch t (0-based here, as the paper's
code), with c = 1 and T_k = 10; the paper sets the forget rate to the noise rate, which a user rarely knows: 0.2
is its symmetric-20 % setting. One network, not two: the peer network's exchange is Co-teaching's other idea.

Own-loop component
------------------
::

    keep = SmallLoss(forget_rate=0.2)
    rows = keep.select(losses, epoch)          # int64 (k,): the k lowest of losses (B,), k = round((1 - tau) B)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dynbatch.methods.scored import Choice, SelectionPolicy, choice_stats
from dynbatch.options import check_fields, option, positive, with_overrides, within


@dataclass
class SmallLossOptions:
    forget_rate: float = option(0.2, "largest share of each batch left out, by highest loss (Co-teaching's tau)",
                                check=within("[0, 1)", lambda v: 0 <= v < 1,
                                             "a rate of 1 would train on nothing; e.g. the noise rate, 0.2"))
    ramp_epochs: int = option(10, "epochs over which the forget rate ramps up from 0 (T_k)",
                              check=positive("give a whole number of 1 or more, e.g. 10"))
    ramp_power: float = option(1.0, "shape of the ramp, (epoch / T_k)^power (c; 1 is linear)",
                               check=positive("e.g. 1"))

    def validate(self) -> None:
        check_fields(self)


def forget_rate_at(epoch: float, opts: SmallLossOptions) -> float:
    """tau(t): the share of the batch left out at (fractional, 0-based) epoch t."""
    return opts.forget_rate * min((max(epoch, 0.0) / opts.ramp_epochs) ** opts.ramp_power, 1.0)


def kept_count(batch: int, tau: float) -> int:
    """How many samples of a batch of ``batch`` are kept at forget rate tau: at least one."""
    return max(1, round((1.0 - tau) * batch))


class SmallLoss:
    """Small-loss selection inside your own loop (see the module docstring)."""

    def __init__(self, options: SmallLossOptions | dict | None = None, **overrides):
        self.options = with_overrides(SmallLossOptions, options, overrides)

    def select(self, losses: torch.Tensor, epoch: float) -> torch.Tensor:
        """Rows int64 (k,) of the k lowest of ``losses`` (B,) at ``epoch``; no host read (k is known)."""
        k = kept_count(losses.shape[0], forget_rate_at(epoch, self.options))
        return torch.topk(losses.detach(), k, largest=False, sorted=False).indices


class SmallLossPolicy(SelectionPolicy):
    name = "small-loss"
    help = "small-loss selection (Co-teaching's schedule, one network): train on the lowest-loss share of each batch"
    options_type = SmallLossOptions

    def __init__(self, options=None, *, batch_size, config=None):
        super().__init__(options, batch_size=batch_size, config=config)
        self.selector = SmallLoss(self.options)

    def choose(self, scores, y, ctx) -> Choice:
        rows = self.selector.select(scores.loss, ctx.epoch)
        kept_losses = scores.loss[rows]
        return Choice(choice_stats(rows.numel(), kept_losses.mean(), kept_losses.max()), rows=rows,
                      record={"forget_rate": forget_rate_at(ctx.epoch, self.options)})
