"""AlexNet: torchvision's definition (for 224x224 inputs) and a variant sized for 32x32 CIFAR images."""
from __future__ import annotations

import torch
from torch import nn


class TorchvisionAlexNet(nn.Module):
    """torchvision's AlexNet, unchanged but for the input channels.

    Inputs smaller than 63x63 (the least its stride-4 stem and three max-pools accept) are bilinearly upsampled to
    ``min_size`` first; the original split-selection experiment resized CIFAR images to 224x224 on the host instead.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, min_size: int = 224):
        super().__init__()
        from torchvision.models import alexnet

        net = alexnet(weights=None, num_classes=num_classes)
        if in_channels != 3:
            net.features[0] = nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2)
        self.features, self.avgpool, self.classifier = net.features, net.avgpool, net.classifier
        self.min_size = min_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 63:
            x = nn.functional.interpolate(x, size=(self.min_size, self.min_size), mode="bilinear", align_corners=False)
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class AlexNetCifar(nn.Module):
    """The AlexNet commonly used on 32x32 CIFAR images: five 3x3/5x5 convolutions, three max-pools, dropout MLP."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5, 1, 2), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(64, 192, 5, 1, 2), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(192, 384, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, 1, 1), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))  # any input size gives the same head
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(256 * 16, 1024), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(1024, 1024), nn.ReLU(inplace=True),
            nn.Linear(1024, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
