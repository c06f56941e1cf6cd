"""The segmentation decoder."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import UpBlock
from .freezing import FreezableMixin


class UNetDecoder(FreezableMixin):
    """U-Net expanding path: up-sample from the bottleneck, joining the encoder's features level by level.

    Args:
        base_filters: channels of the encoder's first level (must match the encoder).
        depth: number of up-samplings (must match the encoder).
        out_channels: segmentation output channels (1 for a whole-tumour mask as logits).
        norm: normalisation after each convolution, ``"batch"`` or ``"instance"`` (as the encoder's).
    """

    def __init__(self, base_filters: int = 64, depth: int = 4, out_channels: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.frozen = False
        channels = [base_filters * 2**level for level in range(depth + 1)]
        # Deepest level first, so that the loop in forward walks from the bottleneck up.
        self.up = nn.ModuleList(
            UpBlock(channels[level + 1], channels[level], channels[level], norm) for level in reversed(range(depth))
        )
        self.segmentation_head = nn.Conv2d(channels[0], out_channels, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for step, block in enumerate(self.up):
            x = block(x, features[-2 - step])
        return self.segmentation_head(x)
