"""Batches of whatever size is asked for at each step: :class:`VariableBatchSampler` (the trainer's, resumable)
and :class:`DynamicBatchSampler`, the same draws as a ``torch.utils.data`` batch sampler for your own loop::

    sampler = DynamicBatchSampler(len(dataset), selector)          # EDBA: selector.batch_size before each batch
    sampler = DynamicBatchSampler(len(dataset), schedule)          # AdaBatch: schedule.batch_size(epoch)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader: ...

The size is asked for just before each batch's indices are drawn. With ``num_workers > 0`` the DataLoader draws
indices ahead (``prefetch_factor`` batches per worker), so a new size takes effect after the batches already in
flight.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import Sampler


class VariableBatchSampler:
    """Index batches over ``n`` samples; an epoch is one pass over a fresh seeded permutation.

    The last batch of an epoch holds what is left (it may be smaller than asked). An epoch may be restricted to
    some of the samples (:meth:`restrict`, InfoBatch's pruning): ``n`` is then that epoch's count. All state lives on
    the CPU and round-trips through :meth:`state_dict`, so a resumed run draws the same batches. The permutation is
    also copied to ``device`` once per epoch and batches are sliced from that copy: a GPU step then moves no indices
    from the host (a copy from pageable memory would wait for the device).
    """

    def __init__(self, n: int, seed: int, device: torch.device | str = "cpu", shuffle: bool = True):
        self.size = n  # the training split's samples; ``n`` is this epoch's
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.shuffle = shuffle
        self.pos = 0
        self._set_perm(self._draw())

    def _draw(self) -> torch.Tensor:
        return torch.randperm(self.size, generator=self.generator) if self.shuffle else torch.arange(self.size)

    def _set_perm(self, perm: torch.Tensor) -> None:
        self.perm = perm
        self._perm_on_device = perm if self.device.type == "cpu" else perm.to(self.device)

    @property
    def n(self) -> int:
        """Samples this epoch draws."""
        return self.perm.numel()

    def restrict(self, keep: torch.Tensor) -> None:
        """Draw this epoch only the samples ``keep`` (bool (size,), CPU) marks, in the order of the permutation
        already drawn: the generator's stream, and so every later epoch's permutation, is the unrestricted one."""
        if self.pos:
            raise RuntimeError("restrict() at an epoch's start only")
        self._set_perm(self.perm[keep[self.perm]])

    @property
    def remaining(self) -> int:
        return self.n - self.pos

    def next(self, batch_size: int) -> torch.Tensor:
        """The next ``min(batch_size, remaining)`` indices (int64, on ``device``)."""
        if self.pos >= self.n:
            raise RuntimeError("epoch exhausted; call new_epoch() first")
        idx = self._perm_on_device[self.pos : self.pos + batch_size]
        self.pos += idx.numel()
        return idx

    @property
    def epoch_done(self) -> bool:
        return self.pos >= self.n

    def new_epoch(self) -> None:
        self._set_perm(self._draw())
        self.pos = 0

    def state_dict(self) -> dict:
        return {"perm": self.perm.clone(), "pos": self.pos, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._set_perm(state["perm"].clone())
        self.pos = int(state["pos"])
        self.generator.set_state(state["generator"])


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
        # Each epoch's permutation is seeded by (seed, epoch), so an epoch can be replayed on its own.
        draws = VariableBatchSampler(self.n, self.seed * 100_003 + self.epoch, shuffle=self.shuffle)
        while not draws.epoch_done:
            size = self.current_size()
            if self.drop_last and draws.remaining < size:
                return
            yield draws.next(size).tolist()

    def __len__(self) -> int:
        """Batches in an epoch at the current size (the true count changes when the size does)."""
        size = self.current_size()
        return self.n // size if self.drop_last else math.ceil(self.n / size)
