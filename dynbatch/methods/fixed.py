"""The baseline: one optimizer step on the whole loader batch."""
from __future__ import annotations

from dynbatch.methods.base import ForwardStep, Plan, Policy, StepContext


class FixedPolicy(Policy):
    name = "fixed"
    help = "one step on the whole batch of --batch-size samples"

    def plan(self, x, y, ctx: StepContext) -> Plan:
        return Plan([ForwardStep(ctx.dist.local(x), ctx.dist.local(y))])
