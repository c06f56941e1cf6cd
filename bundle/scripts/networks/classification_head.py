"""The classification head on the encoder's bottleneck."""

from __future__ import annotations

import torch
from torch import nn

from .freezing import FreezableMixin

POOLINGS = ("avg", "avgmax")


class ClassificationHead(FreezableMixin):
    """Global pooling and a two-layer MLP that gives class logits (no softmax).

    Args:
        in_channels: channels of the bottleneck it reads (``base_filters * 2**depth``).
        num_classes: number of classes (2: no tumour, tumour).
        hidden_dim: width of the hidden layer.
        dropout: dropout probability before the last layer.
        pooling: ``"avg"`` (the seed's global average) or ``"avgmax"``: the average and the maximum of each
            channel side by side. A small lesion lights up a few bottleneck positions; the average dilutes it in
            the whole head, the maximum keeps it. ``"avgmax"`` doubles the inputs of the first layer.
    """

    def __init__(
        self,
        in_channels: int = 1024,
        num_classes: int = 2,
        hidden_dim: int = 256,
        dropout: float = 0.3,
        pooling: str = "avg",
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        self.frozen = False
        self.with_max = pooling == "avgmax"
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.mlp = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(in_channels * (2 if self.with_max else 1), hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(bottleneck)
        if self.with_max:
            pooled = torch.cat([pooled, self.max_pool(bottleneck)], dim=1)
        return self.mlp(pooled)
