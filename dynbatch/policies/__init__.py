"""Batch-size policies by name. A new policy subclasses :class:`Policy` and registers here; the orchestrator
needs no change."""
from __future__ import annotations

from dynbatch.errors import UserError
from dynbatch.policies.adabatch import AdaBatchPolicy
from dynbatch.policies.base import ForwardStep, GradientStep, Plan, Policy, ReuseStep, StepContext, TrainStep
from dynbatch.policies.edba import EDBAPolicy
from dynbatch.policies.fixed import FixedPolicy
from dynbatch.policies.split import SplitPolicy

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (FixedPolicy, SplitPolicy, EDBAPolicy, AdaBatchPolicy)}


def policy_class(name: str) -> type[Policy]:
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]


__all__ = ["POLICIES", "ForwardStep", "GradientStep", "Plan", "Policy", "ReuseStep", "StepContext", "TrainStep",
           "policy_class"]
