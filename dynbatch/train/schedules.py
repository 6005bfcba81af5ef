"""Learning-rate schedules as functions of the fractional epoch (so variable batch sizes need no step counts)."""
from __future__ import annotations

import math

from dynbatch.errors import UserError

SCHEDULES = ("constant", "step", "cosine", "triangle")
TRIANGLE = (0.2, 0.23, 0.07)  # airbench94: 0.2 of the peak at the start, the peak at 23 % of the run, 0.07 at the end


def scheduled_lr(
    progress: float, *, base_lr: float, schedule: str, epochs: int, warmup_epochs: float = 0.0,
    milestones: tuple[float, ...] = (), gamma: float = 0.1, triangle: tuple[float, float, float] = TRIANGLE,
) -> float:
    """Learning rate at fractional epoch ``progress`` (0 at the start of training).

    ``step`` multiplies by ``gamma`` at each milestone epoch (default: half and three quarters of the budget);
    ``cosine`` anneals to zero at ``epochs``; ``triangle`` = (start, peak, end) rises linearly from start x lr to
    the peak lr at fraction ``peak`` of the budget, then falls linearly to end x lr at ``epochs`` (one-cycle). Over
    the first ``warmup_epochs`` a linear warm-up multiplies the rate by (progress + 0.001) / ``warmup_epochs``.
    """
    if schedule == "constant":
        lr = base_lr
    elif schedule == "step":
        ms = milestones or (0.5 * epochs, 0.75 * epochs)
        lr = base_lr * gamma ** sum(progress >= m for m in ms)
    elif schedule == "cosine":
        lr = 0.5 * base_lr * (1.0 + math.cos(math.pi * min(progress / max(epochs, 1e-9), 1.0)))
    elif schedule == "triangle":
        start, peak, end = triangle
        x = min(max(progress / max(epochs, 1e-9), 0.0), 1.0)
        lr = base_lr * (start + (1 - start) * x / peak if x < peak else 1 + (end - 1) * (x - peak) / (1 - peak))
    else:
        raise UserError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup_epochs > 0 and progress < warmup_epochs:
        lr *= (progress + 1e-3) / warmup_epochs  # never exactly zero: the first step still moves
    return lr
