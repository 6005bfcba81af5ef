"""Gradient-consensus selection: train on the samples whose last-layer gradient agrees with the rest of the batch.

A sample's consensus is c_i = cos(g_i, G - g_i), G the batch's summed last-layer gradient (``dynbatch.ops``: no
per-sample gradient is materialised). A mislabeled sample pulls the head toward the wrong class, against the
samples that share its image's true class, so its gradient tends to disagree with the batch. The rule follows
AGRA (Sedova et al. 2023: drop a sample whose gradient's cosine with an aggregate gradient is negative), with the
batch itself, leave-one-out, as the aggregate: keep c_i > ``consensus_threshold`` (0), or with
``consensus_keep F`` the top F share of the batch by consensus. At least one sample is always kept (the
highest).

``--by-class`` compares each sample with its own class only (c_i against G_k, the sum over its class): under
pair-flip noise the mislabeled samples of a class agree with each other across the batch, but within their
labelled class they are the minority that agrees least. Rank them with ``consensus_keep``: within one label the
class cosine is never negative when the head's inputs are (ReLU features, every model here), since two residuals
of label c have e_i . e_j = (1 - p_ic)(1 - p_jc) + sum_{k != c} p_ik p_jk >= 0, so threshold 0 keeps every sample
that has another of its label in the batch.

Own-loop component
------------------
::

    keep = ConsensusFilter(by_class=True).select(scores)    # bool (B,), from BatchScorer(model, by_class=True)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dynbatch.methods.scored import Choice, SelectionPolicy, choice_stats
from dynbatch.options import OptionError, check_fields, option, with_overrides, within
from dynbatch.ops import Scores


@dataclass
class ConsensusOptions:
    consensus_threshold: float = option(0.0, "keep samples whose consensus (a cosine) is above this",
                                        check=within("[-1, 1)", lambda v: -1 <= v < 1, "e.g. 0 (AGRA's rule)"))
    consensus_keep: float | None = option(None, "instead keep this top share of each batch by consensus",
                                          check=within("(0, 1]", lambda v: 0 < v <= 1,
                                                       "a share of 0 would train on nothing; e.g. 0.8"))
    by_class: bool = option(False, "score each sample against its own class's summed gradient (never negative "
                                   "on ReLU features: rank with --consensus-keep)")

    def validate(self) -> None:
        check_fields(self)


def consensus_mask(consensus: torch.Tensor, threshold: float, keep: float | None = None) -> torch.Tensor:
    """Bool (B,): consensus (B,) above ``threshold``, or with ``keep`` its top round(keep B) (at least one);
    never empty (the highest is kept when none passes)."""
    b = consensus.shape[0]
    if keep is not None:
        rows = torch.topk(consensus, max(1, round(keep * b))).indices
        return torch.zeros(b, dtype=torch.bool, device=consensus.device).index_fill_(0, rows, True)
    mask = consensus > threshold
    top = torch.zeros_like(mask).index_fill_(0, consensus.argmax().reshape(1), True)
    return mask | (top & ~mask.any())


class ConsensusFilter:
    """Consensus selection inside your own loop (see the module docstring)."""

    def __init__(self, options: ConsensusOptions | dict | None = None, **overrides):
        self.options = with_overrides(ConsensusOptions, options, overrides)

    def score(self, scores: Scores) -> torch.Tensor:
        """The consensus this filter ranks by, fp32 (B,)."""
        if self.options.by_class and "class_consensus" not in scores.names:
            raise OptionError("{by_class} needs the class scores: score with BatchScorer(model, by_class=True)")
        return scores.class_consensus if self.options.by_class else scores.consensus

    def select(self, scores: Scores) -> torch.Tensor:
        """Bool (B,) of the samples to train on."""
        o = self.options
        return consensus_mask(self.score(scores), o.consensus_threshold, o.consensus_keep)


class ConsensusPolicy(SelectionPolicy):
    name = "consensus"
    help = "gradient consensus: train on the samples whose last-layer gradient agrees with the batch (or class)"
    options_type = ConsensusOptions

    def __init__(self, options=None, *, batch_size, config=None):
        super().__init__(options, batch_size=batch_size, config=config)
        self.filter = ConsensusFilter(self.options)

    @property
    def by_class(self) -> bool:
        return self.options.by_class

    def choose(self, scores, y, ctx) -> Choice:
        c = self.filter.score(scores)
        keep = self.filter.select(scores)
        kept = keep.sum()
        o = self.options
        threshold = float("nan") if o.consensus_keep is not None else o.consensus_threshold
        return Choice(choice_stats(kept, torch.where(keep, c, 0).sum() / kept, threshold), mask=keep)
