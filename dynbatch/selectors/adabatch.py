"""AdaBatch for any PyTorch loop: the batch size and the learning-rate factor of every epoch.

Every ``resize_every`` epochs the batch is multiplied by ``resize_factor`` (2) and the learning rate by
``lr_factor`` (0.75; the published CIFAR runs set this against a 0.375 step decay of the fixed-batch baseline), up
to ``max_batch``. Once the batch is capped a resize can no longer double it, so the learning rate takes the whole
equivalent decay instead, ``lr_factor / resize_factor`` (0.375), keeping the schedule's noise scale on course.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dynbatch.errors import UserError
from dynbatch.selectors.options import from_mapping, option


@dataclass
class AdaBatchOptions:
    resize_every: int = option(20, "epochs between batch-size increases")
    resize_factor: int = option(2, "batch-size multiplier per resize")
    lr_factor: float = option(0.75, "learning-rate multiplier per resize")
    max_batch: int = option(4096, "largest batch size")
    warmup_base: int = option(256, "warm-up target is lr x batch / this")

    def validate(self) -> None:
        """Raise ``UserError`` (a ``ValueError``) naming the first bad option and the fix."""
        for k in ("resize_every", "resize_factor", "max_batch", "warmup_base"):
            if getattr(self, k) < 1:
                raise UserError(f"--{k.replace('_', '-')} must be positive (got {getattr(self, k)}); give a whole "
                                "number of 1 or more")
        if not self.lr_factor > 0:
            raise UserError(f"--lr-factor must be positive (got {self.lr_factor}); e.g. 0.75")


class AdaBatchSchedule:
    """``batch_size(epoch)`` and ``lr_factor(epoch)`` (epochs 0-based) from an initial batch::

        schedule = AdaBatchSchedule(128, resize_every=20)
        for epoch in range(epochs):
            loader = DataLoader(data, batch_size=schedule.batch_size(epoch))
            for g in optimizer.param_groups:
                g["lr"] = base_lr * schedule.lr_factor(epoch)
    """

    def __init__(self, batch_size: int, options: AdaBatchOptions | dict | None = None, **overrides):
        base = dataclasses.asdict(options) if isinstance(options, AdaBatchOptions) else dict(options or {})
        self.options = from_mapping(AdaBatchOptions, {**base, **overrides})
        if batch_size > self.options.max_batch:
            raise UserError(f"--batch-size {batch_size} exceeds --max-batch {self.options.max_batch}; raise "
                            "--max-batch or lower --batch-size")
        self.initial = batch_size

    def resizes(self, epoch: int) -> int:
        return epoch // self.options.resize_every

    def batch_size(self, epoch: int) -> int:
        """Batch size during ``epoch``."""
        o = self.options
        return min(o.max_batch, self.initial * o.resize_factor ** self.resizes(epoch))

    def lr_factor(self, epoch: int) -> float:
        """Learning-rate multiplier from the resizes up to ``epoch`` (warm-up excluded)."""
        o = self.options
        factor = 1.0
        for r in range(1, self.resizes(epoch) + 1):
            grew = self.batch_size(r * o.resize_every) > self.batch_size((r - 1) * o.resize_every)
            factor *= o.lr_factor if grew else o.lr_factor / o.resize_factor
        return factor
