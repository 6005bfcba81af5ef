"""Triton kernels for EDBA's last-layer selection, and the pure-torch references they must match.

- ``reference.py``: torch only (importable without Triton); the ground truth for every backend.
- ``subset_rng.py``: the counter-based subset generator as Triton device functions.
- ``residuals.py``: fused softmax residuals and per-sample gradient norms.
- ``subset_norms_direct.py`` / ``subset_norms_gram.py``: squared norms of subset-mean gradients, both routes.

Nothing here is imported by ``import dynbatch``; the ops of ``dynbatch.ops.library`` load a
kernel module the first time that backend is used.
"""
