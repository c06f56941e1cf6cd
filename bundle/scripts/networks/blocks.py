"""Building blocks shared by the encoder and the decoder."""

from __future__ import annotations

import torch
from torch import nn


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by BatchNorm and ReLU: the basic U-Net block.

    The convolutions carry no bias because the BatchNorm that follows each one has its own shift.

    Args:
        in_channels: channels of the input.
        out_channels: channels of both convolutions' outputs.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DownBlock(nn.Sequential):
    """Halve the resolution with a 2x2 max-pool, then a :class:`DoubleConv`.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(kernel_size=2), DoubleConv(in_channels, out_channels))


class UpBlock(nn.Module):
    """Double the resolution with a transposed convolution, join the encoder's skip features, then a DoubleConv.

    Args:
        in_channels: channels of the coarser input.
        skip_channels: channels of the encoder feature map joined at this level.
        out_channels: channels of the output.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(out_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.upsample(x)
        return self.conv(torch.cat([skip, x], dim=1))
