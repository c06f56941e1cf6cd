"""The names of a run's outputs, chosen so that no output can be taken for, or replace, an input.

BraTS names its ground truth ``<case>_seg.nii.gz`` (``-seg`` in 2023); a prediction must never share that name, nor
look like an input to the next run.
"""

from __future__ import annotations

__all__ = ["PREDICTION_SUFFIXES", "REPORT_SUFFIX", "mask_name", "report_name"]

VOLUME_MASK_SUFFIX = "_pred_wt.nii.gz"  # the predicted whole-tumour mask of a volume
IMAGE_MASK_SUFFIX = "_pred_wt.png"  # the predicted mask of a 2D image
REPORT_SUFFIX = "_pred.json"  # probabilities and summary of either
PREDICTION_SUFFIXES = (VOLUME_MASK_SUFFIX, IMAGE_MASK_SUFFIX, REPORT_SUFFIX)


def mask_name(name: str, kind: str) -> str:
    """The mask file of input ``name``: ``<name>_pred_wt.nii.gz`` for a volume, ``<name>_pred_wt.png`` for an image."""
    return name + (VOLUME_MASK_SUFFIX if kind == "volume" else IMAGE_MASK_SUFFIX)


def report_name(name: str) -> str:
    """The JSON report of input ``name``: ``<name>_pred.json``."""
    return name + REPORT_SUFFIX
