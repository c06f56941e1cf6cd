"""Turn a loaded RAS volume into normalised, resized axial 2D slices, and put slice predictions back.

In-plane orientation: every 2D array produced here is in the radiological display convention (rows run from
anterior to posterior, columns from the patient's right to left), i.e. how axial MRI slices are shown and how the
Kaggle-style 2D images used in stage 3 look. :func:`to_display_plane` / :func:`from_display_plane` convert
between a RAS ``(..., X, Y)`` slice and that ``(..., H, W) = (..., Y, X)`` view; :func:`slices_to_volume` undoes
everything :func:`extract_slices` does to a slice, so predictions land on the volume's RAS grid.

Why not MONAI's ``Resize`` / ``NormalizeIntensity``: the Deploy app runs this same path without MONAI core, and
its inverse (:func:`slices_to_volume`) must undo exactly what it did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from scripts.data.volumes import LoadedCase

__all__ = [
    "Slice",
    "brain_mask",
    "extract_slices",
    "from_display_plane",
    "normalise_volume",
    "resize_slice",
    "restore_slice",
    "slice_label",
    "slices_to_volume",
    "to_display_plane",
]

_CLIP_PERCENTILES = (0.5, 99.5)
_MASK_THRESHOLD = 0.5


@dataclass
class Slice:
    """One prepared axial slice.

    Attributes:
        z: Index of the slice along the RAS Z axis of the loaded volume.
        image: ``(C, size, size)`` float32, normalised, display plane.
        mask: ``(1, size, size)`` uint8 whole-tumour mask, or None for unlabelled cases.
        brain_fraction: Brain pixels / slice pixels at the original resolution (the value used for dropping).
        tumour_pixels: Tumour pixels of ``mask`` at the prepared resolution (0 without mask).
    """

    z: int
    image: np.ndarray
    mask: np.ndarray | None
    brain_fraction: float
    tumour_pixels: int


def brain_mask(image: np.ndarray) -> np.ndarray:
    """Brain voxels of a skull-stripped volume, whose background is exactly 0.

    Args:
        image: ``(C, X, Y, Z)`` volume.

    Returns:
        ``(X, Y, Z)`` bool, True where any channel is nonzero.
    """
    return np.any(image != 0, axis=0)


def _channel_stats(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Per-channel (low, high, mean, scale) of the robust z-score, from brain voxels; shape (C, 4)."""
    stats = np.zeros((image.shape[0], 4), dtype=np.float64)
    if not brain.any():
        return stats
    for channel in range(image.shape[0]):
        values = image[channel][brain]
        low, high = np.percentile(values, _CLIP_PERCENTILES)
        values = np.clip(values, low, high)
        mean = float(values.mean(dtype=np.float64))
        std = float(values.std(dtype=np.float64))
        # A constant channel (std 0) carries no information: map it to 0 rather than dividing by zero.
        stats[channel] = (low, high, mean, 1.0 / std if std > 1e-8 else 0.0)
    return stats


def _apply_stats(image: np.ndarray, brain: np.ndarray, stats: np.ndarray, channel_axis: int = 0) -> np.ndarray:
    """Clip, centre and scale with per-channel stats; voxels outside ``brain`` (broadcastable) become 0.

    The result is C-contiguous whatever the strides of ``image``, so a transposed view is copied only once.
    """
    shape = [1] * image.ndim
    shape[channel_axis] = -1
    low, high, mean, scale = (stats[:, k].astype(np.float32).reshape(shape) for k in range(4))
    out = np.empty(image.shape, dtype=np.float32)
    np.clip(image, low, high, out=out)
    out -= mean
    out *= scale
    out *= brain  # cheaper than a boolean scatter
    return out


def normalise_volume(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Z-score each channel on brain voxels, robustly.

    Brain intensities are clipped to their 0.5-99.5 percentiles first, so a few hot voxels do not squash the
    scale; the clipped brain values then have mean 0 and standard deviation 1. Background is set to 0.

    Args:
        image: ``(C, X, Y, Z)`` volume.
        brain: ``(X, Y, Z)`` bool brain mask.

    Returns:
        ``(C, X, Y, Z)`` float32.
    """
    return _apply_stats(image, brain, _channel_stats(image, brain))


def to_display_plane(array: np.ndarray) -> np.ndarray:
    """RAS ``(..., X, Y)`` slices -> radiological display ``(..., Y, X)`` (anterior up, patient's right on the left).

    Args:
        array: Array whose last two axes are RAS X and Y.

    Returns:
        A view with the last two axes in display order.
    """
    return np.flip(np.swapaxes(array, -1, -2), axis=(-2, -1))


def from_display_plane(array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_display_plane` (the transform is its own inverse)."""
    return np.flip(np.swapaxes(array, -1, -2), axis=(-2, -1))


def _resize(array: np.ndarray, shape: tuple[int, int], is_mask: bool) -> np.ndarray:
    """Resize the last two axes of a ``(C, H, W)`` or ``(N, C, H, W)`` array in one interpolate call."""
    if array.ndim not in (3, 4):
        raise ValueError(f"expected a (C, H, W) or (N, C, H, W) array, got shape {array.shape}")
    batched = array.ndim == 4
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    tensor = tensor if batched else tensor[None]
    if tuple(tensor.shape[-2:]) != tuple(shape):
        # Antialiasing only matters when shrinking; for masks it makes the 0.5 threshold a local majority vote.
        shrinking = shape[0] < tensor.shape[-2] or shape[1] < tensor.shape[-1]
        tensor = F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False, antialias=shrinking)
    result = tensor.numpy()
    if is_mask:
        # Linear interpolation + threshold keeps thin structures better than nearest-neighbour sampling.
        result = (result >= _MASK_THRESHOLD).astype(np.uint8)
    return result if batched else result[0]


def resize_slice(array: np.ndarray, size: int, is_mask: bool = False) -> np.ndarray:
    """Resize slices to ``size x size``.

    Images use bilinear interpolation (antialiased when shrinking); masks use the same interpolation followed by
    a 0.5 threshold, so they stay aligned with their images.

    Args:
        array: ``(C, H, W)`` or a stack ``(N, C, H, W)`` (one interpolate call for the whole stack).
        size: Output height and width.
        is_mask: Threshold the result and return uint8.

    Returns:
        ``(C, size, size)`` or ``(N, C, size, size)``; float32, or uint8 for masks.
    """
    return _resize(array, (size, size), is_mask)


def restore_slice(array: np.ndarray, shape: tuple[int, int], is_mask: bool = False) -> np.ndarray:
    """Inverse of :func:`resize_slice`, for predictions.

    Restoring probabilities with ``is_mask=False`` and thresholding afterwards gives smoother borders than
    restoring a binary mask.

    Args:
        array: ``(C, size, size)`` or ``(N, C, size, size)``.
        shape: ``(H, W)`` of the slice before resizing.
        is_mask: Threshold the result at 0.5 and return uint8.

    Returns:
        ``(C, H, W)`` or ``(N, C, H, W)``; float32, or uint8 for masks.
    """
    return _resize(array, (int(shape[0]), int(shape[1])), is_mask)


def extract_slices(loaded: LoadedCase, size: int = 256, min_brain_fraction: float = 0.05) -> tuple[list[Slice], int]:
    """Normalise a loaded volume and cut it into resized axial slices.

    Args:
        loaded: A case from :func:`scripts.data.volumes.load_case`.
        size: Height and width of the prepared slices.
        min_brain_fraction: Slices whose brain fraction (brain pixels / slice pixels, at the original resolution)
            is below this are dropped.

    Returns:
        The kept slices in increasing z, and the number of tumour pixels (prepared resolution) in dropped slices,
        so an evaluation can count tumour it never saw.
    """
    brain = brain_mask(loaded.image)
    fractions = brain.mean(axis=(0, 1))
    keep = np.flatnonzero(fractions >= min_brain_fraction)
    images = np.empty((0, loaded.image.shape[0], size, size), dtype=np.float32)
    if keep.size:
        # Statistics come from the whole brain; only the kept slices are normalised. Kept slices are usually one
        # run, and a slice view avoids a slow gather along the last axis.
        run = keep[-1] - keep[0] + 1 == keep.size
        pick = slice(int(keep[0]), int(keep[-1]) + 1) if run else keep
        # (C, X, Y, K) -> (K, C, X, Y) -> display plane (K, C, Y, X) as views; normalising writes the copy.
        stack = to_display_plane(np.moveaxis(loaded.image[..., pick], -1, 0))
        brain_stack = to_display_plane(np.moveaxis(brain[..., pick], -1, 0))[:, None]
        kept = _apply_stats(stack, brain_stack, _channel_stats(loaded.image, brain), channel_axis=1)
        images = resize_slice(kept, size)  # one interpolate call for the whole stack
        del kept

    masks, counts, dropped = None, np.zeros(loaded.image.shape[-1], dtype=np.int64), 0
    if loaded.mask is not None:
        # Resize every slice's mask (cheap) so dropped tumour is counted at the prepared resolution too.
        all_masks = resize_slice(to_display_plane(np.moveaxis(loaded.mask, -1, 0))[:, None], size, is_mask=True)
        counts = all_masks.sum(axis=(1, 2, 3), dtype=np.int64)
        dropped = int(counts.sum() - counts[keep].sum())
        masks = all_masks[keep]

    slices = [
        Slice(
            z=int(z),
            image=images[k],
            mask=None if masks is None else masks[k],
            brain_fraction=float(fractions[z]),
            tumour_pixels=int(counts[z]),
        )
        for k, z in enumerate(keep)
    ]
    return slices, dropped


def slices_to_volume(
    slices: np.ndarray, z_indices: Sequence[int], shape: tuple[int, int, int], is_mask: bool = False
) -> np.ndarray:
    """Put per-slice predictions back on the RAS grid of the volume they came from.

    Undoes :func:`extract_slices` for outputs: restores the slice size, converts from the display plane back to
    RAS and places each slice at its z; slices not given (dropped ones) stay 0. Follow with
    :func:`scripts.data.volumes.to_original_grid` to match the input file.

    Args:
        slices: ``(K, size, size)`` or ``(K, 1, size, size)`` predictions (probabilities or 0/1 masks).
        z_indices: RAS z index of each of the K slices (``Slice.z``).
        shape: RAS spatial shape ``(X, Y, Z)`` of the loaded volume.
        is_mask: Threshold at 0.5 after restoring and return uint8; otherwise float32.

    Returns:
        ``(X, Y, Z)`` array.
    """
    z_indices = np.asarray(z_indices, dtype=np.int64)
    stack = np.asarray(slices)
    stack = stack[:, None] if stack.ndim == 3 else stack
    if stack.ndim != 4 or stack.shape[1] != 1 or stack.shape[0] != z_indices.size:
        raise ValueError(f"expected {z_indices.size} slices of shape (1, H, W), got array of shape {stack.shape}")
    x_size, y_size, _ = shape
    volume = np.zeros(shape, dtype=np.uint8 if is_mask else np.float32)
    if z_indices.size:
        # Display plane of an (X, Y) slice is (Y, X).
        restored = from_display_plane(restore_slice(stack, (y_size, x_size), is_mask=is_mask)[:, 0])
        volume[..., z_indices] = np.moveaxis(restored, 0, -1)
    return volume


def slice_label(tumour_pixels: int, min_tumour_pixels: int = 1) -> int:
    """Classification target of a slice.

    Args:
        tumour_pixels: Tumour pixels in the slice mask.
        min_tumour_pixels: Smallest tumour area that counts as tumour (at least 1).

    Returns:
        1 (tumour) when ``tumour_pixels >= min_tumour_pixels``, else 0.
    """
    if min_tumour_pixels < 1:
        raise ValueError(f"min_tumour_pixels must be at least 1, got {min_tumour_pixels}")
    return int(tumour_pixels >= min_tumour_pixels)
