"""A sampler that yields batches of whatever size the policy asks for at each step."""
from __future__ import annotations

import torch


class VariableBatchSampler:
    """Index batches over ``n`` samples; an epoch is one pass over a fresh seeded permutation.

    The last batch of an epoch holds what is left (it may be smaller than asked). All state lives on the CPU and
    round-trips through :meth:`state_dict`, so a resumed run draws the same batches. The permutation is also
    copied to ``device`` once per epoch and batches are sliced from that copy: a GPU step then moves no indices
    from the host (a copy from pageable memory would wait for the device).
    """

    def __init__(self, n: int, seed: int, device: torch.device | str = "cpu"):
        self.n = n
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.pos = 0
        self._set_perm(torch.randperm(n, generator=self.generator))

    def _set_perm(self, perm: torch.Tensor) -> None:
        self.perm = perm
        self._perm_on_device = perm if self.device.type == "cpu" else perm.to(self.device)

    @property
    def remaining(self) -> int:
        return self.n - self.pos

    def next(self, batch_size: int) -> torch.Tensor:
        """The next ``min(batch_size, remaining)`` indices (int64, on ``device``)."""
        if self.pos >= self.n:
            raise RuntimeError("epoch exhausted; call new_epoch() first")
        idx = self._perm_on_device[self.pos : self.pos + batch_size]
        self.pos += idx.numel()
        return idx

    @property
    def epoch_done(self) -> bool:
        return self.pos >= self.n

    def new_epoch(self) -> None:
        self._set_perm(torch.randperm(self.n, generator=self.generator))
        self.pos = 0

    def state_dict(self) -> dict:
        return {"perm": self.perm.clone(), "pos": self.pos, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._set_perm(state["perm"].clone())
        self.pos = int(state["pos"])
        self.generator.set_state(state["generator"])
