"""Pre-activation ResNets for CIFAR (He et al., 2016): depth 6n + 2, widths 16/32/64, basic blocks.

``norm="gn"`` swaps BatchNorm for GroupNorm (8 groups): per-sample normalisation, so a step computed in
micro-batches or across DDP ranks equals the one-shot step exactly; it is also what per-sample-gradient libraries
such as Opacus require.
"""
from __future__ import annotations

import torch
from torch import nn


def make_norm(kind: str, c: int) -> nn.Module:
    return nn.BatchNorm2d(c) if kind == "bn" else nn.GroupNorm(8, c)


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str = "bn"):
        super().__init__()
        self.bn1 = make_norm(norm, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = make_norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        # The projection shortcut takes the pre-activated input, as in the reference implementation.
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class PreResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, norm: str = "bn"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("PreResNet depth must be 6n + 2")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        layers, cin = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(n):
                layers.append(PreActBlock(cin, width, stride if b == 0 else 1, norm))
                cin = width
        self.blocks = nn.Sequential(*layers)
        self.bn = make_norm(norm, 64)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv(x))
        x = torch.relu(self.bn(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
