"""A sampler that yields batches of whatever size the policy asks for at each step."""
from __future__ import annotations

import torch


class VariableBatchSampler:
    """Index batches over ``n`` samples; an epoch is one pass over a fresh seeded permutation.

    The last batch of an epoch holds what is left (it may be smaller than asked). All state lives on the CPU and
    round-trips through :meth:`state_dict`, so a resumed run draws the same batches.
    """

    def __init__(self, n: int, seed: int):
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.generator)
        self.pos = 0

    @property
    def remaining(self) -> int:
        return self.n - self.pos

    def next(self, batch_size: int) -> torch.Tensor:
        """The next ``min(batch_size, remaining)`` indices (int64, CPU)."""
        if self.pos >= self.n:
            raise RuntimeError("epoch exhausted; call new_epoch() first")
        idx = self.perm[self.pos : self.pos + batch_size]
        self.pos += idx.numel()
        return idx

    @property
    def epoch_done(self) -> bool:
        return self.pos >= self.n

    def new_epoch(self) -> None:
        self.perm = torch.randperm(self.n, generator=self.generator)
        self.pos = 0

    def state_dict(self) -> dict:
        return {"perm": self.perm.clone(), "pos": self.pos, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.pos = state["perm"].clone(), int(state["pos"])
        self.generator.set_state(state["generator"])
