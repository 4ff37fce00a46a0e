"""Modules commonly added to a pretrained base with `model.add`."""

from __future__ import annotations

import torch
from torch import nn


class Adapter(nn.Module):
    """Residual bottleneck adapter (Houlsby et al.) for feature maps `[N, C, H, W]` or tokens `[..., C]`.

    `x + up(act(down(x)))`. The up-projection starts small (`init_scale`), not zero, so the block
    begins close to the identity while every weight still receives a gradient on the first step
    (with an exactly-zero up-projection, `down` gets no gradient until `up` has moved).
    """

    def __init__(self, channels: int, reduction: int = 4, init_scale: float = 1e-2, spatial: bool = True):
        super().__init__()
        hidden = max(1, channels // reduction)
        if spatial:
            self.down = nn.Conv2d(channels, hidden, kernel_size=1)
            self.up = nn.Conv2d(hidden, channels, kernel_size=1)
        else:
            self.down = nn.Linear(channels, hidden)
            self.up = nn.Linear(hidden, channels)
        self.act = nn.GELU()
        self.init_scale = init_scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.down.reset_parameters()
        self.up.reset_parameters()
        with torch.no_grad():
            self.up.weight.mul_(self.init_scale)
            self.up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class ConvBlock(nn.Module):
    """conv3x3 → BatchNorm → ReLU, with a residual connection when shapes allow: an extra block."""

    def __init__(self, in_channels: int, out_channels: int | None = None, stride: int = 1):
        super().__init__()
        out_channels = out_channels or in_channels
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        return x + y if self.residual else y
