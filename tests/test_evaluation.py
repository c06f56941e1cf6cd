"""Test-split evaluation: hand-built cases with known answers, scored with the real MONAI and scikit-learn."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.metrics import DiceMetric, compute_dice, compute_hausdorff_distance
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from scripts.data.slices import extract_slices, slices_to_volume
from scripts.data.volumes import find_cases, load_case
from scripts.errors import UsageError
from scripts.evaluation import (
    EvaluationRecords,
    PatientScore,
    PredictionCollector,
    SliceMasks,
    classification_metrics,
    compute_metrics,
    patient_hd95,
    patient_volumes,
    prepared_spacing,
    require_raw_cases,
    score_patients,
    write_json_atomic,
    write_results,
)

SIZE = 16


def mask(*boxes: tuple[int, int, int, int], size: int = SIZE) -> np.ndarray:
    """``(1, size, size)`` uint8 mask, 1 inside each ``(row0, row1, col0, col1)`` box."""
    out = np.zeros((1, size, size), dtype=np.uint8)
    for row0, row1, col0, col1 in boxes:
        out[0, row0:row1, col0:col1] = 1
    return out


EMPTY = mask()


def brats_records(slices: list[tuple[str, int, np.ndarray, np.ndarray]]) -> EvaluationRecords:
    """Records of BraTS slices given as (patient, z, predicted mask, label); classification from the label."""
    records = EvaluationRecords()
    for patient, z, pred, label in slices:
        records.add_brats_slice(patient, z, pred.astype(np.float32), label, cls_prob=0.5, cls=int(label.any()))
    return records


def assert_same_metrics(first: dict[str, float], second: dict[str, float]) -> None:
    assert first.keys() == second.keys()
    for key in first:
        a, b = first[key], second[key]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b), key


# ----------------------------------------------------------------------------------------------------------------------
# Segmentation


def test_slice_masks_round_trip_and_stay_small() -> None:
    pred, label = mask((2, 5, 3, 9)), mask((4, 8, 6, 12))
    packed = SliceMasks.from_masks("p", 7, pred, label)
    np.testing.assert_array_equal(packed.pred(), pred[0].astype(bool))
    np.testing.assert_array_equal(packed.label(), label[0].astype(bool))
    assert (packed.pred_pixels, packed.label_pixels, packed.overlap) == (18, 24, 3)
    empty = SliceMasks.from_masks("p", 8, EMPTY, EMPTY)
    assert empty.pred_bits.nbytes == 0 and empty.label_bits.nbytes == 0
    assert not empty.pred().any() and empty.dice == 1.0


def test_patient_dice_is_over_the_whole_volume() -> None:
    # overlap 2 + 0 + 0, predicted 4 + 0 + 3, ground truth 4 + 6 + 0: Dice = 2*2 / (7 + 10) = 4/17.
    slices = [
        ("p1", 10, mask((0, 2, 0, 2)), mask((1, 3, 0, 2))),
        ("p1", 11, EMPTY, mask((5, 7, 5, 8))),
        ("p1", 12, mask((9, 10, 0, 3)), EMPTY),
    ]
    records = brats_records(slices)
    metrics, per_patient = compute_metrics(records)

    assert per_patient[0].dice == pytest.approx(4 / 17)
    assert metrics["brats_patient_dice_mean"] == pytest.approx(4 / 17)
    assert metrics["brats_patients"] == 1
    # MONAI's own Dice on the stacked volume agrees.
    pred, label = patient_volumes(records.slices)
    monai_dice = compute_dice(
        torch.from_numpy(pred)[None, None].float(), torch.from_numpy(label)[None, None].float(), ignore_empty=False
    )
    assert float(monai_dice) == pytest.approx(4 / 17)


def test_patient_dice_statistics_over_patients() -> None:
    perfect = mask((0, 4, 0, 4))
    slices = [
        ("a", 0, perfect, perfect),  # Dice 1
        ("b", 0, mask((0, 4, 0, 2)), perfect),  # 2*8 / (8 + 16) = 2/3
        ("c", 0, EMPTY, perfect),  # 0
    ]
    metrics, _ = compute_metrics(brats_records(slices))
    values = np.array([1.0, 2 / 3, 0.0])
    assert metrics["brats_patient_dice_mean"] == pytest.approx(values.mean())
    assert metrics["brats_patient_dice_median"] == pytest.approx(2 / 3)
    assert metrics["brats_patient_dice_std"] == pytest.approx(values.std())
    assert metrics["brats_patient_dice_min"] == 0.0
    assert metrics["brats_hd95_undefined"] == 1  # patient c predicted nothing


def test_false_positive_on_a_tumour_free_slice_counts() -> None:
    tumour = mask((2, 6, 2, 6))
    clean = [("p", 0, tumour, tumour), ("p", 1, EMPTY, EMPTY)]
    noisy = [("p", 0, tumour, tumour), ("p", 1, mask((10, 12, 10, 12)), EMPTY)]

    clean_metrics, _ = compute_metrics(brats_records(clean))
    noisy_metrics, _ = compute_metrics(brats_records(noisy))

    assert clean_metrics["brats_slice_dice_mean"] == 1.0
    assert clean_metrics["brats_slice_detection_specificity"] == 1.0
    assert noisy_metrics["brats_slice_dice_mean"] == 0.5
    assert noisy_metrics["brats_slice_dice_tumour_slices_mean"] == 1.0
    assert noisy_metrics["brats_slice_dice_tumour_free_slices_mean"] == 0.0
    assert noisy_metrics["brats_slice_detection_specificity"] == 0.0
    assert noisy_metrics["brats_slice_detection_fp"] == 1
    assert noisy_metrics["brats_patient_dice_mean"] == pytest.approx(2 * 16 / (20 + 16))
    # The trap: MONAI's DiceMetric with its default ignore_empty=True calls the noisy slices perfect.
    trap = DiceMetric(include_background=True)
    pred = torch.from_numpy(np.stack([tumour, mask((10, 12, 10, 12))])).float()
    trap(y_pred=pred, y=torch.from_numpy(np.stack([tumour, EMPTY])).float())
    assert float(trap.aggregate()) == 1.0


def test_detection_uses_min_tumour_pixels() -> None:
    speck, tumour = mask((0, 1, 0, 2)), mask((4, 8, 4, 8))  # 2 and 16 pixels
    slices = [("p", 0, speck, EMPTY), ("p", 1, tumour, tumour), ("p", 2, EMPTY, speck), ("p", 3, EMPTY, EMPTY)]
    strict, _ = compute_metrics(brats_records(slices), min_tumour_pixels=1)
    lenient, _ = compute_metrics(brats_records(slices), min_tumour_pixels=3)
    assert (strict["brats_slice_detection_sensitivity"], strict["brats_slice_detection_specificity"]) == (0.5, 0.5)
    assert (lenient["brats_slice_detection_sensitivity"], lenient["brats_slice_detection_specificity"]) == (1.0, 1.0)
    assert lenient["brats_slices_tumour"] == 1


def test_dropped_tumour_pixels_count_as_missed() -> None:
    tumour = mask((0, 2, 0, 5))  # 10 pixels, predicted perfectly
    records = brats_records([("p", 40, tumour, tumour)])
    patients = {"p": {"slices_kept": [40], "tumour_pixels_kept": 10, "tumour_pixels_dropped": 10}}

    metrics, per_patient = compute_metrics(records, patients)

    assert per_patient[0].dice == pytest.approx(2 * 10 / (10 + 20))
    assert per_patient[0].dice_kept_slices == 1.0
    assert metrics["brats_patient_dice_mean"] == pytest.approx(2 / 3)
    assert metrics["brats_tumour_pixels_dropped"] == 10
    assert metrics["brats_patients_incomplete"] == 0


def test_kept_slices_not_evaluated_count_as_missed() -> None:
    tumour = mask((0, 2, 0, 5))
    records = brats_records([("p", 40, tumour, tumour)])
    # Slice 41 was kept with 6 tumour pixels but never reached the evaluator.
    patients = {"p": {"slices_kept": [40, 41], "tumour_pixels_kept": 16, "tumour_pixels_dropped": 0}}
    metrics, per_patient = compute_metrics(records, patients)
    assert per_patient[0].tumour_pixels_unseen == 6 and not per_patient[0].complete
    assert per_patient[0].dice == pytest.approx(20 / 26)
    assert metrics["brats_patients_incomplete"] == 1


def test_unknown_patient_and_repeated_slice_are_errors() -> None:
    tumour = mask((0, 2, 0, 2))
    with pytest.raises(ValueError, match=r"not in patients\.json"):
        score_patients(brats_records([("p", 0, tumour, tumour)]).slices, {"q": {}})
    with pytest.raises(ValueError, match="no tumour_pixels_dropped"):
        score_patients(brats_records([("p", 0, tumour, tumour)]).slices, {"p": {"slices_kept": [0]}})
    with pytest.raises(ValueError, match="twice"):
        score_patients(brats_records([("p", 0, tumour, tumour), ("p", 0, tumour, tumour)]).slices)


def test_hd95_of_two_plates_follows_the_slice_spacing() -> None:
    # GT is a 4x4 plate on slice 2, the prediction the same plate on slice 4: every surface voxel is exactly two
    # slices (2 x 2.5 mm) from the other surface, so HD95 = 5.0.
    plate = mask((3, 7, 3, 7))
    records = brats_records([("p", 2, EMPTY, plate), ("p", 3, EMPTY, EMPTY), ("p", 4, plate, EMPTY)])
    metrics, per_patient = compute_metrics(records, spacing=(1.0, 1.0, 2.5))
    assert per_patient[0].hd95 == pytest.approx(5.0)
    assert metrics["brats_hd95_mean"] == pytest.approx(5.0)
    assert metrics["brats_hd95_undefined"] == 0


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
def test_hd95_cropping_matches_monai_on_the_full_volume() -> None:
    label = np.zeros((40, 40, 30), dtype=bool)
    pred = np.zeros_like(label)
    label[10:20, 12:22, 5:15] = True
    pred[13:23, 12:24, 7:15] = True
    pred[30, 30, 25] = True  # a far outlier, inside the crop
    spacing = (0.9375, 0.9375, 1.0)
    full = compute_hausdorff_distance(
        torch.from_numpy(pred)[None, None], torch.from_numpy(label)[None, None], True, percentile=95, spacing=spacing
    )
    assert patient_hd95(pred, label, spacing) == pytest.approx(float(full))
    assert math.isnan(patient_hd95(np.zeros_like(label), label, spacing))


def test_prepared_spacing_maps_x_to_columns_and_y_to_rows() -> None:
    assert prepared_spacing((240, 240, 155), 256) == pytest.approx((0.9375, 0.9375, 1.0))
    assert prepared_spacing((200, 300, 50), 100, (1.0, 0.5, 3.0)) == pytest.approx((1.5, 2.0, 3.0))


# ----------------------------------------------------------------------------------------------------------------------
# Classification


def test_classification_metrics_match_hand_computed_and_sklearn() -> None:
    targets = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.8, 0.4, 0.7, 0.1, 0.6, 0.3, 0.2, 0.55])
    metrics = classification_metrics(targets, probs, "x")
    # TP 3 (0.9, 0.8, 0.7), FN 1 (0.4), FP 2 (0.6, 0.55), TN 3.
    expected = {
        "x_n": 9,
        "x_confusion_tp": 3,
        "x_confusion_fn": 1,
        "x_confusion_fp": 2,
        "x_confusion_tn": 3,
        "x_accuracy": 6 / 9,
        "x_sensitivity": 3 / 4,
        "x_specificity": 3 / 5,
        "x_balanced_accuracy": (3 / 4 + 3 / 5) / 2,
        "x_f1": 2 * 3 / (2 * 3 + 2 + 1),
        "x_roc_auc": 18 / 20,  # positive-negative pairs ranked correctly
    }
    assert metrics == pytest.approx(expected)
    predicted = probs >= 0.5
    assert metrics["x_roc_auc"] == pytest.approx(roc_auc_score(targets, probs))
    assert metrics["x_f1"] == pytest.approx(f1_score(targets, predicted))
    assert metrics["x_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(targets, predicted))


def test_one_class_gives_nan_auc_without_crashing() -> None:
    metrics = classification_metrics(np.ones(4, dtype=int), np.array([0.9, 0.2, 0.7, 0.8]), "x")
    assert math.isnan(metrics["x_roc_auc"]) and math.isnan(metrics["x_specificity"])
    assert metrics["x_sensitivity"] == 0.75 and metrics["x_accuracy"] == 0.75
    nothing = classification_metrics(np.array([]), np.array([]), "x")
    assert nothing["x_n"] == 0 and math.isnan(nothing["x_accuracy"]) and math.isnan(nothing["x_roc_auc"])


# ----------------------------------------------------------------------------------------------------------------------
# Collector


def _batches(rng: np.random.Generator) -> tuple[list[dict], EvaluationRecords]:
    """Collated BraTS and Kaggle batches as an evaluator yields them, and the records the same data give directly."""
    direct = EvaluationRecords()
    batches = []
    for patient in ("BraTS-001", "BraTS-002"):
        for first in (30, 32):
            zs = [first, first + 1]
            # Slice 33 is tumour-free; the probabilities give false positives and false negatives.
            labels = np.stack([mask((z % 5, z % 5 + 6, 3, 10)) if z != 33 else EMPTY for z in zs]).astype(np.float32)
            seg_prob = (labels * 0.4 + rng.uniform(0.0, 0.6, labels.shape)).astype(np.float32)
            cls_prob = rng.uniform(0, 1, 2).astype(np.float32)
            cls = labels.reshape(2, -1).max(axis=1).astype(np.int64)
            images = rng.normal(size=(2, 4, SIZE, SIZE)).astype(np.float32)
            batches.append(
                {
                    "source": ["brats", "brats"],
                    "patient": [patient, patient],
                    "slice": torch.tensor(zs),
                    "seg_prob": torch.from_numpy(seg_prob),
                    "label": torch.from_numpy(labels),
                    "cls_prob": torch.from_numpy(cls_prob)[:, None],  # (B, 1) is accepted as well as (B,)
                    "cls": torch.from_numpy(cls),
                    "image": torch.from_numpy(images),
                }
            )
            for i in range(2):
                direct.add_brats_slice(patient, zs[i], seg_prob[i], labels[i], cls_prob[i], cls[i], images[i])
    for start in (0, 3):
        cls4 = [(start + i) % 4 for i in range(3)]
        cls = [int(c != 2) for c in cls4]  # index 2 is "notumor"
        probs = rng.uniform(0, 1, 3).astype(np.float32)
        batches.append(
            {
                "source": ["kaggle"] * 3,
                "group": [f"k{start + i:05d}" for i in range(3)],
                "cls_prob": torch.from_numpy(probs),
                "cls": torch.tensor(cls),
                "cls4": torch.tensor(cls4),
            }
        )
        for i in range(3):
            direct.add_kaggle_image(f"k{start + i:05d}", probs[i], cls[i], cls4[i])
    return batches, direct


def _decollated(batch: dict) -> list[dict]:
    size = len(batch["source"])
    return [{key: value[i] for key, value in batch.items()} for i in range(size)]


@pytest.mark.parametrize("decollate", [False, True], ids=["collated", "decollated"])
def test_collector_through_an_ignite_engine_matches_direct_metrics(decollate: bool) -> None:
    batches, direct = _batches(np.random.default_rng(0))
    engine = Engine(lambda _, batch: _decollated(batch) if decollate else batch)
    collector = PredictionCollector(max_examples=2)
    collector.attach(engine)

    engine.run(batches, max_epochs=1)
    collected, per_patient = collector.compute()
    expected, expected_per_patient = compute_metrics(direct)

    assert_same_metrics(collected, expected)
    assert per_patient == expected_per_patient
    assert collected["brats_slices"] == 8 and collected["kaggle_cls_n"] == 6 and collected["brats_patients"] == 2
    assert [example.patient for example in collector.records.examples] == ["BraTS-001", "BraTS-002"]
    # A second run starts from scratch rather than adding to the first.
    engine.run(batches, max_epochs=1)
    assert len(collector.records.slices) == 8


def test_collector_merges_batch_metadata_with_the_output() -> None:
    batches, direct = _batches(np.random.default_rng(3))
    predictions = ("seg_prob", "cls_prob")
    # The evaluator's output holds only the predictions; the batch supplies metadata, targets and images.
    engine = Engine(lambda _, batch: {key: batch[key] for key in (*predictions, "source") if key in batch})
    collector = PredictionCollector(
        batch_transform=lambda batch: {k: v for k, v in batch.items() if k not in predictions}
    )
    collector.attach(engine)
    engine.run(batches, max_epochs=1)
    assert_same_metrics(collector.compute()[0], compute_metrics(direct)[0])


def test_collector_takes_images_for_examples_from_the_batch() -> None:
    batches, direct = _batches(np.random.default_rng(4))
    engine = Engine(lambda _, batch: {key: value for key, value in batch.items() if key != "image"})
    collector = PredictionCollector(batch_keys=["image"])
    collector.attach(engine)
    engine.run(batches, max_epochs=1)
    assert len(collector.records.examples) == len(direct.examples) == 2
    np.testing.assert_array_equal(collector.records.examples[0].image, direct.examples[0].image)


def test_collector_writes_results_at_epoch_end(tmp_path: Path) -> None:
    batches, _ = _batches(np.random.default_rng(1))
    patients = {"BraTS-001": {"tumour_pixels_dropped": 5}, "BraTS-002": {"tumour_pixels_dropped": 0}}
    (tmp_path / "patients.json").write_text(json.dumps(patients))
    engine = Engine(lambda _, batch: batch)
    collector = PredictionCollector(results_dir=tmp_path / "eval", patients=tmp_path, spacing=(1.0, 1.0, 2.0))
    collector.attach(engine)
    engine.run(batches, max_epochs=1)
    assert (tmp_path / "eval" / "metrics.json").is_file()
    assert engine.state.metrics["brats_tumour_pixels_dropped"] == 5
    assert per_patient_dropped(collector) == [5, 0]


def per_patient_dropped(collector: PredictionCollector) -> list[int]:
    return [score.tumour_pixels_dropped for score in collector.per_patient]


def test_collector_rejects_incomplete_samples() -> None:
    collector = PredictionCollector()
    with pytest.raises(KeyError, match="label"):
        collector.add_sample({"source": "brats", "patient": "p", "slice": 0, "seg_prob": np.zeros((1, 4, 4))})
    with pytest.raises(ValueError, match="unknown source"):
        collector.add_sample({"source": "other", "cls_prob": 0.5, "cls": 1})


# ----------------------------------------------------------------------------------------------------------------------
# Output


def test_write_results_writes_flat_json_report_and_figures(tmp_path: Path) -> None:
    _, records = _batches(np.random.default_rng(2))
    metrics, per_patient = compute_metrics(records)
    metrics["brats_hd95_mean"] = math.nan  # make sure an undefined value goes through

    paths = write_results(metrics, per_patient, records, tmp_path)

    written = json.loads(paths["metrics"].read_text())
    assert written.keys() == metrics.keys()
    assert all(value is None or isinstance(value, (int, float)) for value in written.values())
    assert written["brats_hd95_mean"] is None and written["kaggle_cls_n"] == 6
    report = paths["report"].read_text()
    assert "| Metric | Value |" in report and "BraTS-002" in report and "Kaggle images" in report
    for name in ("roc", "confusion", "patient_dice", "examples"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name}.png)" in report
    assert paths["per_patient"].read_text().count("\n") == 1 + len(per_patient)
    # Every classification with its exact probability: what a paired bootstrap of two models' AUCs resamples.
    with paths["per_image"].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(records.classifications)
    for row, record in zip(rows, records.classifications, strict=True):
        assert (row["source"], row["key"], int(row["cls"]), float(row["prob"])) == (
            record.source, record.key, record.target, record.prob)  # fmt: skip
        assert row["z"] == ("" if record.z is None else str(record.z))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_metrics_json_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"a": 1})

    def failing_replace(source: str, destination: str) -> None:
        raise OSError("disk full")

    # A failure before the rename leaves the previous file whole and no temporary file behind.
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"a": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_single_task_models_record_only_their_task() -> None:
    mask = np.zeros((1, 4, 4), dtype=np.float32)
    mask[0, 1:3, 1:3] = 1
    collector = PredictionCollector()
    # A segmentation-only model: masks, no classification.
    collector.add_sample({"source": "brats", "patient": "p", "slice": 0, "seg_prob": mask, "label": mask})
    # A classification-only model: classification, no masks.
    collector.add_sample({"source": "brats", "patient": "q", "slice": 3, "cls_prob": 0.9, "cls": 1})
    records = collector.records
    assert [(s.patient, s.z) for s in records.slices] == [("p", 0)]
    assert [(c.key, c.z, c.target) for c in records.classifications] == [("q", 3, 1)]


# ----------------------------------------------------------------------------------------------------------------------
# Official BraTS metrics on the raw volume's grid

CASE_ID = "BraTS2021_00001"
# Left-posterior-superior voxels of different sizes: the masks must come back through the RAS flip, and HD95 in mm.
RAW_AFFINE = np.diag([-0.8, -1.2, 2.5, 1.0])
RAW_SHAPE = (24, 24, 10)


def raw_case(folder: Path) -> tuple[dict[str, dict], list]:
    """A BraTS 2021 case on disk (no brain in slice 0, so preparation drops it) with an off-centre two-slice tumour
    (z 4-5), and its slices prepared at the volume's own in-plane size, so that a perfect prediction is exact."""
    case_dir = folder / CASE_ID
    case_dir.mkdir(parents=True)
    flair = np.zeros(RAW_SHAPE, dtype=np.float32)
    flair[2:22, 2:22, 1:] = np.random.default_rng(0).uniform(1.0, 2.0, (20, 20, 9))
    seg = np.zeros(RAW_SHAPE, dtype=np.uint8)
    seg[4:14, 3:11, 4:6] = 2
    seg[6:9, 5:8, 4] = 4
    for name, array in (("flair", flair), ("seg", seg)):
        nib.save(nib.Nifti1Image(array, RAW_AFFINE), case_dir / f"{CASE_ID}_{name}.nii.gz")
    slices, dropped = extract_slices(load_case(find_cases(folder)[0]), size=RAW_SHAPE[0])
    record = {"split": "test", "layout": "brats2021", "case_dir": str(case_dir), "original_shape": list(RAW_SHAPE),
              "slices_kept": [s.z for s in slices], "tumour_pixels_kept": int(sum(s.mask.sum() for s in slices)),
              "tumour_pixels_dropped": dropped}  # fmt: skip
    assert 0 not in record["slices_kept"] and dropped == 0
    return {CASE_ID: record}, slices


def native_scores(patients: dict, slices: list, predict) -> tuple[dict[str, float], PatientScore]:
    """Metrics through the collector (native grid on) of ``predict(slice) -> (1, H, W) probability``."""
    collector = PredictionCollector(patients=patients, native_grid=True)
    for item in slices:
        prob, label = torch.from_numpy(predict(item)), torch.from_numpy(item.mask)
        sample = {"source": "brats", "patient": CASE_ID, "slice": item.z, "cls_prob": 0.5, "cls": 1}
        collector.add_sample({**sample, "seg_prob": prob, "label": label})
    metrics, (score,) = collector.compute()
    return metrics, score


def test_native_grid_scores_a_perfect_prediction_one_and_a_stray_blob_as_a_lesion(tmp_path: Path) -> None:
    patients, slices = raw_case(tmp_path)
    metrics, score = native_scores(patients, slices, lambda item: item.mask.astype(np.float32))
    assert (metrics["brats_patient_global_dice_mean"], metrics["brats_patient_global_hd95_mean"]) == (1.0, 0.0)
    assert (metrics["brats_patient_lesionwise_dice_mean"], metrics["brats_lesions_fp"]) == (1.0, 0)
    assert metrics["brats_patients_native_undefined"] == 0

    def stray(item) -> np.ndarray:  # 2 x 2 pixels in one slice, far from the tumour
        prob = item.mask.astype(np.float32)
        prob[0, 18:20, 18:20] = 1.0 if item.z == 8 else 0.0
        return prob

    metrics, score = native_scores(patients, slices, stray)
    tumour = int(np.count_nonzero(np.concatenate([s.mask for s in slices])))
    assert score.global_dice == pytest.approx(2 * tumour / (2 * tumour + 4))  # > 0.98
    assert (score.lesionwise_dice, score.matched_lesion_dice) == (0.5, 1.0)  # one found, one false positive
    assert (score.lesions_tp, score.lesions_fp, score.lesions_fn) == (1, 1, 0)
    assert metrics["brats_patient_lesionwise_hd95_mean"] == pytest.approx(373.0 / 2)


def test_native_grid_masks_come_back_through_the_flip_and_hd95_is_in_mm(tmp_path: Path) -> None:
    patients, slices = raw_case(tmp_path)
    by_z = {item.z: item.mask.astype(np.float32) for item in slices}
    # The two-slice tumour predicted one slice higher (z 5-6): half of it overlaps, every surface distance is 0 or
    # one slice step, 2.5 mm in this file.
    _, score = native_scores(patients, slices, lambda item: by_z.get(item.z - 1, np.zeros_like(by_z[item.z])))
    assert score.global_dice == pytest.approx(0.5) and score.global_hd95 == pytest.approx(2.5)
    # Mirrored in-plane (what a missed RAS flip would do), the off-centre tumour no longer overlaps itself fully.
    _, mirrored = native_scores(patients, slices, lambda item: item.mask[:, ::-1, ::-1].astype(np.float32).copy())
    assert mirrored.global_dice < 0.9


def test_native_grid_keeps_exactly_the_probabilities_that_decide_the_restored_mask() -> None:
    rng = np.random.default_rng(4)
    prob = rng.uniform(0.3, 0.49, (1, 32, 32)).astype(np.float16).astype(np.float32)  # below 0.5 everywhere
    tumour = np.s_[0, 10:22, 11:20]
    prob[tumour] = rng.uniform(0.5, 1.0, prob[tumour].shape)
    kept_bytes = []
    for native in ((40, 56, 1), (20, 24, 1), (9, 12, 1)):  # restoring enlarges, shrinks, shrinks a lot
        masks = SliceMasks.from_masks("p", 0, prob >= 0.5, prob >= 0.5)
        masks.keep_probability(torch.from_numpy(prob), (*native[:2], 64))  # the volume has 64 slices
        kept_bytes.append(masks.prob.nbytes)
        expected = slices_to_volume(prob[None], [0], native, is_mask=True)
        kept = slices_to_volume(masks.probability()[None, None], [0], native, is_mask=True)
        np.testing.assert_array_equal(kept, expected)
        # The margin matters: the predicted box alone (probabilities 0 around it) restores a smaller mask.
        box = np.zeros_like(prob)
        box[tumour] = prob[tumour]
        assert 0 < slices_to_volume(box[None], [0], native, is_mask=True).sum() < expected.sum()
    assert kept_bytes[0] < prob.nbytes / 3  # only the neighbourhood of the prediction is kept


def test_a_moved_raw_case_stops_the_native_grid_evaluation_with_its_fix(tmp_path: Path) -> None:
    patients, slices = raw_case(tmp_path)
    require_raw_cases(patients, "test")  # present: nothing to say
    moved = {CASE_ID: {**patients[CASE_ID], "case_dir": str(tmp_path / "moved" / CASE_ID)}}
    require_raw_cases(moved, "validation")  # not a patient of the split evaluated
    for check in (lambda: require_raw_cases(moved, "test"), lambda: native_scores(moved, slices, lambda s: s.mask)):
        with pytest.raises(UsageError, match="native_grid_metrics false") as error:
            check()
        assert str(tmp_path / "moved" / CASE_ID) in str(error.value)
