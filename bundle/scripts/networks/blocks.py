"""Building blocks shared by the encoder and the decoder."""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("batch", "instance")


def normalization(norm: str, channels: int) -> nn.Module:
    """The normalisation layer after each convolution, with a learnt scale and shift either way.

    Args:
        norm: ``"batch"`` (the seed's BatchNorm: statistics over the batch, running averages at inference) or
            ``"instance"`` (statistics per image and channel, as nnU-Net: nothing is shared between images, so
            batches from different sources, such as skull-stripped FLAIR slices and whole-head JPEGs, do not
            pull each other's statistics).
        channels: channels to normalise.
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by normalisation and ReLU: the basic U-Net block.

    The convolutions carry no bias because the normalisation that follows each one has its own shift.

    Args:
        in_channels: channels of the input.
        out_channels: channels of both convolutions' outputs.
        norm: ``"batch"`` or ``"instance"`` (see :func:`normalization`).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            normalization(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            normalization(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class DownBlock(nn.Sequential):
    """Halve the resolution with a 2x2 max-pool, then a :class:`DoubleConv`.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        norm: ``"batch"`` or ``"instance"``.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__(nn.MaxPool2d(kernel_size=2), DoubleConv(in_channels, out_channels, norm))


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
