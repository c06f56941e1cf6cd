"""The validation metrics that select each stage's best checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine
from sklearn.metrics import roc_auc_score

from scripts.metrics import validation_metrics


def _batch(source: str, probs: list[float], targets: list[int], dice_perfect: bool | None = None) -> dict:
    out = {"source": [source] * len(probs), "cls_prob": torch.tensor(probs), "cls": torch.tensor(targets)}
    if dice_perfect is not None:
        label = torch.zeros(len(probs), 1, 4, 4)
        label[:, :, :2] = 1
        out["label"] = label
        out["seg_prob"] = label.clone() if dice_perfect else 1 - label
        out["patient"] = [f"P{index}" for index in range(len(probs))]
    return out


def _evaluator_output(flat: dict) -> dict:
    """What MONAI's SupervisedEvaluator holds after a batch whose probabilities and targets are ``flat``: the
    network's logits by task under ``pred``, MultiTaskBatch's targets and sample keys under ``label``."""
    logits, targets = {}, {key: value for key, value in flat.items() if key not in ("seg_prob", "cls_prob")}
    if "seg_prob" in flat:
        logits["seg"] = torch.logit(flat["seg_prob"])
        targets["seg"] = targets.pop("label")
    if "cls_prob" in flat:
        logits["cls"] = torch.stack([torch.zeros(len(flat["cls_prob"])), torch.logit(flat["cls_prob"])], dim=1)
    return {"image": None, "label": targets, "pred": logits}


def _run(tasks: list[str], batches: list[dict]) -> dict[str, float]:
    engine = Engine(lambda engine, batch: _evaluator_output(batch))
    for name, metric in validation_metrics(tasks).items():
        metric.attach(engine, name)
    return engine.run(batches, max_epochs=1).metrics


def test_the_classification_score_is_the_mean_of_the_sources_aucs_not_the_pooled_auc() -> None:
    brats = ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])  # separable
    kaggle = ([0.6, 0.7, 0.65, 0.75], [0, 1, 1, 0])  # poor, and higher than every BraTS probability
    metrics = _run(["cls"], [_batch("brats", *brats), _batch("kaggle", *kaggle)])
    assert metrics["val_brats_auc"] == pytest.approx(roc_auc_score(brats[1], brats[0]))
    assert metrics["val_kaggle_auc"] == pytest.approx(roc_auc_score(kaggle[1], kaggle[0]))
    assert metrics["val_auc"] == pytest.approx(roc_auc_score(brats[1] + kaggle[1], brats[0] + kaggle[0]))
    assert metrics["val_score"] == pytest.approx((metrics["val_brats_auc"] + metrics["val_kaggle_auc"]) / 2)
    assert metrics["val_score"] != pytest.approx(metrics["val_auc"])


def test_a_joint_stage_scores_the_mean_of_dice_and_classification() -> None:
    metrics = _run(["seg", "cls"], [_batch("brats", [0.1, 0.9], [0, 1], dice_perfect=True),
                                    _batch("kaggle", [0.2, 0.4, 0.6], [0, 1, 0])])  # fmt: skip
    assert metrics["val_dice"] == pytest.approx(1.0)
    classification = (1.0 + roc_auc_score([0, 1, 0], [0.2, 0.4, 0.6])) / 2
    assert metrics["val_score"] == pytest.approx((1.0 + classification) / 2)


def test_a_source_without_both_classes_is_left_out_of_the_score() -> None:
    metrics = _run(["cls"], [_batch("brats", [0.1, 0.9], [0, 1]), _batch("kaggle", [0.3, 0.4], [1, 1])])
    assert math.isnan(metrics["val_kaggle_auc"])
    assert metrics["val_score"] == pytest.approx(metrics["val_brats_auc"]) == pytest.approx(1.0)


def test_the_dice_is_per_patient_over_its_stacked_slices_and_the_slice_dice_is_kept() -> None:
    # Patient A: a tumour slice with 4 of 8 tumour pixels found, and a tumour-free slice with 2 false positives:
    # per patient 2*4 / (6 + 8) = 0.571; per slice (2*4 / 12 = 0.667 and 0) / 2. Patient B: nothing, nothing: 1.
    label = torch.zeros(3, 1, 4, 4)
    label[0, 0, :2] = 1
    prediction = torch.zeros(3, 1, 4, 4)
    prediction[0, 0, 0] = 1
    prediction[1, 0, 3, :2] = 1
    batch = {"seg_prob": prediction * 0.9, "label": label, "patient": ["A", "A", "B"], "source": ["brats"] * 3}
    metrics = _run(["seg"], [batch])
    assert metrics["val_dice"] == pytest.approx((8 / 14 + 1.0) / 2)
    assert metrics["val_slice_dice"] == pytest.approx((8 / 12 + 0.0 + 1.0) / 3)
    assert metrics["val_score"] == pytest.approx(metrics["val_dice"])
    # Split over two batches, a patient's slices add up to the same Dice.
    halves = [{key: value[:1] for key, value in batch.items()}, {key: value[1:] for key, value in batch.items()}]
    assert _run(["seg"], halves)["val_dice"] == pytest.approx(metrics["val_dice"])
