"""A *protocol reading*, not a practice to copy: the training subset redrawn from the whole training split at epoch
boundaries (``--redraw-subset``), as the EDBA authors' shared training template would do.

That template (``Tensor-Reloaded/Pytorch-Template``, commit 2def2f7) draws its training subset with
``np.random.choice`` over the whole training set each time the loader is built, and rebuilds the loader whenever
the optimizer returns a new batch size; a batch-adapting method then sees a fresh subset after every resize while
a fixed-batch baseline keeps its first one. ``on-resize`` reproduces that (a new subset at an epoch boundary where
the policy's batch size differs from the previous boundary's); ``every-epoch`` is the upper bound of the effect.
Every epoch row of such a run records ``distinct_train_images``: how many different images it has trained on.
"""
from __future__ import annotations

import numpy as np
import torch

from dynbatch.data import balanced_subset

MODES = ("never", "on-resize", "every-epoch")
SALT = 7919  # the subset of epoch e is drawn with seed + SALT * e: reproducible, different from the first


class SubsetRedraw:
    """When to redraw, which subset, and which images have been used; its state goes into the checkpoint."""

    def __init__(self, mode: str, pool_labels: np.ndarray, first: np.ndarray, seed: int):
        self.mode, self.labels, self.seed = mode, pool_labels, seed
        self.indices = first
        self.seen = np.zeros(len(pool_labels), dtype=bool)
        self.seen[first] = True
        self.mark: int | None = None  # the policy's batch size at the previous epoch boundary

    def at_epoch_start(self, epoch: int, batch_size: int) -> np.ndarray | None:
        """The new subset's indices (into the training split) if this boundary redraws, else None."""
        mark, self.mark = self.mark, batch_size
        if epoch == 0 or self.mode == "never":
            return None
        if self.mode == "on-resize" and (mark is None or mark == batch_size):
            return None
        self.indices = balanced_subset(self.labels, len(self.indices), self.seed + SALT * epoch)
        self.seen[self.indices] = True
        return self.indices

    @property
    def distinct(self) -> int:
        return int(self.seen.sum())

    def state_dict(self) -> dict:
        return {"indices": torch.from_numpy(self.indices.astype(np.int64)), "seen": torch.from_numpy(self.seen),
                "mark": self.mark}

    def load_state_dict(self, s: dict) -> None:
        self.indices, self.seen, self.mark = s["indices"].numpy(), s["seen"].numpy().astype(bool), s["mark"]
