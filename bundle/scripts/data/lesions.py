"""Post-processing of a volume's predicted mask: removal of connected components below a size.

Why: BraTS scores lesion by lesion since 2023, and a false-positive speck far from the tumour costs a whole lesion
(Dice 0), however few its voxels. The size is chosen per trained model on the validation split (evaluate.yaml
``--choose_postprocessing true``, :mod:`scripts.postprocessing`) and stored with the model; 0 removes nothing.

Components are those BraTS counts as lesions: 3D, 26-connectivity (cc3d's default in panoptica). The result is
MONAI's ``RemoveSmallObjects(min_size=min_voxels, connectivity=3)`` as MONAI documents it (components *smaller*
than the size go), computed with scipy here: the Deploy app, which shares this package, then needs neither MONAI nor
scikit-image, and the threshold does not move with scikit-image's version (0.26, under MONAI 1.6.1, also removes
components of exactly ``min_size``: measured).
A component's size is in voxels of the grid the mask is on, so it is the same on the RAS grid and on the file's
own (one is an axis permutation and flip of the other).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["component_sizes", "remove_small_lesions"]

# 26-connectivity: voxels touching by a face, an edge or a corner are one lesion.
_FULL_3D = np.ones((3, 3, 3), dtype=bool)


def component_sizes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, sizes)``: each voxel's 3D component (0 = background, 26-connectivity) and each component's voxels
    (``sizes[k - 1]`` for label ``k``)."""
    labels, _ = ndimage.label(np.asarray(mask) != 0, structure=_FULL_3D)
    return labels, np.bincount(labels.ravel())[1:]


def remove_small_lesions(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """The mask without its connected components of fewer than ``min_voxels`` voxels.

    Args:
        mask: 3D binary mask (any dtype; nonzero is tumour).
        min_voxels: Smallest component kept; 0 (or 1) keeps everything and returns ``mask`` itself.

    Returns:
        The mask, same shape and dtype, small components set to 0.

    Raises:
        ValueError: On a mask that is not 3D or a negative size.
    """
    min_voxels = int(min_voxels)
    if min_voxels < 0:
        raise ValueError(f"min_lesion_voxels must be 0 (none) or a positive number of voxels, got {min_voxels}")
    if np.ndim(mask) != 3:
        raise ValueError(f"lesion removal needs a 3D mask, got shape {np.shape(mask)}")
    if min_voxels <= 1 or not np.any(mask):
        return mask
    labels, sizes = component_sizes(mask)
    small = np.concatenate(([False], sizes < min_voxels))
    if not small.any():
        return mask
    kept = np.array(mask, copy=True)
    kept[small[labels]] = 0
    return kept
