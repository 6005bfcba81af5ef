"""Lookahead as airbench uses it: a slow copy of the weights (and of the BatchNorm statistics) that every ``every``
steps moves toward the fast ones and is copied back into the model.

At a pull, slow <- rho slow + (1 - rho) fast, then fast <- slow, with rho = decay^every x progress^power
(progress: the fraction of training done, 0..1): the model moves fast early and averages strongly late. The slow
copy starts at the first pull after ``start`` epochs (that pull only takes the copy), and at every epoch's end the
slow weights are copied into the model (so evaluation and checkpoints see them). Zhang et al.'s Lookahead is the
case rho = 1 - alpha, constant.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Lookahead:
    def __init__(self, model: nn.Module, *, every: int, decay: float, power: float, start: float):
        self.model, self.every, self.decay, self.power, self.start = model, every, decay, power, start
        self.slow: list[torch.Tensor] | None = None

    def _fast(self) -> list[torch.Tensor]:
        """The model's floating-point state, in ``state_dict`` order (parameters and running statistics)."""
        return [t for t in self.model.state_dict().values() if t.is_floating_point()]

    def after_step(self, step: int, epoch: float, progress: float) -> None:
        """After optimizer step number ``step`` (1-based over the run) at fractional epoch ``epoch``, with
        ``progress`` the fraction of training done."""
        if epoch < self.start or step % self.every:
            return
        fast = self._fast()
        if self.slow is None:
            self.slow = [t.detach().clone() for t in fast]
            return
        rho = self.decay ** self.every * min(max(progress, 0.0), 1.0) ** self.power
        with torch.no_grad():
            torch._foreach_lerp_(self.slow, fast, 1.0 - rho)
            torch._foreach_copy_(fast, self.slow)

    def end_epoch(self) -> None:
        """The slow weights into the model, for evaluation and the checkpoint."""
        if self.slow is not None:
            with torch.no_grad():
                torch._foreach_copy_(self._fast(), self.slow)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": None if self.slow is None else [t.clone() for t in self.slow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        slow = state.get("slow")
        device = next(iter(self.model.parameters())).device
        self.slow = None if slow is None else [t.to(device) for t in slow]
