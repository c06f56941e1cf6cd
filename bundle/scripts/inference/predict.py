"""The prediction itself: training preprocessing, the network over slice batches, masks and probabilities.

Volumes go through :func:`scripts.data.volumes.load_case` and :func:`scripts.data.slices.extract_slices` exactly as
in data preparation (RAS, robust z-score on brain voxels, display plane, resize); images through
:func:`scripts.data.images.preprocess_grey` as the Kaggle images were. Predictions go back with
:func:`scripts.data.slices.slices_to_volume` and :func:`scripts.data.volumes.to_original_grid`, so a volume's mask
has the input file's shape and voxel order, and an image's mask its size.

Nothing here imports MONAI: the MONAI Deploy application runs the same functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from nibabel import orientations

from scripts.data.images import load_grey, preprocess_grey
from scripts.data.slices import extract_slices, restore_slice, slices_to_volume
from scripts.data.volumes import DataError, LoadedCase, load_case, to_original_grid

from .inputs import InferenceInput
from .names import mask_name
from .settings import InferenceSettings

__all__ = [
    "THRESHOLD",
    "Prediction",
    "PreparedImage",
    "PreparedVolume",
    "finish",
    "predict",
    "prepare",
    "run_network",
]

THRESHOLD = 0.5
LABELS = ("no tumour", "tumour")


@dataclass
class PreparedVolume:
    """A volume cut into network inputs.

    Attributes:
        item: The input.
        image: ``(K, C, S, S)`` float32 slices (display plane, normalised) of the analysed slices.
        z: RAS z index of each of the K slices.
        loaded: The case as read (its voxel array dropped once sliced), for going back to the file's grid.
        ras_shape: Spatial shape of the volume in RAS.
        domain: The network's image domain: slices of a volume, as the BraTS slices it trained on.
    """

    domain = 0
    item: InferenceInput
    image: np.ndarray
    z: np.ndarray
    loaded: LoadedCase
    ras_shape: tuple[int, int, int]


@dataclass
class PreparedImage:
    """A 2D image as the network input.

    Attributes:
        item: The input.
        image: ``(1, C, S, S)`` float32.
        shape: ``(H, W)`` of the image file.
        domain: The network's image domain: whole-head 2D images, as the Kaggle images it trained on.
    """

    domain = 1
    item: InferenceInput
    image: np.ndarray
    shape: tuple[int, int]


@dataclass
class Prediction:
    """What is written for one input.

    Attributes:
        item: The input.
        mask: uint8 0/1 whole-tumour mask with the input's shape (volume: the file's voxel grid; image: H x W).
        report: The JSON content (probabilities, classes, volumes).
    """

    item: InferenceInput
    mask: np.ndarray
    report: dict[str, Any]


def _prepare_volume(item: InferenceInput, settings: InferenceSettings) -> PreparedVolume:
    loaded = load_case(item.case, settings.modalities)
    slices, _ = extract_slices(loaded, size=settings.image_size, min_brain_fraction=settings.min_brain_fraction)
    if not slices:
        what = (
            "all its voxels are 0"
            if not np.any(loaded.image)
            else f"no axial slice has nonzero voxels in {settings.min_brain_fraction:.0%} of its pixels"
        )
        raise DataError(f"{item.source}: the volume is empty ({what}); nothing to segment")
    ras_shape = tuple(int(s) for s in loaded.image.shape[1:])
    image = np.stack([s.image for s in slices])
    # The voxels are not needed any more; the rest of the case is what goes back to the file's grid.
    loaded = dataclasses.replace(loaded, image=np.zeros((loaded.image.shape[0], 0, 0, 0), dtype=np.float32))
    return PreparedVolume(item, image, np.array([s.z for s in slices], dtype=np.int64), loaded, ras_shape)


def _prepare_image(item: InferenceInput, settings: InferenceSettings) -> PreparedImage:
    try:
        grey, _ = load_grey(item.source)
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"file {item.source}: pixels cannot be decoded ({error})") from error
    image, blank = preprocess_grey(grey, settings.image_size)
    if blank:
        raise DataError(f"file {item.source}: the image is empty (no foreground); nothing to segment")
    # A multi-channel network sees the grey image in every channel, as in training.
    stack = np.repeat(image[None], settings.in_channels, axis=1)
    return PreparedImage(item, stack, (int(grey.shape[0]), int(grey.shape[1])))


def prepare(item: InferenceInput, settings: InferenceSettings) -> PreparedVolume | PreparedImage:
    """Read an input and turn it into network inputs, as training data were.

    Raises:
        DataError: Unreadable data, or an empty volume or image, naming the file.
    """
    return _prepare_volume(item, settings) if item.kind == "volume" else _prepare_image(item, settings)


def run_network(
    network: Callable[..., dict[str, torch.Tensor]], image: np.ndarray | torch.Tensor, batch_size: int, domain: int = 0
) -> dict[str, torch.Tensor]:
    """Run the multi-task network over a stack of slices, ``batch_size`` at a time.

    Args:
        network: The eager or TorchScript model (``forward(x) -> {"seg": ..., "cls": ...}``), in eval mode and on
            the device it should run on.
        image: ``(K, C, S, S)`` stack.
        batch_size: Slices per call.
        domain: The image domain (``PreparedVolume.domain`` or ``PreparedImage.domain``): it picks the encoder's
            BatchNorm statistics.

    Returns:
        ``{"seg": (K, 1, S, S) logits, "cls": (K, 2) logits}`` on the CPU.
    """
    device = next(iter(network.parameters())).device if hasattr(network, "parameters") else torch.device("cpu")
    stack = torch.as_tensor(image, dtype=torch.float32)
    seg, cls = [], []
    with torch.inference_mode():
        for start in range(0, stack.shape[0], batch_size):
            outputs = network(stack[start : start + batch_size].to(device), True, True, domain)
            seg.append(outputs["seg"].float().cpu())
            cls.append(outputs["cls"].float().cpu())
    return {"seg": torch.cat(seg), "cls": torch.cat(cls)}


def _tumour_probability(cls_logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(cls_logits.float(), dim=1)[:, 1].numpy().astype(np.float64)


def _axial_axis(loaded: LoadedCase) -> tuple[int, bool]:
    """The file axis that RAS z (inferior to superior) runs along, and whether it runs the other way."""
    ornt = orientations.io_orientation(loaded.original_affine)
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    return axis, bool(ornt[axis, 1] < 0)


def _finish_volume(
    prepared: PreparedVolume, seg: torch.Tensor, cls: torch.Tensor, settings: InferenceSettings
) -> Prediction:
    loaded = prepared.loaded
    probabilities = torch.sigmoid(seg.float()).numpy()
    mask_ras = slices_to_volume(probabilities, prepared.z, prepared.ras_shape, is_mask=True)
    mask = to_original_grid(mask_ras, loaded)
    tumour = _tumour_probability(cls)
    by_z = dict(zip(prepared.z.tolist(), tumour.tolist(), strict=True))
    axis, reversed_axis = _axial_axis(loaded)
    n_slices = prepared.ras_shape[2]
    voxels_per_z = mask_ras.sum(axis=(0, 1), dtype=np.int64)
    slices = []
    for index in range(n_slices):
        z = n_slices - 1 - index if reversed_axis else index
        probability = by_z.get(z)
        slices.append(
            {
                "index": index,
                "analysed": probability is not None,
                "tumour_probability": probability,
                "predicted_class": None if probability is None else int(probability >= THRESHOLD),
                "mask_voxels": int(voxels_per_z[z]),
            }
        )
    voxel_ml = float(abs(np.linalg.det(loaded.original_affine[:3, :3]))) / 1000.0
    predicted = int(tumour.max() >= THRESHOLD)
    tumour_voxels = int(mask.sum(dtype=np.int64))
    report = {
        "input": str(prepared.item.source),
        "type": "volume",
        "mask": mask_name(prepared.item.name, "volume"),
        "grid_file": str(prepared.item.reference_file),  # the mask has this file's shape, affine and header
        "shape": [int(s) for s in loaded.original_shape],
        "voxel_volume_ml": voxel_ml,
        "axial_axis": axis,
        "preprocessing": settings.summary(),
        "volume": {
            "predicted_class": predicted,
            "predicted_label": LABELS[predicted],
            "max_tumour_probability": float(tumour.max()),
            "mean_tumour_probability": float(tumour.mean()),
            "slices_total": n_slices,
            "slices_analysed": int(tumour.size),
            "slices_predicted_tumour": int((tumour >= THRESHOLD).sum()),
            "tumour_voxels": tumour_voxels,
            "tumour_volume_ml": tumour_voxels * voxel_ml,
        },
        "slices": slices,
    }
    return Prediction(prepared.item, mask, report)


def _finish_image(
    prepared: PreparedImage, seg: torch.Tensor, cls: torch.Tensor, settings: InferenceSettings
) -> Prediction:
    height, width = prepared.shape
    side = max(height, width)
    # Undo preprocess_grey: back to the padded square's size, then cut the centred padding away.
    square = restore_slice(torch.sigmoid(seg[0].float()).numpy(), (side, side), is_mask=True)[0]
    top, left = (side - height) // 2, (side - width) // 2
    mask = np.ascontiguousarray(square[top : top + height, left : left + width])
    probability = float(_tumour_probability(cls)[0])
    predicted = int(probability >= THRESHOLD)
    report = {
        "input": str(prepared.item.source),
        "type": "image",
        "mask": mask_name(prepared.item.name, "image"),
        "shape": [height, width],
        "preprocessing": settings.summary(),
        "tumour_probability": probability,
        "predicted_class": predicted,
        "predicted_label": LABELS[predicted],
        "tumour_pixels": int(mask.sum(dtype=np.int64)),
    }
    return Prediction(prepared.item, mask, report)


def finish(
    prepared: PreparedVolume | PreparedImage, outputs: dict[str, torch.Tensor], settings: InferenceSettings
) -> Prediction:
    """Turn the network's outputs for one input into its mask (sigmoid > 0.5, on the input's grid) and report."""
    seg, cls = outputs["seg"].detach().cpu(), outputs["cls"].detach().cpu()
    if isinstance(prepared, PreparedVolume):
        return _finish_volume(prepared, seg, cls, settings)
    return _finish_image(prepared, seg, cls, settings)


def predict(
    network: Callable[..., dict[str, torch.Tensor]], item: InferenceInput, settings: InferenceSettings
) -> Prediction:
    """Prepare, run and finish one input."""
    prepared = prepare(item, settings)
    return finish(prepared, run_network(network, prepared.image, settings.slice_batch_size, prepared.domain), settings)
