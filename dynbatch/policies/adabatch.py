"""AdaBatch: the batch size grows on a schedule while the learning rate is adjusted.

The schedule is ``dynbatch.selectors.AdaBatchSchedule``'s (see there for the rule).

With ``--warmup-epochs W > 0`` the learning rate warms up linearly over the first W epochs to
lr x batch / ``--warmup-base`` (256), the linear-scaling rule. The default schedule is ``constant``: AdaBatch
does its own decay. Batches that do not fit are computed in micro-batches (``--micro-batch``, and automatic
halving on CUDA out-of-memory), with the same result as one large step.
"""
from __future__ import annotations

from dynbatch.policies.base import ForwardStep, Plan, Policy, StepContext
from dynbatch.selectors.adabatch import AdaBatchOptions, AdaBatchSchedule


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
