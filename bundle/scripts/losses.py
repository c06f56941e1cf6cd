"""Losses that combine the tasks, and class weights for the classification loss.

Why not MONAI's ``DiceFocalLoss`` / ``FocalLoss`` alone: they do the scoring here, but ``SupervisedTrainer`` takes
one loss, and a two-output network needs the tasks' terms summed and weighted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from monai.losses import FocalLoss
from torch import nn


class MultiTaskLoss(nn.Module):
    """``L = L_seg + lambda * L_cls`` of one optimizer step, the loss of MONAI's ``SupervisedTrainer``.

    A step is a BraTS batch and the Kaggle batches after it, which the trainer accumulates (``accumulation_steps``)
    before one optimizer update, dividing each batch's loss by their number. Only the BraTS batch carries a mask, so
    its segmentation term is multiplied back: the update follows the gradient of ``L_seg`` plus ``lambda`` times the
    mean classification loss of the step's batches, the seed's ``L = L_seg + lambda * L_cls``, whatever the number
    of Kaggle batches.

    Args:
        seg_loss: loss on segmentation logits and the mask, e.g. MONAI ``DiceFocalLoss(sigmoid=True)``.
        cls_loss: loss on classification logits (B, C) and class indices (B,).
        cls_weight: lambda, the weight of the classification term.
        batches_per_step: the trainer's ``accumulation_steps`` (1 when every batch is its own step).
        carried_batches: the updates a BraTS batch's gradient goes into (``step_every_batch``: its cycle,
            :class:`scripts.handlers.BratsGradientCarry`); its classification term is divided by it, so that its
            slices count once in the cycle's updates, as each Kaggle batch's images do.

    ``forward`` returns the batch's share of the step's loss; its unweighted terms stay in :attr:`terms` (detached)
    for logging.
    """

    def __init__(
        self, seg_loss: nn.Module, cls_loss: nn.Module, cls_weight: float = 1.0, batches_per_step: int = 1,
        carried_batches: int = 1,
    ) -> None:  # fmt: skip
        super().__init__()
        self.seg_loss = seg_loss
        self.cls_loss = cls_loss
        self.cls_weight = float(cls_weight)
        self.batches_per_step = int(batches_per_step)
        self.carried_batches = int(carried_batches)
        self.terms: dict[str, torch.Tensor] = {}

    def forward(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        terms: dict[str, torch.Tensor] = {}
        total = None
        if "seg" in outputs:
            terms["seg_loss"] = self.seg_loss(outputs["seg"].float(), targets["seg"])
            total = self.batches_per_step * terms["seg_loss"]
        if "cls" in outputs:
            terms["cls_loss"] = self.cls_loss(outputs["cls"].float(), targets["cls"])
            weighted = self.cls_weight * terms["cls_loss"]
            total = weighted if total is None else total + weighted / self.carried_batches
        if total is None:
            raise ValueError("MultiTaskLoss got no output to score: the network ran no task.")
        self.terms = {name: value.detach() for name, value in terms.items()}
        return total


class FocalClassificationLoss(nn.Module):
    """MONAI's FocalLoss on (B, C) logits and (B,) class indices, with optional per-class weights."""

    def __init__(self, weight: Iterable[float] | None = None, gamma: float = 2.0) -> None:
        super().__init__()
        self.focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=gamma, weight=weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.focal(logits, target.view(-1, 1))


def classification_loss(kind: str = "focal", weight: Iterable[float] | None = None, gamma: float = 2.0) -> nn.Module:
    """The classification loss by name: ``"focal"`` (MONAI FocalLoss) or ``"ce"`` (cross-entropy), class-weighted."""
    if kind == "focal":
        return FocalClassificationLoss(weight=weight, gamma=gamma)
    if kind == "ce":
        return nn.CrossEntropyLoss(weight=None if weight is None else torch.as_tensor(list(weight), dtype=torch.float))
    raise ValueError(f"Unknown classification loss '{kind}': use 'focal' or 'ce'.")


def class_weights(datasets: Iterable[Any], num_classes: int = 2) -> list[float]:
    """Inverse-frequency class weights of the classification data, normalised to sum to ``num_classes`` (all 1.0
    when classes are balanced).

    Args:
        datasets: the training datasets of the classification data (MONAI datasets, whose ``data`` items carry
            ``cls``), or lists of such items.
        num_classes: number of classes.

    Raises:
        ValueError: a class has no training example (its weight would be infinite).
    """
    labels = [item["cls"] for dataset in datasets for item in getattr(dataset, "data", dataset)]
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).double()
    if counts.numel() > num_classes or (counts == 0).any():
        raise ValueError(f"Class weights need every one of {num_classes} classes in the training data, got {counts}.")
    weights = counts.sum() / (num_classes * counts)
    return (weights * num_classes / weights.sum()).tolist()
