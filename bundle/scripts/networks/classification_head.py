"""The classification head on the encoder's bottleneck."""

from __future__ import annotations

import torch
from torch import nn

from .freezing import FreezableMixin


class ClassificationHead(FreezableMixin):
    """Global average pooling and a two-layer MLP that gives class logits (no softmax).

    Args:
        in_channels: channels of the bottleneck it reads (``base_filters * 2**depth``).
        num_classes: number of classes (2: no tumour, tumour).
        hidden_dim: width of the hidden layer.
        dropout: dropout probability before the last layer.
    """

    def __init__(self, in_channels: int = 1024, num_classes: int = 2, hidden_dim: int = 256, dropout: float = 0.3):
        super().__init__()
        self.frozen = False
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.mlp = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(in_channels, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(bottleneck))
