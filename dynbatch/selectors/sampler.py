"""A ``torch.utils.data`` batch sampler whose batch size follows a selector, a schedule or any function.

    sampler = DynamicBatchSampler(len(dataset), selector)          # EDBA: selector.batch_size before each batch
    sampler = DynamicBatchSampler(len(dataset), schedule)          # AdaBatch: schedule.batch_size(epoch)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader: ...

The size is asked for just before each batch's indices are drawn. With ``num_workers > 0`` the DataLoader draws
indices ahead (``prefetch_factor`` batches per worker), so a new size takes effect after the batches already in
flight. Each epoch is one pass over a permutation seeded by (seed, epoch), so runs are reproducible.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import Sampler


class DynamicBatchSampler(Sampler[list[int]]):
    """Batches of indices into a data set of ``n`` items; ``batch_size`` is an int, a function of no arguments, or
    an object with a ``batch_size`` attribute (``EDBASelector``) or method of the epoch (``AdaBatchSchedule``)."""

    def __init__(self, n: int, batch_size: int | Callable[[], int] | Any, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        if n < 1:
            raise ValueError(f"the data set is empty (n = {n}); a sampler needs at least one item")
        self.n, self.source, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.epoch = 0
        self.current_size()  # fail here, not inside a DataLoader worker, if the source is unusable

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def current_size(self) -> int:
        s = self.source
        if isinstance(s, int):
            size = s
        elif hasattr(s, "batch_size"):
            size = s.batch_size(self.epoch) if callable(s.batch_size) else s.batch_size
        elif callable(s):
            size = s()
        else:
            raise TypeError(f"batch_size must be an int, a function or have a batch_size; got {type(s).__name__}")
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"batch size must be a positive int (got {size!r})")
        return size

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(self.n)
        pos = 0
        while pos < self.n:
            size = self.current_size()
            if self.drop_last and self.n - pos < size:
                return
            yield order[pos:pos + size].tolist()
            pos += size

    def __len__(self) -> int:
        """Batches in an epoch at the current size (the true count changes when the size does)."""
        size = self.current_size()
        return self.n // size if self.drop_last else math.ceil(self.n / size)
