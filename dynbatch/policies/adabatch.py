"""AdaBatch: the batch size grows on a schedule while the learning rate is adjusted.

Every ``--resize-every`` epochs the batch is multiplied by ``--resize-factor`` (2) and the learning rate by
``--lr-factor`` (0.75; the published CIFAR runs set this against a 0.375 step decay for the fixed-batch
baseline), up to ``--max-batch``. Once the batch is capped a resize can no longer double it, so the learning rate
takes the whole equivalent decay instead, ``lr-factor / resize-factor`` (0.375), keeping the schedule's effective
noise scale on the same course.

With ``--warmup-epochs W > 0`` the learning rate warms up linearly over the first W epochs to
lr x batch / ``--warmup-base`` (256), the linear-scaling rule. The default schedule is ``constant``: AdaBatch
does its own decay. Batches that do not fit are computed in micro-batches (``--micro-batch``, and automatic
halving on CUDA out-of-memory), with the same result as one large step.
"""
from __future__ import annotations

from dynbatch.errors import UserError
from dynbatch.policies.base import Plan, Policy, StepContext, TrainStep


class AdaBatchPolicy(Policy):
    name = "adabatch"
    help = "AdaBatch: multiply the batch size and learning rate by factors every K epochs"
    config_defaults = {"schedule": "constant"}

    @classmethod
    def add_arguments(cls, g):
        g.add_argument("--resize-every", type=int, default=20, help="epochs between batch-size increases")
        g.add_argument("--resize-factor", type=int, default=2, help="batch-size multiplier per resize")
        g.add_argument("--lr-factor", type=float, default=0.75, help="learning-rate multiplier per resize")
        g.add_argument("--max-batch", type=int, default=4096, help="largest batch size")
        g.add_argument("--warmup-base", type=int, default=256, help="warm-up target is lr x batch / this")

    @classmethod
    def validate(cls, o):
        for k in ("resize_every", "resize_factor", "max_batch", "warmup_base"):
            if o[k] < 1:
                raise UserError(f"--{k.replace('_', '-')} must be positive (got {o[k]}); give a whole number of 1 or more")
        if o["lr_factor"] <= 0:
            raise UserError(f"--lr-factor must be positive (got {o['lr_factor']}); e.g. 0.75")

    def __init__(self, options, *, batch_size, config=None):
        super().__init__(options, batch_size=batch_size, config=config)
        if batch_size > options["max_batch"]:
            raise UserError(f"--batch-size {batch_size} exceeds --max-batch {options['max_batch']}; raise --max-batch or lower --batch-size")
        self.epoch = 0

    def resizes(self, epoch: int) -> int:
        return epoch // self.options["resize_every"]

    def batch_at(self, epoch: int) -> int:
        """Batch size during ``epoch`` (0-based)."""
        o = self.options
        return min(o["max_batch"], self.base_batch_size * o["resize_factor"] ** self.resizes(epoch))

    def lr_at(self, epoch: int) -> float:
        """Learning-rate multiplier from the resizes up to ``epoch`` (warm-up excluded)."""
        o = self.options
        factor = 1.0
        for r in range(1, self.resizes(epoch) + 1):
            grew = self.batch_at(r * o["resize_every"]) > self.batch_at((r - 1) * o["resize_every"])
            factor *= o["lr_factor"] if grew else o["lr_factor"] / o["resize_factor"]
        return factor

    def batch_size(self) -> int:
        return self.batch_at(self.epoch)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def lr_factor(self, epoch_progress: float) -> float:
        factor = self.lr_at(int(epoch_progress))
        if self.config is not None and self.config.warmup_epochs > 0:
            # The trainer ramps 0 -> 1 over the warm-up; this sets where the ramp ends.
            factor *= self.base_batch_size / self.options["warmup_base"]
        return factor

    def plan(self, x, y, ctx: StepContext) -> Plan:
        return Plan([TrainStep(ctx.dist.local(x), ctx.dist.local(y))])

    def state_dict(self):
        return {"epoch": self.epoch}

    def load_state_dict(self, state):
        self.epoch = state["epoch"]
