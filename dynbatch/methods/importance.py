"""Importance sampling (Katharopoulos & Fleuret 2018, "Not All Samples Are Created Equal"): draw a presample of
``presample`` x b, score it, and train on b samples drawn from it with probability p_i proportional to the score,
each loss weighted by 1 / (B p_i) so that the gradient stays an unbiased estimate of the presample's mean.

Scores (``is_score``): ``residual_norm`` ||e_i|| = ||softmax(z_i) - t_i||, the paper's upper bound on the
per-sample gradient norm (its default); ``grad_norm``, the exact last-layer norm ||e_i|| ||a_i||; or ``loss``.

The switch: importance sampling pays only when it reduces the gradient's variance by more than the presample's
forward costs. With the scores' distribution p and the uniform u over the B presampled, the variance reduction
is worth an effective batch increase tau = (1 - ||p - u||^2 / ||p||^2)^(-1/2); the paper samples by importance
while its moving average (``tau_momentum``) exceeds tau_th = (B + 3b) / 3b (a backward costs two forwards), and
uniformly (the first b of the already shuffled presample, weights 1) otherwise, still scoring every presample to
keep tau current. ``tau_threshold`` overrides tau_th.

The loader draws B = presample x b samples per step and b are trained on, so an epoch (a pass of the loader)
trains on a 1/presample share of the data: compare runs by steps, trained samples or time.

Own-loop component
------------------
::

    sampler = ImportanceSampler(train_batch=128)            # draw loader batches of sampler.presample_size
    rows, weight = sampler.choose(scores.residual_norm, seed=step)
    loss = (weight * F.cross_entropy(model(x[rows]), y[rows], reduction="none")).mean()
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dynbatch.methods.scored import Choice, SelectionPolicy, choice_stats
from dynbatch.options import OptionError, check_fields, non_negative, one_of, option, with_overrides, within
from dynbatch.ops import seeded_uniform

_SALT = 0x1A5A  # separates these draws from any other seeded stream of the run


@dataclass
class ImportanceOptions:
    presample: float = option(3.0, "presampled batch as a multiple of the trained batch (B = presample x b)",
                              check=within("[1, 64]", lambda v: 1 <= v <= 64, "e.g. 3"))
    is_score: str = option("residual_norm", "score: residual_norm (the upper bound), grad_norm (exact) or loss",
                           check=one_of("residual_norm", "grad_norm", "loss", hint="residual_norm is the paper's"))
    tau_threshold: float | None = option(None, "sample by importance while the smoothed tau exceeds this "
                                         "(default (B + 3b) / 3b)", check=within("(1, inf)", lambda v: v > 1,
                                                                                  "e.g. 2; leave unset for the cost model"))
    tau_momentum: float = option(0.9, "momentum of tau's moving average",
                                 check=within("[0, 1)", lambda v: 0 <= v < 1, "e.g. 0.9"))
    is_smoothing: float = option(0.0, "added to every score before normalising (evens the distribution)",
                                 check=non_negative("e.g. 0 or 0.1"))

    def validate(self) -> None:
        check_fields(self)


def tau_of(probability: torch.Tensor) -> torch.Tensor:
    """The effective batch increase of sampling by ``probability`` (B,), summing to 1: fp32 0-d, >= 1."""
    u = 1.0 / probability.shape[0]
    ratio = (probability - u).square().sum() / probability.square().sum().clamp_min(1e-30)
    return (1.0 - ratio).clamp_min(1e-12).rsqrt()


def importance_draw(scores: torch.Tensor, count: int, uniform: torch.Tensor,
                    smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows int64 (count,), weights 1 / (B p_i) fp32 (count,), p fp32 (B,)): ``count`` rows drawn with
    replacement with probability p proportional to ``scores`` (B,) + ``smoothing``, by inverting the cumulative
    distribution at ``uniform`` (count,) draws in [0, 1). All-zero scores draw uniformly."""
    s = scores.float().clamp_min(0) + smoothing
    total = s.sum()
    p = torch.where(total > 0, s / total.clamp_min(1e-30), torch.full_like(s, 1.0 / s.shape[0]))
    cdf = torch.cumsum(p, 0)
    rows = torch.searchsorted(cdf, uniform * cdf[-1], right=True).clamp_max(s.shape[0] - 1)
    return rows, 1.0 / (s.shape[0] * p[rows]), p


class ImportanceSampler:
    """Importance sampling inside your own loop (see the module docstring); holds tau's moving average."""

    def __init__(self, train_batch: int, options: ImportanceOptions | dict | None = None, **overrides):
        self.options = o = with_overrides(ImportanceOptions, options, overrides)
        if train_batch < 1:
            raise OptionError(f"{{batch_size}} must be at least 1 (got {train_batch})")
        self.train_batch = train_batch
        self.presample_size = max(train_batch, round(o.presample * train_batch))
        self.threshold = o.tau_threshold or (self.presample_size + 3 * train_batch) / (3 * train_batch)
        self.tau_ema: float | None = None  # None until the first batch is scored

    @property
    def on(self) -> bool:
        """Whether the next batch is sampled by importance (the smoothed tau is above the threshold)."""
        return self.tau_ema is not None and self.tau_ema > self.threshold

    def select(self, scores: torch.Tensor, *, seed: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(rows (b,), weights (b,) or None, tau 0-d) for a presample's ``scores`` (B,): by importance when
        :attr:`on`, else its first b rows. Call :meth:`advance` with tau's value afterwards."""
        b = min(self.train_batch, scores.shape[0])
        if self.on:
            u = seeded_uniform(seed ^ _SALT, b, device=scores.device)
            rows, weight, p = importance_draw(scores, b, u, self.options.is_smoothing)
            return rows, weight, tau_of(p)
        s = scores.float().clamp_min(0) + self.options.is_smoothing
        rows = torch.arange(b, device=scores.device)
        return rows, None, tau_of(s / s.sum().clamp_min(1e-30))

    def choose(self, scores: torch.Tensor, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`select` and :meth:`advance` in one call, for your own loop: (rows (b,), weights (b,), ones when
        sampling uniformly). One host read (tau, which the next step's switch needs)."""
        rows, weight, tau = self.select(scores, seed=seed)
        self.advance(tau.item())
        return rows, torch.ones(rows.shape, device=rows.device) if weight is None else weight

    def advance(self, tau: float) -> None:
        """Fold this step's tau into the moving average (a non-finite tau leaves it)."""
        if math.isfinite(tau):
            m = self.options.tau_momentum
            self.tau_ema = tau if self.tau_ema is None else m * self.tau_ema + (1 - m) * tau

    def state_dict(self) -> dict[str, Any]:
        return {"tau_ema": self.tau_ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau_ema = state["tau_ema"]


class ImportancePolicy(SelectionPolicy):
    name = "importance"
    help = "importance sampling (Katharopoulos & Fleuret): train on b of presample x b drawn by score, reweighted"
    options_type = ImportanceOptions

    def __init__(self, options=None, *, batch_size, config=None):
        super().__init__(options, batch_size=batch_size, config=config)
        self.sampler = ImportanceSampler(batch_size, self.options)

    def batch_size(self) -> int:
        return self.sampler.presample_size

    def choose(self, scores, y, ctx) -> Choice:
        on = self.sampler.on
        s = getattr(scores, self.options.is_score)
        rows, weight, tau = self.sampler.select(s, seed=(ctx.seed << 32) + ctx.step)
        return Choice(choice_stats(rows.numel(), s[rows].mean(), self.sampler.threshold, tau), rows=rows,
                      weight=weight, record={"importance_on": on, "tau_ema": self.sampler.tau_ema})

    def note(self, values, ctx) -> dict[str, Any]:
        self.sampler.advance(values[3])
        return {"tau": values[3]}

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)
