"""Human-readable evaluation report: ``report.md`` with tables, and PNG figures drawn with matplotlib.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, never through ``pyplot``: no
global backend switch, no display needed, and no figure left open in a long-running process.

Why not MONAI: it has no evaluation report; its metrics are computed in :mod:`scripts.evaluation`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.metrics import auc, roc_curve

from .data.images import KAGGLE_CLASSES

if TYPE_CHECKING:  # annotations only: evaluation imports this module, never the other way round
    from .evaluation import EvaluationRecords, ExampleSlice, PatientScore

__all__ = ["format_value", "write_report"]

_SOURCE_TITLES = {"brats": "BraTS slices", "kaggle": "Kaggle images"}
_LABEL_COLOUR = "#2ca02c"  # ground truth: green
_PRED_COLOUR = "#d62728"  # prediction: red
_DPI = 110

_SEGMENTATION_ROWS = (
    ("brats_patients", "Patients"),
    ("brats_patients_incomplete", "Patients with kept slices not evaluated"),
    ("brats_patient_dice_mean", "Patient Dice, mean"),
    ("brats_patient_dice_median", "Patient Dice, median"),
    ("brats_patient_dice_std", "Patient Dice, std"),
    ("brats_patient_dice_min", "Patient Dice, worst"),
    ("brats_patient_dice_kept_slices_mean", "Patient Dice over kept slices only, mean"),
    ("brats_tumour_pixels_dropped", "Tumour pixels in dropped slices (counted as missed)"),
    ("brats_hd95_mean", "HD95, mean"),
    ("brats_hd95_median", "HD95, median"),
    ("brats_hd95_undefined", "Patients without HD95 (empty prediction or ground truth)"),
    ("brats_slices", "Slices"),
    ("brats_slice_dice_mean", "Slice Dice, mean over all slices"),
    ("brats_slice_dice_tumour_slices_mean", "Slice Dice, mean over tumour slices"),
    ("brats_slice_dice_tumour_free_slices_mean", "Slice Dice, mean over tumour-free slices"),
)
_NATIVE_GRID_ROWS = (
    ("postprocessing_min_lesion_voxels", "Post-processing: components below this many voxels removed (0: none)"),
    ("brats_patient_global_dice_mean", "Global Dice, mean"),
    ("brats_patient_global_dice_median", "Global Dice, median"),
    ("brats_patient_global_hd95_mean", "Global HD95 (mm), mean"),
    ("brats_patient_lesionwise_dice_mean", "Lesion-wise Dice, mean (BraTS 2023+ ranking)"),
    ("brats_patient_lesionwise_dice_median", "Lesion-wise Dice, median"),
    ("brats_patient_lesionwise_hd95_mean", "Lesion-wise HD95 (mm), mean"),
    ("brats_patient_matched_lesion_dice_mean", "Dice of matched lesions only, mean"),
    ("brats_patient_lesion_f1_mean", "Lesion detection F1, mean"),
    ("brats_lesions_tp", "Lesions found (matched)"),
    ("brats_lesions_fp", "False-positive lesions"),
    ("brats_lesions_fn", "Missed lesions"),
    ("brats_patients_native_undefined", "Patients left out (prediction and reference both empty)"),
)
_DETECTION_ROWS = (
    ("brats_slices_tumour", "Tumour slices (ground truth)"),
    ("brats_slice_detection_sensitivity", "Sensitivity"),
    ("brats_slice_detection_specificity", "Specificity"),
    ("brats_slice_detection_tp", "True positives"),
    ("brats_slice_detection_fp", "False positives"),
    ("brats_slice_detection_fn", "False negatives"),
    ("brats_slice_detection_tn", "True negatives"),
)
_CLASSIFICATION_ROWS = (
    ("n", "Samples"),
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("roc_auc", "ROC AUC"),
    ("f1", "F1"),
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("confusion_tp", "True positives"),
    ("confusion_fp", "False positives"),
    ("confusion_fn", "False negatives"),
    ("confusion_tn", "True negatives"),
)


def format_value(value: Any) -> str:
    """Integers as integers, other numbers with 4 decimals, undefined (NaN / None) as ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.4f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return [*lines, ""]


def _metric_table(metrics: Mapping[str, Any], rows: Sequence[tuple[str, str]]) -> list[str]:
    return _table(["Metric", "Value"], [[title, format_value(metrics.get(key))] for key, title in rows])


def _sources_present(metrics: Mapping[str, Any]) -> list[str]:
    return [source for source in _SOURCE_TITLES if (metrics.get(f"{source}_cls_n") or 0) > 0]


# ----------------------------------------------------------------------------------------------------------------------
# Figures


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=_DPI, bbox_inches="tight")
    return path


def plot_roc(records: EvaluationRecords, path: Path) -> Path | None:
    """ROC curves of every source with both classes present; None when there is none to draw."""
    figure = Figure(figsize=(5.0, 5.0))
    axes = figure.add_subplot()
    drawn = 0
    for source, title in _SOURCE_TITLES.items():
        targets, probs = records.classification_arrays(source)
        if np.unique(targets).size < 2:
            continue  # a ROC curve needs both classes
        false_positive_rate, true_positive_rate, _ = roc_curve(targets, probs)
        area = float(auc(false_positive_rate, true_positive_rate))
        axes.plot(false_positive_rate, true_positive_rate, linewidth=2, label=f"{title} (AUC {area:.3f})")
        drawn += 1
    if not drawn:
        return None
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)")
    axes.set(ylabel="True positive rate (sensitivity)", title="Tumour / no tumour: ROC")
    axes.set_aspect("equal")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return _save(figure, path)


def plot_confusion(metrics: Mapping[str, Any], path: Path) -> Path | None:
    """Confusion matrices (threshold 0.5) of every source with samples; None when there are none."""
    sources = _sources_present(metrics)
    if not sources:
        return None
    figure = Figure(figsize=(4.2 * len(sources), 4.0))
    for index, source in enumerate(sources):
        axes = figure.add_subplot(1, len(sources), index + 1)
        counts = np.array(
            [
                [metrics[f"{source}_cls_confusion_tn"], metrics[f"{source}_cls_confusion_fp"]],
                [metrics[f"{source}_cls_confusion_fn"], metrics[f"{source}_cls_confusion_tp"]],
            ],
            dtype=np.int64,
        )
        # Colour by share of the true class, so a rare class's errors are as visible as a common one's.
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for row in range(2):
            for col in range(2):
                colour = "white" if shares[row, col] > 0.5 else "black"
                text = f"{counts[row, col]}\n{shares[row, col]:.1%}"
                axes.text(col, row, text, ha="center", va="center", color=colour, fontsize=11)
        axes.set_xticks([0, 1], ["no tumour", "tumour"])
        axes.set_yticks([0, 1], ["no tumour", "tumour"])
        axes.set(xlabel="Predicted", ylabel="True", title=_SOURCE_TITLES[source])
    figure.tight_layout()
    return _save(figure, path)


def plot_patient_dice(per_patient: Sequence[PatientScore], path: Path) -> Path | None:
    """Bar chart of per-patient 3D Dice, worst first, with the mean; None without patients."""
    if not per_patient:
        return None
    ordered = sorted(per_patient, key=lambda score: score.dice)
    dice = np.array([score.dice for score in ordered])
    width = min(max(6.0, 0.25 * len(ordered)), 24.0)
    figure = Figure(figsize=(width, 4.0))
    axes = figure.add_subplot()
    positions = np.arange(len(ordered))
    axes.bar(positions, dice, color="#1f77b4", label="Dice")
    axes.axhline(float(dice.mean()), color=_PRED_COLOUR, linestyle="--", label=f"mean {dice.mean():.3f}")
    if len(ordered) <= 60:  # beyond that the names are unreadable; the table in report.md has them
        axes.set_xticks(positions, [score.patient for score in ordered], rotation=90, fontsize=7)
    else:
        axes.set_xticks([])
    axes.set(ylim=(0, 1), xlim=(-0.6, len(ordered) - 0.4), ylabel="3D Dice", xlabel="Patient (worst first)")
    axes.set_title("Whole-tumour Dice per patient")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    return _save(figure, path)


def plot_examples(examples: Sequence[ExampleSlice], path: Path) -> Path | None:
    """Image with ground-truth (green) and predicted (red) contours for each example slice; None without any."""
    if not examples:
        return None
    columns = min(len(examples), 4)
    rows = math.ceil(len(examples) / columns)
    figure = Figure(figsize=(3.2 * columns, 3.4 * rows))
    for index, example in enumerate(examples):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.imshow(example.image, cmap="gray", interpolation="nearest")
        # A contour of an empty mask only raises a warning, so empty masks are skipped.
        # The ground truth is drawn last so it stays visible where the two contours coincide.
        if example.pred.any():
            axes.contour(example.pred.astype(np.float32), levels=[0.5], colors=_PRED_COLOUR, linewidths=1.2)
        if example.label.any():
            axes.contour(example.label.astype(np.float32), levels=[0.5], colors=_LABEL_COLOUR, linewidths=1.2)
        axes.set_title(f"{example.patient} z={example.z}\nslice Dice {example.dice:.3f}", fontsize=9)
        axes.axis("off")
    handles = [
        Line2D([], [], color=_LABEL_COLOUR, label="ground truth"),
        Line2D([], [], color=_PRED_COLOUR, label="prediction"),
    ]
    figure.legend(handles=handles, loc="lower center", ncol=2, frameon=False)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(figure, path)


# ----------------------------------------------------------------------------------------------------------------------
# Markdown


def _markdown(metrics: Mapping[str, Any], per_patient: Sequence[PatientScore], figures: Mapping[str, Path]) -> str:
    lines = ["# Evaluation report", ""]
    kaggle_n = metrics.get("kaggle_cls_n") or 0
    lines += [
        f"Test split: {format_value(metrics.get('brats_patients'))} BraTS patients "
        f"({format_value(metrics.get('brats_slices'))} slices) and {format_value(kaggle_n)} Kaggle images. "
        "Probabilities are thresholded at 0.5; `n/a` marks a value that is undefined for this data "
        "(e.g. ROC AUC with a single class present).",
        "",
    ]
    if metrics.get("brats_patients"):
        lines += ["## Segmentation (BraTS, whole tumour)", ""]
        lines += [
            "Patient Dice is computed over each patient's whole volume; tumour in slices dropped during data "
            "preparation counts as missed. Slice Dice is 1 for a tumour-free slice with an empty prediction and 0 "
            "for a false positive there. HD95 is in the unit of the spacing given to the evaluation.",
            "",
        ]
        lines += _metric_table(metrics, _SEGMENTATION_ROWS)
        if metrics.get("brats_lesions_tp") is not None and math.isfinite(metrics["brats_lesions_tp"]):
            lines += ["## Official BraTS metrics on the volume's grid (whole tumour)", ""]
            lines += [
                "Each predicted mask is put back on its raw volume's grid as inference writes it and scored against "
                "the raw segmentation with panoptica, configured as the official BraTS glioma evaluation: every "
                "connected component (26-connected) is a lesion, predicted and true lesions are paired one to one by "
                "Dice. Lesion-wise scores average over all lesions, an unpaired one (missed, or a false positive) "
                "counting Dice 0 and HD95 373 mm, so a few stray voxels cost a whole lesion while barely moving the "
                "global Dice. A patient with prediction and reference both empty is undefined and left out, as in "
                "the official evaluation. The predicted masks are post-processed first as inference does: their "
                "components below the size chosen for the model on the validation split are removed (first row).",
                "",
            ]
            lines += _metric_table(metrics, _NATIVE_GRID_ROWS)
        lines += ["## Slice-level tumour detection (from the segmentation)", ""]
        lines += _metric_table(metrics, _DETECTION_ROWS)
    sources = _sources_present(metrics)
    if sources:
        lines += ["## Classification: tumour / no tumour (classification head)", ""]
        header = ["Metric", *(_SOURCE_TITLES[source] for source in sources)]
        rows = [
            [title, *(format_value(metrics.get(f"{source}_cls_{key}")) for source in sources)]
            for key, title in _CLASSIFICATION_ROWS
        ]
        lines += _table(header, rows)
    class_rows = [
        [name, format_value(metrics[f"kaggle_cls4_{name}_n"]), format_value(metrics[f"kaggle_cls4_{name}_tumour_rate"])]
        for name in KAGGLE_CLASSES
        if (metrics.get(f"kaggle_cls4_{name}_n") or 0) > 0
    ]
    if class_rows:
        lines += ["### Kaggle images by class", ""]
        lines += _table(["Class", "Images", "Share predicted tumour"], class_rows)
    if per_patient:
        lines += ["## Per-patient scores", ""]
        header = ["Patient", "Slices", "Dice", "Dice (kept slices)", "HD95", "Tumour px", "Dropped px", "Predicted px",
                  "Global Dice (volume grid)", "Lesion-wise Dice", "Lesions TP/FP/FN"]  # fmt: skip
        rows = [
            [
                score.patient + ("" if score.complete else " (incomplete)"),
                str(score.slices),
                format_value(score.dice),
                format_value(score.dice_kept_slices),
                format_value(score.hd95),
                str(score.label_pixels),
                str(score.tumour_pixels_dropped),
                str(score.pred_pixels),
                format_value(score.global_dice),
                format_value(score.lesionwise_dice),
                "n/a" if score.lesions_tp is None else f"{score.lesions_tp}/{score.lesions_fp}/{score.lesions_fn}",
            ]
            for score in per_patient
        ]
        lines += _table(header, rows)
    if figures:
        lines += ["## Figures", ""]
        for name, path in figures.items():
            lines += [f"![{name}]({Path(path).name})", ""]
    return "\n".join(lines)


def write_report(
    metrics: Mapping[str, Any],
    per_patient: Sequence[PatientScore],
    records: EvaluationRecords,
    output_dir: str | os.PathLike[str],
) -> dict[str, Path]:
    """Draw the figures and write ``report.md`` into ``output_dir``.

    Args:
        metrics: Flat metrics from :func:`scripts.evaluation.compute_metrics`.
        per_patient: Per-patient scores from the same call.
        records: The records scored (ROC curves and overlay examples are drawn from them).
        output_dir: Destination folder (created if needed).

    Returns:
        ``report`` plus one entry per figure drawn (``roc``, ``confusion``, ``patient_dice``, ``examples``); a
        figure without data (e.g. ROC with one class only) is not drawn.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    drawn = {
        "roc": plot_roc(records, output_dir / "roc.png"),
        "confusion": plot_confusion(metrics, output_dir / "confusion.png"),
        "patient_dice": plot_patient_dice(per_patient, output_dir / "patient_dice.png"),
        "examples": plot_examples(records.examples, output_dir / "examples.png"),
    }
    figures = {name: path for name, path in drawn.items() if path is not None}
    report = output_dir / "report.md"
    temporary = report.with_name(f".{report.name}.tmp")
    temporary.write_text(_markdown(metrics, per_patient, figures), encoding="utf-8")
    os.replace(temporary, report)  # a reader never sees half a report
    return {"report": report, **figures}
