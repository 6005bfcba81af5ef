"""Forwards that must leave the model exactly as they found it (candidate and selection forwards)."""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def preserved_buffers(model: nn.Module):
    """Restore every buffer (BatchNorm running statistics, counters, ...) on exit.

    Keeping train-mode behaviour (batch statistics, dropout) while undoing the running-statistics update is what
    selection forwards need: their losses are those of a training forward, but they must not count as one.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        for b, v in saved:
            b.data.copy_(v)
