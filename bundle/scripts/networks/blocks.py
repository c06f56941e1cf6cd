"""Building blocks shared by the encoder and the decoder.

The encoder's blocks take the ``domain`` of their batch for their normalisation layers (see ``normalization.py``);
the decoder's use one set of statistics, as it only sees features the encoder has already normalised per domain.
"""

from __future__ import annotations

import torch
from torch import nn

from .normalization import normalization


class DoubleConv(nn.Module):
    """Two 3x3 convolutions, each followed by normalisation and ReLU: the basic U-Net block.

    The convolutions carry no bias because the normalisation that follows each one has its own shift.

    Args:
        in_channels: channels of the input.
        out_channels: channels of both convolutions' outputs.
        norm: ``"batch"`` or ``"instance"`` (see :func:`normalization`).
        num_domains: BatchNorm statistics sets, one per image domain.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch", num_domains: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm1 = normalization(norm, out_channels, num_domains)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = normalization(norm, out_channels, num_domains)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, domain: int = 0) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(x), domain))
        return self.act(self.norm2(self.conv2(x), domain))


class DownBlock(nn.Module):
    """Halve the resolution with a 2x2 max-pool, then a :class:`DoubleConv`.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        norm: ``"batch"`` or ``"instance"``.
        num_domains: BatchNorm statistics sets, one per image domain.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch", num_domains: int = 1) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size=2)
        self.conv = DoubleConv(in_channels, out_channels, norm, num_domains)

    def forward(self, x: torch.Tensor, domain: int = 0) -> torch.Tensor:
        return self.conv(self.pool(x), domain)


class UpBlock(nn.Module):
    """Double the resolution with a transposed convolution, join the encoder's skip features, then a DoubleConv.

    Args:
        in_channels: channels of the coarser input.
        skip_channels: channels of the encoder feature map joined at this level.
        out_channels: channels of the output.
        norm: ``"batch"`` or ``"instance"``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(out_channels + skip_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.upsample(x)
        return self.conv(torch.cat([skip, x], dim=1))
