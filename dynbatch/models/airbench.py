"""The network of airbench94 (Keller Jordan's cifar10-airbench): a 2 x 2 convolution meant to be whitened
(``--whiten``), then three groups of conv -> max-pool -> BatchNorm -> GELU -> conv -> BatchNorm -> GELU (widths 64,
256, 256; ``airbench-proxy``: 32, 64, 64, the proxy of airbench96_faster's data filtering), a 3 x 3 max-pool and
a linear head without bias whose output is scaled by 1/9.

The recipe's other parts are engine options applied to it (see ``dynbatch/recipes/airbench94.json``): dirac
initialisation, BatchNorm momentum, epsilon and frozen weights, whitening, the BatchNorm-bias lr scaler.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ScaledLinear(nn.Linear):
    """``nn.Linear`` whose output is multiplied by ``scale``: still the model's final ``nn.Linear`` (the layer the
    selection methods score), its gradients ``scale`` times those of the unscaled layer."""

    def __init__(self, in_features: int, out_features: int, scale: float, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * self.scale


class ConvGroup(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding="same", bias=False)
        self.norm1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding="same", bias=False)
        self.norm2 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        x = self.conv1(x)
        if min(x.shape[-2:]) >= 2:  # (small images, e.g. 8 x 8, reach 1 x 1 before the last group)
            x = F.max_pool2d(x, 2)
        x = F.gelu(self.norm1(x))
        return F.gelu(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """``widths``: the three groups' channels (airbench94's 64/256/256; airbench96_faster's proxy 32/64/64)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, int, int] = (64, 256, 256),
                 whiten_kernel: int = 2, scale: float = 1 / 9):
        super().__init__()
        whiten_width = 2 * in_channels * whiten_kernel**2
        self.whiten = nn.Conv2d(in_channels, whiten_width, whiten_kernel, padding=0, bias=True)
        self.groups = nn.Sequential(*(ConvGroup(a, b) for a, b in zip((whiten_width, *widths[:-1]), widths)))
        self.head = ScaledLinear(widths[-1], num_classes, scale)
        nn.init.zeros_(self.whiten.bias)

    def forward(self, x):
        x = self.groups(F.gelu(self.whiten(x)))
        return self.head(torch.flatten(F.adaptive_max_pool2d(x, 1), 1))
