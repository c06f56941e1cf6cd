"""Loading weights across the multi-task model and the plain segmentation U-Net."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

# Wrappers that training tools put around a state dict: MONAI's CheckpointSaver saves {"model": ...} or
# {"network": ...} depending on the bundle's save_dict, other tools use "state_dict".
_WRAPPER_KEYS = ("model", "network", "state_dict", "net")
_TASK_PREFIXES = ("encoder.", "decoder.", "cls_head.")


class CheckpointMismatchError(RuntimeError):
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
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    not_allowed = [k for k in missing if not k.startswith(allow_missing)]
    wrong_shape = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if not_allowed or unexpected or wrong_shape:
        lines = ["Checkpoint does not match the network."]
        if not_allowed:
            lines.append(f"Missing keys ({len(not_allowed)}): {', '.join(not_allowed)}")
        if unexpected:
            lines.append(f"Unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if wrong_shape:
            lines.append(f"Shape mismatches ({len(wrong_shape)}): {'; '.join(wrong_shape)}")
        raise CheckpointMismatchError("\n".join(lines))
    network.load_state_dict(state, strict=False)
    return missing
