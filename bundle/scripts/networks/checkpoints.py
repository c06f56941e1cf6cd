"""Loading weights across the multi-task model and the plain segmentation U-Net, and checking that a model file fits
the network a config builds.

Why not MONAI's ``CheckpointLoader`` alone: it loads a state dict as saved; moving weights between the multi-task
model and the plain U-Net, and naming the settings that differ when a file does not fit, is not in it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError

# Wrappers that training tools put around a state dict: MONAI's CheckpointSaver saves {"model": ...} or
# {"network": ...} depending on the bundle's save_dict, other tools use "state_dict".
_WRAPPER_KEYS = ("model", "network", "state_dict", "net")
_TASK_PREFIXES = ("encoder.", "decoder.", "cls_head.")


class CheckpointMismatchError(UsageError):
    """A checkpoint does not fit the network; the message lists the missing and unexpected keys."""


def _unwrap(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    state = checkpoint
    for key in _WRAPPER_KEYS:
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    # DistributedDataParallel saves its module's keys with a "module." prefix.
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def segmentation_state_dict(checkpoint: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Keep only the encoder and decoder weights: a plain segmentation U-Net checkpoint.

    Args:
        checkpoint: a multi-task state dict, or a checkpoint file's content that wraps one.

    Returns:
        A state dict that :class:`~scripts.networks.SegmentationUNet` loads strictly.
    """
    state = _unwrap(checkpoint)
    return {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder."))}


def load_network_weights(
    network: nn.Module, checkpoint: Mapping[str, object], allow_missing: tuple[str, ...] = ("cls_head.",)
) -> list[str]:
    """Load a checkpoint into ``network``, allowing only whole components under ``allow_missing`` to stay fresh.

    A segmentation U-Net checkpoint (``encoder.*`` and ``decoder.*``) loads into :class:`MultiTaskModel` with a
    newly initialised classification head; a multi-task checkpoint loads into :class:`SegmentationUNet` when its
    head weights are dropped first with :func:`segmentation_state_dict`.

    Args:
        network: the model to load into.
        checkpoint: a state dict or a checkpoint's content (wrapped by "model", "network" or "state_dict").
        allow_missing: key prefixes of components that may be absent from the checkpoint.

    Returns:
        The network's keys that kept their initial values (all under ``allow_missing``).

    Raises:
        CheckpointMismatchError: keys are missing outside ``allow_missing``, or the checkpoint has keys the network
            lacks, or a tensor's shape differs. The message names every such key.
    """
    state = _unwrap(checkpoint)
    problems = {kind: keys for kind, keys in _mismatches(network, state, allow_missing).items() if keys}
    if problems:
        lines = [f"{kind} ({len(keys)}): {'; '.join(keys)}" for kind, keys in problems.items()]
        raise CheckpointMismatchError("\n".join(["Checkpoint does not match the network.", *lines]))
    network.load_state_dict(state, strict=False)
    return sorted(set(network.state_dict()) - set(state))


def _mismatches(
    network: nn.Module, state: Mapping[str, torch.Tensor], allow_missing: tuple[str, ...] = ()
) -> dict[str, list[str]]:
    """The keys that keep a state dict from loading into ``network``, by kind (empty lists where it fits)."""
    expected = network.state_dict()
    return {
        "Missing keys": sorted(k for k in set(expected) - set(state) if not k.startswith(allow_missing)),
        "Unexpected keys": sorted(set(state) - set(expected)),
        "Shape mismatches": [
            f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}"
            for k in sorted(set(state) & set(expected))
            if state[k].shape != expected[k].shape
        ],
    }


def is_bundle_model(metadata_file: str | os.PathLike[str], model_file: str | os.PathLike[str]) -> bool:
    """Whether ``model_file`` is the bundle's own ``models/model.pt``, the model its ``metadata.json`` describes (not
    a baseline's, nor one elsewhere)."""
    bundle_root = Path(metadata_file).resolve().parents[1] if metadata_file else None
    return bundle_root is not None and Path(model_file).resolve() == bundle_root / "models" / "model.pt"


def require_fitting_weights(
    network: nn.Module,
    model_file: str | os.PathLike[str],
    settings: Mapping[str, Any],
    metadata_file: str | os.PathLike[str] = "",
) -> None:
    """Stop with one message naming the file and the settings that differ when the weights in ``model_file`` do not
    fit ``network``; a loader would list every mismatched tensor (hundreds of lines) and name no setting.

    Args:
        network: The network the config builds.
        model_file: A state dict (``model.pt``, plain or wrapped); nothing is checked when the file does not exist.
        settings: The config's network settings (``network_settings``: base_filters, image_size, ...).
        metadata_file: The bundle's ``metadata.json``, whose ``network_settings`` describe its own ``models/model.pt``.

    Raises:
        CheckpointMismatchError: The weights do not fit; the message says which settings differ where it can tell.
    """
    if not os.path.isfile(model_file):
        return
    state = _unwrap(torch.load(model_file, map_location="cpu", weights_only=True))
    problems = {kind: keys for kind, keys in _mismatches(network, state).items() if keys}
    if not problems:
        return
    summary = "; ".join(f"{kind.lower()}: {len(keys)}, e.g. {keys[0]}" for kind, keys in problems.items())
    described = None
    if is_bundle_model(metadata_file, model_file) and os.path.isfile(metadata_file):
        described = json.loads(Path(metadata_file).read_text()).get("network_settings")
    if described:
        differing = [f"{k} {v!r} (this run: {settings.get(k)!r})" for k, v in described.items() if settings.get(k) != v]
        cause = f"{metadata_file} says it was trained with {'; '.join(differing) or 'these same settings'}."
        fix = "Leave the preset out of --config_file (the bundle's metadata.json describes its model.pt)"
    else:
        cause = f"This run's network: {', '.join(f'{k} {v!r}' for k, v in settings.items())}."
        fix = "Add the preset (configs/*.yaml) the model was trained with to --config_file"
    raise CheckpointMismatchError(
        f"{model_file} does not fit the network this config builds ({summary}). {cause} {fix}, or point the "
        "model file at weights trained with this config."
    )
