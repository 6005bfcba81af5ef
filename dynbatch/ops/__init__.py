"""The last-layer ops for your own code: per-sample and subset gradient norms, random subsets, EDBA's subset choice,
each sample's scores against its batch; a language model's head at vocabulary scale (``lm_head``: per-token and
per-sequence scores, the fused linear cross-entropy).

Shapes: logits (B, C) and features (B, D) in fp32, bf16 or fp16; targets (B,) integer class indices; masks
(N, B) bool. Results are fp32 whatever the input dtype. One module per op (``norms``, ``subset_sums``,
``selection``, ``per_sample_scores``): its schema, fake, registrations and public wrapper together; ``library``
what they share. Backends: the dispatcher picks the device's own kernel (the native extension on CPU, Triton on
CUDA, the torch reference elsewhere); :func:`using_backend` makes it pick another for a block of code.
"""
from __future__ import annotations

from dynbatch.ops import native
from dynbatch.ops.library import BACKENDS, backend_status, resolve_backend, triton_status, using_backend
from dynbatch.ops.lm_head import (LMHeadScores, Sequences, linear_cross_entropy, lm_head_scores,
                                  sequence_scores)
from dynbatch.ops.norms import per_sample_grad_norms
from dynbatch.ops.per_sample_scores import SCORES, Scores, sample_scores
from dynbatch.ops.selection import MAX_SUBSETS, Selection, SubsetSpec, margins, select_subset, subset_scores
from dynbatch.ops.subset_sums import random_subsets, seeded_uniform, subset_grad_norms

__all__ = ["BACKENDS", "LMHeadScores", "MAX_SUBSETS", "SCORES", "Scores", "Selection", "Sequences", "SubsetSpec",
           "backend_status", "linear_cross_entropy", "lm_head_scores", "margins", "native", "per_sample_grad_norms",
           "random_subsets", "resolve_backend", "sample_scores", "seeded_uniform", "select_subset",
           "sequence_scores", "subset_grad_norms", "subset_scores", "triton_status", "using_backend"]
