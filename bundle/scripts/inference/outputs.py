"""Write predictions: mask NIfTI on the input's grid, mask PNG, JSON; all of a run's outputs or none.

Files are written into a hidden staging folder inside the output folder and renamed into place only when the whole
run succeeded (a rename within one file system is atomic), so a failure never leaves a partial file, nor some
outputs of a run that looks complete.

Why not MONAI's ``SaveImage``: it writes each file as it comes, so a failed run would leave some outputs behind; the
Deploy app also writes through this module without MONAI core.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from .names import report_name
from .predict import Prediction

__all__ = ["OutputStaging", "save_mask_nifti", "write_prediction"]

_PNG_TUMOUR = 255  # masks as 0 / 255 PNGs, visible in any viewer


class OutputStaging:
    """A staging folder for one run's outputs.

    Args:
        output_dir: The run's output folder (created when missing, and removed again by :meth:`abort` when it was
            created here and is left empty).
    """

    def __init__(self, output_dir: Path | str) -> None:
        self.output_dir = Path(output_dir)
        self._created_output_dir = not self.output_dir.exists()
        self.dir = self.output_dir / f".partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(parents=True)
        self.names: list[str] = []

    def path(self, name: str) -> Path:
        """Where to write the output called ``name`` for now."""
        self.names.append(name)
        return self.dir / name

    def commit(self) -> list[Path]:
        """Move every staged file into the output folder (replacing older outputs of the same name)."""
        final = []
        for name in self.names:
            target = self.output_dir / name
            os.replace(self.dir / name, target)
            final.append(target)
        shutil.rmtree(self.dir, ignore_errors=True)
        return final

    def abort(self) -> None:
        """Drop everything staged; the output folder is left as it was before the run."""
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._created_output_dir and self.output_dir.is_dir() and not any(self.output_dir.iterdir()):
            self.output_dir.rmdir()


def save_mask_nifti(mask: np.ndarray, reference: Path, path: Path) -> None:
    """Save a uint8 mask with the reference file's affine, qform / sform codes and voxel sizes.

    Args:
        mask: ``(X, Y, Z)`` array on the reference file's voxel grid.
        reference: The input NIfTI file (a 4D one keeps its spatial part).
        path: The ``.nii.gz`` file to write.
    """
    source = nib.load(str(reference))
    if tuple(mask.shape) != tuple(source.shape[:3]):
        raise ValueError(f"mask of shape {mask.shape} is not on the grid {source.shape[:3]} of {reference}")
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    header["descrip"] = b"whole-tumour mask (0/1)"
    image = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), source.affine, header=header)
    # Both transforms exactly as stored, so that viewers that prefer either overlay the mask on the input.
    image.set_qform(source.header.get_qform(), code=int(source.header["qform_code"]))
    image.set_sform(source.header.get_sform(), code=int(source.header["sform_code"]))
    nib.save(image, str(path))


def write_prediction(prediction: Prediction, staging: OutputStaging) -> list[str]:
    """Stage one input's mask (NIfTI for volumes, PNG for images) and JSON report; returns the names written."""
    item = prediction.item
    mask_name = prediction.report["mask"]
    if item.kind == "volume":
        save_mask_nifti(prediction.mask, item.reference_file, staging.path(mask_name))
    else:
        Image.fromarray((prediction.mask * _PNG_TUMOUR).astype(np.uint8), mode="L").save(staging.path(mask_name))
    json_name = report_name(item.name)
    staging.path(json_name).write_text(json.dumps(prediction.report, indent=2) + "\n", encoding="utf-8")
    return [mask_name, json_name]
