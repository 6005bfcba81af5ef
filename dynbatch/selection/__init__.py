"""EDBA's selection: per-sample and subset-mean last-layer gradient norms, random subsets, and the subset choice.

See ``dynbatch.selection.functional`` for shapes, backends and routes.
"""
from dynbatch.selection.functional import (
    Selection, margins, per_sample_grad_norms, random_subsets, select_subset, subset_grad_norms,
    subset_scores,
)

__all__ = ["Selection", "margins", "per_sample_grad_norms", "random_subsets", "select_subset", "subset_grad_norms",
           "subset_scores"]
