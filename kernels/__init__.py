"""Triton kernels for EDBA's last-layer selection, and the pure-torch references they must match.

- ``reference.py``: torch only (importable without Triton); the ground truth for every backend.
- ``subset_rng.py``: the counter-based subset generator as Triton device functions.
- ``residuals.py``: fused softmax residuals and per-sample gradient norms.
- ``subset_norms_direct.py`` / ``subset_norms_gram.py``: squared norms of subset-mean gradients, both routes.
- ``lm_head.py``: a language model's head at vocabulary scale in torch, a chunk at a time (the reference);
  ``lm_head_rows.py``: its Triton kernels (the fused per-token pass, the row kernels of the chunked path).

Nothing here is imported by ``import dynbatch``; the ops of ``dynbatch.ops.library`` load a
kernel module the first time that backend is used.
"""
