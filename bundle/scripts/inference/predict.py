"""The prediction itself: training preprocessing, the network over slice batches, masks and probabilities.

Volumes go through :func:`scripts.data.volumes.load_case` and :func:`scripts.data.slices.extract_slices` exactly as
in data preparation (RAS, robust z-score on brain voxels, display plane, resize); images through
:func:`scripts.data.images.preprocess_grey` as the Kaggle images were. Predictions go back with
:func:`scripts.data.slices.slices_to_volume` and :func:`scripts.data.volumes.to_original_grid`, so a volume's mask
has the input file's shape and voxel order, and an image's mask its size. A volume's mask then loses its 3D
components of fewer than ``InferenceSettings.min_lesion_voxels`` voxels (the post-processing chosen for the model on
validation, :mod:`scripts.data.lesions`); the per-slice voxel counts of the report are those of the final mask.

The fast path (``InferenceSettings.fast_inference``, on by default) decodes a volume's segmentation on its brain's
bounding box only, taken in the network's input grid after the resize (training's pixel scale), and pastes it back
into that grid before the usual put-back; the encoder, and with it the classification, still sees whole slices
(:func:`run_network`). On a CPU the network also runs with channels_last weights (:func:`fast_layout`) and, with
``InferenceSettings.int8_inference``, its convolutions in int8 (:mod:`scripts.inference.quantized`). Slices
with too little brain are not analysed in either path (``min_brain_fraction``, as in data preparation). 2D images
always run whole.

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
from torch import nn

from scripts.data.images import load_grey, preprocess_grey
from scripts.data.lesions import remove_small_lesions
from scripts.data.slices import extract_slices, restore_slice, slices_to_volume
from scripts.data.volumes import DataError, LoadedCase, load_case, to_original_grid

from .inputs import InferenceInput
from .names import mask_name
from .quantized import int8_available, quantize_for_volume
from .settings import InferenceSettings

__all__ = [
    "BACKGROUND_LOGIT",
    "THRESHOLD",
    "Prediction",
    "PreparedImage",
    "PreparedVolume",
    "brain_box",
    "fast_layout",
    "finish",
    "network_device",
    "predict",
    "prepare",
    "run_network",
    "size_divisor",
]

THRESHOLD = 0.5
LABELS = ("no tumour", "tumour")
# The segmentation logit outside a volume's brain box, where the fast path does not run the network: sigmoid
# gives about 1e-13, background that stays far below THRESHOLD through the bilinear put-back, and, unlike -inf,
# it keeps sums and differences of logits finite.
BACKGROUND_LOGIT = -30.0


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
        fast: Decode the segmentation on the volume's brain box only (``InferenceSettings.fast_inference``,
            :func:`run_network`).
        int8: Run the fast path's convolutions in int8 on a CPU (``InferenceSettings.int8_inference``).
    """

    domain = 0
    item: InferenceInput
    image: np.ndarray
    z: np.ndarray
    loaded: LoadedCase
    ras_shape: tuple[int, int, int]
    fast: bool = False
    int8: bool = False


@dataclass
class PreparedImage:
    """A 2D image as the network input.

    Attributes:
        item: The input.
        image: ``(1, C, S, S)`` float32.
        shape: ``(H, W)`` of the image file.
        domain: The network's image domain: whole-head 2D images, as the Kaggle images it trained on.
        fast: Never: a whole-head image has no zero background to crop away.
    """

    domain = 1
    fast = False
    int8 = False
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
    z = np.array([s.z for s in slices], dtype=np.int64)
    int8 = settings.fast_inference and settings.int8_inference
    return PreparedVolume(item, image, z, loaded, ras_shape, fast=settings.fast_inference, int8=int8)


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


def network_device(network: Callable[..., Any]) -> torch.device:
    """Where a network's weights are: that of its first parameter; the CPU for a callable without parameters."""
    parameters = network.parameters() if hasattr(network, "parameters") else iter(())
    first = next(iter(parameters), None)
    return torch.device("cpu") if first is None else first.device


def fast_layout(network: nn.Module, settings: InferenceSettings) -> nn.Module:
    """The network in the fast path's memory layout: channels_last weights on a CPU, in place.

    oneDNN's convolutions run faster in NHWC on a CPU (measured for the full network, docs/performance.md), and with
    NHWC weights every activation follows; the values stay those of the default layout up to rounding. On a GPU
    nothing changes: not measured there. Applied once, where the network is loaded (a module's layout is its own
    state), never per call.
    """
    if settings.fast_inference and isinstance(network, nn.Module) and network_device(network).type == "cpu":
        network.to(memory_format=torch.channels_last)
    return network


def size_divisor(network: Callable[..., Any]) -> int | None:
    """What the network's input height and width must be a multiple of: its encoder's ``2**depth``.

    Read from the network itself, so that it is right for whatever network runs: the eager one, and every
    ``model.ts`` (TorchScript keeps the encoder's ``size_divisor``, which its forward checks, in all versions
    of this bundle). None for a callable that does not say (a frozen module, another runtime).
    """
    divisor = getattr(getattr(network, "encoder", None), "size_divisor", None)
    return int(divisor) if isinstance(divisor, int) and divisor > 0 else None


def _has_parts(network: Callable[..., Any]) -> bool:
    """Whether the network's parts can be called one by one (eager and TorchScript ``MultiTaskModel`` alike:
    ``features`` is exported, and a scripted module's submodules keep their ``forward``)."""
    return all(hasattr(network, name) for name in ("features", "decoder", "cls_head"))


def _aligned_span(occupied: torch.Tensor, divisor: int) -> slice:
    """The rows (or columns) flagged in ``occupied``, widened outwards to multiples of ``divisor``.

    Both ends on the divisor's grid, not just the length: the box then falls on whole pixels of every encoder
    level (each halves the grid, ``depth`` times), so its feature maps are exact sub-windows of the whole slice's.
    """
    indices = torch.nonzero(occupied).flatten()
    first, last = int(indices[0]), int(indices[-1])
    return slice(first // divisor * divisor, -(-(last + 1) // divisor) * divisor)


def brain_box(stack: torch.Tensor, divisor: int | None) -> tuple[slice, slice] | None:
    """One bounding box of the brain (nonzero pixels in any slice and channel) of a ``(K, C, S, S)`` stack.

    The pixels outside the brain are exactly 0 after z-scoring, as in the training slices. One box for the whole
    volume keeps every slice the same shape, so the slices still batch. The box is aligned to the divisor's grid
    (:func:`_aligned_span`), hence inside the slice whenever the slice fits the network (its side a multiple of
    the divisor). None, for whole slices, when there is no divisor, no brain, the slice does not fit the network
    (it then fails as it would on whole slices), or the box is the whole slice.
    """
    height, width = stack.shape[-2:]
    if divisor is None or height % divisor or width % divisor:
        return None
    occupied = stack.ne(0).flatten(0, 1).any(dim=0)
    if not occupied.any():
        return None
    box = (_aligned_span(occupied.any(dim=1), divisor), _aligned_span(occupied.any(dim=0), divisor))
    return None if box == (slice(0, height), slice(0, width)) else box


def _box_at_level(box: tuple[slice, slice], level: int) -> tuple[slice, slice]:
    """The box on the grid of encoder level ``level`` (``2**level`` times coarser), whole pixels by alignment."""
    return tuple(slice(span.start >> level, span.stop >> level) for span in box)


def _paste(seg: torch.Tensor, box: tuple[slice, slice], size: tuple[int, int]) -> torch.Tensor:
    """Segmentation logits of the box back in the whole slice's grid, background (not tumour) around them."""
    whole = torch.full((*seg.shape[:2], *size), BACKGROUND_LOGIT, dtype=seg.dtype, device=seg.device)
    whole[..., box[0], box[1]] = seg
    return whole


def _forward_decoding_box(
    network: Callable[..., Any], batch: torch.Tensor, domain: int, box: tuple[slice, slice]
) -> dict[str, torch.Tensor]:
    """Both outputs, with the decoder run on the brain box only.

    The encoder runs on the whole slices: the classification head pools its whole bottleneck (a global average),
    and the encoder's receptive field spans most of a slice, so an encoder on a crop, however padded, gives other
    tumour probabilities (docs/inference.md). The decoder is local and is about two thirds of the network's work:
    it gets each level's features cut to the box (exact sub-windows, by alignment); only its own zero padding at
    the box's edge, in background, differs from the whole slice.
    """
    features = network.features(batch, domain)
    cropped = []
    for level, feature in enumerate(features):
        rows, cols = _box_at_level(box, level)
        cropped.append(feature[..., rows, cols])
    seg = network.decoder(cropped)
    return {"seg": _paste(seg, box, tuple(batch.shape[-2:])), "cls": network.cls_head(features[-1])}


def run_network(
    network: Callable[..., dict[str, torch.Tensor]],
    image: np.ndarray | torch.Tensor,
    batch_size: int,
    domain: int = 0,
    fast: bool = False,
    int8: bool = False,
) -> dict[str, torch.Tensor]:
    """Run the multi-task network over a stack of slices, ``batch_size`` at a time.

    Args:
        network: The eager or TorchScript model (``forward(x) -> {"seg": ..., "cls": ...}``), in eval mode and on
            the device it should run on.
        image: ``(K, C, S, S)`` stack.
        batch_size: Slices per call.
        domain: The image domain (``PreparedVolume.domain`` or ``PreparedImage.domain``): it picks the encoder's
            BatchNorm statistics.
        fast: Decode only the stack's brain box (:func:`brain_box`, :func:`_forward_decoding_box`) and
            paste the segmentation back into the ``S x S`` grid (``PreparedVolume.fast``); the network
            sees the whole slices' pixel scale either way. Whole slices when the network cannot say its divisor
            or be called part by part.
        int8: With ``fast``, on a CPU, the encoder and decoder in int8, calibrated on the stack
            (:func:`scripts.inference.quantized.quantize_for_volume`); float32 where the network cannot be.

    Returns:
        ``{"seg": (K, 1, S, S) logits, "cls": (K, 2) logits}`` on the CPU.
    """
    stack = torch.as_tensor(image, dtype=torch.float32)
    divisor = size_divisor(network)
    parts = fast and divisor is not None and _has_parts(network)
    box = brain_box(stack, divisor) if parts else None
    if parts and int8 and isinstance(network, nn.Module) and int8_available(network):
        network = quantize_for_volume(network, stack, domain)
        box = box or (slice(0, stack.shape[-2]), slice(0, stack.shape[-1]))
    device = network_device(network)
    seg, cls = [], []
    with torch.inference_mode():
        for start in range(0, stack.shape[0], batch_size):
            batch = stack[start : start + batch_size].to(device)
            if box is None:
                outputs = network(batch, True, True, domain)
            else:
                outputs = _forward_decoding_box(network, batch, domain, box)
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
    mask_ras = remove_small_lesions(mask_ras, settings.min_lesion_voxels)
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
    """Turn the network's outputs for one input into its mask (sigmoid > 0.5, on the input's grid; a volume's without
    its components below ``settings.min_lesion_voxels``) and report."""
    seg, cls = outputs["seg"].detach().cpu(), outputs["cls"].detach().cpu()
    if isinstance(prepared, PreparedVolume):
        return _finish_volume(prepared, seg, cls, settings)
    return _finish_image(prepared, seg, cls, settings)


def predict(
    network: Callable[..., dict[str, torch.Tensor]], item: InferenceInput, settings: InferenceSettings
) -> Prediction:
    """Prepare, run and finish one input."""
    prepared = prepare(item, settings)
    outputs = run_network(
        network, prepared.image, settings.slice_batch_size, prepared.domain, prepared.fast, prepared.int8
    )
    return finish(prepared, outputs, settings)
