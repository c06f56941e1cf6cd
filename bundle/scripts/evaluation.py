"""Test-split evaluation: collect predictions from a MONAI evaluator, score them, write metrics and a report.

Three parts:

* :class:`PredictionCollector`, an ignite handler that records every sample an evaluator produces, compactly:
  BraTS slices as binarised masks cropped to the tumour / prediction and bit-packed (a tumour-free slice with an
  empty prediction costs a few dozen bytes), classification outputs as one small record per slice or image.
* :func:`compute_metrics`, a pure function of those records: per-patient 3D Dice and HD95, per-slice Dice over
  every slice (tumour-free slices included), slice-level tumour detection, and tumour / no-tumour
  classification for BraTS slices and Kaggle images separately; optionally (``native_grid``, on in evaluate.yaml)
  the official BraTS 2023+ whole-tumour metrics, global and lesion-wise, of each patient's mask put back on its
  raw volume's grid (:func:`native_grid_scores`), after the model's post-processing (``min_lesion_voxels``: its
  3D components below that size removed, as inference does); with ``lesion_size_candidates`` the collector first
  chooses that size on what it recorded (:mod:`scripts.postprocessing`, validation split only). The prepared-slice
  metrics score the network's masks as they are, without post-processing.
* :func:`write_results`, which writes ``metrics.json`` (flat, numbers only), ``per_patient.csv``, ``per_image.csv``
  (each classified slice and image with its probability) and, through
  :mod:`scripts.report`, ``report.md`` with its figures.

Conventions (why they matter):

* Masks and classes are binarised at ``threshold`` (0.5) with ``>=``, as MONAI's ``AsDiscrete(threshold=0.5)``.
* Per-slice Dice is 1 when prediction and ground truth are both empty and 0 when either alone is empty. MONAI's
  ``DiceMetric`` default (``ignore_empty=True``) drops tumour-free slices instead, hiding false positives there.
* Per-patient Dice is computed over the patient's whole volume (BraTS scores patients, not slices). Tumour pixels
  in slices that data preparation dropped (``patients.json`` ``tumour_pixels_dropped``) and in kept slices that
  were never evaluated count as false negatives, so leaving slices out can never raise the score.
* A patient whose prediction and ground truth are both empty has Dice 1; HD95 is undefined (NaN) when either is
  empty, such patients are left out of the HD95 statistics and counted in ``brats_hd95_undefined``. The official
  native-grid metrics follow BraTS instead: such a patient is NaN and left out of their means
  (``brats_patients_native_undefined``), an empty prediction or reference scores Dice 0 and HD95 373 mm.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import compute_hausdorff_distance
from nibabel.affines import voxel_sizes
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from .brats_metrics import union_box, whole_tumour_metrics
from .data.images import KAGGLE_CLASSES
from .data.lesions import remove_small_lesions
from .data.slices import slices_to_volume
from .data.volumes import VolumeCase, find_cases, load_case, to_original_grid
from .errors import UsageError
from .files import write_json_atomic
from .metrics import dice_from_counts
from .postprocessing import choose_min_lesion_voxels, lesionwise_dice_by_size
from .report import write_report

__all__ = [
    "SOURCES",
    "ClassificationRecord",
    "EvaluationRecords",
    "ExampleSlice",
    "PatientScore",
    "PredictionCollector",
    "SliceMasks",
    "choose_postprocessing",
    "classification_metrics",
    "compute_metrics",
    "load_patients",
    "native_grid_masks",
    "native_grid_scores",
    "patient_hd95",
    "prepared_spacing",
    "require_raw_cases",
    "score_patients",
    "write_per_image_csv",
    "write_results",
]

logger = logging.getLogger(__name__)

THRESHOLD = 0.5
SOURCES: tuple[str, ...] = ("brats", "kaggle")
_SEGMENTATION_KEYS = ("seg_prob", "label", "slice", "patient")

# ----------------------------------------------------------------------------------------------------------------------
# Records


@dataclass(slots=True)
class SliceMasks:
    """Binarised prediction and ground truth of one BraTS slice, cropped to their union and bit-packed.

    Attributes:
        patient: BraTS patient id.
        z: Slice index along the volume's Z axis (as in ``patients.json`` ``slices_kept``).
        shape: ``(H, W)`` of the full slice.
        box: ``(row0, row1, col0, col1)`` of the union of both masks (all 0 when both are empty).
        pred_bits: ``np.packbits`` of the predicted mask inside ``box``.
        label_bits: ``np.packbits`` of the ground-truth mask inside ``box``.
        pred_pixels: Predicted tumour pixels.
        label_pixels: Ground-truth tumour pixels.
        overlap: Pixels that are tumour in both.
        prob_box: ``(row0, row1, col0, col1)`` of ``prob`` (all 0 when no probability is kept).
        prob: float16 tumour probabilities inside ``prob_box``, kept only for the native-grid metrics
            (:meth:`keep_probability`); None otherwise.
    """

    patient: str
    z: int
    shape: tuple[int, int]
    box: tuple[int, int, int, int]
    pred_bits: np.ndarray
    label_bits: np.ndarray
    pred_pixels: int
    label_pixels: int
    overlap: int
    prob_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    prob: np.ndarray | None = None

    @classmethod
    def from_masks(cls, patient: str, z: int, pred: np.ndarray, label: np.ndarray) -> SliceMasks:
        """Pack two binary ``(H, W)`` masks (any shape with singleton leading axes, any dtype; nonzero = tumour)."""
        pred, label = _plane(pred) != 0, _plane(label) != 0
        if pred.shape != label.shape:
            raise ValueError(f"{patient} z={z}: prediction {pred.shape} and label {label.shape} differ in shape")
        union = pred | label
        if union.any():
            rows, cols = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
            box = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
        else:
            box = (0, 0, 0, 0)
        crop = np.s_[box[0] : box[1], box[2] : box[3]]
        return cls(
            patient=str(patient),
            z=int(z),
            shape=(int(pred.shape[0]), int(pred.shape[1])),
            box=box,
            pred_bits=np.packbits(pred[crop]),
            label_bits=np.packbits(label[crop]),
            pred_pixels=int(np.count_nonzero(pred)),
            label_pixels=int(np.count_nonzero(label)),
            overlap=int(np.count_nonzero(pred & label)),
        )

    def _unpack(self, bits: np.ndarray) -> np.ndarray:
        full = np.zeros(self.shape, dtype=bool)
        row0, row1, col0, col1 = self.box
        height, width = row1 - row0, col1 - col0
        if height and width:
            full[row0:row1, col0:col1] = np.unpackbits(bits, count=height * width).reshape(height, width)
        return full

    def pred(self) -> np.ndarray:
        """The full ``(H, W)`` bool predicted mask."""
        return self._unpack(self.pred_bits)

    def keep_probability(self, prob: Any, native_shape: Sequence[int]) -> None:
        """Keep the probabilities that decide this slice's mask once restored to a volume of ``native_shape``.

        Inference restores probabilities, not masks, to the volume's grid (bilinear, antialiased when shrinking,
        then >= 0.5); the native-grid metrics score that same mask. A restored pixel interpolates prepared pixels
        less than ``2 s + 1`` apart (``s``: prepared / native size, at least 1) and reaches 0.5 only when one of them
        does, i.e. is predicted: the probabilities in the predicted box grown by that margin restore the same mask
        as the whole slice (outside it, 0), and a slice predicted empty restores empty. They are kept in float16,
        so a restored pixel within float16 rounding of 0.5 may differ.

        Args:
            prob: ``(H, W)`` (or with singleton leading axes) tumour probability of this slice.
            native_shape: Shape of the raw volume (``patients.json`` ``original_shape``); its smallest side bounds
                the scale, so any axis order will do.
        """
        if not self.pred_pixels:
            return
        prob = _plane(_to_numpy(prob.float() if isinstance(prob, torch.Tensor) else prob))
        pred = self.pred()
        margin = math.ceil(2 * max(1.0, max(self.shape) / min(int(n) for n in native_shape))) + 1
        rows, cols = np.flatnonzero(pred.any(axis=1)), np.flatnonzero(pred.any(axis=0))
        height, width = self.shape
        self.prob_box = (
            max(int(rows[0]) - margin, 0),
            min(int(rows[-1]) + 1 + margin, height),
            max(int(cols[0]) - margin, 0),
            min(int(cols[-1]) + 1 + margin, width),
        )
        row0, row1, col0, col1 = self.prob_box
        self.prob = prob[row0:row1, col0:col1].astype(np.float16)

    def probability(self) -> np.ndarray:
        """The full ``(H, W)`` float32 probability kept by :meth:`keep_probability` (0 outside its box)."""
        full = np.zeros(self.shape, dtype=np.float32)
        if self.pred_pixels and self.prob is None:
            raise ValueError(f"{self.patient} z={self.z}: recorded without probabilities (native_grid off)")
        if self.prob is not None:
            row0, row1, col0, col1 = self.prob_box
            full[row0:row1, col0:col1] = self.prob
        return full

    def label(self) -> np.ndarray:
        """The full ``(H, W)`` bool ground-truth mask."""
        return self._unpack(self.label_bits)

    @property
    def dice(self) -> float:
        """Slice Dice; 1 when both masks are empty (a correct 'no tumour here')."""
        return dice_from_counts(self.overlap, self.pred_pixels, self.label_pixels)


@dataclass(slots=True)
class ClassificationRecord:
    """One tumour / no-tumour decision.

    Attributes:
        source: ``"brats"`` (a slice) or ``"kaggle"`` (an image).
        key: BraTS patient id or Kaggle duplicate group.
        prob: Predicted probability of tumour.
        target: True class, 1 = tumour.
        z: Slice index (BraTS only).
        cls4: 4-class Kaggle label (index into :data:`KAGGLE_CLASSES`), when known.
    """

    source: str
    key: str
    prob: float
    target: int
    z: int | None = None
    cls4: int | None = None


@dataclass(slots=True)
class ExampleSlice:
    """A slice kept whole for the report's overlay figure."""

    patient: str
    z: int
    image: np.ndarray  # (H, W) float32, first input channel
    label: np.ndarray  # (H, W) bool
    pred: np.ndarray  # (H, W) bool
    dice: float


@dataclass
class EvaluationRecords:
    """Everything the collector keeps; the input of :func:`compute_metrics` and :func:`write_results`.

    Attributes:
        slices: One :class:`SliceMasks` per BraTS slice.
        classifications: One :class:`ClassificationRecord` per BraTS slice and Kaggle image.
        examples: Up to ``max_examples`` overlay examples: for each of the first patients seen, the slice with the
            largest ground-truth tumour (kept only when an image was supplied).
        max_examples: How many example slices (patients) to keep.
        threshold: Binarisation threshold of probabilities.
    """

    slices: list[SliceMasks] = field(default_factory=list)
    classifications: list[ClassificationRecord] = field(default_factory=list)
    examples: list[ExampleSlice] = field(default_factory=list)
    max_examples: int = 4
    threshold: float = THRESHOLD

    def add_brats_slice(
        self,
        patient: str,
        z: int,
        seg_prob: Any,
        label: Any,
        cls_prob: float | None = None,
        cls: int | None = None,
        image: Any | None = None,
        native_shape: Sequence[int] | None = None,
    ) -> SliceMasks:
        """Record one BraTS slice.

        Args:
            patient: Patient id.
            z: Slice index.
            seg_prob: ``(1, H, W)`` or ``(H, W)`` tumour probability (numpy or torch); binarised at ``threshold``.
            label: Ground-truth mask of the same shape, 0/1.
            cls_prob: Probability of tumour from the classification head (None for a segmentation-only model).
            cls: Classification target, 0/1 (None with ``cls_prob``).
            image: Optional ``(C, H, W)`` input; used only if the slice becomes an overlay example.
            native_shape: The raw volume's shape, to keep the probabilities the native-grid metrics restore
                (:meth:`SliceMasks.keep_probability`); None: masks only.

        Returns:
            The stored slice record.
        """
        pred = _to_numpy(_binarise(seg_prob, self.threshold))
        masks = SliceMasks.from_masks(patient, z, pred, _to_numpy(label) > 0.5)
        if native_shape is not None:
            masks.keep_probability(seg_prob, native_shape)
        self.slices.append(masks)
        if cls_prob is not None and cls is not None:
            self.add_brats_classification(masks.patient, masks.z, cls_prob, cls)
        if image is not None:
            self._offer_example(masks, image)
        return masks

    def add_brats_classification(self, patient: str, z: int, cls_prob: float, cls: int) -> None:
        """Record one BraTS slice's classification alone (a classification-only model has no mask)."""
        self.classifications.append(ClassificationRecord("brats", str(patient), float(cls_prob), int(cls), int(z)))

    def add_kaggle_image(self, group: str, cls_prob: float, cls: int, cls4: int | None = None) -> None:
        """Record one Kaggle image's classification (``group``: its duplicate group id)."""
        self.classifications.append(
            ClassificationRecord(
                "kaggle", str(group), float(cls_prob), int(cls), None, None if cls4 is None else int(cls4)
            )
        )

    def _offer_example(self, masks: SliceMasks, image: Any) -> None:
        # One example per patient (the slice with the most tumour) shows more variety than the best N slices.
        current = next((index for index, ex in enumerate(self.examples) if ex.patient == masks.patient), None)
        if current is None and len(self.examples) >= self.max_examples:
            return
        if current is not None and self.examples[current].label.sum() >= masks.label_pixels:
            return
        if masks.label_pixels == 0 and current is None and masks.pred_pixels == 0:
            return  # nothing to show yet; wait for a slice of this patient with tumour
        channels = _to_numpy(image).astype(np.float32, copy=False)
        first_channel = _plane(channels[:1] if channels.ndim == 3 else channels).copy()
        example = ExampleSlice(masks.patient, masks.z, first_channel, masks.label(), masks.pred(), masks.dice)
        if current is None:
            self.examples.append(example)
        else:
            self.examples[current] = example

    def classification_arrays(self, source: str) -> tuple[np.ndarray, np.ndarray]:
        """``(targets int64, probabilities float64)`` of one source's classification records."""
        chosen = [record for record in self.classifications if record.source == source]
        targets = np.array([record.target for record in chosen], dtype=np.int64)
        probs = np.array([record.prob for record in chosen], dtype=np.float64)
        return targets, probs


# ----------------------------------------------------------------------------------------------------------------------
# Segmentation


@dataclass(slots=True)
class PatientScore:
    """Segmentation scores of one BraTS patient.

    Attributes:
        patient: Patient id.
        slices: Slices evaluated.
        dice: 3D Dice over the whole volume, dropped / unevaluated tumour counted as missed.
        dice_kept_slices: 3D Dice over the evaluated slices only (what ignoring dropped slices would report).
        hd95: 95th-percentile Hausdorff distance in spacing units over the evaluated slices; NaN if undefined.
        label_pixels: Ground-truth tumour pixels in the evaluated slices.
        pred_pixels: Predicted tumour pixels.
        overlap: Pixels tumour in both.
        tumour_pixels_dropped: Tumour pixels in slices removed by data preparation.
        tumour_pixels_unseen: Tumour pixels of kept slices that were not evaluated.
        complete: Whether every kept slice was evaluated (always True without ``patients``).
        global_dice, global_hd95, lesionwise_dice, lesionwise_hd95, matched_lesion_dice, matched_lesion_hd95,
        lesion_f1, lesions_tp, lesions_fp, lesions_fn: The official BraTS whole-tumour metrics on the raw volume's
            grid (:func:`native_grid_scores`, :func:`scripts.brats_metrics.whole_tumour_metrics`; HD95 in mm); NaN
            / None when not computed, NaN when prediction and reference are both empty.
    """

    patient: str
    slices: int
    dice: float
    dice_kept_slices: float
    hd95: float
    label_pixels: int
    pred_pixels: int
    overlap: int
    tumour_pixels_dropped: int = 0
    tumour_pixels_unseen: int = 0
    complete: bool = True
    global_dice: float = math.nan
    global_hd95: float = math.nan
    lesionwise_dice: float = math.nan
    lesionwise_hd95: float = math.nan
    matched_lesion_dice: float = math.nan
    matched_lesion_hd95: float = math.nan
    lesion_f1: float = math.nan
    lesions_tp: int | None = None
    lesions_fp: int | None = None
    lesions_fn: int | None = None


def prepared_spacing(
    original_shape: Sequence[int], size: int, original_spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[float, float, float]:
    """Voxel spacing of a patient volume stacked from prepared slices, in the order HD95 expects.

    Preparation resizes each RAS ``(X, Y)`` slice to ``size x size`` in the display plane, whose rows run along Y
    and columns along X; Z is untouched.

    Args:
        original_shape: ``(X, Y, Z)`` of the loaded volume (``patients.json`` ``original_shape``).
        size: Side of the prepared slices.
        original_spacing: ``(X, Y, Z)`` spacing of the loaded volume (1 mm for BraTS).

    Returns:
        ``(row, column, slice)`` spacing.
    """
    x, y = original_shape[0], original_shape[1]
    return (
        float(original_spacing[1]) * y / size,
        float(original_spacing[0]) * x / size,
        float(original_spacing[2]),
    )


def patient_volumes(slices: Sequence[SliceMasks]) -> tuple[np.ndarray, np.ndarray]:
    """Stack one patient's slices by z into ``(H, W, D)`` bool prediction and ground-truth volumes.

    Slices sit at their own z offset from the lowest one, so gaps (unevaluated slices) keep their true distance.
    """
    if not slices:
        raise ValueError("a patient volume needs at least one slice")
    shapes = {masks.shape for masks in slices}
    if len(shapes) != 1:
        raise ValueError(f"patient {slices[0].patient}: slices of different shapes {sorted(shapes)}")
    low = min(masks.z for masks in slices)
    depth = max(masks.z for masks in slices) - low + 1
    pred = np.zeros((*slices[0].shape, depth), dtype=bool)
    label = np.zeros_like(pred)
    for masks in slices:
        pred[..., masks.z - low] = masks.pred()
        label[..., masks.z - low] = masks.label()
    return pred, label


def patient_hd95(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """Symmetric 95th-percentile Hausdorff distance of two binary volumes (MONAI), NaN when either is empty.

    Args:
        pred: Binary volume.
        label: Binary volume of the same shape.
        spacing: Spacing per axis of the arrays, in the unit of the result.

    Returns:
        HD95 in spacing units, or NaN.
    """
    pred, label = np.asarray(pred, dtype=bool), np.asarray(label, dtype=bool)
    if not pred.any() or not label.any():
        return math.nan
    # Surface distances depend only on the shapes, so crop to their union plus one voxel (the margin keeps MONAI's
    # edge extraction identical): a 256x256x155 volume shrinks to the tumour's size, which is most of the cost.
    union = pred | label
    box = []
    for axis in range(union.ndim):
        hits = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - 1, 0), int(hits[-1]) + 2))
    crop = tuple(box)
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 pass their own deprecated `always_return_as_numpy` internally; nothing to fix on our side.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        value = compute_hausdorff_distance(
            torch.from_numpy(np.ascontiguousarray(pred[crop]))[None, None],
            torch.from_numpy(np.ascontiguousarray(label[crop]))[None, None],
            include_background=True,  # the single channel is the tumour, not a background channel
            percentile=95,
            spacing=[float(s) for s in spacing],
        )
    return float(value.reshape(-1)[0])


def score_patients(
    slices: Iterable[SliceMasks],
    patients: Mapping[str, Mapping[str, Any]] | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    native_grid: bool = False,
    min_lesion_voxels: int = 0,
    native_masks: Mapping[str, tuple[np.ndarray, np.ndarray, tuple[float, ...]]] | None = None,
) -> list[PatientScore]:
    """Per-patient 3D Dice and HD95, and with ``native_grid`` the official BraTS metrics on the raw volume's grid.

    Args:
        slices: Slice records of any number of patients, in any order.
        patients: ``patients.json`` content; supplies ``tumour_pixels_dropped`` (counted as missed tumour) and
            ``slices_kept`` / ``tumour_pixels_kept`` (kept tumour never evaluated is counted as missed too).
            Without it, only the evaluated slices count.
        spacing: ``(row, column, slice)`` spacing of the stacked volumes (see :func:`prepared_spacing`).
        native_grid: Also score each patient with :func:`native_grid_scores` (needs ``patients`` and the raw
            cases it names, and slices recorded with their probabilities).
        min_lesion_voxels: The post-processing of the native-grid masks (:func:`native_grid_scores`).
        native_masks: Patients' native-grid masks already built (:func:`choose_postprocessing`'s ``keep``).

    Returns:
        One score per patient, sorted by patient id.

    Raises:
        ValueError: A slice recorded twice, or a patient missing from ``patients``.
        UsageError: With ``native_grid``, a patient's raw case folder is missing.
    """
    if native_grid and patients is None:
        raise ValueError("the native-grid metrics need patients.json (where each patient's raw case is)")
    raw_cases: dict[tuple[str, str | None], dict[str, VolumeCase]] = {}
    by_patient = _by_patient(slices)
    scores = []
    for patient in sorted(by_patient):
        own = sorted(by_patient[patient], key=lambda masks: masks.z)
        zs = [masks.z for masks in own]
        if len(set(zs)) != len(zs):
            raise ValueError(f"patient {patient}: a slice was recorded twice (z={sorted(zs)})")
        pred_pixels = sum(masks.pred_pixels for masks in own)
        label_pixels = sum(masks.label_pixels for masks in own)
        overlap = sum(masks.overlap for masks in own)
        dropped, unseen, complete = _missing_tumour(patient, set(zs), label_pixels, patients)
        pred, label = patient_volumes(own)
        native = {}
        if native_grid:
            masks = (native_masks or {}).get(patient)
            native = native_grid_scores(patient, own, patients[patient], raw_cases, min_lesion_voxels, masks)
        scores.append(
            PatientScore(
                patient=patient,
                slices=len(own),
                dice=dice_from_counts(overlap, pred_pixels, label_pixels + dropped + unseen),
                dice_kept_slices=dice_from_counts(overlap, pred_pixels, label_pixels),
                hd95=patient_hd95(pred, label, spacing),
                label_pixels=label_pixels,
                pred_pixels=pred_pixels,
                overlap=overlap,
                tumour_pixels_dropped=dropped,
                tumour_pixels_unseen=unseen,
                complete=complete,
                **native,
            )
        )
    return scores


def _by_patient(slices: Iterable[SliceMasks]) -> dict[str, list[SliceMasks]]:
    by_patient: dict[str, list[SliceMasks]] = defaultdict(list)
    for masks in slices:
        by_patient[masks.patient].append(masks)
    return by_patient


def _missing_case_message(patient: str, case_dir: Any) -> str:
    where = f"{case_dir} (patient {patient}, as patients.json records it) does not exist"
    if not case_dir:
        where = f"patients.json records no raw case folder for patient {patient} (prepared by an older version?)"
    return (
        f"The native-grid BraTS metrics read each evaluated patient's raw case, but {where}: put the raw data back "
        "where preparation read it (or prepare again), or add --native_grid_metrics false to the evaluation command "
        "to score on the prepared slices only."
    )


def require_raw_cases(patients: Mapping[str, Mapping[str, Any]], split: str) -> None:
    """Fail before evaluating, with the fix, when a raw case folder of the split's patients has moved.

    Raises:
        UsageError: Naming the first missing folder (and how many more are missing).
    """
    missing = [
        (patient, record.get("case_dir"))
        for patient, record in sorted(patients.items())
        if record.get("split") == split and not (record.get("case_dir") and Path(record["case_dir"]).is_dir())
    ]
    if missing:
        more = f" ({len(missing) - 1} more patients' folders are missing too)" if len(missing) > 1 else ""
        raise UsageError(_missing_case_message(*missing[0]) + more)


def native_grid_scores(
    patient: str,
    slices: Sequence[SliceMasks],
    record: Mapping[str, Any],
    raw_cases: dict[tuple[str, str | None], dict[str, VolumeCase]] | None = None,
    min_lesion_voxels: int = 0,
    masks: tuple[np.ndarray, np.ndarray, tuple[float, ...]] | None = None,
) -> dict[str, float]:
    """The official BraTS whole-tumour metrics of one patient, on the grid of its raw volume, after the model's
    post-processing (components below ``min_lesion_voxels`` removed from the prediction; 0: none).

    Args:
        masks: The patient's :func:`native_grid_masks` when they were already built (cropped to their
            :func:`scripts.brats_metrics.union_box`, which changes no score): the raw case is not read again.

    Returns:
        :func:`scripts.brats_metrics.whole_tumour_metrics` of the patient.
    """
    prediction, reference, spacing = masks or native_grid_masks(patient, slices, record, raw_cases)
    return whole_tumour_metrics(remove_small_lesions(prediction, min_lesion_voxels), reference, spacing)


def native_grid_masks(
    patient: str,
    slices: Sequence[SliceMasks],
    record: Mapping[str, Any],
    raw_cases: dict[tuple[str, str | None], dict[str, VolumeCase]] | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """One patient's predicted and reference whole-tumour masks on the grid of its raw volume, and its voxel size.

    Why: the slice-grid scores above are on prepared (resized) slices; BraTS scores the mask on the volume's own
    grid, lesion by lesion. The prediction goes back the way inference writes its mask (one path, no second
    resampling): the evaluated slices' probabilities through :func:`scripts.data.slices.slices_to_volume`
    (restored size, display plane to RAS; slices dropped at preparation or not evaluated stay background) and
    :func:`scripts.data.volumes.to_original_grid`. The reference is the raw case's whole-tumour mask as
    :func:`scripts.data.volumes.load_case` reads it, the spacing the file's voxel sizes (mm).

    Args:
        patient: Patient id (the raw case's id).
        slices: The patient's slice records, with probabilities (:meth:`SliceMasks.keep_probability`).
        record: The patient's ``patients.json`` entry (``case_dir``, ``layout``).
        raw_cases: Cache of listed raw data folders, shared across patients.

    Returns:
        ``(prediction, reference, spacing)``: bool masks in the raw file's voxel order, spacing in mm per axis.

    Raises:
        UsageError: The raw case (folder or segmentation) is missing.
    """
    raw_cases = {} if raw_cases is None else raw_cases
    case_dir = Path(record.get("case_dir") or "")
    if not record.get("case_dir") or not case_dir.is_dir():
        raise UsageError(_missing_case_message(patient, record.get("case_dir")))
    # BraTS: case_dir is the case folder, its parent the data folder; MSD: case_dir is imagesTr/, its parent holds
    # dataset.json. Listing that folder once serves every patient in it.
    key = (str(case_dir.parent), record.get("layout"))  # no layout recorded: detected
    if key not in raw_cases:
        raw_cases[key] = {case.case_id: case for case in find_cases(case_dir.parent, key[1])}
    case = raw_cases[key].get(patient)
    if case is None or case.seg_file is None or not case.modality_files:
        raise UsageError(_missing_case_message(patient, f"the segmentation of case {patient} in {case_dir}"))
    loaded = load_case(case, modalities=(next(iter(case.modality_files)),))  # one image: the grid, no more
    ras_shape = tuple(int(n) for n in loaded.image.shape[1:])
    probabilities = np.stack([masks.probability()[None] for masks in slices])
    mask_ras = slices_to_volume(probabilities, [masks.z for masks in slices], ras_shape, is_mask=True)
    spacing = tuple(float(s) for s in voxel_sizes(loaded.original_affine))
    return to_original_grid(mask_ras, loaded) != 0, to_original_grid(loaded.mask, loaded) != 0, spacing


def choose_postprocessing(
    slices: Iterable[SliceMasks],
    patients: Mapping[str, Mapping[str, Any]],
    candidates: Sequence[int],
    keep: dict[str, tuple[np.ndarray, np.ndarray, tuple[float, ...]]] | None = None,
) -> dict[str, Any]:
    """Choose the model's post-processing size on these (validation) patients' native-grid masks
    (:func:`scripts.postprocessing.choose_min_lesion_voxels`); each mask is put back once and post-processed per
    candidate, the network is not run again. Only one patient's volumes are held at a time.

    Args:
        keep: Filled with each patient's masks cropped to their union box (a few hundred kB where the whole grids
            are megabytes), for scoring with the chosen size without reading the raw cases again
            (:func:`native_grid_scores`'s ``masks``).
    """
    raw_cases: dict[tuple[str, str | None], dict[str, VolumeCase]] = {}
    scores = []
    for patient, own in sorted(_by_patient(slices).items()):
        prediction, reference, spacing = native_grid_masks(
            patient, sorted(own, key=lambda m: m.z), patients[patient], raw_cases
        )
        box = union_box(prediction, reference)
        prediction, reference = np.ascontiguousarray(prediction[box]), np.ascontiguousarray(reference[box])
        if keep is not None:
            keep[patient] = (prediction, reference, spacing)
        scores.append(lesionwise_dice_by_size(prediction, reference, spacing, candidates))
    return choose_min_lesion_voxels(scores)


def _missing_tumour(
    patient: str, evaluated: set[int], label_pixels: int, patients: Mapping[str, Mapping[str, Any]] | None
) -> tuple[int, int, bool]:
    """Tumour pixels dropped at preparation and kept-but-unevaluated, and whether all kept slices were evaluated."""
    if patients is None:
        return 0, 0, True
    if patient not in patients:
        raise ValueError(f"patient {patient} is not in patients.json: its dropped tumour pixels are unknown")
    record = patients[patient]
    if "tumour_pixels_dropped" not in record:
        # Defaulting to 0 would silently flatter the patient's Dice: refuse instead.
        raise ValueError(f"patients.json has no tumour_pixels_dropped for patient {patient}")
    dropped = int(record["tumour_pixels_dropped"])
    kept = record.get("slices_kept")
    complete = kept is None or {int(z) for z in kept} <= evaluated
    unseen = 0
    if not complete and "tumour_pixels_kept" in record:
        # Only the total is known per patient; the part not seen is what the evaluated labels do not account for.
        unseen = max(int(record["tumour_pixels_kept"]) - label_pixels, 0)
    if complete and "tumour_pixels_kept" in record and int(record["tumour_pixels_kept"]) != label_pixels:
        logger.warning(
            "patient %s: evaluated labels hold %d tumour pixels, patients.json says %d kept: are labels evaluated at "
            "the prepared resolution?",
            patient,
            label_pixels,
            int(record["tumour_pixels_kept"]),
        )
    return dropped, unseen, complete


def _summary(values: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, median, population std, min) of finite values; NaN for none."""
    finite = np.array([value for value in values if math.isfinite(value)], dtype=np.float64)
    if finite.size == 0:
        return math.nan, math.nan, math.nan, math.nan
    return float(finite.mean()), float(np.median(finite)), float(finite.std()), float(finite.min())


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def segmentation_metrics(scores: Sequence[PatientScore], slices: Sequence[SliceMasks]) -> dict[str, float]:
    """Per-patient and per-slice segmentation metrics (keys ``brats_patient_*``, ``brats_hd95_*``, ...)."""
    dice_mean, dice_median, dice_std, dice_min = _summary([score.dice for score in scores])
    hd95 = [score.hd95 for score in scores]
    hd95_mean, hd95_median, _, _ = _summary(hd95)
    return {
        "brats_patients": len(scores),
        "brats_patients_incomplete": sum(not score.complete for score in scores),
        "brats_patient_dice_mean": dice_mean,
        "brats_patient_dice_median": dice_median,
        "brats_patient_dice_std": dice_std,
        "brats_patient_dice_min": dice_min,
        "brats_patient_dice_kept_slices_mean": _summary([score.dice_kept_slices for score in scores])[0],
        "brats_hd95_mean": hd95_mean,
        "brats_hd95_median": hd95_median,
        "brats_hd95_undefined": sum(not math.isfinite(value) for value in hd95),
        "brats_tumour_pixels_dropped": sum(score.tumour_pixels_dropped for score in scores),
        "brats_slice_dice_mean": _mean([masks.dice for masks in slices]),
        **native_grid_metrics(scores),
    }


def native_grid_metrics(scores: Sequence[PatientScore]) -> dict[str, float]:
    """Means (and medians) over patients of the official BraTS metrics on the raw volumes' grid.

    NaN-aware as the official evaluation is: a patient whose prediction and reference are both empty scores NaN
    there and drops out of every mean (counted in ``brats_patients_native_undefined``). Every key is NaN when the
    native-grid metrics were not computed (``native_grid_metrics: false``), so the key list stays the same.
    """
    scored = [score for score in scores if score.lesions_tp is not None]
    metrics: dict[str, float] = {}
    for name in ("global_dice", "global_hd95", "lesionwise_dice", "lesionwise_hd95"):
        mean, median, _, _ = _summary([getattr(score, name) for score in scored])
        metrics[f"brats_patient_{name}_mean"], metrics[f"brats_patient_{name}_median"] = mean, median
    for name in ("matched_lesion_dice", "matched_lesion_hd95", "lesion_f1"):
        metrics[f"brats_patient_{name}_mean"] = _summary([getattr(score, name) for score in scored])[0]
    for name in ("lesions_tp", "lesions_fp", "lesions_fn"):
        metrics[f"brats_{name}"] = sum(getattr(score, name) for score in scored) if scored else math.nan
    undefined = sum(not math.isfinite(score.global_dice) for score in scored)
    metrics["brats_patients_native_undefined"] = undefined if scored else math.nan
    return metrics


def detection_metrics(slices: Sequence[SliceMasks], min_tumour_pixels: int = 1) -> dict[str, float]:
    """Slice-level tumour detection from the segmentation, and slice Dice split by ground truth.

    A slice is positive (predicted or true) when its mask has at least ``min_tumour_pixels`` pixels.
    """
    if min_tumour_pixels < 1:
        raise ValueError(f"min_tumour_pixels must be at least 1, got {min_tumour_pixels}")
    truth = np.array([masks.label_pixels >= min_tumour_pixels for masks in slices], dtype=bool)
    found = np.array([masks.pred_pixels >= min_tumour_pixels for masks in slices], dtype=bool)
    dice = np.array([masks.dice for masks in slices], dtype=np.float64)
    tp, fp = int(np.sum(truth & found)), int(np.sum(~truth & found))
    fn, tn = int(np.sum(truth & ~found)), int(np.sum(~truth & ~found))
    return {
        "brats_slices": len(slices),
        "brats_slices_tumour": int(truth.sum()),
        "brats_slice_dice_tumour_slices_mean": _mean(dice[truth]),
        "brats_slice_dice_tumour_free_slices_mean": _mean(dice[~truth]),
        "brats_slice_detection_sensitivity": _ratio(tp, tp + fn),
        "brats_slice_detection_specificity": _ratio(tn, tn + fp),
        "brats_slice_detection_tp": tp,
        "brats_slice_detection_fp": fp,
        "brats_slice_detection_fn": fn,
        "brats_slice_detection_tn": tn,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Classification


def classification_metrics(
    targets: np.ndarray, probs: np.ndarray, prefix: str, threshold: float = THRESHOLD
) -> dict[str, float]:
    """Binary tumour / no-tumour metrics at ``threshold``; NaN wherever a value is undefined.

    Args:
        targets: 0/1 true classes.
        probs: Probabilities of tumour.
        prefix: Key prefix, e.g. ``"kaggle_cls"``.
        threshold: Decision threshold (``prob >= threshold`` is tumour).

    Returns:
        ``{prefix}_n``, ``_accuracy``, ``_balanced_accuracy``, ``_roc_auc``, ``_f1``, ``_sensitivity``,
        ``_specificity``, ``_confusion_tn``, ``_confusion_fp``, ``_confusion_fn``, ``_confusion_tp``.
    """
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    predicted = (probs >= threshold).astype(np.int64)
    n = int(targets.size)
    if n == 0:
        tn = fp = fn = tp = 0
        accuracy = balanced = f1 = auc = math.nan
    else:
        tn, fp, fn, tp = (int(v) for v in confusion_matrix(targets, predicted, labels=[0, 1]).ravel())
        accuracy = float(accuracy_score(targets, predicted))
        with warnings.catch_warnings():
            # One class only: sklearn warns and returns the recall of the class present, which is what we want.
            warnings.simplefilter("ignore")
            balanced = float(balanced_accuracy_score(targets, predicted))
        f1 = float(f1_score(targets, predicted, labels=[0, 1], zero_division=np.nan))
        # AUC needs both classes; one class only (a tumour-only test subset) is NaN, not a crash.
        auc = float(roc_auc_score(targets, probs)) if np.unique(targets).size == 2 else math.nan
    return {
        f"{prefix}_n": n,
        f"{prefix}_accuracy": accuracy,
        f"{prefix}_balanced_accuracy": balanced,
        f"{prefix}_roc_auc": auc,
        f"{prefix}_f1": f1,
        f"{prefix}_sensitivity": _ratio(tp, tp + fn),
        f"{prefix}_specificity": _ratio(tn, tn + fp),
        f"{prefix}_confusion_tn": tn,
        f"{prefix}_confusion_fp": fp,
        f"{prefix}_confusion_fn": fn,
        f"{prefix}_confusion_tp": tp,
    }


def kaggle_class_metrics(records: Sequence[ClassificationRecord], threshold: float = THRESHOLD) -> dict[str, float]:
    """Per 4-class Kaggle label: image count and share predicted 'tumour' (for notumor: the false-positive rate)."""
    metrics: dict[str, float] = {}
    for index, name in enumerate(KAGGLE_CLASSES):
        probs = [record.prob for record in records if record.source == "kaggle" and record.cls4 == index]
        metrics[f"kaggle_cls4_{name}_n"] = len(probs)
        metrics[f"kaggle_cls4_{name}_tumour_rate"] = _mean([float(p >= threshold) for p in probs])
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# All metrics


def compute_metrics(
    records: EvaluationRecords,
    patients: Mapping[str, Mapping[str, Any]] | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    min_tumour_pixels: int = 1,
    threshold: float | None = None,
    native_grid: bool = False,
    min_lesion_voxels: int = 0,
    native_masks: Mapping[str, tuple[np.ndarray, np.ndarray, tuple[float, ...]]] | None = None,
) -> tuple[dict[str, float], list[PatientScore]]:
    """Score everything the collector recorded.

    Args:
        records: Slice and classification records (from :class:`PredictionCollector` or built directly).
        patients: ``patients.json`` content (see :func:`score_patients`); None: no dropped-slice accounting.
        spacing: ``(row, column, slice)`` spacing of the stacked patient volumes, for HD95.
        min_tumour_pixels: Smallest mask area that makes a slice tumour-positive for detection.
        threshold: Classification threshold; default: ``records.threshold``.
        native_grid: Add the official BraTS metrics on the raw volumes' grid (see :func:`score_patients`).
        min_lesion_voxels: Their post-processing (recorded as ``postprocessing_min_lesion_voxels``).
        native_masks: Patients' native-grid masks already built (see :func:`score_patients`).

    Returns:
        ``(metrics, per_patient)``: a flat dict of numbers (NaN where undefined; the key list is the same for
        every run, so runs compare key by key) and the per-patient scores.
    """
    threshold = records.threshold if threshold is None else threshold
    scores = score_patients(records.slices, patients, spacing, native_grid, min_lesion_voxels, native_masks)
    metrics: dict[str, float] = {"postprocessing_min_lesion_voxels": min_lesion_voxels if native_grid else math.nan}
    metrics.update(segmentation_metrics(scores, records.slices))
    metrics.update(detection_metrics(records.slices, min_tumour_pixels))
    for source in SOURCES:
        targets, probs = records.classification_arrays(source)
        metrics.update(classification_metrics(targets, probs, f"{source}_cls", threshold))
    metrics.update(kaggle_class_metrics(records.classifications, threshold))
    return metrics, scores


# ----------------------------------------------------------------------------------------------------------------------
# Output


def _json_number(value: Any) -> float | int | None:
    """A JSON-safe number: bools and integers stay integers, NaN and infinities become None (JSON null)."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def write_per_patient_csv(path: Path, scores: Sequence[PatientScore]) -> Path:
    """One row per patient; undefined values (NaN HD95) are written as empty cells."""
    columns = [item.name for item in fields(PatientScore)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for score in scores:
            row = [getattr(score, column) for column in columns]
            writer.writerow(["" if isinstance(v, float) and not math.isfinite(v) else v for v in row])
    return path


def write_per_image_csv(path: Path, records: Sequence[ClassificationRecord]) -> Path:
    """One row per classified BraTS slice and Kaggle image, with its probability of tumour: what a paired bootstrap
    of two models' AUCs resamples (scripts/compare_runs.py). ``key`` is the BraTS patient or Kaggle duplicate
    group (one image per group is scored)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "key", "z", "cls", "cls4", "prob"])
        for record in records:
            writer.writerow([record.source, record.key, "" if record.z is None else record.z, record.target,
                             "" if record.cls4 is None else record.cls4, repr(record.prob)])  # fmt: skip
    return path


def write_results(
    metrics: Mapping[str, float],
    per_patient: Sequence[PatientScore],
    records: EvaluationRecords,
    output_dir: str | os.PathLike[str],
) -> dict[str, Path]:
    """Write ``metrics.json``, ``per_patient.csv``, ``per_image.csv``, ``report.md`` and the report's PNG figures.

    ``metrics.json`` is one flat object of numbers, sorted by key, written atomically; NaN (undefined, e.g. AUC
    with a single class) and infinities are written as ``null`` because JSON has no NaN.

    Args:
        metrics: From :func:`compute_metrics`.
        per_patient: From :func:`compute_metrics`.
        records: The records the metrics came from (ROC curves and examples are drawn from them).
        output_dir: Folder to write into (created if needed).

    Returns:
        Name -> path of every file written (``metrics``, ``per_patient``, ``per_image``, ``report`` and one per
        figure).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    flat = {str(key): _json_number(value) for key, value in metrics.items()}
    paths = {
        "metrics": write_json_atomic(output_dir / "metrics.json", flat),
        "per_patient": write_per_patient_csv(output_dir / "per_patient.csv", per_patient),
        "per_image": write_per_image_csv(output_dir / "per_image.csv", records.classifications),
    }
    paths.update(write_report(metrics, per_patient, records, output_dir))
    return paths


def load_patients(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read ``patients.json`` from the file itself or from the prepared dataset folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "patients.json"
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


# ----------------------------------------------------------------------------------------------------------------------
# Collector


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _binarise(prob: Any, threshold: float) -> Any:
    # Threshold where the tensor lives (GPU): only the bool mask, a quarter of the float32 bytes, crosses to the CPU.
    if isinstance(prob, torch.Tensor):
        return prob.detach() >= threshold
    return np.asarray(prob) >= threshold


def _plane(array: np.ndarray) -> np.ndarray:
    """``(H, W)`` view of a ``(1, H, W)`` / ``(1, 1, H, W)`` / ``(H, W)`` array."""
    array = np.asarray(array)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"expected a single-channel 2D mask or image, got shape {array.shape}")
    return array


def _scalar(value: Any) -> Any:
    """A Python number or string from a 0-d / 1-element tensor or array, or the value itself."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.reshape(-1)[0].item()
    return value


def _batch_size(batch: Mapping[str, Any]) -> int:
    """B of a collated batch: the length of ``source``, else of the first per-sample value."""
    if "source" in batch and not isinstance(batch["source"], str):
        return len(batch["source"])
    for value in batch.values():
        if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim > 0:
            return int(value.shape[0])
        if isinstance(value, (list, tuple)):
            return len(value)
    raise ValueError(f"cannot tell the batch size of a batch with keys {sorted(batch)}")


def _samples(data: Any) -> list[dict[str, Any]]:
    """Per-sample dicts from a collated batch dict (lists / batched tensors) or a decollated list of dicts."""
    if data is None:
        return []
    if isinstance(data, Mapping):
        if isinstance(data.get("source"), str):
            return [dict(data)]
        size = _batch_size(data)
        samples: list[dict[str, Any]] = [{} for _ in range(size)]
        for key, value in data.items():
            if value is None:
                continue
            if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim > 0 and value.shape[0] == size:
                items: Sequence[Any] = value
            elif isinstance(value, (list, tuple)) and len(value) == size:
                items = value
            else:
                continue  # not per-sample (e.g. a scalar): not ours to interpret
            for index in range(size):
                samples[index][key] = items[index]
        return samples
    if isinstance(data, (list, tuple)):
        return [dict(sample) for sample in data]
    raise TypeError(f"expected a dict or a list of dicts, got {type(data).__name__}")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _world_size() -> int:
    return torch.distributed.get_world_size() if _distributed() else 1


def _is_rank_zero() -> bool:
    return not _distributed() or torch.distributed.get_rank() == 0


class PredictionCollector:
    """Ignite handler that records every evaluated sample for :func:`compute_metrics`.

    On each ``ITERATION_COMPLETED`` it reads ``output_transform(engine.state.output)``, merged with
    ``batch_transform(engine.state.batch)`` and / or the batch's ``batch_keys`` when given (the output wins on
    shared keys). Each may be a collated batch dict (values: lists of length B or tensors with first dimension B)
    or a list of B per-sample dicts (what MONAI evaluators hold with ``decollate=True``). Per sample:

    ==============  ==================================================  ===========================
    key             value                                               when
    ==============  ==================================================  ===========================
    ``source``      ``"brats"`` or ``"kaggle"``                         always
    ``cls_prob``    float / 0-d or (1,) tensor: probability of tumour   always
    ``cls``         int / 0-d or (1,) tensor: target, 1 = tumour        always
    ``patient``     str, BraTS patient id                               BraTS
    ``slice``       int / 0-d tensor, z index of the slice              BraTS
    ``seg_prob``    (1, H, W) tensor, tumour probability after sigmoid  BraTS
    ``label``       (1, H, W) tensor, 0/1 ground-truth mask             BraTS
    ``image``       (C, H, W) tensor, network input                     optional (overlay examples)
    ``group``       str, duplicate group id                             Kaggle
    ``cls4``        int / 0-d tensor, 4-class label                     Kaggle, optional
    ==============  ==================================================  ===========================

    Collated, a BraTS batch therefore holds ``seg_prob``/``label`` of shape (B, 1, H, W), ``cls_prob`` of shape
    (B,) or (B, 1), ``cls``/``slice`` of shape (B,), ``source``/``patient`` lists of B strings; keys a sample's
    source does not use are ignored. Masks are binarised at ``threshold`` on the tensor's device and stored
    bit-packed and cropped; probability maps are not kept.

    Records are reset at every ``EPOCH_STARTED``, so one collector serves repeated runs. With ``results_dir`` set,
    ``EPOCH_COMPLETED`` also computes the metrics, writes them with :func:`write_results` and adds them to
    ``engine.state.metrics`` (for tracking handlers attached after this one).

    Distributed runs: only rank 0 records (the handler does nothing elsewhere, so memory is not multiplied) and
    nothing is gathered. The metrics therefore cover what rank 0 evaluated: run the test evaluation without a
    sharding sampler (one process, or every rank on the full list) for test-split numbers.

    Args:
        output_transform: Maps ``engine.state.output`` to the data above.
        batch_transform: Optional; maps ``engine.state.batch`` to more of the keys above (e.g. ``patient``).
        batch_keys: Optional; keys taken from the (transformed) batch, e.g. ``["image"]`` for overlay examples
            when the evaluator's output does not carry the input image.
        threshold: Binarisation threshold for masks and classes.
        max_examples: Overlay examples to keep (one slice each from the first patients seen); needs ``image``.
        results_dir: If set, metrics and report are written there at ``EPOCH_COMPLETED`` (rank 0).
        patients: ``patients.json`` content or a path to it / to the dataset folder (dropped-slice accounting).
        spacing: ``(row, column, slice)`` spacing of the stacked volumes, for HD95.
        min_tumour_pixels: Smallest mask area that makes a slice tumour-positive for detection.
        native_grid: Also compute the official BraTS metrics on each raw volume's grid (:func:`native_grid_scores`):
            keeps the probabilities near each predicted mask, reads the raw cases ``patients`` names.
        min_lesion_voxels: The model's post-processing, applied to the native-grid masks (0: none).
        lesion_size_candidates: Choose ``min_lesion_voxels`` among these on the recorded patients first
            (:func:`choose_postprocessing`; the choice, ``selection``, is also written to ``postprocessing.json``).
    """

    def __init__(
        self,
        output_transform: Callable[[Any], Any] = lambda x: x,
        batch_transform: Callable[[Any], Any] | None = None,
        batch_keys: Sequence[str] | None = None,
        threshold: float = THRESHOLD,
        max_examples: int = 4,
        results_dir: str | os.PathLike[str] | None = None,
        patients: Mapping[str, Mapping[str, Any]] | str | os.PathLike[str] | None = None,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        min_tumour_pixels: int = 1,
        native_grid: bool = False,
        min_lesion_voxels: int = 0,
        lesion_size_candidates: Sequence[int] | None = None,
    ) -> None:
        self.output_transform = output_transform
        self.batch_transform = batch_transform
        self.batch_keys = tuple(batch_keys or ())
        self.threshold = float(threshold)
        self.max_examples = int(max_examples)
        self.results_dir = None if results_dir is None else Path(results_dir)
        self.patients = load_patients(patients) if isinstance(patients, (str, os.PathLike)) else patients
        self.spacing = tuple(float(s) for s in spacing)
        self.min_tumour_pixels = int(min_tumour_pixels)
        self.native_grid = bool(native_grid)
        if self.native_grid and self.patients is None:
            raise ValueError("native_grid needs patients (patients.json names each patient's raw case)")
        self.min_lesion_voxels = int(min_lesion_voxels)
        candidates = lesion_size_candidates
        self.lesion_size_candidates = None if candidates is None else [int(n) for n in candidates]
        if self.lesion_size_candidates is not None and not self.native_grid:
            raise UsageError("choosing the post-processing scores the native grid: it needs native_grid_metrics true")
        self.selection: dict[str, Any] | None = None
        self.records = self._new_records()
        self.metrics: dict[str, float] = {}
        self.per_patient: list[PatientScore] = []
        self.paths: dict[str, Path] = {}

    def _new_records(self) -> EvaluationRecords:
        return EvaluationRecords(max_examples=self.max_examples, threshold=self.threshold)

    def attach(self, engine: Engine) -> None:
        """Register with ``engine``: reset per epoch, record per iteration, optionally write results per epoch."""
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        if self.results_dir is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget everything recorded."""
        self.records = self._new_records()
        if _world_size() > 1 and _is_rank_zero():
            logger.warning("PredictionCollector records rank 0 only: with a sharded sampler it sees one shard.")

    def __call__(self, engine: Engine) -> None:
        """Record one iteration's samples."""
        if not _is_rank_zero():
            return
        samples = _samples(self.output_transform(engine.state.output))
        if self.batch_transform is not None or self.batch_keys:
            batch = engine.state.batch if self.batch_transform is None else self.batch_transform(engine.state.batch)
            extra = _samples(batch)
            if self.batch_keys:
                extra = [{key: more[key] for key in self.batch_keys if key in more} for more in extra]
            if len(extra) != len(samples):
                raise ValueError(f"the batch holds {len(extra)} samples, the output {len(samples)}")
            samples = [{**more, **sample} for more, sample in zip(extra, samples, strict=True)]
        for sample in samples:
            self.add_sample(sample)

    def add_sample(self, sample: Mapping[str, Any]) -> None:
        """Record one per-sample dict (keys as in the class docstring)."""
        source = _scalar(sample.get("source"))
        if source == "brats":
            # A segmentation-only model gives no cls_prob, a classification-only model no seg_prob.
            has_seg = all(sample.get(key) is not None for key in _SEGMENTATION_KEYS)
            has_cls = sample.get("cls_prob") is not None and sample.get("cls") is not None
            if not (has_seg or has_cls) or sample.get("patient") is None or sample.get("slice") is None:
                missing = [key for key in (*_SEGMENTATION_KEYS, "cls_prob", "cls") if sample.get(key) is None]
                raise KeyError(f"BraTS sample without {missing}")
            patient, z = str(_scalar(sample["patient"])), int(_scalar(sample["slice"]))
            cls_prob = float(_scalar(sample["cls_prob"])) if has_cls else None
            cls = int(_scalar(sample["cls"])) if has_cls else None
            if has_seg:
                native_shape = None
                if self.native_grid:
                    if patient not in self.patients:
                        raise ValueError(f"patient {patient} is not in patients.json: its raw volume is unknown")
                    native_shape = self.patients[patient]["original_shape"]
                self.records.add_brats_slice(
                    patient, z, sample["seg_prob"], sample["label"], cls_prob, cls, sample.get("image"), native_shape
                )
            else:
                self.records.add_brats_classification(patient, z, cls_prob, cls)
        elif source == "kaggle":
            missing = [key for key in ("group", "cls_prob", "cls") if sample.get(key) is None]
            if missing:
                raise KeyError(f"Kaggle sample without {missing}")
            cls4 = sample.get("cls4")
            self.records.add_kaggle_image(
                group=str(_scalar(sample["group"])),
                cls_prob=float(_scalar(sample["cls_prob"])),
                cls=int(_scalar(sample["cls"])),
                cls4=None if cls4 is None else int(_scalar(cls4)),
            )
        else:
            raise ValueError(f"unknown source {source!r}: expected one of {SOURCES}")

    def compute(self) -> tuple[dict[str, float], list[PatientScore]]:
        """Metrics and per-patient scores of what has been recorded (see :func:`compute_metrics`), after choosing the
        post-processing when asked to."""
        native_masks: dict[str, tuple[np.ndarray, np.ndarray, tuple[float, ...]]] = {}
        if self.lesion_size_candidates is not None and self.records.slices:
            self.selection = choose_postprocessing(
                self.records.slices, self.patients, self.lesion_size_candidates, keep=native_masks
            )
            self.min_lesion_voxels = self.selection["min_lesion_voxels"]
        self.metrics, self.per_patient = compute_metrics(
            self.records,
            self.patients,
            self.spacing,
            self.min_tumour_pixels,
            self.threshold,
            self.native_grid,
            self.min_lesion_voxels,
            native_masks,
        )
        return self.metrics, self.per_patient

    def write(self, engine: Engine | None = None) -> dict[str, Path]:
        """Compute the metrics and write all results to ``results_dir`` (rank 0 only)."""
        if not _is_rank_zero():
            return {}
        if self.results_dir is None:
            raise ValueError("PredictionCollector.write needs results_dir")
        metrics, per_patient = self.compute()
        self.paths = write_results(metrics, per_patient, self.records, self.results_dir)
        if self.selection is not None:
            self.paths["postprocessing"] = write_json_atomic(self.results_dir / "postprocessing.json", self.selection)
        if engine is not None:
            engine.state.metrics.update(metrics)
        logger.info("evaluation results written to %s", self.results_dir)
        return self.paths


def require_model(path: str | os.PathLike[str]) -> Path:
    """Fail early, with the command that makes it, when the model to evaluate does not exist."""
    model = Path(path)
    if not model.is_file():
        raise UsageError(
            f"No trained model at {model}: train it first with `python scripts/train.py --config_file "
            "\"['bundle/configs/train.yaml', PRESET]\" --bundle_root bundle --dataset_dir PREPARED_DIR`."
        )
    return model


def results_message(collector: PredictionCollector, split: str = "test") -> str:
    """Where the evaluation wrote its results and the headline numbers, printed at the end."""
    metrics = collector.metrics
    lines = [f"Evaluation on the {split} split:"]
    for key in ("brats_patient_dice_mean", "brats_hd95_mean", "brats_patient_lesionwise_dice_mean",
                "brats_cls_roc_auc", "kaggle_cls_roc_auc"):  # fmt: skip
        if key in metrics and not math.isnan(metrics[key]):
            lines.append(f"  {key}: {metrics[key]:.4f}")
    lines += [f"  {name}: {path}" for name, path in sorted(collector.paths.items())]
    return "\n".join(lines)


def add_latency(
    results_dir: str | os.PathLike[str],
    network: torch.nn.Module,
    in_channels: int,
    image_size: int,
    batch_size: int,
    tasks: Sequence[str],
    repeats: int = 10,
) -> float:
    """Time the evaluated network on batches of slices and add ``latency_ms_per_slice`` to ``metrics.json``.

    The median over ``repeats`` timed batches (after two warm-up batches) of the forward pass the model's tasks
    need, in inference mode on the evaluation device; data loading is not included. ``scripts/benchmark.py``
    measures more (TorchScript, whole volumes, memory).

    Returns:
        Milliseconds per slice.
    """
    device = next(network.parameters()).device
    images = torch.randn(batch_size, in_channels, image_size, image_size, device=device)
    flags = {"do_seg": "seg" in tasks, "do_cls": "cls" in tasks}
    network.eval()
    times = []
    with torch.inference_mode():
        for index in range(repeats + 2):
            start = time.perf_counter()
            network(images, **flags)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index >= 2:
                times.append(time.perf_counter() - start)
    latency = 1000.0 * float(np.median(times)) / batch_size
    path = Path(results_dir) / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["latency_ms_per_slice"] = latency
    write_json_atomic(path, dict(sorted(metrics.items())))
    return latency
