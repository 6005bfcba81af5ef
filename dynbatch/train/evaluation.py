"""Test-split evaluation: centre crops, eval mode, one read from the device at the end."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dynbatch.methods.base import sample_cross_entropy, sample_hits


def tta_logits(model: torch.nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
    """Logits (B, C) of ``model`` on x (B, C, H, W) averaged over test-time views: level 0 the image, 1 the image
    and its mirror, 2 that mean (weight 1/2) and the mean of the mirrored pairs translated by one pixel up-left
    and down-right with reflect padding (1/4 each): airbench's views."""
    def mirrored(v):
        return 0.5 * (model(v) + model(v.flip(-1)))

    if level == 0:
        return model(x)
    logits = mirrored(x)
    if level == 1:
        return logits
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = 0.5 * (mirrored(padded[..., :h, :w]) + mirrored(padded[..., 2:h + 2, 2:w + 2]))
    return 0.5 * logits + 0.5 * shifted


@torch.no_grad()
def evaluate(model: torch.nn.Module, step_model: torch.nn.Module, split, batch: int, channels_last: bool,
             autocast: Callable, tta: int = 0) -> tuple[float, float]:
    """(mean loss, accuracy) of ``step_model`` on ``split`` (a ``DeviceSplit``, or a ``TokenSplit``: the loss
    and accuracy per token, sequences of one length) in batches of ``batch``, with
    test-time augmentation of level ``tta`` (:func:`tta_logits`); ``model`` (the plain module inside it) is put
    in eval mode for the pass and back in train mode after."""
    model.eval()
    device = split.x.device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, correct: read once, at the end
    for start in range(0, len(split), batch):
        x, y = split.batch(torch.arange(start, min(start + batch, len(split)), device=device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = tta_logits(step_model, x, tta).float()
        loss = F.cross_entropy(logits, y, reduction="sum") if y.dim() == 1 else sample_cross_entropy(logits, y).sum()
        sums += torch.stack([loss, sample_hits(logits, y).sum()])
    model.train()
    loss, correct = sums.tolist()
    return loss / len(split), correct / len(split)  # correct: a count, or a sum of token accuracies
