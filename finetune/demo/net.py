"""DemoNet: the base architecture of the demo (model A), a small ResNet-style CNN for 32x32 images."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DemoNet(nn.Module):
    def __init__(self, num_classes: int = 8, width: int = 16):
        super().__init__()
        self.stem = conv_bn(3, width)
        self.layer1 = nn.Sequential(conv_bn(width, width), conv_bn(width, width))
        self.layer2 = nn.Sequential(conv_bn(width, 2 * width, stride=2), conv_bn(2 * width, 2 * width))
        self.layer3 = nn.Sequential(conv_bn(2 * width, 4 * width, stride=2), conv_bn(4 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
