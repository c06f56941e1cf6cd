"""The network of an inference run: ``model.pt`` in the eager network, or ``model.ts`` on its own.

A ``model.ts`` written by ``python -m monai.bundle ckpt_export`` carries ``metadata.json`` and each config file it
was exported with (``inference.json`` and the preset, e.g. ``demo.json``) under ``<archive>/extra/``. They are
found by listing the archive, not by the file's name (MONAI Deploy's bundle operator looks them up by the file
stem and silently finds nothing in a renamed file), and they give the settings the model was trained with.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .predict import fast_layout
from .settings import InferenceSettings, settings_from_config

__all__ = [
    "SegmentationView",
    "embedded_configs",
    "embedded_metadata",
    "inference_network",
    "load_torchscript",
    "resolve_model_file",
    "settings_from_model",
]

_EXTRA = re.compile(r"^[^/]+/extra/([^/]+\.json)$")
_MAIN_CONFIG = "inference.json"
_METADATA = "metadata.json"

logger = logging.getLogger(__name__)


class SegmentationView(nn.Module):
    """The segmentation output alone, for tools that expect one tensor (``monai.bundle verify_net_in_out``).

    Args:
        network: The multi-task network (eager or TorchScript).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x, True, False)["seg"]


def resolve_model_file(path: Path | str) -> Path:
    """The TorchScript file at ``path``, or the only ``.ts`` file under a folder (MONAI Deploy's models folder)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("*.ts"))
        if len(found) != 1:
            raise UsageError(f"model folder {path} holds {len(found)} .ts files; expected exactly one")
        return found[0]
    if not path.is_file():
        raise UsageError(f"model file {path} does not exist")
    return path


def _extra_files(path: Path) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(path) as archive:
            return {m.group(1): archive.read(name) for name in archive.namelist() if (m := _EXTRA.match(name))}
    except zipfile.BadZipFile as error:
        raise UsageError(f"{path} is not a TorchScript file ({error})") from error


def embedded_metadata(path: Path | str) -> dict[str, Any] | None:
    """The ``metadata.json`` a TorchScript file carries, or None."""
    content = _extra_files(Path(path)).get(_METADATA)
    return None if content is None else json.loads(content)


def embedded_configs(path: Path | str) -> list[tuple[str, dict[str, Any]]]:
    """The config files a TorchScript file carries, ``inference.json`` first, then the others by name.

    TorchScript stores extra files sorted by name, so the order of ``--config_file`` at export is lost; the
    settings merged from them are therefore only trusted when the presets do not contradict each other.
    """
    extras = _extra_files(Path(path))
    names = sorted(n for n in extras if n not in (_MAIN_CONFIG, _METADATA))
    names = ([_MAIN_CONFIG] if _MAIN_CONFIG in extras else []) + names
    return [(name, json.loads(extras[name])) for name in names]


def settings_from_model(path: Path | str, slice_batch_size: int | None = None) -> InferenceSettings:
    """The preprocessing settings a ``model.ts`` was exported with.

    Args:
        path: The TorchScript file.
        slice_batch_size: Overrides the batch size of the embedded config when given.

    Raises:
        UsageError: Without an embedded ``inference.json``, or when two embedded presets set one setting to
            different values.
    """
    configs = embedded_configs(path)
    if not configs or configs[0][0] != _MAIN_CONFIG:
        raise UsageError(
            f"{path} carries no inference.json: export it with `python -m monai.bundle ckpt_export` and "
            "--config_file naming configs/inference.yaml and the preset it was trained with"
        )
    merged = dict(configs[0][1])
    set_by: dict[str, str] = {}
    for name, config in configs[1:]:
        for key, value in config.items():
            if key in set_by and merged[key] != value:
                raise UsageError(f"{path}: embedded {set_by[key]} and {name} disagree on {key!r}")
            merged[key], set_by[key] = value, name
    if slice_batch_size is not None:
        merged["batch_size"] = slice_batch_size
    return settings_from_config(merged, f"model {path}", embedded_metadata(path))


def load_torchscript(
    path: Path | str, device: torch.device | str = "cpu", settings: InferenceSettings | None = None
) -> torch.jit.ScriptModule:
    """Load a TorchScript model in eval mode on ``device``, in the fast path's memory layout when ``settings`` ask
    for it (:func:`scripts.inference.predict.fast_layout`)."""
    network = torch.jit.load(str(path), map_location=device).eval()
    return network if settings is None else fast_layout(network, settings)


def _check_against_model(path: Path, settings: InferenceSettings) -> None:
    exported = settings_from_model(path, slice_batch_size=settings.slice_batch_size)
    differences = [
        f"{name} {getattr(exported, name)!r} (this run: {getattr(settings, name)!r})"
        for name in ("image_size", "in_channels", "modalities")
        if getattr(exported, name) != getattr(settings, name)
    ]
    if differences:
        presets = ", ".join(name for name, _ in embedded_configs(path))
        raise UsageError(
            f"model {path} was exported with {'; '.join(differences)} (embedded configs: {presets}); add the preset "
            "it was exported with to --config_file"
        )


def inference_network(
    model_file: Path | str,
    network_def: nn.Module | None,
    device: torch.device | str,
    settings: InferenceSettings,
    network_settings: Mapping[str, Any] | None = None,
    metadata_file: Path | str = "",
) -> nn.Module:
    """The network to run: ``model.ts`` loaded on its own, or ``network_def`` for a ``model.pt`` checkpoint, in the
    fast path's memory layout when the settings ask for it (:func:`scripts.inference.predict.fast_layout`).

    Args:
        model_file: ``.ts`` (TorchScript, needs no training code) or ``.pt`` (state dict, loaded by the config's
            CheckpointLoader into ``network_def``).
        network_def: The eager network (None when the config disabled it for a ``.ts`` file).
        device: Where to run.
        settings: The run's settings, checked against those embedded in a ``.ts`` file.
        network_settings: The config's network settings, named when a ``.pt`` file's weights do not fit.
        metadata_file: The bundle's ``metadata.json``, which describes its own ``models/model.pt``.

    Raises:
        UsageError: When a ``.ts`` file was exported with other preprocessing settings than the run's, or a ``.pt``
            file's weights do not fit ``network_def``.
    """
    path = Path(model_file)
    if path.suffix == ".ts":
        _check_against_model(path, settings)
        logger.info(f"running TorchScript model {path}")
        return load_torchscript(path, device, settings)
    if network_def is None:
        raise UsageError(f"model file {path} is a checkpoint; the config's network_def is needed to load it")
    from ..networks.checkpoints import require_fitting_weights  # the network code, needed for a .pt file only

    require_fitting_weights(network_def, path, network_settings or {}, metadata_file)
    # The checkpoint is loaded later (the config's CheckpointLoader), into these parameters: in place, so the
    # layout chosen here stays.
    return fast_layout(network_def.to(device), settings)
