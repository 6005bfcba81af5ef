"""The training methods, one module each; a module holds the method's options (one dataclass: types, defaults,
help, validation), its state and pure functions, the component for your own loop, and the adapter that
``dynbatch train --policy NAME`` runs (a :class:`~dynbatch.methods.base.Policy`).

- ``fixed``: one step on the whole batch (the baseline).
- ``split``: online batch-size selection (:func:`choose_split`).
- ``edba``: EDBA (:class:`EDBASelector`, :class:`EDBAState`, :func:`advance`).
- ``adabatch``: AdaBatch (:class:`AdaBatchSchedule`).
- ``importance``: importance sampling (:class:`ImportanceSampler`).
- ``selective_backprop``: Selective Backprop (:class:`SelectiveBackprop`).
- ``small_loss``: small-loss selection (:class:`SmallLoss`).
- ``consensus``: gradient-consensus selection (:class:`ConsensusFilter`).
- ``infobatch``: InfoBatch, per-epoch pruning of low-loss samples, rescaled (:class:`InfoBatch`).
- ``proxy``: proxy filtering, a small network's highest-loss share of each batch (:class:`ProxyFilter`).
- ``token-selection``: language models, a share of the tokens by loss or excess loss (:class:`TokenSelection`).

The four selection methods share ``scored`` (:class:`BatchScorer`, the scoring forward, and the adapter).

Adding a method is adding its module and its name to ``_MODULES``. Imports run one way: CLI -> train -> methods ->
ops -> kernels.
"""
from __future__ import annotations

from importlib import import_module

from dynbatch.errors import UserError
from dynbatch.methods.base import ForwardStep, GradientStep, Plan, Policy, ReuseStep, StepContext, TrainStep

_MODULES = ("fixed", "split", "edba", "adabatch", "importance", "selective_backprop", "small_loss", "consensus",
            "infobatch", "proxy", "token_selection")


def _policies() -> dict[str, type[Policy]]:
    out = {}
    for module in _MODULES:
        m = import_module(f"dynbatch.methods.{module}")
        out.update({obj.name: obj for obj in vars(m).values()
                    if isinstance(obj, type) and issubclass(obj, Policy) and obj is not Policy
                    and obj.__module__ == m.__name__})
    return out


POLICIES: dict[str, type[Policy]] = _policies()


def policy_class(name: str) -> type[Policy]:
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]


_EXPORTS = {
    "EDBASelector": "edba", "EDBAOptions": "edba", "EDBAState": "edba", "advance": "edba",
    "choose_split": "split", "SplitOptions": "split", "KeptForwards": "split",
    "AdaBatchSchedule": "adabatch", "AdaBatchOptions": "adabatch",
    "ImportanceSampler": "importance", "ImportanceOptions": "importance",
    "SelectiveBackprop": "selective_backprop", "SelectiveBackpropOptions": "selective_backprop",
    "SmallLoss": "small_loss", "SmallLossOptions": "small_loss",
    "ConsensusFilter": "consensus", "ConsensusOptions": "consensus",
    "InfoBatch": "infobatch", "InfoBatchOptions": "infobatch",
    "ProxyFilter": "proxy", "ProxyOptions": "proxy",
    "TokenSelection": "token_selection", "TokenSelectionOptions": "token_selection",
    "BatchScorer": "scored",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"dynbatch.methods.{_EXPORTS[name]}"), name)
    if name == "DynamicBatchSampler":  # the data layer's; re-exported beside the components that size it
        from dynbatch.data.sampler import DynamicBatchSampler

        return DynamicBatchSampler
    raise AttributeError(f"module 'dynbatch.methods' has no attribute {name!r}")


__all__ = ["POLICIES", "ForwardStep", "GradientStep", "Plan", "Policy", "ReuseStep", "StepContext", "TrainStep",
           "policy_class", *_EXPORTS, "DynamicBatchSampler"]
