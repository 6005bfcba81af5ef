"""VGG-16 with batch norm in its CIFAR form: the 13 convolutions of VGG-16 and a single linear classifier."""
from __future__ import annotations

import torch
from torch import nn

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16BN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        layers, cin = [], in_channels
        for v in _VGG16:
            if v == "M":
                # ceil_mode keeps 1x1 feature maps alive, so inputs smaller than 32x32 still work.
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))
