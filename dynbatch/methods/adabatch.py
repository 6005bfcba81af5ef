"""AdaBatch: the batch size grows on a schedule while the learning rate is adjusted.

The schedule is :class:`AdaBatchSchedule`'s, below (the rule is in its own docstring).

With ``--warmup-epochs W > 0`` the learning rate warms up linearly over the first W epochs to
lr x batch / ``--warmup-base`` (256), the linear-scaling rule. The default schedule is ``constant``: AdaBatch
does its own decay. Batches that do not fit are computed in micro-batches (``--micro-batch``, and automatic
halving on CUDA out-of-memory), with the same result as one large step.

Own-loop component
------------------
AdaBatch for any PyTorch loop: the batch size and the learning-rate factor of every epoch.

Every ``resize_every`` epochs the batch is multiplied by ``resize_factor`` (2) and the learning rate by
``lr_factor`` (0.75; the published CIFAR runs set this against a 0.375 step decay of the fixed-batch baseline), up
to ``max_batch``. Once the batch is capped a resize can no longer double it, so the learning rate takes the whole
equivalent decay instead, ``lr_factor / resize_factor`` (0.375), keeping the schedule's noise scale on course.
The factors act on the step's rate in both hyperparameter forms: with ``--hyp-form decoupled`` the lr converted for
the initial batch is the rate a grown batch's step starts from (per example, a 0.375 decay per doubling), not
rescaled to the grown batch, so the method means the same in either form.
"""
from __future__ import annotations

from dataclasses import dataclass

from dynbatch.methods.base import ForwardStep, Plan, Policy, StepContext
from dynbatch.options import OptionError, check_fields, option, positive, with_overrides


_WHOLE = "give a whole number of 1 or more"


@dataclass
class AdaBatchOptions:
    resize_every: int = option(20, "epochs between batch-size increases", check=positive(_WHOLE))
    resize_factor: int = option(2, "batch-size multiplier per resize", check=positive(_WHOLE))
    lr_factor: float = option(0.75, "learning-rate multiplier per resize", check=positive("e.g. 0.75"))
    max_batch: int = option(4096, "largest batch size", check=positive(_WHOLE))
    warmup_base: int = option(256, "warm-up target is lr x batch / this", check=positive(_WHOLE))

    def validate(self) -> None:
        """Raise ``OptionError`` (a ``ValueError``) naming the first bad option and the fix."""
        check_fields(self)


class AdaBatchSchedule:
    """``batch_size(epoch)`` and ``lr_factor(epoch)`` (epochs 0-based) from an initial batch::

        schedule = AdaBatchSchedule(128, resize_every=20)
        for epoch in range(epochs):
            loader = DataLoader(data, batch_size=schedule.batch_size(epoch))
            for g in optimizer.param_groups:
                g["lr"] = base_lr * schedule.lr_factor(epoch)
    """

    def __init__(self, batch_size: int, options: AdaBatchOptions | dict | None = None, **overrides):
        self.options = with_overrides(AdaBatchOptions, options, overrides)
        if batch_size > self.options.max_batch:
            raise OptionError(f"{{batch_size}} {batch_size} exceeds {{max_batch}} {self.options.max_batch}; raise "
                              "{max_batch} or lower {batch_size}")
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


# ---- the trainer adapter -------------------------------------------------------------------------------------
class AdaBatchPolicy(Policy):
    name = "adabatch"
    help = "AdaBatch: multiply the batch size and learning rate by factors every K epochs"
    config_defaults = {"schedule": "constant"}
    options_type = AdaBatchOptions

    def __init__(self, options=None, *, batch_size, config=None):
        super().__init__(options, batch_size=batch_size, config=config)
        self.schedule = AdaBatchSchedule(batch_size, self.options)
        self.epoch = 0

    def batch_size(self) -> int:
        return self.schedule.batch_size(self.epoch)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def lr_factor(self, epoch_progress: float) -> float:
        factor = self.schedule.lr_factor(int(epoch_progress))
        if self.config is not None and self.config.warmup_epochs > 0:
            # The trainer ramps 0 -> 1 over the warm-up; this sets where the ramp ends.
            factor *= self.base_batch_size / self.options.warmup_base
        return factor

    def plan(self, x, y, ctx: StepContext) -> Plan:
        return Plan([ForwardStep(ctx.dist.local(x), ctx.dist.local(y))])

    def state_dict(self):
        return {"epoch": self.epoch}

    def load_state_dict(self, state):
        self.epoch = state["epoch"]
