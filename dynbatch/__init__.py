"""dynbatch: training image classifiers with dynamic batch sizes.

Importing this package is cheap: it neither initialises CUDA nor imports Triton nor compiles anything. The
submodules load on first use: ``dynbatch.ops`` (EDBA's last-layer gradient norms), ``dynbatch.baselines``,
``dynbatch.models``, ``dynbatch.data``, ``dynbatch.methods``, ``dynbatch.train``.
"""
from importlib import import_module

__version__ = "0.1.0"

_SUBMODULES = ("baselines", "data", "models", "monitor", "policies", "selection", "train")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return import_module(f"dynbatch.{name}")
    raise AttributeError(f"module 'dynbatch' has no attribute {name!r}")
