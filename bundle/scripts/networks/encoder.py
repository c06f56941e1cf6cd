"""The shared U-Net encoder."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import DoubleConv, DownBlock
from .freezing import FreezableMixin


class UNetEncoder(FreezableMixin):
    """U-Net contracting path that returns the feature map of every level.

    At the defaults and a 1x256x256 input the features are
    ``[x0 (64x256x256), x1 (128x128x128), x2 (256x64x64), x3 (512x32x32), bottleneck (1024x16x16)]``.

    Args:
        in_channels: input channels: 1 for FLAIR alone, 4 for all BraTS modalities.
        base_filters: channels of the first level; each level below doubles them.
        depth: number of 2x down-samplings; the input's height and width must be divisible by ``2**depth``.
        norm: normalisation after each convolution, ``"batch"`` (the seed's) or ``"instance"``.
        num_domains: BatchNorm running-statistics sets, one per image domain (1: the seed's single set; see
            ``normalization.py``).
    """

    def __init__(
        self, in_channels: int = 1, base_filters: int = 64, depth: int = 4, norm: str = "batch", num_domains: int = 1
    ) -> None:
        super().__init__()
        if in_channels < 1 or base_filters < 1 or depth < 1:
            raise ValueError(
                f"in_channels, base_filters and depth must be positive, got {in_channels}, {base_filters}, {depth}."
            )
        self.frozen = False
        self.in_channels = in_channels
        self.depth = depth
        self.size_divisor = 2**depth
        self.out_channels = [base_filters * 2**level for level in range(depth + 1)]
        self.stem = DoubleConv(in_channels, self.out_channels[0], norm, num_domains)
        self.down = nn.ModuleList(
            DownBlock(self.out_channels[level], self.out_channels[level + 1], norm, num_domains)
            for level in range(depth)
        )

    def forward(self, x: torch.Tensor, domain: int = 0) -> list[torch.Tensor]:
        height, width = x.shape[-2], x.shape[-1]
        if height % self.size_divisor != 0 or width % self.size_divisor != 0:
            raise ValueError(
                f"Input height and width must be divisible by 2**depth = {self.size_divisor}, "
                f"got {height}x{width}; resize or pad the image first."
            )
        features = [self.stem(x, domain)]
        for block in self.down:
            features.append(block(features[-1], domain))
        return features
