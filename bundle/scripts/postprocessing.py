"""The post-processing size of a trained model: chosen on the validation split, stored with the model, read back.

Why: a 2D slice model leaves small false-positive components that the BraTS lesion-wise Dice punishes as whole
lesions (:mod:`scripts.brats_metrics`). Removing components below a size (:mod:`scripts.data.lesions`) helps or
hurts depending on the model, so the size is chosen per trained model, on validation patients only (never on the
test split), by the mean lesion-wise Dice on the volumes' own grid; none (0) is one of the candidates.

Where it is stored: the bundle's own model (``models/model.pt``) in ``metadata.json`` ``postprocessing``, which
``inference.yaml`` reads and ``ckpt_export`` embeds into ``model.ts`` (hence the Deploy app); any other model (a
baseline's ``models/<variant>/model.pt``) in ``postprocessing.json`` beside it. The record names the weights it was
chosen for (sha256): publishing other weights resets the bundle's to 0, and the evaluation ignores a choice made
for other weights.

Why not MONAI: its ``RemoveSmallObjects`` removes components (:mod:`scripts.data.lesions`), but choosing the size
per model and storing it with the weights is not in MONAI.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .brats_metrics import whole_tumour_metrics
from .data.lesions import component_sizes, remove_small_lesions
from .errors import UsageError
from .files import file_sha256, write_json_atomic
from .networks.checkpoints import is_bundle_model

__all__ = [
    "LESION_SIZE_CANDIDATES",
    "choose_min_lesion_voxels",
    "forget_stale_choice",
    "lesionwise_dice_by_size",
    "require_validation_split",
    "store_choice",
    "stored_min_lesion_voxels",
]

logger = logging.getLogger(__name__)

# Voxels (1 mm^3 on BraTS grids): none, specks of a few slices' worth of voxels (10-50; BraTS 2023's own script set
# reference lesions of 50 voxels or less aside), up to 1 ml; a real whole tumour is tens of ml, and larger sizes would
# start to delete real small lesions rather than noise.
LESION_SIZE_CANDIDATES: tuple[int, ...] = (0, 10, 25, 50, 100, 250, 500, 1000)
SIDECAR = "postprocessing.json"


def lesionwise_dice_by_size(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float], candidates: Sequence[int]
) -> dict[int, float]:
    """One patient's BraTS lesion-wise Dice after removing its predicted components below each candidate size.

    A size that removes no more components than the previous one gives the same mask: scored once.

    Returns:
        Candidate -> lesion-wise Dice (NaN where prediction and reference are both empty, as BraTS scores it).
    """
    _, sizes = component_sizes(prediction)
    scores: dict[int, float] = {}
    last: tuple[int, float] | None = None
    for size in sorted(int(n) for n in candidates):
        kept = int(np.count_nonzero(sizes >= size))
        if last is None or last[0] != kept:
            scores_now = whole_tumour_metrics(remove_small_lesions(prediction, size), reference, spacing)
            last = (kept, scores_now["lesionwise_dice"])
        scores[size] = last[1]
    return scores


def choose_min_lesion_voxels(scores: Sequence[Mapping[int, float]]) -> dict[str, Any]:
    """The candidate size with the best mean lesion-wise Dice over patients (NaN patients left out, as in the
    reported means); ties go to the smaller size, so none (0) wins unless removal helps.

    Args:
        scores: Per patient, :func:`lesionwise_dice_by_size`; every patient with the same candidates.

    Returns:
        ``{"min_lesion_voxels": chosen, "criterion": ..., "patients": n, "candidates": [{"min_lesion_voxels": n,
        "lesionwise_dice_mean": mean}, ...]}``; with no patient scored, 0.
    """
    candidates = sorted({size for patient in scores for size in patient})
    table, best = [], (-math.inf, 0)
    for size in candidates:
        values = [patient[size] for patient in scores if math.isfinite(patient[size])]
        mean = float(np.mean(values)) if values else math.nan
        table.append({"min_lesion_voxels": size, "lesionwise_dice_mean": None if math.isnan(mean) else mean})
        if values and mean > best[0] + 1e-12:
            best = (mean, size)
    return {
        "min_lesion_voxels": best[1],
        "criterion": "mean BraTS lesion-wise Dice of the whole tumour on the volumes' grid, ties to the smaller size",
        "patients": len(scores),
        "candidates": table,
    }


def require_validation_split(split: str, choose: bool) -> None:
    """Refuse to choose the post-processing on any split but validation: the test split is scored once, with a
    model whose settings were all chosen without it."""
    if choose and split != "validation":
        raise UsageError(
            f"--choose_postprocessing true picks the post-processing on the validation split, not on {split!r}: the "
            f"test split is only scored, once, with what validation chose. Add --eval_split validation."
        )


def _record_file(metadata_file: str, model_path: str) -> Path | None:
    """Where the model's choice lives: None for the bundle's model (metadata.json), else the sidecar file."""
    return None if is_bundle_model(metadata_file, model_path) else Path(model_path).parent / SIDECAR


def _read(path: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def stored_min_lesion_voxels(metadata_file: str, model_path: str) -> int:
    """The size chosen for the model at ``model_path``, 0 when none was chosen for these weights."""
    sidecar = _record_file(metadata_file, model_path)
    record = _read(sidecar) if sidecar else _read(metadata_file).get("postprocessing", {})
    size = int(record.get("min_lesion_voxels", 0))
    if size and record.get("model_sha256") != (file_sha256(model_path) if Path(model_path).is_file() else None):
        logger.warning("post-processing of %d voxels was chosen for other weights than %s: none", size, model_path)
        return 0
    return size


def store_choice(selection: Mapping[str, Any] | None, metadata_file: str, model_path: str) -> str:
    """Record the chosen size for the model (see the module docstring for where). Returns a line for the log."""
    if not selection:
        return "Post-processing not chosen: the model has no segmentation to post-process (or no patient was scored)."
    record = {"min_lesion_voxels": int(selection["min_lesion_voxels"]), "model_sha256": file_sha256(model_path),
              "chosen_on": "validation", "criterion": selection["criterion"]}  # fmt: skip
    sidecar = _record_file(metadata_file, model_path)
    if sidecar:
        write_json_atomic(sidecar, record, indent=4)
    else:
        metadata = _read(metadata_file)
        metadata["postprocessing"] = record
        write_json_atomic(metadata_file, metadata, indent=4, sort_keys=False)  # the file's own layout and key order
    means = {row["min_lesion_voxels"]: row["lesionwise_dice_mean"] for row in selection["candidates"]}
    table = ", ".join(f"{size}: " + ("n/a" if mean is None else f"{mean:.4f}") for size, mean in means.items())
    return (
        f"Post-processing chosen on {selection['patients']} validation patients (mean lesion-wise Dice by minimum "
        f"lesion size in voxels: {table}): min_lesion_voxels {record['min_lesion_voxels']}"
        f"{' (none)' if not record['min_lesion_voxels'] else ''}, written to {sidecar or metadata_file}"
    )


def forget_stale_choice(metadata_file: str, model_path: str) -> None:
    """After new weights are published: a choice made for other weights no longer holds (none until chosen again)."""
    sidecar = _record_file(metadata_file, model_path)
    record = _read(sidecar) if sidecar else _read(metadata_file).get("postprocessing")
    if record is None or record.get("model_sha256") == file_sha256(model_path):
        return
    if sidecar:
        sidecar.unlink(missing_ok=True)
    elif record != {"min_lesion_voxels": 0}:
        metadata = _read(metadata_file)
        metadata["postprocessing"] = {"min_lesion_voxels": 0}
        write_json_atomic(metadata_file, metadata, indent=4, sort_keys=False)
