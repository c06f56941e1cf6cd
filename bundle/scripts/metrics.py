"""Validation metrics for the training stages, as ignite metrics over the output of MONAI's ``SupervisedEvaluator``.

Each metric reads only the batches that carry its task's outputs, so BraTS and Kaggle batches can share one
validation pass. The thorough test-split evaluation (per-patient 3D Dice, HD95, ...) is in ``evaluation.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.metrics import Metric, MetricsLambda
from monai.metrics import compute_dice, compute_roc_auc
from monai.utils import CommonKeys


def dice_from_counts(overlap: float, predicted: float, labelled: float) -> float:
    """Dice from pixel counts; 1 when both masks are empty (a correct "no tumour here")."""
    total = predicted + labelled
    return 1.0 if total == 0 else 2.0 * overlap / total


_PROBABILITIES = "probabilities"


def task_probabilities(output: dict[str, Any]) -> dict[str, Any]:
    """An evaluator's output as probabilities and targets, flat, for the metrics and the evaluation.

    ``output`` is what MONAI's ``SupervisedEvaluator`` holds after a batch: ``pred``, the network's logits by task,
    and ``label``, the targets and sample keys that :class:`scripts.engines.MultiTaskBatch` made of the batch. The
    result has ``seg_prob`` (sigmoid, (B, 1, H, W)) and ``label`` (the mask) for segmentation, ``cls_prob`` (the
    softmax probability of "tumour", (B,)) and ``cls`` for classification, and the sample keys (source, patient,
    slice, ...); a task the batch did not run is absent. Computed once per batch and kept in ``output`` under
    ``probabilities``: every validation metric and the evaluation's collector read the same batch.
    """
    if _PROBABILITIES not in output:
        output[_PROBABILITIES] = _probabilities(output[CommonKeys.PRED], output[CommonKeys.LABEL])
    return output[_PROBABILITIES]


def _probabilities(logits: Mapping[str, Any], targets: Mapping[str, Any]) -> dict[str, Any]:
    result = {key: value for key, value in targets.items() if key not in ("seg", "cls")}
    if "seg" in logits:
        result["seg_prob"] = torch.sigmoid(logits["seg"].float())
        if "seg" in targets:
            result["label"] = targets["seg"]
    if "cls" in logits:
        result["cls_prob"] = torch.softmax(logits["cls"].float(), dim=1)[:, 1]
        if "cls" in targets:
            result["cls"] = targets["cls"]
    return result


class _StepOutputMetric(Metric):
    """A metric fed the evaluator's whole output, as :func:`task_probabilities` (ignite only passes mappings through
    under fixed keys)."""

    def iteration_completed(self, engine: Any) -> None:
        self.update(task_probabilities(engine.state.output))


class SliceDice(_StepOutputMetric):
    """Mean Dice over validation slices, tumour-free slices included.

    A tumour-free slice scores 1 when nothing is predicted and 0 for any false positive (MONAI's default
    ``ignore_empty=True`` would drop those slices and hide false positives on healthy tissue).
    """

    def reset(self) -> None:
        self._sum, self._count = 0.0, 0

    def update(self, output: dict[str, Any]) -> None:
        if "seg_prob" not in output:
            return
        prediction = (output["seg_prob"] >= 0.5).float()
        dice = compute_dice(prediction, output["label"], include_background=True, ignore_empty=False)
        self._sum += float(dice.sum())
        self._count += dice.numel()

    def compute(self) -> float:
        return self._sum / self._count if self._count else math.nan


class PatientDice(_StepOutputMetric):
    """Mean over patients of the Dice of each patient's stacked slices (the per-patient Dice the reports give).

    Every slice's pixels count towards its patient's overlap and sums, so a tumour-free slice weighs by its false
    positives rather than scoring 0 or 1 as a whole: on a few validation patients the slice Dice moves by 0.05-0.15
    between epochs with tumour-free slices flipping, which made it a noisy key metric.
    """

    def reset(self) -> None:
        self._counts: dict[str, list[float]] = {}

    def update(self, output: dict[str, Any]) -> None:
        if "seg_prob" not in output:
            return
        prediction = (output["seg_prob"] >= 0.5).flatten(1).float()
        label = output["label"].flatten(1).float()
        sums = torch.stack([(prediction * label).sum(1), prediction.sum(1), label.sum(1)], dim=1).cpu().tolist()
        for patient, (overlap, predicted, labelled) in zip(output["patient"], sums, strict=True):
            counts = self._counts.setdefault(str(patient), [0.0, 0.0, 0.0])
            counts[0] += overlap
            counts[1] += predicted
            counts[2] += labelled

    def compute(self) -> float:
        if not self._counts:
            return math.nan
        dice = [dice_from_counts(*counts) for counts in self._counts.values()]
        return sum(dice) / len(dice)


class _TumourScores(_StepOutputMetric):
    """Collects tumour probabilities and targets, optionally of one data source only."""

    def __init__(self, source: str | None = None, **kwargs: Any) -> None:
        self.source = source
        super().__init__(**kwargs)

    def reset(self) -> None:
        self._probs: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def update(self, output: dict[str, Any]) -> None:
        if "cls_prob" not in output or "cls" not in output:
            return
        probs, targets = output["cls_prob"].detach().cpu(), output["cls"].detach().cpu()
        if self.source is not None:
            keep = torch.tensor([s == self.source for s in output["source"]], dtype=torch.bool)
            probs, targets = probs[keep], targets[keep]
        self._probs.append(probs)
        self._targets.append(targets)

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._probs:
            return torch.empty(0), torch.empty(0)
        return torch.cat(self._probs), torch.cat(self._targets)


class TumourAUC(_TumourScores):
    """ROC AUC of the tumour probability (NaN when the data hold only one class)."""

    def compute(self) -> float:
        probs, targets = self._gathered()
        if targets.numel() == 0 or targets.unique().numel() < 2:
            return math.nan
        return float(compute_roc_auc(probs, targets))


class TumourAccuracy(_TumourScores):
    """Accuracy of tumour / no-tumour at probability 0.5."""

    def compute(self) -> float:
        probs, targets = self._gathered()
        if targets.numel() == 0:
            return math.nan
        return float(((probs >= 0.5).long() == targets.long()).float().mean())


def _mean_of_defined(*values: float) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def validation_metrics(tasks: Sequence[str], sources: Sequence[str] = ("brats", "kaggle")) -> dict[str, Metric]:
    """The validation metrics of a stage and ``val_score``, the key metric that selects the best checkpoint.

    The classification score is the mean of the AUCs of the sources (an AUC over the pooled sources would let the
    larger source decide, and reward separating the sources rather than tumours). ``val_score`` is the Dice for a
    segmentation stage, the classification score for a classification stage, and the mean of the two when a stage
    trains both. The Dice is the per-patient one (:class:`PatientDice`); ``val_slice_dice`` is the mean over slices.

    Args:
        tasks: the stage's tasks ("seg", "cls").
        sources: data sources that get their own classification metrics.
    """
    metrics: dict[str, Metric] = {}
    parts: list[Metric] = []
    if "seg" in tasks:
        metrics["val_dice"] = PatientDice()
        metrics["val_slice_dice"] = SliceDice()
        parts.append(metrics["val_dice"])
    if "cls" in tasks:
        metrics["val_auc"] = TumourAUC()
        metrics["val_accuracy"] = TumourAccuracy()
        for source in sources:
            metrics[f"val_{source}_auc"] = TumourAUC(source=source)
        parts.append(MetricsLambda(_mean_of_defined, *(metrics[f"val_{source}_auc"] for source in sources)))
    return {"val_score": MetricsLambda(_mean_of_defined, *parts), **metrics}
