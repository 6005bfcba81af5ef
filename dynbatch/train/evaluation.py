"""Test-split evaluation: centre crops, eval mode, one read from the device at the end."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model: torch.nn.Module, step_model: torch.nn.Module, split, batch: int, channels_last: bool,
             autocast: Callable) -> tuple[float, float]:
    """(mean loss, accuracy) of ``step_model`` on ``split`` (a ``DeviceSplit``) in batches of ``batch``; ``model``
    (the plain module inside it) is put in eval mode for the pass and back in train mode after."""
    model.eval()
    device = split.x.device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, correct: read once, at the end
    for start in range(0, len(split), batch):
        x, y = split.batch(torch.arange(start, min(start + batch, len(split)), device=device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = step_model(x).float()
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()])
    model.train()
    loss, correct = sums.tolist()
    return loss / len(split), int(correct) / len(split)
