"""What inference must know to reproduce the training preprocessing, and how to read it from a config.

Why not MONAI's ``ConfigParser``: the Deploy app reads the configs that ``ckpt_export`` embeds in ``model.ts``
without MONAI core, so only plain values and ``@_meta_`` references are read here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scripts.data.volumes import MODALITIES
from scripts.flags import as_bool

__all__ = ["DEFAULT_MIN_BRAIN_FRACTION", "InferenceSettings", "make_settings", "settings_from_config"]

# scripts/prepare_data.py's default: training never saw slices with less brain than this.
DEFAULT_MIN_BRAIN_FRACTION = 0.05
DEFAULT_SLICE_BATCH_SIZE = 16
# The config keys that carry the settings (those of configs/inference.yaml and the presets).
_META_REFERENCE = "@_meta_#"
_CONFIG_KEYS = {
    "image_size": "image_size",
    "in_channels": "in_channels",
    "modalities": "modalities",
    "min_brain_fraction": "min_brain_fraction",
    "slice_batch_size": "batch_size",
    "fast_inference": "fast_inference",
    "int8_inference": "int8_inference",
    "min_lesion_voxels": "min_lesion_voxels",
}


@dataclass(frozen=True)
class InferenceSettings:
    """Preprocessing and batching settings of one inference run.

    Attributes:
        image_size: Side of the square slices the network sees (the preset's ``image_size``).
        in_channels: Input channels of the network.
        modalities: Canonical BraTS modality per channel, in order (``("flair",)`` for one channel).
        min_brain_fraction: Axial slices with less brain (nonzero voxels) than this fraction are not analysed, as in
            data preparation; their mask is 0 and their probability is reported as null.
        slice_batch_size: Slices per network call.
        fast_inference: Decode each volume's segmentation on its brain's bounding box only (in the network's input
            grid, so the network sees the pixel scale it was trained at; the encoder, hence the classification,
            still sees whole slices) and, on a CPU, run channels_last weights; False runs whole slices in the
            default layout. On by default: the masks and probabilities agree with whole slices
            (tests/test_fast_inference.py) for less work. Configs without the key (a model.ts exported before it
            existed) get the default.
        int8_inference: Within the fast path on a CPU, run each volume's convolutions in int8, calibrated on a few of
            its slices (:mod:`scripts.inference.quantized`): about a quarter of the float time for the full
            preset's network, where the calibration costs more than it saves on the demo's 64 px slices
            (docs/performance.md). Masks and probabilities agree with float32 to a Dice of 0.99 and a hundredth
            (tests/test_fast_inference.py). Ignored on a GPU and for networks without BatchNorm.
        min_lesion_voxels: Post-processing of a volume's mask: its 3D connected components (26-connectivity) of fewer
            voxels are removed (:func:`scripts.data.lesions.remove_small_lesions`); 0 removes none. The size chosen
            for the model on the validation split (metadata.json ``postprocessing``); 2D images are left as they are.
            Configs without the key (a model.ts exported before it existed) get 0.
    """

    image_size: int
    in_channels: int
    modalities: tuple[str, ...]
    min_brain_fraction: float = DEFAULT_MIN_BRAIN_FRACTION
    slice_batch_size: int = DEFAULT_SLICE_BATCH_SIZE
    fast_inference: bool = True
    min_lesion_voxels: int = 0
    int8_inference: bool = True

    def summary(self) -> dict[str, Any]:
        """The settings as recorded in every output JSON."""
        return {
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "modalities": list(self.modalities),
            "min_brain_fraction": self.min_brain_fraction,
            "fast_inference": self.fast_inference,
            "int8_inference": self.int8_inference,
            "min_lesion_voxels": self.min_lesion_voxels,
        }


def make_settings(
    image_size: int,
    in_channels: int,
    modalities: Sequence[str] | None = None,
    min_brain_fraction: float = DEFAULT_MIN_BRAIN_FRACTION,
    slice_batch_size: int = DEFAULT_SLICE_BATCH_SIZE,
    fast_inference: bool = True,
    min_lesion_voxels: int = 0,
    int8_inference: bool = True,
) -> InferenceSettings:
    """Check and build the settings.

    Args:
        image_size: Side of the network's input slices.
        in_channels: Input channels of the network.
        modalities: Modality per channel; None picks FLAIR for one channel and FLAIR, T1, T1ce, T2 for four, the
            orders ``scripts/prepare_data.py --modalities`` documents.
        min_brain_fraction: See :class:`InferenceSettings`.
        slice_batch_size: See :class:`InferenceSettings`.
        fast_inference: See :class:`InferenceSettings`.
        min_lesion_voxels: See :class:`InferenceSettings`.
        int8_inference: See :class:`InferenceSettings`.

    Raises:
        ValueError: On values that cannot work, naming the setting.
    """
    image_size, in_channels, slice_batch_size = int(image_size), int(in_channels), int(slice_batch_size)
    if modalities is None:
        defaults = {1: ("flair",), len(MODALITIES): MODALITIES}
        if in_channels not in defaults:
            raise ValueError(f"in_channels {in_channels}: set `modalities` to name the modality of each channel")
        modalities = defaults[in_channels]
    modalities = tuple(str(m) for m in modalities)
    if len(modalities) != in_channels or set(modalities) - set(MODALITIES) or len(set(modalities)) != in_channels:
        raise ValueError(
            f"modalities {list(modalities)} do not give one distinct name from {list(MODALITIES)} for each of the "
            f"{in_channels} input channels"
        )
    min_lesion_voxels = int(min_lesion_voxels)
    if image_size < 8 or slice_batch_size < 1 or not 0 <= float(min_brain_fraction) < 1 or min_lesion_voxels < 0:
        raise ValueError(
            f"invalid settings: image_size {image_size} (at least 8), batch size {slice_batch_size} (at least 1), "
            f"min_brain_fraction {min_brain_fraction} (in [0, 1)), min_lesion_voxels {min_lesion_voxels} (0: none)"
        )
    fast = as_bool(fast_inference, "fast_inference")  # `--fast_inference false` arrives as text
    int8 = as_bool(int8_inference, "int8_inference")
    return InferenceSettings(
        image_size, in_channels, modalities, float(min_brain_fraction), slice_batch_size, fast, min_lesion_voxels, int8
    )


def settings_from_config(
    config: Mapping[str, Any], source: str, metadata: Mapping[str, Any] | None = None
) -> InferenceSettings:
    """Settings from a merged bundle config (plain values, as in the presets, or references into the metadata, as
    configs/inference.yaml's ``@_meta_#network_settings#image_size``).

    Args:
        config: Top-level config items, later files already merged over earlier ones.
        source: What the config came from, named in errors (e.g. the model file).
        metadata: The bundle's metadata (``_meta_``), for references into it.

    Raises:
        ValueError: When a setting is missing or is an expression or reference that only a bundle run can resolve.
    """
    values: dict[str, Any] = {}
    for name, key in _CONFIG_KEYS.items():
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, str) and value.startswith(_META_REFERENCE) and metadata is not None:
            value = _metadata_value(metadata, value.removeprefix(_META_REFERENCE).split("#"), source)
        elif isinstance(value, str) and value.startswith(("$", "@", "%")):
            raise ValueError(f"{source}: config item {key!r} is {value!r}; inference needs a plain value")
        values[name] = value
    missing = [
        key for name, key in _CONFIG_KEYS.items() if name in ("image_size", "in_channels") and name not in values
    ]
    if missing:
        raise ValueError(f"{source}: its config does not set {', '.join(missing)}")
    return make_settings(**values)


def _metadata_value(metadata: Mapping[str, Any], keys: Sequence[str], source: str) -> Any:
    value: Any = metadata
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            raise ValueError(f"{source}: its metadata has no {'#'.join(keys)}")
        value = value[key]
    return value
