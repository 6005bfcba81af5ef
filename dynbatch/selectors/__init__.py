"""The three ideas as components for any PyTorch loop, and the batch sampler that feeds them.

- :class:`EDBASelector` (``edba``): which samples of a batch to train on, and the next batch size.
- :func:`choose_split` (``split``): online batch-size selection's choice among chunkings of one batch.
- :class:`AdaBatchSchedule` (``adabatch``): batch size and learning-rate factor per epoch.
- :class:`DynamicBatchSampler` (``sampler``): a ``torch.utils.data`` batch sampler whose batch size follows any
  of them.

The policies of ``dynbatch train`` are thin users of these; imports run one way: CLI and trainer -> policies ->
selectors -> selection -> kernels.
"""
from importlib import import_module

_EXPORTS = {
    "EDBASelector": "edba", "EDBAOptions": "edba", "EDBAState": "edba",
    "choose_split": "split", "SplitOptions": "split",
    "AdaBatchSchedule": "adabatch", "AdaBatchOptions": "adabatch",
    "DynamicBatchSampler": "sampler",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"dynbatch.selectors.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dynbatch.selectors' has no attribute {name!r}")


__all__ = list(_EXPORTS)
